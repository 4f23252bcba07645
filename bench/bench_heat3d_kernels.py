"""CPU effective bandwidth of the 3-D heat kernels' host build against a copy of the same bytes.

    python bench/bench_heat3d_kernels.py [--sizes 64 128 192] [--dtype float64] [--repeats 7]
                                         [--out bench/results/heat3d_cpu.md]

T_eff = bytes the kernel must move per cell x cells / time, counting each field once (the
neighbours a stencil reads again come from cache):

* forward step: reads u, kappa, f, writes u_new: 4 fields;
* fused adjoint, both cotangents: reads lam_next, kappa, u, kappa_bar, f_bar, writes lam,
  kappa_bar, f_bar: 8 fields (kappa_bar and f_bar are read and written);
* adjoint, kappa_bar only: reads lam_next, kappa, u, kappa_bar, writes lam, kappa_bar: 6;
* adjoint, neither (the cotangent of u alone): reads lam_next, kappa, writes lam: 3.

Each is given as a ratio to a NumPy copy (``np.copyto``) of the same number of bytes (half read,
half written), timed in the same run: within each repeat the kernel and its copy run in turn
(each a warm-up call and a timed batch of calls through ``_timing.times``), so both see the same
load. Min and median over the repeats, the 1-minute load average before and after. One
thread, like the kernels.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
from bench_heat_kernels import _machine  # noqa: E402

from gpumpiad.heat import hostkernels3d  # noqa: E402

#: Fields each kernel must move per cell.
FIELDS = {"step": 4, "adjoint (kappa_bar, f_bar)": 8, "adjoint (kappa_bar)": 6,
          "adjoint (neither)": 3}


def batch(fn, seconds=0.05):
    """``fn`` repeated enough times that one batch lasts about ``seconds``; the count too."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    count = max(1, int(seconds / once))

    def run():
        for _ in range(count):
            fn()
    return run, count


def measure(n, dtype, repeats):
    """Rows of (kernel, fields, kernel (min, median) s, copy (min, median) s) at ``n``³."""
    rng = np.random.default_rng(0)
    shape = (n + 2,) * 3
    u, kappa, f, lam_next, kb, fb = (rng.random(shape).astype(dtype) for _ in range(6))
    u_new, lam = np.zeros(shape, dtype), np.zeros(shape, dtype)
    r, dt = 0.1, 1e-3
    kernels = {
        "step": lambda: hostkernels3d.step(u, kappa, f, u_new, r, dt),
        "adjoint (kappa_bar, f_bar)": lambda: hostkernels3d.adjoint(lam_next, kappa, u, lam, kb,
                                                                     fb, r, dt),
        "adjoint (kappa_bar)": lambda: hostkernels3d.adjoint(lam_next, kappa, u, lam, kb, None,
                                                              r, dt),
        "adjoint (neither)": lambda: hostkernels3d.adjoint(lam_next, kappa, None, lam, None,
                                                            None, r, dt),
    }
    cells = n ** 3
    rows = []
    for name, kernel in kernels.items():
        half = FIELDS[name] * cells // 2
        src, dst = rng.random(half).astype(dtype), np.zeros(half, dtype)
        run_kernel, k_count = batch(kernel)
        run_copy, c_count = batch(lambda: np.copyto(dst, src))
        k_times, c_times = [], []
        for _ in range(repeats):
            k_times += _timing.times(run_kernel, 1, MPI.COMM_SELF)
            c_times += _timing.times(run_copy, 1, MPI.COMM_SELF)
        k = [t / k_count for t in k_times]
        c = [t / c_count for t in c_times]
        rows.append((name, FIELDS[name], (min(k), statistics.median(k)),
                     (min(c), statistics.median(c))))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192])
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "heat3d_cpu.md"))
    args = ap.parse_args(argv)
    if not hostkernels3d.available():
        raise SystemExit("3-D host kernels unavailable (no C++ compiler?)")
    dtype = np.dtype(args.dtype)
    load_before = os.getloadavg()[0]
    table = ["| n³ | kernel | fields | MiB moved | kernel min / median [ms] | "
             "T_eff min [GB/s] | copy min / median [ms] | T_eff / copy (min) | "
             "T_eff / copy (median) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in args.sizes:
        for name, fields, (k_min, k_med), (c_min, c_med) in measure(n, dtype, args.repeats):
            nbytes = fields * dtype.itemsize * n ** 3
            line = (f"| {n} | {name} | {fields} | {nbytes / 2**20:.1f} | "
                    f"{k_min * 1e3:.3f} / {k_med * 1e3:.3f} | {nbytes / k_min / 1e9:.2f} | "
                    f"{c_min * 1e3:.3f} / {c_med * 1e3:.3f} | {c_min / k_min:.2f} | "
                    f"{c_med / k_med:.2f} |")
            table.append(line)
            print(line, flush=True)
    model, cores, caches = _machine()
    info = hostkernels3d.build_info()
    lines = [
        f"# 3-D heat kernels (kernels/heat3d.cu), host build: T_eff against a copy "
        f"({dtype.name}, one thread)",
        "",
        f"- CPU: {model} ({cores}){'; ' + caches if caches else ''}",
        f"- NumPy {np.__version__}, Python {platform.python_version()}; host build "
        f"({info['march']}): `{' '.join(info['flags'])}`, {info['version']}",
        f"- Load average (1 min): {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        "the end",
        f"- `python bench/bench_heat3d_kernels.py --sizes {' '.join(map(str, args.sizes))} "
        f"--dtype {dtype.name} --repeats {args.repeats}`",
        "- T_eff = fields x itemsize x n³ / time, each field counted once: step 4 (u, kappa, f "
        "read, u_new written), adjoint 8 with both cotangents (lam_next, kappa, u, kappa_bar, "
        "f_bar read; lam, kappa_bar, f_bar written), 6 with kappa_bar only, 3 with neither",
        "- copy: `np.copyto` of the same bytes (half read, half written); kernel and copy "
        f"alternate within each of {args.repeats} repeats, each a warm-up call and a timed "
        "batch of about 50 ms; min and median per call",
        "",
        *table,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
