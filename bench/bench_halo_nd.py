"""The N-D halo exchange against a copy of the padded field: 3-D patches of 64³ cells per rank.

Run:  python bench/bench_halo_nd.py [--n 64] [--repeats 15] [--sizes 16,32,64]
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

A second table compares, at width 1 without corners and patches of ``--sizes`` cells per
axis, one round of ``gpumpiad.halo.PaddedExchange`` (``post`` then ``finish`` on an array,
its buffers and persistent requests made once) with the same round through the N-D
exchange's in-place form (its buffers made at the grid's first exchange of such fields and
reused, its persistent requests likewise) and with ``halo_exchange`` (which copies the field first),
all against a copy of the padded field:
the four alternate within each repeat, so that every ratio compares runs made under the same
load. Entries are ``min / median``; ratios are of the minima and of the medians.

The load average is printed with each table: the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

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


def alternating(fns, repeats, comm=MPI.COMM_WORLD):
    """``(min, median)`` of the slowest rank's time of each of ``fns``, called in turn within
    each of ``repeats`` rounds (one warm-up round first), a barrier before each call."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, runs):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            out.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return [(min(r), statistics.median(r)) for r in runs]


def ratio(a, b):
    return f"{a[0] / b[0]:.2f} / {a[1] / b[1]:.2f}"


def padded_rows(sizes, repeats, comm=MPI.COMM_WORLD):
    """One PaddedExchange round, the in-place N-D round and halo_exchange, against a copy."""
    P, rows = comm.size, []
    for n in sizes:
        with gm.Grid((n * P, n, n), dims=(P, 1, 1), periodic=True) as grid:
            u = np.random.default_rng(comm.rank).standard_normal(grid.padded_shape)
            work, again = u.copy(), u.copy()
            ex = halo.PaddedExchange(grid, u.shape, u.dtype)

            def padded():
                ex.post(work)
                ex.finish(work)

            copy, round_, nd_round, exchange = alternating(
                [lambda: u.copy(), padded,
                 lambda: halo._exchange_nd((again,), grid, (1, 1, 1), False, False),
                 lambda: gm.halo_exchange(u, grid)], repeats, comm)
            ex.free()
            rows.append((n, copy, round_, nd_round, exchange))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="cells per axis of each patch")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sizes", default="16,32,64",
                        help="cells per axis of each patch in the PaddedExchange table")
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
    padded = padded_rows([int(v) for v in args.sizes.split(",")], args.repeats, comm)
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
        print()
        print(f"ranks {P}, width 1, no corners, dims {grid.dims}, periodic, float64, load "
              f"average {os.getloadavg()[0]:.1f}; ratios: of the minima / of the medians")
        print("| patch | copy (ms) | PaddedExchange round (ms) | / copy | in-place N-D round "
              "(ms) | / copy | halo_exchange (ms) | / copy | PaddedExchange / N-D round |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n, copy, rnd, nd_round, ex in padded:
            print(f"| {n}³ | {cell(copy)} | {cell(rnd)} | {ratio(rnd, copy)} | "
                  f"{cell(nd_round)} | {ratio(nd_round, copy)} | {cell(ex)} | "
                  f"{ratio(ex, copy)} | {ratio(rnd, nd_round)} |")


if __name__ == "__main__":
    main()
