"""The N-D halo exchange against a copy of the padded field: 3-D patches of 64³ cells per rank.

Run:  python bench/bench_halo_nd.py [--n 64] [--repeats 15]
      mpiexec -n 2 python bench/bench_halo_nd.py

The patches are split along x (``dims = (P, 1, 1)``); periodic along every axis, so every rank
exchanges all six faces (at 1 rank, with itself). Timed per row, each the median over repeats
of the slowest rank's time after a barrier:

* copy: ``u.copy()`` of the padded float64 field (what the exchange's forward copies first);
* exchange: ``gpumpiad.halo_exchange(u, grid, width, corners)`` outside any tape;
* in place: the exchange's rounds on an array, without the copy (what it costs on top);
* adjoint: the pullback of ``vjp`` of the exchange (copy, send back, add);
* 2 fields: both fields in one call (one message per neighbour), against one field.

Each entry is ``min / median`` over the repeats; ratios are of the minima, against the copy.
The load average is printed with the table: the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from mpi4py import MPI

import gpumpiad as gm
from gpumpiad import halo

import _timing


def timed(fn, repeats, comm=MPI.COMM_WORLD):
    """``(min, median)`` of :func:`_timing.times`."""
    runs = _timing.times(fn, repeats, comm)
    return min(runs), statistics.median(runs)


def cell(t):
    return f"{t[0] * 1e3:.3f} / {t[1] * 1e3:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="cells per axis of each patch")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    P, n = comm.size, args.n
    grid = gm.Grid((n * P, n, n), dims=(P, 1, 1), periodic=True)
    rows = []
    for width in (1, 2):
        shape = tuple(m + 2 * width for m in grid.local_shape)
        u = np.random.default_rng(comm.rank).standard_normal(shape)
        y = np.random.default_rng(comm.rank + 1).standard_normal(shape)
        widths = (width,) * 3
        copy = timed(lambda: u.copy(), args.repeats)
        for corners in (False, True):
            exchange = timed(lambda: gm.halo_exchange(u, grid, width, corners),
                                   args.repeats)
            work = u.copy()
            in_place = timed(lambda: halo._exchange_nd((work,), grid, widths, corners,
                                                             False), args.repeats)
            _, pullback = gm.vjp(lambda x: gm.halo_exchange(x, grid, width, corners),
                                 gm.tensor(u, distributed=True))
            adjoint = timed(lambda: pullback(y), args.repeats)
            both = timed(lambda: gm.halo_exchange((u, y), grid, width, corners),
                               args.repeats)
            rows.append((width, corners, copy, exchange, in_place, adjoint, both))
    if comm.rank == 0:
        print(f"ranks {P}, patch {n}³ float64 per rank, dims {grid.dims}, periodic, "
              f"load average {os.getloadavg()[0]:.1f}")
        print("| width | corners | copy (ms) | exchange (ms) | / copy | in place (ms) | "
              "adjoint (ms) | / copy | 2 fields, 1 call (ms) | / exchange |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for width, corners, copy, ex, ip, adj, both in rows:
            print(f"| {width} | {'yes' if corners else 'no'} | {cell(copy)} | {cell(ex)} | "
                  f"{ex[0] / copy[0]:.1f} | {cell(ip)} | {cell(adj)} | {adj[0] / copy[0]:.1f} | "
                  f"{cell(both)} | {both[0] / ex[0]:.2f} |")


if __name__ == "__main__":
    main()
