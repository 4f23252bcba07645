"""Benchmark of the PyTorch bridge: one training step of a network κθ(x, y) through the heat
solver, split into network, solver and bridge.

Run under MPI, one ``n x n`` patch per rank (``MPI.Compute_dims`` decomposition)::

    mpiexec -n 2 python bench/bench_torch.py --n 256 --out bench/results/torch_cpu.md

Measured, float64, each time the maximum over ranks of one barrier-synchronised run, the runs
of the four kinds alternating (``--repeats`` of each), reported as min and median:

* step: a whole Adam step of ``gpumpiad.heat.learn``'s set-up (network on this rank's cells,
  the bridged objective: ``--steps`` solver steps and the misfit, backward, the replicated
  parameters' allreduce, the optimiser);
* network: the same step with the objective replaced by a torch function of the same
  gradient shape (``(κ * g).sum()``): network forward and backward, allreduce, optimiser;
* solver: the objective and its pullback through ``gpumpiad.vjp`` on a NumPy κ, no torch;
* bridge: what ``gpumpiad.torch.function`` adds around a call and its backward (DLPack both
  ways, torch's Function machinery, the layout checks), measured directly as the time of a
  bridged cheap objective (``mpi_sum(κ.sum())``) minus that of the same objective through
  ``gpumpiad.vjp``; also the remainder step − network − solver, which carries the noise of
  three measurements.

Results go to ``--out`` (Markdown) on rank 0.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import gpumpiad as gm
import gpumpiad.torch as gt
from gpumpiad import heat
from gpumpiad.heat import inverse, learn

import torch

WORLD = MPI.COMM_WORLD


def timed(fn):
    WORLD.Barrier()
    t0 = time.perf_counter()
    fn()
    return WORLD.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="cells per side of each patch")
    parser.add_argument("--steps", type=int, default=20, help="solver steps per objective")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dims = MPI.Compute_dims(WORLD.size, 2)
    grid = heat.Grid((args.n * dims[0], args.n * dims[1]), dims=dims)
    x, y = grid.coordinates()
    X, Y = np.meshgrid(x, y, indexing="ij")
    u0, f = inverse.initial_state(X, Y), inverse.source(X, Y)
    h = grid.h[0]
    dt = 0.2 * h * h / 2.5
    observed = heat.solve(u0, inverse.true_kappa(X, Y), f, dt, h, args.steps, grid=grid).data

    def misfit(kappa):
        u = heat.solve(u0, kappa, f, dt, h, args.steps, grid=grid)
        return gm.mpi_sum(((u - observed) ** 2).sum(), comm=grid.cart)

    def cheap(kappa):
        return gm.mpi_sum(kappa.sum(), comm=grid.cart)

    J = gt.function(misfit, "distributed", comm=grid.cart)
    J_cheap = gt.function(cheap, "distributed", comm=grid.cart)
    net = learn.network(args.hidden)
    gt.replicate(net, comm=grid.cart)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    xy = torch.from_numpy(np.stack([X.reshape(-1), Y.reshape(-1)], axis=1))
    g = torch.full(grid.local_shape, 1e-3, dtype=torch.float64)
    kappa_np = np.ascontiguousarray(learn.kappa(net, xy, grid.local_shape).detach().numpy())
    kappa_t = torch.from_numpy(kappa_np.copy()).requires_grad_()

    def step():
        optimizer.zero_grad()
        J(learn.kappa(net, xy, grid.local_shape)).backward()
        optimizer.step()

    def network():
        optimizer.zero_grad()
        (learn.kappa(net, xy, grid.local_shape) * g).sum().backward()
        optimizer.step()

    def solver():
        _, pullback = gm.vjp(misfit, gm.tensor(kappa_np, distributed=True, comm=grid.cart))
        pullback(np.ones(()))

    def bridged_cheap():
        kappa_t.grad = None
        J_cheap(kappa_t).backward()

    def direct_cheap():
        _, pullback = gm.vjp(cheap, gm.tensor(kappa_np, distributed=True, comm=grid.cart))
        pullback(np.ones(()))

    kinds = {"step": step, "network": network, "solver": solver,
             "bridged cheap objective": bridged_cheap,
             "cheap objective, gpumpiad.vjp": direct_cheap}
    for fn in kinds.values():
        fn()
    times = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for name, fn in kinds.items():
            times[name].append(timed(fn))
    # The bridge's own cost, many calls per sample: it is tens of microseconds.
    inner = 20
    for name in ("bridged cheap objective", "cheap objective, gpumpiad.vjp"):
        fn = kinds[name]
        times[name] = [timed(lambda: [fn() for _ in range(inner)]) / inner
                       for _ in range(args.repeats)]
    if WORLD.rank == 0:
        report(args, grid, times)


def report(args, grid, times):
    lo = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    bridge = {s: max(0.0, d["bridged cheap objective"] - d["cheap objective, gpumpiad.vjp"])
              for s, d in (("min", lo), ("median", med))}
    rest = {s: d["step"] - d["network"] - d["solver"] for s, d in (("min", lo), ("median", med))}
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rows = [(k, lo[k], med[k]) for k in ("step", "network", "solver")]
    lines = [
        f"# PyTorch bridge benchmark (numpy, float64)",
        "",
        f"- Machine: {cpu}, {os.cpu_count()} CPUs; load average (1 min) at the end of the run: "
        f"{os.getloadavg()[0]:.1f} (other jobs on a shared machine inflate times)",
        f"- {WORLD.size} MPI ranks, decomposition {grid.dims[0]}x{grid.dims[1]}, "
        f"{grid.local_shape[0]}x{grid.local_shape[1]} cells per rank, {args.steps} solver steps "
        f"per objective, MLP 2-{args.hidden}-{args.hidden}-1 on every cell, Adam; torch "
        f"{torch.__version__} ({torch.get_num_threads()} thread per rank), NumPy "
        f"{np.__version__}, Python {platform.python_version()}",
        f"- Command: `mpiexec -n {WORLD.size} python bench/bench_torch.py "
        + " ".join(sys.argv[1:]) + "`",
        f"- Times: {args.repeats} runs of each kind, alternating; each the maximum over ranks.",
        "",
        "| part | min [ms] | median [ms] | share of the step (min) |",
        "|---|---:|---:|---:|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {1e3 * a:.3f} | {1e3 * b:.3f} | "
                     f"{100 * a / lo['step']:.1f} % |")
    lines.append(f"| bridge (bridged cheap objective − the same through gpumpiad.vjp) | "
                 f"{1e3 * bridge['min']:.3f} | {1e3 * bridge['median']:.3f} | "
                 f"{100 * bridge['min'] / lo['step']:.2f} % |")
    lines.append(f"| remainder: step − network − solver | {1e3 * rest['min']:.3f} | "
                 f"{1e3 * rest['median']:.3f} | {100 * rest['min'] / lo['step']:.1f} % |")
    lines += ["",
              f"Bridged cheap objective {1e6 * lo['bridged cheap objective']:.1f} µs, through "
              f"gpumpiad.vjp {1e6 * lo['cheap objective, gpumpiad.vjp']:.1f} µs (min, forward "
              "and backward, each the mean of 20 calls).",
              f"Target: bridge share under 2 % at 256² per rank: "
              f"{100 * bridge['min'] / lo['step']:.2f} % (min), "
              f"{100 * bridge['median'] / med['step']:.2f} % (median)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(text)


if __name__ == "__main__":
    main()
