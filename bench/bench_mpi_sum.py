"""``mpi_sum`` forward + backward against raw mpi4py ``Allreduce`` calls moving the same data.

    mpiexec -n 2 python bench/bench_mpi_sum.py [--repeats 30]

Three programs, float64, 8 B / 1 MB / 64 MB per rank:

- ``vjp serial``: ``value, pullback = vjp(mpi_sum, x)`` and ``pullback(ȳ)`` for a serial ``x``:
  the forward allreduce of x and the reverse allreduce of the shares (x is a term on every
  rank, so its cotangent is P·ȳ). Raw: two ``Allreduce`` calls (x, then ȳ).
- ``vjp distributed``: the same for a distributed ``x``: ȳ passes straight back to every
  rank's term, no reverse communication. Raw: one ``Allreduce``.
- ``grad of sum``: ``grad(lambda x: sum(mpi_sum(x)))``, serial x: the two allreduces plus the
  loss's own array work (the local sum, its broadcast cotangent written out for MPI). Raw: the
  same two ``Allreduce`` calls, not that array work.

The raw floor is the communication raw mpi4py needs for the same value and gradient, nothing
more: blocking ``Allreduce`` calls on preallocated buffers that the loop reuses (cache-hot, no
copy of its own). gpumpiad's figure also holds what the library guarantees and raw code does
not: the copy that gives value semantics (the reduction copies into its result and reduces in
place) and the signature of the array's size and dtype reduced with it and checked. The reverse pass makes the same round trips as raw code: the ranks' agreement on which
serial values receive per-rank shares needs no message for these programs (the sum is the last
collective and the argument is small, see ``gpumpiad/tape.py``).

Each repeat times the raw program and then gpumpiad's, alternating, each after a barrier, so
that both see the same load; the median over repeats of the slowest rank's time is reported,
with the ratio, then the minimum, and the load average before and after. The targets are
for ``value_and_grad`` of ``mpi_sum``, the ``grad of sum`` program (``bench/run.py`` reports
it), at 2 ranks: <= 1.2 at 1 MB, <= 5 at 8 B.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from mpi4py import MPI

import gpumpiad as gp

SIZES = {"8 B": 8, "1 MB": 1 << 20, "64 MB": 64 << 20}
PROGRAMS = ("vjp serial", "vjp distributed", "grad of sum")


def programs(comm, n):
    """``{name: (gpumpiad program, raw program)}`` for ``n`` float64 elements."""
    x = np.random.default_rng(0).standard_normal(n)
    ybar = np.random.default_rng(1).standard_normal(n)
    x_dist = gp.tensor(x * (comm.rank + 1), distributed=True)
    out, back = np.empty_like(x), np.empty_like(x)

    def raw_once():
        comm.Allreduce(x, out, op=MPI.SUM)

    def raw_twice():
        comm.Allreduce(x, out, op=MPI.SUM)
        comm.Allreduce(ybar, back, op=MPI.SUM)

    def vjp(arg):
        def run():
            _, pullback = gp.vjp(gp.mpi_sum, arg)
            return pullback(ybar)
        return run

    grad = gp.grad(lambda t: gp.sum(gp.mpi_sum(t)))
    return dict(zip(PROGRAMS, ((vjp(x), raw_twice), (vjp(x_dist), raw_once),
                               (lambda: grad(x), raw_twice))))


def alternating(ours, raw, repeats, comm):
    """Per-repeat times of ``raw()`` and ``ours()``, alternating (one warm-up run each): the
    slowest rank's time of each, every run after a barrier."""
    ours()
    raw()
    times = {"ours": [], "raw": []}
    for _ in range(repeats):
        for key, fn in (("raw", raw), ("ours", ours)):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            times[key].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return times["ours"], times["raw"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    load_before = os.getloadavg()[0]
    for label, nbytes in SIZES.items():
        repeats = args.repeats if nbytes < (16 << 20) else max(5, args.repeats // 3)
        for name, (ours, raw) in programs(comm, nbytes // 8).items():
            t_gp, t_raw = alternating(ours, raw, repeats, comm)
            rows.append((name, label, t_gp, t_raw))
    if comm.rank == 0:
        print(f"mpi_sum forward+backward vs raw Allreduce, {comm.size} ranks, "
              f"{MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"{'program':>16} {'size':>6} {'gpumpiad':>12} {'raw mpi4py':>12} {'ratio':>7}")
        rows.sort(key=lambda r: PROGRAMS.index(r[0]))
        for name, label, t_gp, t_raw in rows:
            gp_med, raw_med = statistics.median(t_gp), statistics.median(t_raw)
            print(f"{name:>16} {label:>6} {1e6 * gp_med:10.1f}us {1e6 * raw_med:10.1f}us "
                  f"{gp_med / raw_med:7.2f}")
        print("minimum over repeats:")
        for name, label, t_gp, t_raw in rows:
            print(f"  min {name:>16} {label:>6} {1e6 * min(t_gp):10.1f}us "
                  f"{1e6 * min(t_raw):10.1f}us {min(t_gp) / min(t_raw):7.2f}")
        print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
