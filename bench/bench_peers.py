"""The heat problem in gpumpiad, JAX and PyTorch: forward and gradient, one core and two.

    python bench/bench_peers.py [--sizes 64 128 256 512 1024 2048] [--repeats 5] [--rounds 2]
        [--two-core-sizes 128 256 1024] [--json FILE] [--out FILE]

The problem is the one ``gpumpiad.heat.solve`` runs: an ``n x n`` grid, cell size
``h = 1 / (n + 1)``, Dirichlet zero ghosts, explicit Euler steps
``u <- u + r * kappa * L(u) + dt * f`` (``L`` the 5-point Laplacian numerator, ``r = dt / h^2``,
``dt = 0.2 h^2 / max kappa``), and the objective ``J = sum(u_steps^2)`` over the whole grid. The
gradient is ``J`` and its gradient with respect to ``u0``, ``kappa`` and ``f`` together.

Contenders, float64:

* one core (this script pins its worker to one CPU): gpumpiad on one rank, JAX ``jit`` of the
  loop (``lax.fori_loop``) and ``jit(value_and_grad)``, PyTorch eager (forward under
  ``no_grad``, gradient by autograd, one thread);
* two cores: gpumpiad on two ranks (``mpiexec -n 2``, a 2x1 split) against JAX ``shard_map`` over
  two XLA host devices with the halo rows moved by ``ppermute``, and JAX ``jit`` on one device
  with XLA's threads (what a JAX user gets without sharding).

Before any timing, each contender's ``J`` and gradients are compared with those of gpumpiad on
one rank (relative error ``max|a - b| / max|b|`` at most 1e-12; for kappa's gradient, whose
``L(u)`` cancels to ``~h^2``, ``1e-12 * (n / 256)^2`` above 256², see :func:`tolerances`); a
contender that differs is reported and not timed; the largest error is recorded. The contenders
of one process are timed in turn, repeat by repeat, in an order that goes through their
permutations, so that over a full cycle each follows each of the others equally often: a call
pays for memory the previous one evicted (``bench_cold.py`` measures how much), and a fixed
cycle would always put the same contender after the same one. The two-core ones run in separate
processes, alternating round by round. Reported: min, median and max per contender, ratios of
medians against JAX and PyTorch, and the load average before and after. A contender whose
package is not installed is left out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STEPS = {64: 100, 128: 100, 256: 100, 512: 50, 1024: 20, 2048: 10}
TOLERANCE = 1e-12


def steps_for(n):
    """Default number of steps for an ``n x n`` grid (fewer steps on larger grids)."""
    return STEPS.get(n, max(10, min(100, 100 * 256 * 256 // (n * n))))


def problem(n):
    """Global ``(u0, kappa, f, dt, h)`` of the benchmark problem on an ``n x n`` grid."""
    h = 1.0 / (n + 1)
    x = np.arange(1, n + 1) * h
    u0 = np.outer(np.sin(np.pi * x), np.sin(np.pi * x))
    kappa = 1.0 + 0.5 * np.outer(np.sin(3 * np.pi * x) ** 2, np.cos(np.pi * x) ** 2)
    f = np.outer(x, 1.0 - x)
    dt = 0.2 * h * h / kappa.max()
    return u0, kappa, f, dt, h


def rel_error(a, b):
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - b))) / scale


def tolerances(n):
    """Relative tolerances of ``(J, g_u0, g_kappa, g_f)`` on an ``n x n`` grid.

    kappa's gradient sums ``lam * L(u)``, and the 5-point numerator ``L(u)`` of a smooth field
    is ``~h^2`` times the values it subtracts, so two correct implementations that round
    differently (operation order, fused multiply-adds) agree on it to ``~eps / h^2`` only:
    its tolerance grows as ``(n / 256)^2`` above 256.
    """
    return (TOLERANCE, TOLERANCE, TOLERANCE * max(1.0, (n / 256) ** 2), TOLERANCE)


def compare(name, got, ref):
    """Largest relative error of ``(J, g_u0, g_kappa, g_f)`` against ``ref``; raises above the
    tolerances."""
    errors = [rel_error(a, b) for a, b in zip(got, ref)]
    tols = tolerances(ref[1].shape[0])
    if not all(e <= t for e, t in zip(errors, tols)):
        raise AssertionError(f"{name}: J and gradients differ from gpumpiad's by "
                             f"{', '.join(f'{e:.1e}' for e in errors)} (J, u0, kappa, f), "
                             f"expected at most {', '.join(f'{t:.1e}' for t in tols)}")
    return max(errors)


def spread(times):
    return {"min": min(times), "median": statistics.median(times), "max": max(times),
            "n": len(times)}


# ---------------------------------------------------------------------------------------------
# Contenders: each returns (forward(), gradient()) callables; forward returns J, gradient
# returns (J, g_u0, g_kappa, g_f) as NumPy values, both waiting until the result is ready.

def gpumpiad_contender(n, steps, dims=(1, 1)):
    import gpumpiad as gm
    from gpumpiad.heat import Grid, solve

    u0, kappa, f, dt, h = problem(n)
    grid = Grid((n, n), dims=dims)
    args = [gm.tensor(grid.local(a), distributed=True) for a in (u0, kappa, f)]

    def objective(u0, kappa, f):
        u = solve(u0, kappa, f, dt, h, steps, grid=grid)
        return gm.mpi_sum(gm.sum(u * u))

    value_and_grad = gm.value_and_grad(objective, argnums=(0, 1, 2))

    def forward():
        return float(np.asarray(objective(*args).data))

    def gradient():
        value, grads = value_and_grad(*args)
        return (float(np.asarray(value.data if hasattr(value, "data") else value)),
                *(np.asarray(getattr(g, "data", g)) for g in grads))

    def gather(result):
        """The global gradients on every rank."""
        return (result[0], *(grid.gather(g, root=None) for g in result[1:]))

    return forward, gradient, gather


def jax_objective(jax, jnp, n, steps, dt, h):
    r = dt / (h * h)

    def step(u, kappa, f):
        p = jnp.pad(u, 1)
        lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u
        return u + r * kappa * lap + dt * f

    def objective(u0, kappa, f):
        u = jax.lax.fori_loop(0, steps, lambda i, u: step(u, kappa, f), u0)
        return jnp.sum(u * u)

    return objective


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def _jax_contender_of(jax, objective, args):
    """``(forward, gradient)`` of a JAX objective of ``args``: ``jit`` and
    ``jit(value_and_grad)`` with respect to (u0, kappa, f), waited for."""
    fwd = jax.jit(objective)
    vg = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))

    def forward():
        return float(fwd(*args).block_until_ready())

    def gradient():
        value, grads = jax.block_until_ready(vg(*args))
        return (float(value), *(np.asarray(g) for g in grads))

    return forward, gradient


def jax_contender(n, steps):
    jax = _jax()
    import jax.numpy as jnp

    u0, kappa, f, dt, h = problem(n)
    objective = jax_objective(jax, jnp, n, steps, dt, h)
    args = [jax.device_put(a) for a in (u0, kappa, f)]
    return _jax_contender_of(jax, objective, args)


def jax_sharded_contender(n, steps, devices=2):
    jax = _jax()
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    u0, kappa, f, dt, h = problem(n)
    r = dt / (h * h)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("x",))
    down = [(i, i + 1) for i in range(devices - 1)]
    up = [(i + 1, i) for i in range(devices - 1)]

    def step(u, kappa, f):
        # Devices that receive nothing get zeros: the Dirichlet ghosts of the outer rows.
        north = jax.lax.ppermute(u[-1:], "x", perm=down)
        south = jax.lax.ppermute(u[:1], "x", perm=up)
        p = jnp.pad(jnp.concatenate([north, u, south], axis=0), ((0, 0), (1, 1)))
        lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u
        return u + r * kappa * lap + dt * f

    def local(u0, kappa, f):
        u = jax.lax.fori_loop(0, steps, lambda i, u: step(u, kappa, f), u0)
        return jax.lax.psum(jnp.sum(u * u), "x")

    spec = PartitionSpec("x")
    objective = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec),
                              out_specs=PartitionSpec())
    sharding = NamedSharding(mesh, spec)
    args = [jax.device_put(a, sharding) for a in (u0, kappa, f)]
    return _jax_contender_of(jax, objective, args)


def torch_contender(n, steps):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    u0, kappa, f, dt, h = problem(n)
    r = dt / (h * h)
    base = [torch.from_numpy(a.copy()) for a in (u0, kappa, f)]

    def objective(u, kappa, f):
        for _ in range(steps):
            p = F.pad(u, (1, 1, 1, 1))
            lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * u
            u = u + r * kappa * lap + dt * f
        return (u * u).sum()

    def forward():
        with torch.no_grad():
            return float(objective(*base))

    def gradient():
        leaves = [b.detach().requires_grad_(True) for b in base]
        value = objective(*leaves)
        value.backward()
        return (float(value), *(leaf.grad.numpy() for leaf in leaves))

    return forward, gradient


# ---------------------------------------------------------------------------------------------
# Workers: one process each, printing or writing their timings as JSON.

def time_alternating(contenders, repeats, barrier=None, reduce_max=None):
    """``{(name, kind): [seconds]}`` timing every contender's forward and gradient in turn,
    in the order of the next permutation of the contenders from repeat to repeat, after one
    warm-up call each."""
    for forward, gradient in contenders.values():
        forward()
        gradient()
    times = {(name, kind): [] for name in contenders for kind in ("forward", "gradient")}
    orders = list(itertools.permutations(contenders))
    for rep in range(repeats):
        for name in orders[rep % len(orders)]:
            for kind, fn in zip(("forward", "gradient"), contenders[name]):
                if barrier:
                    barrier()
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
                times[name, kind].append(reduce_max(t) if reduce_max else t)
    return times


def _installed(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def worker_one_core(args):
    """gpumpiad (one rank), JAX jit and PyTorch on one CPU; writes the reference values."""
    n, steps = args.n, args.steps
    gm_fwd, gm_grad, _ = gpumpiad_contender(n, steps)
    ref = tuple(gm_grad())
    np.savez(args.ref_out, *ref)
    makers, skipped = {}, {}
    for name, make in (("jax", jax_contender), ("torch", torch_contender)):
        if _installed(name):
            makers[name] = lambda make=make: make(n, steps)
        else:
            skipped[name] = f"{name} is not installed"
    return _checked_and_timed(makers, ref, args.repeats, {"gpumpiad": (gm_fwd, gm_grad)},
                              skipped)


def _checked_and_timed(makers, ref, repeats, contenders, skipped):
    """Make each contender (``name -> make() -> (forward, gradient)``), keep those whose
    gradient and forward agree with ``ref`` (the others go to ``skipped`` with the reason) and
    time them all, alternating."""
    checks = {}
    for name, make in makers.items():
        fwd, grad = make()
        try:
            checks[name] = max(compare(name, grad(), ref),
                               compare(name + " forward", (fwd(),) + ref[1:], ref))
        except AssertionError as exc:
            skipped[name] = str(exc)
            continue
        contenders[name] = (fwd, grad)
    times = time_alternating(contenders, repeats)
    return {"times": {f"{a}|{b}": t for (a, b), t in times.items()}, "checks": checks,
            "skipped": skipped}


def worker_gpumpiad_ranks(args):
    """gpumpiad on every rank of COMM_WORLD (a P x 1 split); rank 0 returns the timings."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    fwd, grad, gather = gpumpiad_contender(args.n, args.steps, dims=(comm.size, 1))
    got = gather(grad())
    checks, skipped = {}, {}
    if args.ref:
        ref = tuple(np.load(args.ref)[f"arr_{i}"] for i in range(4))
        try:
            checks["gpumpiad"] = compare(f"gpumpiad, {comm.size} ranks", got, ref)
        except AssertionError as exc:
            skipped["gpumpiad"] = str(exc)
    skipped = comm.bcast(skipped)
    if skipped:
        return {"times": {}, "checks": checks, "skipped": skipped}
    times = time_alternating({"gpumpiad": (fwd, grad)}, args.repeats, barrier=comm.Barrier,
                             reduce_max=lambda t: comm.allreduce(t, op=MPI.MAX))
    return {"times": {f"{a}|{b}": t for (a, b), t in times.items()}, "checks": checks,
            "skipped": skipped}


