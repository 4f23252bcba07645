"""CPU effective-throughput benchmark of the heat kernels (NumPy vs host build).

T_eff = bytes/cell * cells / time with 32 B/cell for the forward step
(read u, kappa, f; write u_new) and 64 B/cell for the fused adjoint (read
lam_next, kappa, u, kappa_bar, f_bar; write lam, kappa_bar, f_bar), for
float64.  Each T_eff is reported as a ratio to the bandwidth of a
"3 reads + 1 write" loop (``host_copy4``: d = a + b + c, same shared library,
same number of cells, same run).  Single-threaded, like the kernels.

Usage: python bench/bench_heat_kernels.py [--sizes 512 1024 2048] [--out PATH]

``--compare-builds`` times the step and adjoint kernels of the portable build and of the build
for this machine (``GPUMPIAD_HOST_MARCH``) in the same run, alternating, at ``--sizes``, and
prints (and writes to ``--out``) the min and median of each and their ratio.

``--time-loop`` times the host forward loop (``Loop.steps``: two steps per sweep, or
``hostkernels.DEEP_DEPTHS[0]`` over fields of ``DEEP_SWEEP_BYTES`` and more) over two buffers
in turn and over a buffer per state against one step call per step, at ``--sizes``, and appends
its table to ``--out``.

``--segments`` times a gradient of the heat problem of ``bench_peers.py`` (J w.r.t. u0, kappa
and f, host kernels) with every state kept against the same reverse pass made by segments (each
segment's first state kept, the others made again): the length the solver picks on this machine
and fixed ones, alternating, the bits compared first; appends its table to ``--out``. One rank:
pin it to one core (``taskset -c 1``) as ``bench_peers.py`` pins its worker; under ``mpiexec``
the grid is split P x 1.

``--cotangents`` times the host adjoint steps for each choice of cotangents they accumulate
besides lam (kappa_bar and f_bar, kappa_bar, f_bar, neither) against forward steps, many steps in
one call as the solver runs them, alternating batches, at ``--sizes``, and appends its table to
``--out``: what each cotangent costs, against the bytes it moves.

``--layouts`` times the step and adjoint kernels over fields in NumPy's arrays (which start at
one offset within a page) and in the solver's host buffers (``solver._host_buffer``: staggered
offsets), and the forward and gradient of ``bench_peers.py``'s problem with the solver's buffers
staggered and not (the buffer cache emptied before each), alternating, the bits compared first;
under ``mpiexec`` the grid is split P x 1. Appends its table to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from gpumpiad.heat import hostkernels, stencil


def _time(fn, min_time=0.3, repeats=5):
    """Best per-call seconds over ``repeats`` batches of >= ``min_time`` s."""
    fn()  # warm-up (page faults, cache)
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time / repeats:
            break
        n *= 2
    best = t / n
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _machine():
    model, cores = platform.processor() or "unknown", str(os.cpu_count())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(
            (k.strip(), v.strip()) for k, v in
            (line.split(":", 1) for line in out.splitlines() if ":" in line)
        )
        model = info.get("Model name", model)
        cores = f"{info.get('CPU(s)', cores)} CPUs, {info.get('Core(s) per socket', '?')} " \
                f"cores/socket, {info.get('Socket(s)', '?')} socket(s)"
        caches = ", ".join(f"{k} {info[k]}" for k in ("L2 cache", "L3 cache") if k in info)
    except (OSError, subprocess.SubprocessError):
        caches = ""
    return model, cores, caches


def bench(n, dtype=np.float64):
    rng = np.random.default_rng(0)
    shape = (n + 2, n + 2)
    u, kappa, f, lam_next = (rng.random(shape, dtype) for _ in range(4))
    u_new, lam, kb, fb = (np.zeros(shape, dtype) for _ in range(4))
    r, dt = 0.2, 1e-3
    rect = (1, n + 1, 1, n + 1)
    cells = n * n
    a, b, c, d = (rng.random(cells, dtype) for _ in range(4))

    t_copy4 = _time(lambda: hostkernels.copy4(a, b, c, d))
    t_copy4_np = _time(lambda: np.add(np.add(a, b), c, out=d))
    times = {
        ("step", "numpy"): _time(lambda: stencil.step(u, kappa, f, u_new, r, dt, *rect)),
        ("step", "host"): _time(lambda: hostkernels.step(u, kappa, f, u_new, r, dt, *rect)),
        ("adjoint", "numpy"): _time(
            lambda: stencil.adjoint(lam_next, kappa, u, lam, kb, fb, r, dt, *rect)),
        ("adjoint", "host"): _time(
            lambda: hostkernels.adjoint(lam_next, kappa, u, lam, kb, fb, r, dt, *rect)),
    }
    itemsize = np.dtype(dtype).itemsize
    bw_copy4 = 4 * itemsize * cells / t_copy4
    rows = []
    for (op, impl), t in times.items():
        nbytes = (4 if op == "step" else 8) * itemsize * cells
        teff = nbytes / t
        rows.append(dict(n=n, op=op, impl=impl, ms=t * 1e3, teff=teff / 1e9,
                         ratio=teff / bw_copy4))
    return rows, bw_copy4 / 1e9, 4 * itemsize * cells / t_copy4_np / 1e9


def layouts(sizes, repeats=9):
    """Rows of (n, steps, {what: {layout: (min, median) seconds}}): the step and adjoint kernels
    (one call, n² cells) and the solve's forward and gradient (the world's ranks), over NumPy's
    arrays ("plain") and the solver's staggered host buffers ("staggered"), alternating."""
    import gpumpiad as gm
    from mpi4py import MPI
    from gpumpiad.heat import Grid, set_buffer_cache, solve, solver
    from bench_peers import problem, steps_for

    comm = MPI.COMM_WORLD
    threshold = solver._STAGGER_MIN_BYTES
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        shape = (n + 2, n + 2)
        fields = {}
        for layout, make in (("plain", lambda: np.empty(shape)),
                             ("staggered", lambda: solver._host_buffer(shape, np.float64))):
            arrays = [make() for _ in range(8)]
            for a in arrays:
                a[...] = rng.random(shape)
            fields[layout] = arrays
        rect = (1, n + 1, 1, n + 1)

        def kernel(what, layout):
            u, kappa, f, lam_next, u_new, lam, kb, fb = fields[layout]
            if what == "step kernel":
                return lambda: hostkernels.step(u, kappa, f, u_new, 0.2, 1e-3, *rect)
            return lambda: hostkernels.adjoint(lam_next, kappa, u, lam, kb, fb, 0.2, 1e-3, *rect)

        steps = steps_for(n)
        u0, kappa, f, dt, h = problem(n)
        grid = Grid((n, n), dims=(comm.size, 1))
        args = [gm.tensor(grid.local(a), distributed=True) for a in (u0, kappa, f)]

        def forward(*a):
            return solve(*a, dt, h, steps, grid=grid, backend="host")
        gradient = gm.value_and_grad(lambda *a: gm.mpi_sum(gm.sum(forward(*a) ** 2)),
                                     argnums=(0, 1, 2))

        def solve_call(fn, layout):
            """Seconds of ``fn(*args)`` on the slowest rank, and its result, with new buffers
            in ``layout``."""
            solver._STAGGER_MIN_BYTES = threshold if layout == "staggered" else 1 << 62
            try:
                set_buffer_cache(set_buffer_cache(0))
                fn(*args)
                comm.Barrier()
                t0 = time.perf_counter()
                out = fn(*args)
                return comm.allreduce(time.perf_counter() - t0, op=MPI.MAX), out
            finally:
                solver._STAGGER_MIN_BYTES = threshold

        flat = [[np.asarray(value.data)] + [np.asarray(g.data) for g in grads]
                for value, grads in (solve_call(gradient, layout)[1]
                                     for layout in ("plain", "staggered"))]
        if not all(np.array_equal(a, b) for a, b in zip(*flat)):
            raise AssertionError(f"{n}²: the gradient differs between layouts")
        times = {}
        for _ in range(repeats):
            for what in ("step kernel", "adjoint kernel", "forward", "gradient"):
                for layout in ("plain", "staggered"):
                    if what.endswith("kernel"):
                        t = _time(kernel(what, layout), 0.05, 1)
                    else:
                        t = solve_call(forward if what == "forward" else gradient, layout)[0]
                    times.setdefault(what, {}).setdefault(layout, []).append(t)
        rows.append((n, steps, {what: {k: (min(v), float(np.median(v))) for k, v in t.items()}
                                for what, t in times.items()}))
    return rows


