"""Collectives: raw mpi4py vs gpumpiad (forward, forward+backward), torch.distributed (gloo)
and mpi4jax where installed, at 8 B, 1 MB and 64 MB; and communication/compute overlap.

Run:  mpiexec -n 2 python bench/bench_collectives.py [--repeats 20] [--out FILE]
      MPIR_CVAR_ASYNC_PROGRESS=1 mpiexec -n 2 python bench/bench_collectives.py --overlap-only
      mpiexec -n 2 python bench/bench_collectives.py --copy-cost-only
      GPUMPIAD_BACKEND=cupy mpiexec -n 2 python bench/bench_collectives.py   # device arrays

Each call moves a distributed float64 array ``x``: ``mpi_sum(x)``, ``mpi_bcast(x, root=0)``, and
a ring (send ``x`` to the next rank, receive from the previous one). Forward+backward is
``value, pullback = vjp(call, x)`` and ``pullback(ȳ)``; its raw counterpart is the forward call
plus the reverse communication written by hand: none for allreduce and bcast (the result is
serial, so ȳ is already the total: x̄ = ȳ on every rank, resp. on the root), the ring in the
other direction for sendrecv. torch and mpi4jax run the forward call (mpi4jax under
``jax.jit``); mpi4jax's forward+backward is ``jax.jit(jax.grad(...))`` of the allreduce, the one
of the three it can differentiate.

On the CuPy backend the data live on the GPU and raw mpi4py gets what a user would write by
hand: device arrays straight to MPI when it is CUDA-aware, else a copy to a pinned host buffer,
the MPI call and a copy back. torch and mpi4jax are then left out (their GPU paths need NCCL or
a CUDA build of mpi4jax).

Every timing is the median over repeats of the slowest rank's time, each repeat starting after
a barrier. Ratios are against raw mpi4py's blocking calls.

The copy cost: what a call sends is the value at the time of the call, so the library sends
from its own copy. The same gpumpiad call with that copy and without it (the caller's array
handed to MPI, as if the caller promised not to write it) alternate repeat by repeat; min and
median of each, and the load average.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from mpi4py import MPI

import gpumpiad as gp
from gpumpiad import backend, transport
from _timing import median_time

SIZES = {"8 B": 1, "1 MB": 1 << 17, "64 MB": 1 << 23}  # float64 elements


def raw_cases(n, comm):
    """``{call: (forward, forward + the reverse communication)}`` in raw mpi4py."""
    P, r = comm.size, comm.rank
    x, out = np.random.default_rng(r).standard_normal(n), np.empty(n)
    if backend.device_backend():
        return raw_device_cases(x, comm)
    back = np.empty(n)

    def ring():
        comm.Sendrecv(x, (r + 1) % P, 0, out, (r - 1) % P, 0)

    def ring_and_back():
        ring()
        comm.Sendrecv(out, (r - 1) % P, 1, back, (r + 1) % P, 1)

    allreduce = lambda: comm.Allreduce(x, out, op=MPI.SUM)  # noqa: E731
    bcast = lambda: comm.Bcast(x if r == 0 else out, root=0)  # noqa: E731
    return {"allreduce": (allreduce, allreduce), "bcast": (bcast, bcast),
            "sendrecv": (ring, ring_and_back)}


def raw_device_cases(host_x, comm):
    """mpi4py on CuPy arrays, by hand: direct when MPI is CUDA-aware, else staged."""
    import cupy
    import cupyx
    P, r = comm.size, comm.rank
    x, out, back = cupy.asarray(host_x), cupy.empty(host_x.size), cupy.empty(host_x.size)
    stream = cupy.cuda.get_current_stream()

    def call(mpi_call, src, dst):
        if transport.cuda_aware():
            def run():
                stream.synchronize()
                mpi_call(src, dst)
                return dst
            return run
        hsrc, hdst = cupyx.empty_pinned(src.shape), cupyx.empty_pinned(dst.shape)

        def run():
            src.get(out=hsrc)
            mpi_call(hsrc, hdst)
            dst.set(hdst)
            stream.synchronize()
            return dst
        return run

    allreduce = call(lambda a, b: comm.Allreduce(a, b, op=MPI.SUM), x, out)
    bcast = call(lambda a, b: comm.Bcast(a if r == 0 else b, root=0), x, out)
    ring = call(lambda a, b: comm.Sendrecv(a, (r + 1) % P, 0, b, (r - 1) % P, 0), x, out)
    ring_back = call(lambda a, b: comm.Sendrecv(a, (r - 1) % P, 1, b, (r + 1) % P, 1), out, back)
    return {"allreduce": (allreduce, allreduce), "bcast": (bcast, bcast),
            "sendrecv": (ring, lambda: (ring(), ring_back()))}


def _ready(array):
    backend.synchronize(array)
    return array


def gpumpiad_cases(n, comm):
    """``{call: (forward, forward + backward)}``; the backward pulls back a fixed ȳ."""
    P, r = comm.size, comm.rank
    xp = backend.array_module()
    x = gp.tensor(np.random.default_rng(r).standard_normal(n), distributed=True)
    ybar = xp.asarray(np.random.default_rng(P).standard_normal(n))  # the same on every rank

    def ring(x):
        gp.mpi_send(x, (r + 1) % P)
        return gp.mpi_recv(x, (r - 1) % P)

    def both(call):
        def run():
            _, pullback = gp.vjp(call, x)
            return _ready(pullback(ybar))
        return run

    programs = {"allreduce": gp.mpi_sum, "bcast": lambda x: gp.mpi_bcast(x, root=0),
                "sendrecv": ring}
    return {k: ((lambda f=f: _ready(f(x).data)), both(f)) for k, f in programs.items()}


def torch_cases(n, comm):
    if backend.device_backend():
        return None, "not run on device arrays"
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:
        return None, f"torch not importable ({exc})"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    P, r = comm.size, comm.rank
    x = torch.from_numpy(np.random.default_rng(r).standard_normal(n))
    out = torch.empty_like(x)

    def sendrecv():
        reqs = [dist.isend(x, (r + 1) % P), dist.irecv(out, (r - 1) % P)]
        for q in reqs:
            q.wait()

    return {"allreduce": lambda: dist.all_reduce(x.clone()),
            "bcast": lambda: dist.broadcast(x if r == 0 else out, src=0),
            "sendrecv": sendrecv}, f"torch {torch.__version__} gloo"


def mpi4jax_cases(n, comm):
    """``{call: (forward, forward + backward or None)}`` under ``jax.jit``."""
    if backend.device_backend():
        return None, "not run on device arrays"
    try:
        import jax
        import jax.numpy as jnp
        import mpi4jax
    except ImportError as exc:
        return None, f"mpi4jax/jax not importable ({type(exc).__name__}: {exc})"
    P, r = comm.size, comm.rank
    x = jnp.asarray(np.random.default_rng(r).standard_normal(n))
    allreduce = jax.jit(lambda x: mpi4jax.allreduce(x, op=MPI.SUM, comm=comm))
    bcast = jax.jit(lambda x: mpi4jax.bcast(x, 0, comm=comm))
    ring = jax.jit(lambda x: mpi4jax.sendrecv(x, x, (r - 1) % P, (r + 1) % P, comm=comm))
    grad = jax.jit(jax.grad(lambda x: mpi4jax.allreduce(x, op=MPI.SUM, comm=comm).sum()))
    run = lambda f: lambda: f(x).block_until_ready()  # noqa: E731
    return ({"allreduce": (run(allreduce), run(grad)), "bcast": (run(bcast), None),
             "sendrecv": (run(ring), None)},
            f"mpi4jax {mpi4jax.__version__} (jax {jax.__version__}), under jax.jit")


def overlap(comm, repeats):
    """Asynchronous mpi_sum of 64 MB, then a ~50 ms matmul, then the sum's result is read."""
    xp = backend.array_module()
    x = gp.tensor(np.ones(1 << 23), distributed=True)
    a = xp.asarray(np.random.default_rng(0).standard_normal((600, 600)))
    _ready(a @ a)  # library handles and kernels load outside the sizing loop
    k = 1
    while True:  # size the compute to ~50 ms
        t0 = time.perf_counter()
        for _ in range(k):
            b = a @ a
        _ready(b)
        if time.perf_counter() - t0 > 0.05 or k > 1 << 16:
            break
        k *= 2

    def compute():
        for _ in range(k):
            b = a @ a
        return b

    t_comm = median_time(lambda: _ready(gp.mpi_sum(x).data), repeats, comm)
    t_comp = median_time(lambda: _ready(compute()), repeats, comm)

    def both():
        s = gp.mpi_sum(x)  # posted, not waited for
        b = compute()
        return _ready(s.data), _ready(b)

    t_both = median_time(both, repeats, comm)
    return t_comm, t_comp, t_both