def worker_jax_two(args):
    """JAX shard_map over two host devices and JAX jit on one device with XLA's threads."""
    ref = tuple(np.load(args.ref)[f"arr_{i}"] for i in range(4))
    makers = {"jax shard_map": lambda: jax_sharded_contender(args.n, args.steps),
              "jax threads": lambda: jax_contender(args.n, args.steps)}
    return _checked_and_timed(makers, ref, args.repeats, {}, {})


def run_worker(args):
    if args.worker == "one":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        result = worker_one_core(args)
    elif args.worker == "gpumpiad":
        result = worker_gpumpiad_ranks(args)
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank != 0:
            return
    else:
        result = worker_jax_two(args)
    Path(args.worker_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Driver

def _spawn(cmd, env=None, timeout=900):
    env = dict(os.environ if env is None else env)
    # The workers import this checkout's gpumpiad, whatever the installed one.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH"))
                                        if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def one_core_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                        " intra_op_parallelism_threads=1").strip()
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def run_size(n, steps, args, tmp):
    """Timings of every contender at ``n x n``: ``{"one core": {...}, "two cores": {...}}``."""
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--n", str(n), "--steps", str(steps)]
    ref = str(tmp / f"ref{n}.npz")
    out = tmp / f"one{n}.json"
    _spawn(me + ["--worker", "one", "--repeats", str(args.repeats), "--ref-out", ref,
                 "--worker-out", str(out)] + common, env=one_core_env())
    one = json.loads(out.read_text())
    entry = {"n": n, "steps": steps, "one core": summarize(one)}
    if n in args.two_core_sizes and shutil.which(args.mpiexec):
        merged = {"times": {}, "checks": {}, "skipped": {}}
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + " --xla_force_host_platform_device_count=2").strip()
        for rnd in range(args.rounds):
            order = ["gpumpiad", "jax"] if rnd % 2 == 0 else ["jax", "gpumpiad"]
            for who in order:
                if who == "jax" and not _installed("jax"):
                    merged["skipped"]["jax shard_map"] = "jax is not installed"
                    continue
                out = tmp / f"two{n}-{who}-{rnd}.json"
                cmd = me + ["--worker", who, "--repeats", str(args.repeats), "--ref", ref,
                            "--worker-out", str(out)] + common
                if who == "gpumpiad":
                    cmd = [args.mpiexec, "-n", "2"] + cmd
                _spawn(cmd, env=env)
                part = json.loads(out.read_text())
                for key, ts in part["times"].items():
                    merged["times"].setdefault(key, []).extend(ts)
                merged["checks"].update(part["checks"])
                merged["skipped"].update(part["skipped"])
        entry["two cores"] = summarize(merged)
    return entry


