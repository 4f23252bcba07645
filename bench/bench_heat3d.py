"""The 3-D heat solver's time step against its parts: the bare kernel and the halo exchange.

    mpiexec -n 1 python bench/bench_heat3d.py [--sizes 48 96] [--steps 10] [--repeats 5]
    mpiexec -n 2 python bench/bench_heat3d.py ...      # (2, 1, 1) patches: one exchanged side

For each global size n³ (patches by MPI's choice of dims), in one run, alternating within each
repeat (every contender the slowest rank's time, barrier-synchronised):

* kernel: one ``hostkernels3d.step`` over the whole patch interior;
* exchange: one ``halo.PaddedExchange`` post + finish of a padded state;
* solve step: ``heat.solve(..., steps)`` without a tape, divided by ``steps`` (the solve's
  fixed cost, argument checks and padded copies, spread over the steps);
* gradient: ``value_and_grad`` w.r.t. kappa of ``mpi_sum(sum(u*u))`` over the same solve.

Reported as ratios: exchange / kernel, solve step / kernel, gradient / forward solve, and the
per-step overhead beyond kernel + exchange in microseconds (min: of each contender's own
minimum, so the overhead's min may be negative under load). Min and median over the repeats,
the load average before and after. Appends a section to ``--out`` (rank 0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
from bench_heat_kernels import _machine  # noqa: E402

import gpumpiad as gm  # noqa: E402
from gpumpiad import halo  # noqa: E402
from gpumpiad.heat import hostkernels3d, solve  # noqa: E402


def measure(n, steps, repeats, dtype):
    """``{contender: [seconds per repeat]}`` for ``n``³ cells over the world's ranks."""
    grid = gm.Grid((n, n, n))
    rng = np.random.default_rng(grid.rank)
    shape = grid.local_shape
    u0, f = rng.random(shape).astype(dtype), rng.random(shape).astype(dtype)
    kappa = (0.5 + rng.random(shape)).astype(dtype)
    h = grid.h[0]
    dt = 0.9 * h * h / (6 * 1.5)
    padded = [np.zeros(grid.padded_shape, dtype) for _ in range(4)]
    for p, a in zip(padded, (u0, kappa, f)):
        p[1:-1, 1:-1, 1:-1] = a
    exchange = halo.PaddedExchange(grid, grid.padded_shape, dtype)

    def kernel():
        hostkernels3d.step(padded[0], padded[1], padded[2], padded[3], dt / (h * h), dt)

    def halos():
        exchange.post(padded[0])
        exchange.finish(padded[0])

    def forward():
        solve(u0, kappa, f, dt, h, steps, grid=grid)

    def loss(k):
        u = solve(u0, k, f, dt, h, steps, grid=grid)
        return gm.mpi_sum((u * u).sum())

    def gradient():
        gm.value_and_grad(loss)(gm.tensor(kappa, distributed=True))

    contenders = {"kernel": kernel, "exchange": halos, "forward": forward,
                  "gradient": gradient}
    results = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            results[name] += _timing.times(fn, 1)
    exchange.free()
    grid.free()
    return grid.dims, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 96])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "heat3d_solver_cpu.md"))
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    dtype = np.dtype(args.dtype)
    load_before = os.getloadavg()[0]
    header = ["| cells | dims | kernel min [ms] | kernel median [ms] | exchange min [ms] | "
              "exchange median [ms] | exchange / kernel min | exchange / kernel median | "
              "step / kernel min | step / kernel median | overhead per step min [µs] | "
              "overhead per step median [µs] | gradient / forward min | "
              "gradient / forward median |", "|---:|---|" + "---:|" * 12]
    if comm.rank == 0:
        print("\n".join(header), flush=True)
    rows = []
    for n in args.sizes:
        dims, r = measure(n, args.steps, args.repeats, dtype)
        r["step"] = [t / args.steps for t in r["forward"]]
        r["overhead"] = [(s - k - e) * 1e6 for s, k, e in
                         zip(r["step"], r["kernel"], r["exchange"])]
        lo = {name: min(v) for name, v in r.items()}
        mid = {name: statistics.median(v) for name, v in r.items()}
        cells = [f"{n}³", "x".join(map(str, dims))]
        cells += [f"{lo['kernel'] * 1e3:.3f}", f"{mid['kernel'] * 1e3:.3f}",
                  f"{lo['exchange'] * 1e3:.3f}", f"{mid['exchange'] * 1e3:.3f}"]
        for top, bottom in (("exchange", "kernel"), ("step", "kernel")):
            cells += [f"{lo[top] / lo[bottom]:.3f}", f"{mid[top] / mid[bottom]:.3f}"]
        cells += [f"{lo['overhead']:.0f}", f"{mid['overhead']:.0f}",
                  f"{lo['gradient'] / lo['forward']:.2f}",
                  f"{mid['gradient'] / mid['forward']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
        if comm.rank == 0:
            print(rows[-1], flush=True)
    if comm.rank != 0:
        return
    model, cores, caches = _machine()
    lines = [
        "",
        f"## {comm.size} rank(s), {dtype.name}, {args.steps} steps per solve",
        "",
        f"- CPU: {model} ({cores}); load average (1 min) {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end",
        f"- `mpiexec -n {comm.size} python bench/bench_heat3d.py --sizes "
        f"{' '.join(map(str, args.sizes))} --steps {args.steps} --repeats {args.repeats} "
        f"--dtype {dtype.name}`; min / median over {args.repeats} alternating repeats",
        "",
        *header,
        *rows,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# 3-D heat solver: a time step against its kernel and its halo "
                       "exchange (CPU)\n")
    with out.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
