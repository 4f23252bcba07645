"""A heat gradient whose stored states would fill more than half of the host's available
memory: peak memory and time with the solver's memory check (as many checkpoints as half the
memory holds) against every state kept, each in a fresh process, the bits compared.

    python bench/bench_checkpoint_memory.py [--n 2048] [--steps 400] [--out PATH]

``--steps`` should make ``(steps + 1)`` states of ``(n + 2)²`` float64 exceed half of
``MemAvailable`` and stay below all of it (every state kept must still fit). One rank, the
host kernels; gradient of ``sum(u(T)²)`` with respect to kappa.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
import gpumpiad as gm
from gpumpiad.heat import solve, solver
n, steps, check = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "check"
if not check:
    solver._MEMORY_CHECK_BYTES = 1 << 62
rng = np.random.default_rng(0)
u0, kappa, f = rng.random((n, n)), 0.5 + rng.random((n, n)), rng.random((n, n))
h = 1.0 / (n + 1)
dt = 0.1 * h * h
kept = []
vjp = solver._Heat.vjp
def counting(self, *a):
    kept.append((len(self.states), self.checkpoints))
    return vjp(self, *a)
solver._Heat.vjp = counting
t0 = time.perf_counter()
grad = gm.grad(lambda k: gm.mpi_sum(gm.sum(solve(u0, k, f, dt, h, steps) ** 2)))(
    gm.tensor(kappa, distributed=True))
seconds = time.perf_counter() - t0
np.save(sys.argv[4], np.asarray(grad.data))
print(json.dumps(dict(seconds=seconds, peak_bytes=resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss << 10, kept=kept[0][0], checkpoints=kept[0][1])))
"""


def available():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", default=None)
    ap.add_argument("--scratch", default="/tmp")
    args = ap.parse_args()
    state = (args.n + 2) ** 2 * 8
    before = available()
    runs = {}
    for mode in ("check", "keep"):
        path = Path(args.scratch) / f"checkpoint-memory-{mode}.npy"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(args.steps), mode,
                               str(path)], capture_output=True, text=True)
        if proc.returncode:
            runs[mode] = dict(failed=proc.returncode, stderr=proc.stderr[-2000:])
            continue
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        runs[mode]["path"] = str(path)
    import numpy as np
    same = None
    if all("path" in r for r in runs.values()):
        same = bool(np.array_equal(np.load(runs["check"]["path"]), np.load(runs["keep"]["path"])))
    for r in runs.values():
        if "path" in r:
            os.unlink(r.pop("path"))
    gib = 1 << 30
    lines = [
        "## A gradient whose states outgrow half the available memory (host, one rank)",
        "",
        f"- {args.n}² float64, {args.steps} steps: {args.steps + 1} states of "
        f"{state / gib:.3f} GiB = {(args.steps + 1) * state / gib:.1f} GiB; MemAvailable before "
        f"{before / gib:.1f} GiB; load average {os.getloadavg()[0]:.1f}",
        f"- the bits of the two gradients equal: {same}",
        "",
        "| | states kept | checkpoints | peak RSS [GiB] | time [s] |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, label in (("check", "memory check (default)"), ("keep", "every state kept")):
        r = runs[mode]
        if "failed" in r:
            lines.append(f"| {label} | failed (exit {r['failed']}) | | | |")
            continue
        lines.append(f"| {label} | {r['kept']} | {r['checkpoints']} | "
                     f"{r['peak_bytes'] / gib:.2f} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