def summarize(result):
    stats = {}
    for key, ts in result["times"].items():
        name, kind = key.split("|")
        stats.setdefault(name, {})[kind] = spread(ts)
    ratios = {}
    gm = stats.get("gpumpiad")
    for name, s in stats.items():
        if name == "gpumpiad" or gm is None:
            continue
        for kind in ("forward", "gradient"):
            ratios[f"gpumpiad / {name}, {kind}"] = gm[kind]["median"] / s[kind]["median"]
    for name, s in stats.items():
        ratios[f"{name} gradient / forward"] = s["gradient"]["median"] / s["forward"]["median"]
    return {"stats": stats, "ratios": ratios, "checks": result["checks"],
            "skipped": result["skipped"]}


def versions():
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for module in ("gpumpiad", "jax", "jaxlib", "torch", "mpi4py"):
        try:
            out[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            out[module] = None
    return out


def markdown(entries, load):
    lines = ["| n² | steps | cores | contender | forward median [ms] | gradient median [ms] | "
             "gpumpiad / it, forward | gpumpiad / it, gradient | gradient / forward |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for e in entries:
        for cores in ("one core", "two cores"):
            if cores not in e:
                continue
            block = e[cores]
            for name, s in block["stats"].items():
                r = block["ratios"]
                fr = r.get(f"gpumpiad / {name}, forward")
                gr = r.get(f"gpumpiad / {name}, gradient")
                lines.append(
                    f"| {e['n']} | {e['steps']} | {1 if cores == 'one core' else 2} | {name} | "
                    f"{s['forward']['median'] * 1e3:.3f} | {s['gradient']['median'] * 1e3:.3f} | "
                    f"{'' if fr is None else f'{fr:.2f}'} | {'' if gr is None else f'{gr:.2f}'} | "
                    f"{r[f'{name} gradient / forward']:.2f} |")
            for name, why in block["skipped"].items():
                lines.append(f"| {e['n']} | {e['steps']} | {1 if cores == 'one core' else 2} | "
                             f"{name} | skipped: {why} | | | | |")
    lines.append("")
    lines.append(f"Load average (1 min) before {load[0]:.2f}, after {load[1]:.2f}, "
                 f"on {os.cpu_count()} CPUs.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(STEPS))
    parser.add_argument("--steps", type=int, default=None,
                        help="time steps at every size (default: per size, see STEPS)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="two-core rounds (processes alternate between contenders)")
    parser.add_argument("--two-core-sizes", type=int, nargs="*", default=[128, 256, 1024])
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")
    parser.add_argument("--out", default=None, help="write the Markdown table to this file")
    parser.add_argument("--worker", choices=["one", "gpumpiad", "jax"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--ref-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    for n in args.sizes + args.two_core_sizes:
        if n < 4 or n % 2:
            parser.error(f"sizes must be even and at least 4, got {n}")
    load_before = os.getloadavg()[0]
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            steps = args.steps or steps_for(n)
            print(f"bench_peers: {n}x{n}, {steps} steps", file=sys.stderr, flush=True)
            entries.append(run_size(n, steps, args, Path(tmp)))
    load = (load_before, os.getloadavg()[0])
    table = markdown(entries, load)
    print(table)
    result = {"sizes": entries, "load_average": {"before": load[0], "after": load[1]},
              "versions": versions(), "tolerance": TOLERANCE, "repeats": args.repeats,
              "rounds": args.rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
