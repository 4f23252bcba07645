"""``mpi_sum`` forward + backward against a raw mpi4py ``Allreduce`` of the same buffer.

    mpiexec -n 2 python bench/bench_mpi_sum.py [--repeats 30]

gpumpiad: ``grad(lambda x: sum(mpi_sum(x)))`` on a serial float64 array (forward allreduce of x,
backward allreduce of the leaf's share: two allreduces, plus the local sum and its broadcast
cotangent). Raw: two ``Comm.Allreduce`` calls on preallocated buffers. Each repeat starts after a barrier; the median over repeats of the slowest
rank's time is reported, with the ratio (target <= 1.05 at 1 MB and above).
"""
from __future__ import annotations

import argparse

import numpy as np
from mpi4py import MPI

import gpumpiad as gp
from _timing import median_time

SIZES = {"8 B": 8, "1 MB": 1 << 20, "64 MB": 64 << 20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    for label, nbytes in SIZES.items():
        n = nbytes // 8
        x = np.random.default_rng(0).standard_normal(n)
        w = np.ones(n)
        grad = gp.grad(lambda x: gp.sum(gp.mpi_sum(x)))
        out = np.empty_like(x)
        back = np.empty_like(x)

        def raw():
            comm.Allreduce(x, out, op=MPI.SUM)
            comm.Allreduce(w, back, op=MPI.SUM)

        repeats = args.repeats if nbytes < (16 << 20) else max(5, args.repeats // 3)
        t_raw = median_time(raw, repeats, comm)
        t_gp = median_time(lambda: grad(x), repeats, comm)
        rows.append((label, t_gp, t_raw))
    if comm.rank == 0:
        print(f"mpi_sum forward+backward vs 2x raw Allreduce, {comm.size} ranks, "
              f"{MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"{'size':>6} {'gpumpiad':>12} {'raw mpi4py':>12} {'ratio':>7}")
        for label, t_gp, t_raw in rows:
            print(f"{label:>6} {1e6 * t_gp:10.1f}us {1e6 * t_raw:10.1f}us {t_gp / t_raw:7.2f}")


if __name__ == "__main__":
    main()