def _library(march):
    """The host library built with ``GPUMPIAD_HOST_MARCH=march``, loaded apart."""
    import ctypes
    previous = os.environ.get("GPUMPIAD_HOST_MARCH")
    os.environ["GPUMPIAD_HOST_MARCH"] = march
    try:
        path = hostkernels._build()
    finally:
        if previous is None:
            del os.environ["GPUMPIAD_HOST_MARCH"]
        else:
            os.environ["GPUMPIAD_HOST_MARCH"] = previous
    lib = ctypes.CDLL(str(path))
    hostkernels._declare(lib)
    return lib, dict(hostkernels._built)


def compare_builds(sizes, repeats=7):
    """Rows of (n, op, portable (min, median) s, native (min, median) s)."""
    libs = {march: _library(march) for march in ("portable", "native")}
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        shape = (n + 2, n + 2)
        u, kappa, f, lam_next = (rng.random(shape) for _ in range(4))
        u_new, lam, kb = (np.zeros(shape) for _ in range(3))
        p = [a.ctypes.data for a in (u, kappa, f, u_new, lam_next, lam, kb)]
        calls = {
            "step": lambda lib: lib.host_heat_step_float64(p[0], p[1], p[2], p[3], n, n, 0.2,
                                                           1e-3, 1, n + 1, 1, n + 1),
            "adjoint (kappa_bar)": lambda lib: lib.host_heat_adjoint_float64(
                p[4], p[1], p[0], p[5], p[6], None, n, n, 0.2, 1e-3, 1, n + 1, 1, n + 1, 1),
        }
        for op, call in calls.items():
            times = {march: [] for march in libs}
            for _ in range(repeats):
                for march, (lib, _) in libs.items():
                    times[march].append(_time(lambda: call(lib), min_time=0.05, repeats=2))
            rows.append((n, op) + tuple((min(times[m]), float(np.median(times[m])))
                                        for m in ("portable", "native")))
    return rows, {m: info for m, (_, info) in libs.items()}


