"""Debug-mode overhead: collectives and a value_and_grad, ``set_debug(False)`` vs ``True``.

    mpiexec -n 2 python bench/bench_debug.py [--repeats 15]
        [--out bench/results/debug_overhead_cpu.md]

Loops of ``mpi_sum`` and ``mpi_bcast`` (waited for) of 8 B, 1 KB and 1 MB float64 arrays, and a
``value_and_grad`` of a small distributed MLP-like program (two tanh layers on each rank's own
batch, weights serial, loss summed with ``mpi_sum``). Debug mode adds one small allgather of a
signature per collective, a checksum of serial values, and the serial-argument checksum and
distributed-argument NaN check at ``value_and_grad``. Each repeat starts after a barrier; the
median over repeats of the slowest rank's time is reported. Rank 0 writes the table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from mpi4py import MPI

import gpumpiad as gp

SIZES = {"8 B": 1, "1 KB": 128, "1 MB": 1 << 17}


def _timed(comm, fn, repeats, loops):
    fn()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append(comm.allreduce((time.perf_counter() - t0) / loops, op=MPI.MAX))
    return statistics.median(times)


def _mlp(r):
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 32)) * 0.3, rng.standard_normal((32, 1)) * 0.3
    # Each rank's own batch: distributed (as plain arrays they would be declared serial, which
    # debug mode reports as "a different value declared serial").
    batch = gp.tensor(np.random.default_rng(1 + r).standard_normal((64, 16)), distributed=True)
    target = gp.tensor(np.random.default_rng(100 + r).standard_normal((64, 1)),
                       distributed=True)

    def loss(w1, w2):
        hidden = gp.tanh(gp.matmul(batch, w1))
        out = gp.tanh(gp.matmul(hidden, w2))
        return gp.mpi_sum(gp.sum((out - target) ** 2))

    vg = gp.value_and_grad(loss, argnums=(0, 1))
    return lambda: vg(w1, w2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    r = comm.rank
    cases = []
    for label, n in SIZES.items():
        x = np.ones(n)
        loops = 200 if n < 1000 else 20
        cases.append((f"mpi_sum {label}", lambda x=x: gp.mpi_sum(x).numpy(), loops))
        cases.append((f"mpi_bcast {label}", lambda x=x: gp.mpi_bcast(x, root=0).numpy(),
                      loops))
    cases.append(("value_and_grad, MLP 16-32-1, batch 64/rank", _mlp(r), 50))
    rows = []
    for name, fn, loops in cases:
        gp.set_debug(False)
        off = _timed(comm, fn, args.repeats, loops)
        gp.set_debug(True)
        on = _timed(comm, fn, args.repeats, loops)
        gp.set_debug(False)
        rows.append((name, off * 1e6, on * 1e6, on / off))
    if r != 0:
        return
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mpi_version = " ".join(MPI.Get_library_version().splitlines()[0].split())
    lines = [
        "# Debug-mode overhead on CPU (NumPy backend)",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, "
        f"NumPy {np.__version__}, {mpi_version}, "
        f"mpi4py {__import__('mpi4py').__version__}; load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
        "",
        f"`mpiexec -n {comm.size} python bench/bench_debug.py --repeats {args.repeats}`: "
        "median over repeats of the slowest rank's time per call, debug off vs on "
        "(`gpumpiad.set_debug`).",
        "",
        "| case | debug off µs | debug on µs | ratio on/off |",
        "|---|---|---|---|",
    ] + [f"| {n} | {a:.1f} | {b:.1f} | {c:.2f} |" for n, a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
