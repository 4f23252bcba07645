"""Host waits per time step on the CUDA stream model (tests/cudamodel), no GPU needed.

Runs ``heat.solve`` (forward) and its gradient on the modelled device at the given number of
ranks and counts, from the model's log of enqueued device work and host waits, per step: the
host waits that come between the previous step's last kernel and this step's first kernel
(each one leaves the GPU idle for a host round trip), the host waits for compute work (on
the compute stream, or the legacy default stream), and all host waits. Also reports that the
run raised no hazard.

    mpiexec -n 2 python bench/bench_stream_model.py [--n 32] [--steps 8] [--cuda-aware 0|1]
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "cudamodel"))
os.environ.setdefault("GPUMPIAD_BACKEND", "cupy")

import cupy  # noqa: E402  (the model)
import heat_kernels  # noqa: E402
import mpi_check  # noqa: E402
import numpy as np  # noqa: E402
from cupy import MODEL  # noqa: E402

heat_kernels.register()

import gpumpiad as gm  # noqa: E402
from gpumpiad import heat  # noqa: E402

mpi_check.install()


def waits_before_each_step(log, kernel):
    """Host waits between the last kernel of one step and the first kernel of the next, per
    step after the first; a step starts at the first ``kernel`` launch after a halo pack (or at
    every launch when nothing is packed)."""
    counts, waits, packed, seen = [], 0, False, False
    for entry in log:
        if entry[0] == "sync":
            waits += 1
        elif entry[2].startswith("halo_pack"):
            packed = True
        elif entry[2].startswith(kernel):
            if seen and (packed or not any(e[2].startswith("halo_pack") for e in log
                                           if e[0] == "op")):
                counts.append(waits)
            seen, waits, packed = True, 0, False
    return counts


def steps_in(log, kernel):
    """Steps in ``log``: ``kernel`` launches that follow a halo pack (each launch when nothing
    is packed)."""
    packs = any(e[0] == "op" and e[2].startswith("halo_pack") for e in log)
    count, packed = 0, False
    for entry in log:
        if entry[0] != "op":
            continue
        if entry[2].startswith("halo_pack"):
            packed = True
        elif entry[2].startswith(kernel) and (packed or not packs):
            count, packed = count + 1, False
    return max(count, 1)


def waits_for_compute(log, kernel, compute):
    """Per step of the time loop (from its first ``kernel`` launch to its last): host waits
    for compute work (on the stream named ``compute`` or the null stream), and all host waits
    (Event.done queries left out). The argument checks before the loop are not counted."""
    launches = [k for k, e in enumerate(log) if e[0] == "op" and e[2].startswith(kernel)]
    log = log[launches[0]:launches[-1] + 1] if launches else []
    steps = steps_in(log, kernel)
    syncs = [e for e in log if e[0] == "sync" and e[1] != "Event.done"]
    on_compute = [e for e in syncs if e[2] in (compute, "null stream")]
    return len(on_compute) / steps, len(syncs) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--periodic", action="store_true")
    args = parser.parse_args()
    size, rank = gm.mpi_size(), gm.mpi_rank()
    grid = heat.Grid((args.n, args.n), dims=(size, 1), periodic=args.periodic)
    rng = np.random.default_rng(rank)
    u0, kappa, f = (cupy.asarray(rng.random(grid.local_shape) + 0.5) for _ in range(3))

    h = 1.0 / args.n
    dt = 0.2 * h * h / 1.5

    def objective(k):
        u = heat.solve(u0, k, f, dt=dt, h=h, steps=args.steps, grid=grid)
        return gm.sum(gm.mpi_sum(gm.sum(u * u)))

    heat.solve(u0, kappa, f, dt=dt, h=h, steps=2, grid=grid)  # warm pools
    start = len(MODEL.log)
    heat.solve(u0, kappa, f, dt=dt, h=h, steps=args.steps, grid=grid)
    from gpumpiad import streams
    compute = streams.compute_stream()._agent.name
    forward = waits_before_each_step(MODEL.log[start:], "heat_step")
    forward_compute = waits_for_compute(MODEL.log[start:], "heat_step", compute)
    start = len(MODEL.log)
    gm.value_and_grad(objective)(gm.tensor(kappa, distributed=True))  # this rank's patch
    adjoint = waits_before_each_step(MODEL.log[start:], "heat_adjoint")
    adjoint_compute = waits_for_compute(MODEL.log[start:], "heat_adjoint", compute)
    from mpi4py import MPI
    rows = MPI.COMM_WORLD.gather((rank, forward, adjoint, forward_compute, adjoint_compute))
    if rank == 0:
        path = os.environ.get("GPUMPIAD_CUDA_AWARE", "probe")
        print(f"{size} rank(s), {args.n}x{args.n}, {args.steps} steps, periodic "
              f"{args.periodic}, GPUMPIAD_CUDA_AWARE={path}: no hazard")
        for r, fw, ad, fc, ac in rows:
            print(f"  rank {r}: host waits before each step's first kernel: forward "
                  f"max {max(fw, default=0)} mean {np.mean(fw) if fw else 0:.2f}; adjoint "
                  f"max {max(ad, default=0)} mean {np.mean(ad) if ad else 0:.2f}; "
                  f"per step, for compute / all: forward {fc[0]:.2f} / {fc[1]:.2f}, "
                  f"adjoint (whole gradient) {ac[0]:.2f} / {ac[1]:.2f}")


if __name__ == "__main__":
    main()
