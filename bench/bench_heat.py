"""Benchmark of the distributed heat solver: throughput, halo cost, gradient cost.

Run under MPI, one patch of ``n x n`` cells per rank (``MPI.Compute_dims`` decomposition)::

    mpiexec -n 2 python bench/bench_heat.py --n 1024 --steps 100            # CPU
    GPUMPIAD_BACKEND=cupy mpiexec -n 2 python bench/bench_heat.py --n 4096  # GPU target
    GPUMPIAD_BACKEND=cupy mpiexec -n 1 python bench/bench_heat.py --n 4096 --periodic

Two ranks on one GPU time-share it (their kernels and copies interleave), which inflates
every synchronisation; one rank on a periodic grid exchanges all four sides with itself
through MPI and measures the halo's cost without that.

Measured, float64, times are the maximum over ranks of the best of ``--repeats``:

* ``copy4``: bandwidth of ``d = a + b + c`` over ``n^2`` cells (3 reads + 1 write), the same
  kernel build as the solver's (``copy4`` in ``kernels/heat.cu``), all ranks at once;
* T_eff of the step kernel alone and of a solver step (halo exchange included; overlapped on a
  GPU) at 32 B/cell, of the fused adjoint kernel at 64 B/cell (all cotangents) and at 48 B/cell
  (kappa's alone: what a gradient with respect to kappa runs), each as a ratio to ``copy4``;
* solver step time with halo exchange over kernel step time without it; the solver step is the
  marginal one, ``(t(N steps) - t(0 steps)) / N``, so that a solve's fixed cost (checks,
  padded copies of the inputs, the result's copy) is reported apart. With few steps of a large
  grid that fixed cost's own spread (first-touched pages) swamps the difference, so the loop
  the host solver runs -- blocking exchange, then the step kernel, two buffers in turn -- is
  also timed on its own;
* gradient time (forward + reverse, ``value_and_grad``) over forward time: with respect to kappa
  storing all states and with ``--checkpoints`` states (binomial recomputation), and with
  respect to (u0, kappa, f) together storing all states.

Results go to ``--out`` (Markdown) on rank 0.

``--overhead`` measures instead, for each of ``--sizes`` (float64, one patch per rank), what a
solver step costs beyond its bare kernel and what a solve costs whatever its steps:

* bare kernel: one call of the host step kernel over the whole patch less one over an empty
  rectangle (the call itself), through the loaded library;
* solver step: ``(t(N steps) - t(0 steps)) / N`` of ``solve`` (halo exchange included);
* per-step overhead: solver step less bare kernel; fixed cost: ``t(0 steps)``;
* gradient / forward: ``value_and_grad`` with respect to kappa, all states stored, over the
  forward solve of the same steps.

The four are timed in turn in each of ``2 * --repeats`` rounds, so that the bare kernel runs
beside the solver step it is subtracted from; each figure is the minimum over the rounds
(maximum over ranks), with the median beside it; it prints one table, which ``--out`` also
receives::

    mpiexec -n 1 python bench/bench_heat.py --overhead --sizes 64 128 256 512 1024
    mpiexec -n 2 python bench/bench_heat.py --overhead --sizes 64 128 256 512 1024

``--adjoint-loop`` compares, for each of ``--sizes`` on one patch per rank, the gradient /
forward ratio (with respect to kappa, all states stored, ``max(20, min(1000, 2e7 / n^2))``
steps) of the host reverse pass in one kernel call (a patch no other rank borders) against the
same reverse pass one kernel call per step, in ``2 * --repeats`` alternating batches of
``--repeats`` runs each; it prints min and median of each and the load average, and ``--out``
receives the table when given::

    mpiexec -n 1 python bench/bench_heat.py --adjoint-loop --sizes 64 256 1024
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

import gpumpiad
from gpumpiad import halo
from gpumpiad.backend import array_module, synchronize
from gpumpiad.heat import Grid, recompute_steps, solve
from gpumpiad.heat.kernels import kernels_for


def timed(fn, xp, repeats, median=False):
    """Best wall time of ``fn()`` over ``repeats`` runs, maximum over ranks (and the median's,
    with ``median``)."""
    comm = MPI.COMM_WORLD
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        out = fn()
        synchronize(out if out is not None else xp.zeros(1))
        times.append(time.perf_counter() - t0)
    best = comm.allreduce(min(times), op=MPI.MAX)
    if median:
        return best, comm.allreduce(float(np.median(times)), op=MPI.MAX)
    return best


def bare_step(n):
    """A function returning this rank's seconds of the host step kernel over an ``n x n``
    patch without the call's own cost: a batch of calls over the patch less one over an empty
    rectangle, per call."""
    from gpumpiad.heat import hostkernels
    fn = hostkernels._fn("host_heat_step", np.dtype(np.float64))
    rng = np.random.default_rng(0)
    fields = [rng.random((n + 2, n + 2)) for _ in range(4)]   # u, kappa, f, out
    addresses = [a.ctypes.data for a in fields]
    count = max(10, min(20000, int(2e7 / (n * n))))

    def batch(i1, fields=fields):   # the fields live as long as the function
        t0 = time.perf_counter()
        for _ in range(count):
            fn(*addresses, n, n, 0.2, 1e-3, 1, i1, 1, n + 1)
        return (time.perf_counter() - t0) / count

    batch(n + 1)
    return lambda: batch(n + 1) - batch(1)


def overhead(opts):
    """The ``--overhead`` table: per-step overhead, fixed cost and gradient / forward."""
    comm = MPI.COMM_WORLD
    dims = MPI.Compute_dims(comm.size, [0, 0])
    rows = []
    for n in opts.sizes:
        steps = max(20, min(1000, int(2e7 / (n * n))))
        grid = Grid((dims[0] * n, dims[1] * n), dims=dims)
        h = grid.h[0]
        rng = np.random.default_rng(comm.rank)
        u0 = rng.random(grid.local_shape)
        kappa = 0.5 + 0.5 * rng.random(grid.local_shape)
        f = rng.random(grid.local_shape)
        dt = 0.2 * h * h
        bare = bare_step(n)

        def once(fn):
            comm.Barrier()
            t0 = time.perf_counter()
            synchronize(fn())
            return time.perf_counter() - t0

        def objective(k):
            u = solve(u0, k, f, dt, h, steps, grid=grid)
            return gpumpiad.mpi_sum((u * u).sum())

        vg = gpumpiad.value_and_grad(objective)
        karg = gpumpiad.tensor(kappa, distributed=True)
        calls = {"kernel": bare,
                 "forward": lambda: once(lambda: solve(u0, kappa, f, dt, h, steps,
                                                       grid=grid).data),
                 "zero": lambda: once(lambda: solve(u0, kappa, f, dt, h, 0, grid=grid).data),
                 "gradient": lambda: once(lambda: vg(karg)[1])}
        for fn in calls.values():
            fn()
        # Every contender once per round, in turn: load on a shared machine hits all alike,
        # and the bare kernel is timed beside the solver step it is subtracted from.
        runs = {name: [] for name in calls}
        for _ in range(2 * opts.repeats):
            for name, fn in calls.items():
                runs[name].append(fn())
        best = {name: comm.allreduce(min(t), op=MPI.MAX) for name, t in runs.items()}
        mid = {name: comm.allreduce(float(np.median(t)), op=MPI.MAX)
               for name, t in runs.items()}
        kernel = best["kernel"], mid["kernel"]
        t_fwd = best["forward"], mid["forward"]
        t_zero = best["zero"], mid["zero"]
        t_grad = best["gradient"], mid["gradient"]
        step = (t_fwd[0] - t_zero[0]) / steps, (t_fwd[1] - t_zero[1]) / steps
        rows.append(dict(n=n, steps=steps, kernel=kernel, step=step,
                         over=(step[0] - kernel[0], step[1] - kernel[1]), fixed=t_zero,
                         ratio=(t_grad[0] / t_fwd[0], t_grad[1] / t_fwd[1])))
        grid.free()
    if comm.rank != 0:
        return
    from gpumpiad.heat import hostkernels
    info = getattr(hostkernels, "build_info", lambda: {"flags": hostkernels.CXXFLAGS})()
    cpu, _ = machine()
    us = 1e6
    lines = [
        f"## Per-step overhead, {comm.size} rank(s) ({dims[0]}x{dims[1]}), float64",
        "",
        f"- Machine: {cpu}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}",
        f"- Host build: `{' '.join(info['flags'])}`; gpumpiad from "
        f"`{Path(gpumpiad.__file__).parent}`",
        f"- min (median) of {2 * opts.repeats} rounds, each timing the bare kernel, the "
        "forward, the 0-step solve and the gradient in turn; maximum over ranks",
        "",
        "| n | steps | bare kernel [µs] | solver step [µs] | overhead/step [µs] | "
        "fixed cost/solve [ms] | gradient / forward |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['steps']} | {r['kernel'][0] * us:.1f} ({r['kernel'][1] * us:.1f})"
            f" | {r['step'][0] * us:.1f} ({r['step'][1] * us:.1f}) | "
            f"{r['over'][0] * us:.1f} ({r['over'][1] * us:.1f}) | "
            f"{r['fixed'][0] * 1e3:.3f} ({r['fixed'][1] * 1e3:.3f}) | "
            f"{r['ratio'][0]:.2f} ({r['ratio'][1]:.2f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out_given:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        with open(opts.out, "a") as out:
            out.write(text + "\n")


def adjoint_loop(opts):
    """The ``--adjoint-loop`` table: gradient / forward, reverse pass in one call or per step."""
    from gpumpiad.heat import hostkernels, solver

    comm = MPI.COMM_WORLD
    dims = MPI.Compute_dims(comm.size, [0, 0])
    one_call = solver._Heat._adjoints_host
    rows = []
    for n in opts.sizes:
        steps = max(20, min(1000, int(2e7 / (n * n))))
        grid = Grid((dims[0] * n, dims[1] * n), dims=dims)
        h = grid.h[0]
        rng = np.random.default_rng(comm.rank)
        u0 = rng.random(grid.local_shape)
        kappa = 0.5 + 0.5 * rng.random(grid.local_shape)
        f = rng.random(grid.local_shape)
        dt = 0.2 * h * h

        def objective(k):
            u = solve(u0, k, f, dt, h, steps, grid=grid)
            return gpumpiad.mpi_sum((u * u).sum())

        vg = gpumpiad.value_and_grad(objective)
        karg = gpumpiad.tensor(kappa, distributed=True)
        times = {"forward": [], "one call": [], "per step": []}
        for k in range(2 * opts.repeats):
            times["forward"].append(timed(lambda: solve(u0, kappa, f, dt, h, steps,
                                                         grid=grid).data, np, opts.repeats))
            order = ("one call", "per step") if k % 2 == 0 else ("per step", "one call")
            for name in order:
                solver._Heat._adjoints_host = (one_call if name == "one call"
                                               else lambda self, *a: None)
                try:
                    times[name].append(timed(lambda: vg(karg)[1], np, opts.repeats))
                finally:
                    solver._Heat._adjoints_host = one_call
        stats = {name: (min(t), float(np.median(t))) for name, t in times.items()}
        fwd = stats["forward"]
        rows.append(dict(n=n, steps=steps, fwd=fwd,
                         **{name: (*stats[name], stats[name][0] / fwd[0],
                                   stats[name][1] / fwd[1])
                            for name in ("one call", "per step")}))
        grid.free()
    load = os.getloadavg()
    if comm.rank != 0:
        return
    info = hostkernels.build_info()
    cpu, _ = machine()
    lines = [
        f"## Reverse pass in one host call against one call per step, {comm.size} rank(s) "
        f"({dims[0]}x{dims[1]}), float64, d/d kappa, all states stored",
        "",
        f"- Machine: {cpu}; load average (1, 5 min) at the end: {load[0]:.1f}, {load[1]:.1f}",
        f"- Host build: `{' '.join(info['flags'])}`; gpumpiad from "
        f"`{Path(gpumpiad.__file__).parent}`",
        f"- {2 * opts.repeats} alternating batches (forward, then the two gradients in "
        f"alternating order), each the best of {opts.repeats} runs; min (median) over the "
        "batches; ratios: min over min (median over median)",
        "",
        "| n | steps | forward [ms] | gradient, one call [ms] | gradient, per step [ms] | "
        "gradient / forward, one call | gradient / forward, per step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        new, old = r["one call"], r["per step"]
        lines.append(
            f"| {r['n']} | {r['steps']} | {r['fwd'][0] * 1e3:.1f} ({r['fwd'][1] * 1e3:.1f}) | "
            f"{new[0] * 1e3:.1f} ({new[1] * 1e3:.1f}) | {old[0] * 1e3:.1f} ({old[1] * 1e3:.1f})"
            f" | {new[2]:.2f} ({new[3]:.2f}) | {old[2]:.2f} ({old[3]:.2f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out_given:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        with open(opts.out, "a") as out:
            out.write(text + "\n")


def loop(fn, count):
    def run():
        out = None
        for _ in range(count):
            out = fn()
        return out
    return run


def machine():
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict((k.strip(), v.strip()) for k, v in
                    (line.split(":", 1) for line in out.splitlines() if ":" in line))
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = (f"{info.get('Model name', platform.processor())}, "
           f"{info.get('CPU(s)', os.cpu_count())} CPUs")
    gpu = ""
    if gpumpiad.backend_name() == "cupy":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        gpu = props["name"].decode()
    return cpu, gpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="cells per rank along each axis")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--checkpoints", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--periodic", action="store_true",
                        help="periodic grid: every side exchanges halos, also on one rank "
                             "(with itself, through MPI) -- the halo cost on a single GPU")
    parser.add_argument("--out", default=None,
                        help="Markdown file (default bench/results/heat_cpu.md; --overhead "
                             "appends to it only when given)")
    parser.add_argument("--overhead", action="store_true",
                        help="per-step overhead, fixed cost per solve and gradient / forward "
                             "at --sizes (host kernels)")
    parser.add_argument("--adjoint-loop", action="store_true",
                        help="gradient / forward with the host reverse pass in one call "
                             "against one call per step, at --sizes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    opts = parser.parse_args(argv)
    opts.out_given = opts.out is not None
    if opts.out is None:
        opts.out = str(Path(__file__).parent / "results" / "heat_cpu.md")
    if opts.overhead:
        overhead(opts)
        return
    if opts.adjoint_loop:
        adjoint_loop(opts)
        return

    comm = MPI.COMM_WORLD
    xp = array_module()
    dims = MPI.Compute_dims(comm.size, [0, 0])
    n, steps = opts.n, opts.steps
    grid = Grid((dims[0] * n, dims[1] * n), dims=dims, periodic=opts.periodic)
    h = grid.h[0]
    rng = np.random.default_rng(comm.rank)
    u0 = xp.asarray(rng.random(grid.local_shape))
    kappa = xp.asarray(0.5 + 0.5 * rng.random(grid.local_shape))
    f = xp.asarray(rng.random(grid.local_shape))
    dt = 0.2 * h * h
    r = dt / (h * h)
    kernels = kernels_for(u0)
    cells = n * n

    a, b, c, d = (xp.asarray(rng.random(cells)) for _ in range(4))
    t_copy4 = timed(loop(lambda: kernels.copy4(a, b, c, d) if hasattr(kernels, "copy4")
                         else xp.add(xp.add(a, b), c, out=d), 20), xp, opts.repeats) / 20
    bw_copy4 = 32 * cells / t_copy4

    padded = [xp.asarray(rng.random(grid.padded_shape)) for _ in range(6)]
    pu, pk, pf, pout, pkb, pfb = padded
    full = (1, n + 1, 1, n + 1)
    t_kstep = timed(loop(lambda: kernels.step(pu, pk, pf, pout, r, dt, *full), steps),
                    xp, opts.repeats) / steps
    t_kadj = timed(loop(lambda: kernels.adjoint(pu, pk, pf, pout, pkb, pfb, r, dt, *full),
                        steps), xp, opts.repeats) / steps
    t_kadj_k = timed(loop(lambda: kernels.adjoint(pu, pk, pf, pout, pkb, None, r, dt, *full),
                          steps), xp, opts.repeats) / steps
    t_halo = timed(loop(lambda: halo.exchange(pu, grid, kernels, verify=False), steps), xp,
                   opts.repeats) / steps

    def exchange_then_step():
        a, b = pu, pout
        for _ in range(steps):
            halo.exchange(a, grid, kernels, verify=False)
            kernels.step(a, pk, pf, b, r, dt, *full)
            a, b = b, a
        return b

    t_kstep_halo = timed(exchange_then_step, xp, opts.repeats) / steps

    def forward_time(count):
        return timed(lambda: solve(u0, kappa, f, dt, h, count, grid=grid).data, xp, opts.repeats)

    t_fwd = forward_time(steps)
    # A solve's fixed cost (argument checks, padded copies of u0, kappa and f, the result's
    # copy) is not a step's: it is the time of a solve of 0 steps, and a step's is the rest.
    t_setup = forward_time(0)
    # A noisy run can time the solve of 0 steps above the full one: then no step time (n/a).
    t_step = max(t_fwd - t_setup, 0.0) / steps

    def grad_time(checkpoints, argnums=1):
        def objective(*a):
            u = solve(*a, dt, h, steps, grid=grid, checkpoints=checkpoints)
            return gpumpiad.mpi_sum((u * u).sum())
        vg = gpumpiad.value_and_grad(objective, argnums=argnums)
        args = [gpumpiad.tensor(a, distributed=True) for a in (u0, kappa, f)]
        return timed(lambda: vg(*args)[1], xp, opts.repeats)

    t_grad_all = grad_time(None)
    t_grad_ck = grad_time(opts.checkpoints)
    t_grad_every = grad_time(None, argnums=(0, 1, 2))

    load = os.getloadavg()[0]
    if comm.rank != 0:
        return
    cpu, gpu = machine()
    gb = 1e9
    rows = [
        ("copy4 (3 reads + 1 write)", t_copy4, 32, bw_copy4),
        ("step kernel, no halo", t_kstep, 32, 32 * cells / t_kstep),
        ("solver step with halo exchange (marginal)", t_step, 32,
         32 * cells / t_step if t_step else None),
        ("blocking halo exchange + step kernel", t_kstep_halo, 32, 32 * cells / t_kstep_halo),
        ("adjoint kernel, no halo", t_kadj, 64, 64 * cells / t_kadj),
        ("adjoint kernel, kappa_bar only, no halo", t_kadj_k, 48, 48 * cells / t_kadj_k),
    ]
    lines = [
        f"# Heat solver benchmark ({gpumpiad.backend_name()}, float64)",
        "",
        f"- Machine: {cpu}" + (f"; GPU {gpu}" if gpu else ""),
        f"- {comm.size} MPI ranks ({MPI.Get_library_version().splitlines()[0].strip()}), "
        f"decomposition {dims[0]}x{dims[1]}{', periodic' if opts.periodic else ''}, "
        f"{n}x{n} cells per rank "
        f"(global {grid.shape[0]}x{grid.shape[1]}), {steps} steps; kernels "
        f"`{kernels.__name__}`; NumPy {np.__version__}, Python {platform.python_version()}",
        f"- Load average (1 min) at the end of the run: {load:.1f} on {os.cpu_count()} CPUs "
        "(other jobs on a shared machine inflate times; ratios from one run are comparable).",
        f"- Command: `mpiexec -n {comm.size} python bench/bench_heat.py "
        f"{' '.join(sys.argv[1:])}`",
        "- Times: best of "
        f"{opts.repeats}, maximum over ranks; T_eff = bytes/cell x cells / time; copy4 runs on "
        "all ranks at once, like the solver, so it is the bandwidth the ranks share.",
        "- Size: the GPU target is 4096x4096 cells per rank (`--n 4096`); CPU runs use a size "
        "that finishes in reasonable time (1024x1024 per rank on 2 cores).",
        "",
        "| what | time per call/step [ms] | B/cell | T_eff [GB/s] | T_eff / copy4 |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {t * 1e3:.3f} | {bpc} | {bw / gb:.2f} | {bw / bw_copy4:.2f} |"
              if bw else f"| {name} | n/a | {bpc} | n/a | n/a |" for name, t, bpc, bw in rows]
    lines += [
        "",
        "| ratio | value |",
        "|---|---:|",
        "| solver step with halo exchange / kernel step without halo | "
        + (f"{t_step / t_kstep:.3f} |" if t_step else "n/a |"),
        f"| blocking halo exchange + step kernel / kernel step without halo | "
        f"{t_kstep_halo / t_kstep:.3f} |",
        f"| blocking halo exchange alone / kernel step | {t_halo / t_kstep:.3f} |",
        f"| gradient (d/d kappa) / forward, all {steps} states stored | "
        f"{t_grad_all / t_fwd:.2f} |",
        f"| gradient (d/d kappa) / forward, {opts.checkpoints} checkpoints "
        f"({recompute_steps(steps, opts.checkpoints)} steps recomputed) | "
        f"{t_grad_ck / t_fwd:.2f} |",
        f"| gradient (d/d u0, kappa, f) / forward, all {steps} states stored | "
        f"{t_grad_every / t_fwd:.2f} |",
        "",
        f"Forward {t_fwd * 1e3:.1f} ms ({t_setup * 1e3:.1f} ms of it the solve's fixed cost: "
        f"a solve of 0 steps), gradient {t_grad_all * 1e3:.1f} ms (stored states), "
        f"{t_grad_ck * 1e3:.1f} ms (checkpoints), {t_grad_every * 1e3:.1f} ms (u0, kappa, f; "
        f"stored states) for {steps} steps.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(text)


if __name__ == "__main__":
    main()
