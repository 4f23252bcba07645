"""Debug-mode and watchdog overhead: collectives and a value_and_grad, ``set_debug(False)`` vs
``True``; waits for a message, watchdog off vs on.

    mpiexec -n 2 python bench/bench_debug.py [--repeats 15] [--cases all|debug|watchdog]
        [--out bench/results/debug_overhead_cpu.md]

Loops of ``mpi_sum`` and ``mpi_bcast`` (waited for) of 8 B, 1 KB and 1 MB float64 arrays, and a
``value_and_grad`` of a small distributed MLP-like program (two tanh layers on each rank's own
batch, weights serial, loss summed with ``mpi_sum``). Debug mode adds one small allgather of a
signature per collective, a checksum of serial values, and the serial-argument checksum and
distributed-argument NaN check at ``value_and_grad``. Each repeat starts after a barrier; the
median over repeats of the slowest rank's time is reported.

The watchdog (``set_timeout``) turns every wait into a loop of ``Testall``: rank 0 posts a
receive of 8 B, the ranks meet at a barrier, rank 1 sends after a busy delay of 0, 20 or 200 µs,
and rank 0 times ``debug.wait`` on the receive, watchdog off (``Waitall``) and on, alternating
repeat by repeat; the minimum and the median of rank 0's wait are reported, with the load
average. Rank 0 writes the tables.
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


DELAYS_US = (0, 20, 200)


def _spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _watchdog_rows(comm, repeats):
    """``(delay µs, off min, off median, on min, on median)`` in µs, rank 0's wait for a
    message rank 1 sends ``delay`` after a barrier; watchdog off and on alternate."""
    from gpumpiad import debug
    payload, buffer = np.ones(1), np.empty(1)
    rows = []
    for delay in DELAYS_US:
        times = {None: [], 60.0: []}
        for rep in range(repeats + 2):
            for limit in times:
                gp.set_timeout(limit)
                request = comm.Irecv(buffer, source=1, tag=7) if comm.rank == 0 else None
                comm.Barrier()
                if comm.rank == 1:
                    _spin(delay * 1e-6)
                    comm.Send(payload, dest=0, tag=7)
                    continue
                t0 = time.perf_counter()
                debug.wait(request, None, "bench receive")
                if rep >= 2:  # two warm-up rounds
                    times[limit].append(time.perf_counter() - t0)
        gp.set_timeout(None)
        if comm.rank != 0:
            continue
        off, on = (np.array(times[k]) * 1e6 for k in (None, 60.0))
        rows.append((delay, off.min(), float(np.median(off)), on.min(), float(np.median(on))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", choices=("all", "debug", "watchdog"), default="all")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    r = comm.rank
    load_before = os.getloadavg()[0]
    watchdog = (_watchdog_rows(comm, max(args.repeats, 30)) if args.cases != "debug"
                and comm.size >= 2 else [])
    cases = []
    for label, n in (SIZES.items() if args.cases != "watchdog" else ()):
        x = np.ones(n)
        loops = 200 if n < 1000 else 20
        cases.append((f"mpi_sum {label}", lambda x=x: gp.mpi_sum(x).numpy(), loops))
        cases.append((f"mpi_bcast {label}", lambda x=x: gp.mpi_bcast(x, root=0).numpy(),
                      loops))
    if args.cases != "watchdog":
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
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
    ]
    if rows:
        lines += [
            "",
            f"`mpiexec -n {comm.size} python bench/bench_debug.py --repeats {args.repeats}`: "
            "median over repeats of the slowest rank's time per call, debug off vs on "
            "(`gpumpiad.set_debug`).",
            "",
            "| case | debug off µs | debug on µs | ratio on/off |",
            "|---|---|---|---|",
        ] + [f"| {n} | {a:.1f} | {b:.1f} | {c:.2f} |" for n, a, b, c in rows]
    if watchdog:
        lines += [
            "",
            "Rank 0's `debug.wait` for an 8 B message rank 1 sends a delay after a barrier, "
            "watchdog off (`Waitall`) vs on (`set_timeout(60)`), alternating; µs.",
            "",
            "| case | watchdog off min µs | off median µs | watchdog on min µs | on median µs |",
            "|---|---|---|---|---|",
        ] + [f"| wait, message after {d} µs | {a:.1f} | {b:.1f} | {c:.1f} | {e:.1f} |"
             for d, a, b, c, e in watchdog]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
