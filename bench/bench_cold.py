"""What the heat forward and gradient cost when memory is cold: right after the other
contender's work, as in ``bench_peers.py``'s alternating runs, against the same call repeated.

    python bench/bench_cold.py [--sizes 64 128 256] [--steps 100] [--repeats 11] [--out F]

One process pinned to one CPU (XLA and OpenMP limited to one thread), as ``bench_peers.py``'s
one-core worker. The contenders are ``bench_peers.py``'s: gpumpiad and, when it is installed,
JAX ``jit``; each one's forward and gradient is timed right after one of three preludes, the
preludes rotating from repeat to repeat:

- ``warm``: the same call (what it touches is in cache);
- ``after the other``: the other contender's forward and gradient (JAX after gpumpiad and
  gpumpiad after JAX; without JAX, a NumPy pass over 64 MB);
- ``after 20 ms idle``: a sleep, nothing else running.

The table gives medians and minima, each prelude's median less the warm one, and gpumpiad's
time over JAX's for each prelude; the load average before and after.
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

PRELUDES = ("warm", "after the other", "after 20 ms idle")
KINDS = ("forward", "gradient")


def contenders(n, steps):
    """``{name: (forward, gradient)}``: gpumpiad, and JAX when it is installed."""
    out = {"gpumpiad": bench_peers.gpumpiad_contender(n, steps)[:2]}
    try:
        out["JAX"] = bench_peers.jax_contender(n, steps)
    except ImportError:
        pass
    return out


def others(calls):
    """For each contender, what runs before it in the ``after the other`` prelude."""
    out = {}
    for name in calls:
        rest = [fn for other, pair in calls.items() if other != name for fn in pair]
        if not rest:
            big = np.ones(8 << 20)  # only when there is no other contender
            rest = [big.sum]
        out[name] = lambda rest=rest: [fn() for fn in rest]
    return out


def timed(calls, repeats):
    """``{(contender, kind, prelude): [seconds]}``, the preludes rotating from repeat to repeat."""
    before = others(calls)
    preludes = {"warm": lambda name, fn: fn(), "after the other": lambda name, fn: before[name](),
                "after 20 ms idle": lambda name, fn: time.sleep(0.02)}
    out = {(c, k, p): [] for c in calls for k in KINDS for p in PRELUDES}
    for rep in range(repeats):
        for j in range(len(PRELUDES)):
            prelude = PRELUDES[(rep + j) % len(PRELUDES)]
            for name, pair in calls.items():
                for kind, fn in zip(KINDS, pair):
                    preludes[prelude](name, fn)
                    t0 = time.perf_counter()
                    fn()
                    out[name, kind, prelude].append(time.perf_counter() - t0)
    return out


def _cpu():
    """The CPU's model name (``/proc/cpuinfo``), or the machine type."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    load = os.getloadavg()[0]
    rows, ratios = [], []
    for n in args.sizes:
        calls = contenders(n, args.steps)
        for pair in calls.values():
            for fn in pair:
                fn()
        times = timed(calls, args.repeats)
        medians = {key: statistics.median(t) for key, t in times.items()}
        for (name, kind, prelude), t in times.items():
            extra = medians[name, kind, prelude] - medians[name, kind, "warm"]
            rows.append((n, name, kind, prelude, medians[name, kind, prelude], min(t), extra))
        if "JAX" in calls:
            for kind in KINDS:
                ratios.append((n, kind, [medians["gpumpiad", kind, p] / medians["JAX", kind, p]
                                         for p in PRELUDES]))
    lines = [f"# Heat forward and gradient with cold memory ({_cpu()}, {os.cpu_count()} CPUs, "
             "one core used)", "",
             f"`python bench/bench_cold.py --sizes {' '.join(map(str, args.sizes))} --steps "
             f"{args.steps} --repeats {args.repeats}`. Load average (1 min) {load:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after.", "",
             "| n² | code | call | run | median [ms] | min [ms] | median − warm median [ms] |",
             "|---:|---|---|---|---:|---:|---:|"]
    for n, name, kind, prelude, med, low, extra in rows:
        lines.append(f"| {n} | {name} | {kind} | {prelude} | {1e3 * med:.3f} | {1e3 * low:.3f} "
                     f"| {1e3 * extra:+.3f} |")
    if ratios:
        lines += ["", "gpumpiad / JAX (medians):", "",
                  "| n² | call | " + " | ".join(PRELUDES) + " |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {n} | {kind} | " + " | ".join(f"{r:.2f}" for r in values) + " |"
                  for n, kind, values in ratios]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