def _alternating(variants, steps, repeats):
    """``{name: (min, median) seconds per step}`` of ``variants`` (``{name: fn}``, each call
    ``steps`` steps): one call of each in turn, ``repeats`` times, after one warm-up call each."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def time_loop(sizes, repeats=7):
    """Rows of (n, steps, {variant: (min, median) seconds per step}) of the host forward loop
    over two buffers in turn (a forward solve) and over a buffer per state (a recording
    forward): ``Loop.steps`` (steps in pairs, the first of a pair over two buffers in a ring of
    rows; deeper sweeps over large fields) and one ``Loop.step`` call per step (", single"),
    alternating batches."""
    rows = []
    for n in sizes:
        steps = max(10, min(100, int(2e7 / (n * n))) // 2 * 2)
        rng = np.random.default_rng(0)
        shape = (n + 2, n + 2)
        kappa, f, first = (rng.random(shape) for _ in range(3))
        loop = hostkernels.Loop(kappa, f, 0.2, 1e-3)
        a, b = np.zeros(shape), np.zeros(shape)
        two = [first] + [a, b] * (steps // 2)
        own = [first] + [np.zeros(shape) for _ in range(steps)]

        def single(states):
            for k in range(steps):
                loop.step(states[k], states[k + 1])

        variants = {"two buffers, single": lambda: single(two),
                    "two buffers": lambda: loop.steps(two),
                    "every state kept, single": lambda: single(own),
                    "every state kept": lambda: loop.steps(own)}
        rows.append((n, steps, _alternating(variants, steps, repeats)))
    return rows


def segments(sizes, lengths=(2, 4, 16), repeats=11):
    """Rows of (n, steps, policy's length, {length: (min, median) seconds}) of the gradient on
    the world's ranks (a P x 1 split) with ``solver._segment_length`` fixed to each length (0:
    every state kept; None: the solver's policy), alternating, each call after a barrier and
    timed on the slowest rank; raises if any differs from every state kept in a bit."""
    import gpumpiad as gm
    from mpi4py import MPI
    from gpumpiad.heat import Grid, solve, solver
    from bench_peers import problem, steps_for

    comm = MPI.COMM_WORLD
    policy = solver._segment_length
    rows = []
    for n in sizes:
        steps = steps_for(n)
        u0, kappa, f, dt, h = problem(n)
        grid = Grid((n, n), dims=(comm.size, 1))
        args = [gm.tensor(grid.local(a), distributed=True) for a in (u0, kappa, f)]
        gradient = gm.value_and_grad(lambda *a: gm.mpi_sum(gm.sum(
            solve(*a, dt, h, steps, grid=grid, backend="host") ** 2)), argnums=(0, 1, 2))

        def run(length):
            solver._segment_length = policy if length is None else (lambda b, s: length)
            try:
                value, grads = gradient(*args)
                return [np.asarray(value.data)] + [np.asarray(g.data) for g in grads]
            finally:
                solver._segment_length = policy

        chosen = comm.allreduce(policy(grid.padded_shape[0] * grid.padded_shape[1] * 8, steps),
                                op=MPI.MIN)
        contenders = [0, None] + [k for k in lengths if k < steps]
        kept = run(0)
        for length in contenders[1:]:
            if not all(np.array_equal(a, b) for a, b in zip(kept, run(length))):
                raise AssertionError(f"{n}²: segments of {length} differ from kept states")
        times = {k: [] for k in contenders}
        for _ in range(repeats):
            for length in contenders:
                comm.Barrier()
                t0 = time.perf_counter()
                run(length)
                times[length].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        rows.append((n, steps, chosen,
                     {k: (min(v), float(np.median(v))) for k, v in times.items()}))
    return rows


#: Bytes per float64 cell each adjoint variant reads and writes (the step: 32).
ADJOINT_BYTES = {"kappa_bar and f_bar": 64, "kappa_bar": 48, "f_bar": 40, "neither": 24}


def cotangents(sizes, repeats=7):
    """Rows of (n, {"step" or adjoint variant: (min, median) seconds per step}): the host step
    and the adjoint with each choice of cotangents (``ADJOINT_BYTES``) as the solver runs them,
    many steps in one call (``Loop.steps`` one step per sweep, ``Loop.adjoints``), one batch of
    each in turn, ``repeats`` times."""
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        shape = (n + 2, n + 2)
        u, kappa, f, lam = (rng.random(shape) for _ in range(4))
        spare, kb, fb = (np.zeros(shape) for _ in range(3))
        loop = hostkernels.Loop(kappa, f, 0.2, 1e-3, depths=(1, 2))
        steps = max(2, int(2e7 / (n * n))) // 2 * 2
        chain = [u] + [np.zeros(shape), np.zeros(shape)] * (steps // 2)
        states = [u] * steps
        variants = {"step": lambda: loop.steps(chain),
                    "kappa_bar and f_bar": lambda: loop.adjoints(lam, spare, states, kb, fb),
                    "kappa_bar": lambda: loop.adjoints(lam, spare, states, kb, None),
                    "f_bar": lambda: loop.adjoints(lam, spare, steps, None, fb),
                    "neither": lambda: loop.adjoints(lam, spare, steps, None, None)}
        rows.append((n, _alternating(variants, steps, repeats)))
    return rows


def _append(path, lines):
    """Print the section ``lines`` and append it to the Markdown file ``path``."""
    text = "\n".join(lines) + "\n"
    print(text)
    with open(path, "a") as out:
        out.write("\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "heat_kernels_cpu.md"))
    ap.add_argument("--compare-builds", action="store_true",
                    help="portable build against the build for this machine, same run")
    ap.add_argument("--time-loop", action="store_true",
                    help="the host forward loop in one call against one call per step")
    ap.add_argument("--segments", action="store_true",
                    help="a gradient's reverse pass from kept states against segments made again")
    ap.add_argument("--layouts", action="store_true",
                    help="the solver's staggered host buffers against NumPy's arrays")
    ap.add_argument("--cotangents", action="store_true",
                    help="the adjoint kernel for each choice of cotangents against the step")
    args = ap.parse_args()
    if not hostkernels.available():
        raise SystemExit("host kernels unavailable (no C++ compiler?)")
    if args.segments:
        from mpi4py import MPI
        rows = segments(args.sizes)
        if MPI.COMM_WORLD.rank:
            return
        model, cores, _ = _machine()
        ranks = MPI.COMM_WORLD.size
        lines = [
            f"## Gradient on {ranks} rank{'s' if ranks > 1 else ''}: every state kept against "
            "segments made again (float64)",
            "",
            f"- CPU: {model} ({cores}); load average (1 min) at the end: "
            f"{os.getloadavg()[0]:.1f}",
            "- J and its gradient w.r.t. u0, kappa, f (`bench_peers.py`'s problem), min (median) "
            "of 11 alternating calls in ms; same bits in every column",
            "",
            "| n | steps | policy's length | every state kept | policy | "
            "fixed lengths |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for n, steps, chosen, t in rows:
            def cell(k):
                return f"{1e3 * t[k][0]:.2f} ({1e3 * t[k][1]:.2f})"
            fixed = "; ".join(f"{k}: {cell(k)}" for k in t if k not in (0, None))
            lines.append(f"| {n} | {steps} | {chosen} | {cell(0)} | {cell(None)} | {fixed} |")
        _append(args.out, lines)
        return
    if args.layouts:
        from mpi4py import MPI
        rows = layouts(args.sizes)
        if MPI.COMM_WORLD.rank:
            return
        model, cores, caches = _machine()
        ranks = MPI.COMM_WORLD.size
        lines = [
            "## Host buffers at staggered offsets within a page against NumPy's arrays (float64)",
            "",
            f"- CPU: {model} ({cores}){'; ' + caches if caches else ''}; load average (1 min) at "
            f"the end: {os.getloadavg()[0]:.1f}",
            f"- kernels: one call over n² cells per process; forward and gradient (J w.r.t. u0, "
            f"kappa, f, `bench_peers.py`'s problem): {ranks} rank{'s' if ranks > 1 else ''}, "
            "timed on the slowest; ms, min (median) of 9 alternating rounds; same bits",
            "",
            "| n | steps | what | NumPy's arrays | staggered | staggered / NumPy's |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for n, steps, t in rows:
            for what, by in t.items():
                (plo, pmid), (slo, smid) = by["plain"], by["staggered"]
                lines.append(f"| {n} | {steps} | {what} | {1e3 * plo:.3f} ({1e3 * pmid:.3f}) | "
                             f"{1e3 * slo:.3f} ({1e3 * smid:.3f}) | {slo / plo:.2f} "
                             f"({smid / pmid:.2f}) |")
        _append(args.out, lines)
        return
    if args.cotangents:
        model, cores, caches = _machine()
        lines = [
            "## Host adjoint kernel by the cotangents it accumulates, against the step kernel "
            "(float64)",
            "",
            f"- CPU: {model} ({cores}){'; ' + caches if caches else ''}; load average (1 min) at "
            f"the end: {os.getloadavg()[0]:.1f}",
            "- per step, min (median) of 7 alternating batches of many steps in one call (the "
            "adjoint two steps per sweep); bytes per cell each reads and writes (step: 32), and "
            "the time and bytes against the step's",
            "",
            "| n | kernel | B/cell | time [µs] | time / step | bytes / step |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for n, t in cotangents(args.sizes):
            step = t["step"]
            for name, (lo, mid) in t.items():
                nbytes = ADJOINT_BYTES.get(name, 32)
                label = "step" if name == "step" else f"adjoint, {name}"
                lines.append(f"| {n} | {label} | {nbytes} | {1e6 * lo:.1f} ({1e6 * mid:.1f}) | "
                             f"{lo / step[0]:.2f} ({mid / step[1]:.2f}) | {nbytes / 32:.2f} |")
        _append(args.out, lines)
        return
    if args.time_loop:
        model, cores, _ = _machine()
        lines = [
            "## Host forward loop: steps in one call against one call per step (float64)",
            "",
            f"- CPU: {model} ({cores}); load average (1 min) at the end: "
            f"{os.getloadavg()[0]:.1f}",
            "- per step, min (median) of 7 alternating batches; `Loop.steps` against one "
            "`Loop.step` call per step over the same buffers",
            "",
            "| n | steps | two buffers: single steps [µs] | one call [µs] | ratio | every state "
            "kept: single steps [µs] | one call [µs] | ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, steps, t in time_loop(args.sizes):
            cells = []
            for name in ("two buffers", "every state kept"):
                one, (lo, mid) = t[name + ", single"], t[name]
                cells += [f"{1e6 * one[0]:.1f} ({1e6 * one[1]:.1f})",
                          f"{1e6 * lo:.1f} ({1e6 * mid:.1f})",
                          f"{lo / one[0]:.2f} ({mid / one[1]:.2f})"]
            lines.append(f"| {n} | {steps} | " + " | ".join(cells) + " |")
        _append(args.out, lines)
        return
    if args.compare_builds:
        rows, infos = compare_builds(args.sizes)
        model, cores, _ = _machine()
        lines = [
            "## Host build for this machine against the portable build (float64, one thread)",
            "",
            f"- CPU: {model} ({cores}); load average (1 min) at the end: "
            f"{os.getloadavg()[0]:.1f}",
            f"- portable: `{' '.join(infos['portable']['flags'])}`",
            f"- native: `{' '.join(infos['native']['flags'])}`"
            + (" (refused, portable used)" if infos["native"]["march"] != "native" else ""),
            "- min (median) of 7 alternating batches, each the best of 2 timings",
            "",
            "| n | kernel | portable [ms] | native [ms] | portable / native |",
            "|---:|---|---:|---:|---:|",
        ]
        for n, op, (pmin, pmed), (nmin, nmed) in rows:
            lines.append(f"| {n} | {op} | {pmin * 1e3:.3f} ({pmed * 1e3:.3f}) | "
                         f"{nmin * 1e3:.3f} ({nmed * 1e3:.3f}) | {pmin / nmin:.2f} "
                         f"({pmed / nmed:.2f}) |")
        _append(args.out, lines)
        return

    model, cores, caches = _machine()
    lines = [
        "# Heat kernels: CPU effective throughput (float64, single thread)",
        "",
        f"- CPU: {model} ({cores}){'; ' + caches if caches else ''}",
        f"- NumPy {np.__version__}, Python {platform.python_version()}, "
        f"host build flags: `{' '.join(hostkernels.build_info()['flags'])}`",
        "- T_eff = (32 B/cell step, 64 B/cell adjoint) x n^2 / time; ratio = T_eff / BW(copy4),",
        "  copy4 = host-compiled `d = a + b + c` over n^2 float64 (3 reads + 1 write), same run.",
        "",
    ]
    table = ["| n | op | impl | time [ms] | T_eff [GB/s] | copy4 BW [GB/s] | T_eff / copy4 |",
             "|---:|---|---|---:|---:|---:|---:|"]
    np_copy = []
    print(f"{'n':>5} {'op':>8} {'impl':>6} {'ms':>9} {'T_eff GB/s':>11} {'copy4 GB/s':>11} "
          f"{'ratio':>6}")
    for n in args.sizes:
        rows, bw, bw_np = bench(n)
        np_copy.append((n, bw_np, bw))
        for row in rows:
            print(f"{row['n']:>5} {row['op']:>8} {row['impl']:>6} {row['ms']:>9.3f} "
                  f"{row['teff']:>11.2f} {bw:>11.2f} {row['ratio']:>6.2f}")
            table.append(f"| {row['n']} | {row['op']} | {row['impl']} | {row['ms']:.3f} | "
                         f"{row['teff']:.2f} | {bw:.2f} | {row['ratio']:.2f} |")
    lines += table
    lines += ["", "For reference, NumPy `np.add(np.add(a, b), c, out=d)` counted as 32 B/cell:", ""]
    lines += [f"- n={n}: {bnp:.2f} GB/s ({bnp / bw:.2f} of copy4)" for n, bnp, bw in np_copy]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
