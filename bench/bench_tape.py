"""Per-op cost of the tape: record + backward of a chain of tiny elementwise ops.

A chain of ``N`` ops (alternating ``x * 1.0001``, ``x + 0.1``, ``sin(x)``) on a 1-element
float64 array, differentiated once, timed for gpumpiad and for PyTorch autograd in the same run.
Reports microseconds per op (forward recording + backward) and gpumpiad / PyTorch (target
<= 0.8).

    python bench/bench_tape.py [--ops 1000] [--repeats 20] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np

import gpumpiad as gp


def chain_gpumpiad(x, n):
    for i in range(n):
        k = i % 3
        x = x * 1.0001 if k == 0 else (x + 0.1 if k == 1 else gp.sin(x))
    return gp.sum(x)


def chain_torch(torch, x, n):
    for i in range(n):
        k = i % 3
        x = x * 1.0001 if k == 0 else (x + 0.1 if k == 1 else torch.sin(x))
    return x.sum()


def time_gpumpiad(n, repeats):
    grad = gp.grad(lambda x: chain_gpumpiad(x, n))
    x = np.array([0.5])
    grad(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = grad(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(g[0])


def time_torch(n, repeats):
    import torch
    torch.set_num_threads(1)
    times = []
    g = None
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        x = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
        chain_torch(torch, x, n).backward()
        times.append(time.perf_counter() - t0)
        g = float(x.grad[0])
    return statistics.median(times[1:]), g


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="cProfile the gpumpiad run")
    args = parser.parse_args()
    t_gp, g_gp = time_gpumpiad(args.ops, args.repeats)
    try:
        t_th, g_th = time_torch(args.ops, args.repeats)
    except ImportError:
        t_th = g_th = None
    print(f"chain of {args.ops} elementwise ops on 1-element float64, median of {args.repeats}")
    print(f"gpumpiad: {1e6 * t_gp / args.ops:8.2f} us/op   (gradient {g_gp:.12g})")
    if t_th is not None:
        print(f"pytorch : {1e6 * t_th / args.ops:8.2f} us/op   (gradient {g_th:.12g})")
        print(f"ratio gpumpiad/pytorch: {t_gp / t_th:.2f}")
        assert abs(g_gp - g_th) <= 1e-9 * max(1.0, abs(g_th)), "gradients disagree"
    if args.profile:
        grad = gp.grad(lambda x: chain_gpumpiad(x, args.ops))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeats):
            grad(np.array([0.5]))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