def copy_cost(comm, repeats):
    """Lines of a table: gpumpiad's broadcast and ring with the value-semantics copy and
    without it, alternating, at 1, 8 and 64 MB."""
    import functools
    import statistics
    copying = transport.send_buffer
    no_copy = functools.partial(copying, private=True)
    P, r = comm.size, comm.rank
    lines = [f"load average (1 min) at the start: {os.getloadavg()[0]:.2f}", "",
             "| call | size | with copy min / median (ms) | without min / median (ms) "
             "| median ratio |", "|---|---|---|---|---|"]
    for label, n in {"1 MB": 1 << 17, "8 MB": 1 << 20, "64 MB": 1 << 23}.items():
        x = np.random.default_rng(r).standard_normal(n)
        calls = {"bcast": lambda: gp.mpi_bcast(x, root=0).data,
                 "sendrecv": lambda: (gp.mpi_send(x, (r + 1) % P),
                                      gp.mpi_recv(x, (r - 1) % P).data)}
        for call, fn in calls.items():
            times = {"copy": [], "none": []}
            fn()
            for _ in range(repeats):
                for kind, sender in (("copy", copying), ("none", no_copy)):
                    transport.send_buffer = sender
                    comm.Barrier()
                    t0 = time.perf_counter()
                    fn()
                    times[kind].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
            transport.send_buffer = copying
            a, b = times["copy"], times["none"]
            lines.append(f"| {call} | {label} | {min(a) * 1e3:.3f} / "
                         f"{statistics.median(a) * 1e3:.3f} | {min(b) * 1e3:.3f} / "
                         f"{statistics.median(b) * 1e3:.3f} | "
                         f"{statistics.median(a) / statistics.median(b):.2f} |")
    lines.append(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    parser.add_argument("--overlap-only", action="store_true")
    parser.add_argument("--copy-cost-only", action="store_true")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    lines = []
    say = lines.append
    if args.copy_cost_only:
        lines += copy_cost(comm, args.repeats)
    elif not args.overlap_only:
        say("| call | size | mpi4py fwd (ms) | gpumpiad fwd (ms) | ratio | mpi4py fwd+bwd (ms) "
            "| gpumpiad fwd+bwd (ms) | ratio | torch gloo fwd (ms) | mpi4jax fwd (ms) "
            "| mpi4jax fwd+bwd (ms) |")
        say("|---|---|---|---|---|---|---|---|---|---|---|")
        notes = {}

        def ms(fn, reps):
            return f"{median_time(fn, reps) * 1e3:.3f}" if fn is not None else "n/a"

        for label, n in SIZES.items():
            reps = args.repeats if n < (1 << 20) else max(5, args.repeats // 3)
            raw = raw_cases(n, comm)
            ours = gpumpiad_cases(n, comm)
            tch, notes["torch"] = torch_cases(n, comm)
            jx, notes["mpi4jax"] = mpi4jax_cases(n, comm)
            for call, (raw_fwd, raw_both) in raw.items():
                t_raw, t_raw_both = median_time(raw_fwd, reps), median_time(raw_both, reps)
                t_fwd, t_both = median_time(ours[call][0], reps), median_time(ours[call][1], reps)
                jax_fwd, jax_both = jx[call] if jx else (None, None)
                say(f"| {call} | {label} | {t_raw * 1e3:.3f} | {t_fwd * 1e3:.3f} | "
                    f"{t_fwd / t_raw:.2f} | {t_raw_both * 1e3:.3f} | {t_both * 1e3:.3f} | "
                    f"{t_both / t_raw_both:.2f} | {ms(tch[call] if tch else None, reps)} | "
                    f"{ms(jax_fwd, reps)} | {ms(jax_both, reps)} |")
        say("")
        say(f"torch: {notes['torch']}; mpi4jax: {notes['mpi4jax']}")
        say("")
        lines += copy_cost(comm, max(5, args.repeats // 3))
    if not args.copy_cost_only:
        t_comm, t_comp, t_both = overlap(comm, max(5, args.repeats // 3))
        say("")
        say(f"overlap (MPIR_CVAR_ASYNC_PROGRESS="
            f"{os.environ.get('MPIR_CVAR_ASYNC_PROGRESS', 'unset')}): mpi_sum 64 MB "
            f"{t_comm * 1e3:.1f} ms + matmul {t_comp * 1e3:.1f} ms = "
            f"{(t_comm + t_comp) * 1e3:.1f} ms; issued together {t_both * 1e3:.1f} ms "
            f"(hidden: {max(0.0, t_comm + t_comp - t_both) / t_comm * 100:.0f}% of the "
            "communication)")
    if comm.rank == 0:
        header = (f"ranks {comm.size}, {MPI.Get_library_version().splitlines()[0].strip()}, "
                  f"mpi4py {__import__('mpi4py').__version__}, numpy {np.__version__}, "
                  f"Python {platform.python_version()}, "
                  f"{platform.processor() or platform.machine()}"
                  f", {os.cpu_count()} CPUs; backend {gp.backend_name()}, data path "
                  f"{transport.path_description()}")
        text = "\n".join([header, ""] + lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
