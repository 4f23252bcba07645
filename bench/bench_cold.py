"""What a heat forward costs when its memory is cold: right after another program's work, as in
``bench_peers.py``'s alternating runs, against the same forward repeated (warm).

    python bench/bench_cold.py [--sizes 64 128 256] [--steps 2 100] [--repeats 15] [--out F]

One process, one core (XLA and OpenMP limited to one thread, as ``bench_peers.py`` does). Each
case times gpumpiad's forward (``mpi_sum(sum(u*u))`` of a solve, ``bench_peers``'s problem)
right after one of three preludes, alternating the preludes from repeat to repeat:

- ``warm``: the same forward (everything it touches is in cache);
- ``after JAX``: JAX ``jit``'s forward and gradient of the same problem, when JAX is installed
  (what ``bench_peers.py`` times gpumpiad after); without JAX, a NumPy pass over 64 MB;
- ``after 20 ms idle``: a sleep, nothing else running.

The reference is a NumPy forward of the same steps (``np.pad`` and the 5-point update) after
the same preludes: the cold penalty of plain array code on this machine. Medians and minima,
and the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402

PRELUDES = ("warm", "after JAX", "after 20 ms idle")


def numpy_forward(n, steps):
    u0, kappa, f, dt, h = bench_peers.problem(n)
    r = dt / (h * h)

    def run():
        u = u0
        for _ in range(steps):
            p = np.pad(u, 1)
            u = u + r * kappa * (p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2]
                                 - 4 * u) + dt * f
        return float((u * u).sum())
    return run


def other_program(n):
    """JAX's forward and gradient of the problem (``bench_peers``'s contender), or a NumPy
    pass over 64 MB when JAX is not installed; and its name."""
    try:
        forward, gradient = bench_peers.jax_contender(n, 100)
    except ImportError:
        big = np.ones(8 << 20)
        return (lambda: big.sum()), "a NumPy sum over 64 MB"
    return (lambda: (forward(), gradient())), "JAX jit forward + gradient"


def timed_after(contenders, preludes, repeats):
    """``{(contender, prelude): [seconds]}``, the preludes rotating from repeat to repeat."""
    out = {(c, p): [] for c in contenders for p in preludes}
    names = list(preludes)
    for rep in range(repeats):
        for k in range(len(names)):
            prelude = names[(rep + k) % len(names)]
            for name, fn in contenders.items():
                preludes[prelude](fn)
                t0 = time.perf_counter()
                fn()
                out[name, prelude].append(time.perf_counter() - t0)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 100])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for n in args.sizes:
        other, other_name = other_program(n)
        other()
        preludes = {"warm": lambda fn: fn(), "after JAX": lambda fn: other(),
                    "after 20 ms idle": lambda fn: time.sleep(0.02)}
        for steps in args.steps:
            gm_forward = bench_peers.gpumpiad_contender(n, steps)[0]
            contenders = {"gpumpiad": gm_forward, "NumPy": numpy_forward(n, steps)}
            for fn in contenders.values():
                fn()
            times = timed_after(contenders, preludes, args.repeats)
            for name in contenders:
                warm = statistics.median(times[name, "warm"])
                for prelude in PRELUDES:
                    t = times[name, prelude]
                    rows.append((n, steps, name, prelude, statistics.median(t), min(t),
                                 statistics.median(t) - warm))
    lines = [f"# Cold-state cost of a heat forward ({os.uname().machine}, "
             f"{os.cpu_count()} CPUs, one core used)", "",
             f"`python bench/bench_cold.py --sizes {' '.join(map(str, args.sizes))} --steps "
             f"{' '.join(map(str, args.steps))} --repeats {args.repeats}`; \"after JAX\" runs "
             f"{other_name} first. Load average (1 min) {load:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after.", "",
             "| n² | steps | code | run | median [µs] | min [µs] | median − warm median [µs] |",
             "|---:|---:|---|---|---:|---:|---:|"]
    for n, steps, name, prelude, med, low, extra in rows:
        lines.append(f"| {n} | {steps} | {name} | {prelude} | {1e6 * med:.0f} | {1e6 * low:.0f} "
                     f"| {1e6 * extra:+.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
