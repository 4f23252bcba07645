"""Tests of gpumpiad.optimize.minimize: the seed problem (and its default stopping rule),
distributed parameters, dist-lbfgs against its one-rank run, SciPy pass-through, argument checks
on every rank, checkpoint/resume (in process and after a kill) and checkpoints of other
problems."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.optimize
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad import checkpoint
from gpumpiad.checkpoint import CheckpointError
from gpumpiad.optimize import minimize

SEED_ROOT = {1: 1.0, 2: 1.0, 3: (5 ** 0.5 - 1) / 2, 4: 0.5436890126920764}


def seed_loss(theta, target=2.0):
    """(sum over ranks r of theta**r - target)**2: one term per rank."""
    terms = gpumpiad.mpi_bcast(theta) ** gpumpiad.mpi_rank()
    return (gpumpiad.mpi_sum(terms).sum() - target) ** 2


def rosenbrock(x):
    return 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2


def _same_everywhere(value):
    values = MPI.COMM_WORLD.allgather(np.asarray(value).tobytes())
    return all(v == values[0] for v in values)


def _shared_tmp(tmp_path):
    return MPI.COMM_WORLD.bcast(str(tmp_path) if MPI.COMM_WORLD.rank == 0 else None)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_seed_problem(method):
    size = MPI.COMM_WORLD.size
    res = minimize(seed_loss, np.ones(1), method=method, tol=1e-14, trace=False)
    theta = float(res.x[0])
    if size == 1:  # L is the constant 1: nothing to do
        parallel_assert(theta == 1.0 and res.fun == 1.0 and res.nit == 0, f"{res}")
    else:
        parallel_assert(abs(theta - SEED_ROOT[size]) < 1e-10, f"theta={theta!r} at P={size}")
        parallel_assert(res.success and res.nit <= 15, f"{res}")
    parallel_assert(res.x.shape == (1,))
    parallel_assert(_same_everywhere([theta, res.fun, res.nit]))


@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_default_stopping_reaches_the_root(method):
    size = MPI.COMM_WORLD.size
    roots = np.roots([1.0] * (size - 1) + [-1.0])  # 1 + θ + ... + θ^(P-1) = 2
    root = float(roots[(np.abs(roots.imag) < 1e-12) & (roots.real > 0)].real[0])
    res = minimize(seed_loss, np.ones(1), method=method, trace=False)
    theta = float(res.x[0])
    parallel_assert(abs(theta - root) < 1e-10,
                    f"P={size}: θ={theta!r}, root {root!r}, off by {theta - root:.2e} ({res})")
    parallel_assert(res.success and res.nit <= 15, f"{res}")
    parallel_assert(_same_everywhere([theta, res.fun, res.nit]))


@pytest.mark.parallel(nprocs=[1, 2])
def test_trace_on_root_only(capsys):
    res = minimize(lambda x: ((x - 3.0) ** 2).sum(), np.zeros(2), options={"maxiter": 3})
    out = capsys.readouterr().out.splitlines()
    if MPI.COMM_WORLD.rank == 0:
        ok = (out[0].split() == ["Iter", "Function", "value", "Gradient", "norm", "Time", "(s)"]
              and out[1].split()[:3] == ["0", "1.800000e+01", "6.000000e+00"]
              and len(out) == 2 + res.nit)
    else:
        ok = out == []
    parallel_assert(ok, f"rank {MPI.COMM_WORLD.rank} printed {out}")


def _lsq_problem(comm):
    """0.5 sum_i (a_i x_i - b_i)**2 + 0.5 lam (sum_i x_i - s)**2 with uneven pieces per rank.

    Returns the loss, this rank's x0 piece, its slice of the global vector, and the exact
    minimiser (solved densely with NumPy)."""
    counts = [3 + 2 * r for r in range(comm.size)]
    n = sum(counts)
    rng = np.random.default_rng(42)
    a = rng.uniform(1.0, 3.0, n)
    b = rng.standard_normal(n)
    lam, s = 0.7, 1.5
    start = sum(counts[:comm.rank])
    mine = slice(start, start + counts[comm.rank])
    a_r, b_r = a[mine], b[mine]

    def loss(x):
        r = x * a_r - b_r
        t = gpumpiad.mpi_sum(x.sum(), comm=x.comm) - s
        return 0.5 * gpumpiad.mpi_sum((r * r).sum(), comm=x.comm) + 0.5 * lam * t * t

    hess = np.diag(a * a) + lam * np.ones((n, n))
    exact = np.linalg.solve(hess, a * b + lam * s)
    return loss, np.zeros(counts[comm.rank]), mine, exact


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_distributed_least_squares(method):
    comm = gpumpiad.Comm()
    loss, x0, mine, exact = _lsq_problem(comm)
    res = minimize(loss, gpumpiad.tensor(x0, distributed=True), method=method, tol=1e-14,
                   trace=False)
    parallel_assert(res.success, f"{res.message}")
    parallel_assert(res.x_local.shape == x0.shape)
    parallel_assert(np.allclose(res.x_local, exact[mine], rtol=0, atol=1e-6),
                    f"{res.x_local} vs {exact[mine]}")
    if method == "L-BFGS-B":  # the root held the global vector; every rank gets it
        parallel_assert(res.x.shape == exact.shape and np.allclose(res.x, exact, atol=1e-6))
        parallel_assert(np.array_equal(res.x[mine], res.x_local))
        parallel_assert(_same_everywhere(res.x))
    else:  # no rank holds the global vector
        parallel_assert(res.x is res.x_local)


def _coupled_problem(comm, counts, rank_index):
    """A non-quadratic, non-separable loss over a vector split as ``counts``."""
    n = sum(counts)
    w = np.linspace(1.0, 30.0, n)
    c = np.cos(np.arange(n))
    start = sum(counts[:rank_index])
    mine = slice(start, start + counts[rank_index])
    w_r, c_r = w[mine], c[mine]

    def loss(x):
        d = x - c_r
        quad = gpumpiad.mpi_sum((w_r * d * d).sum(), comm=x.comm)
        norm2 = gpumpiad.mpi_sum((x * x).sum(), comm=x.comm)
        return 0.5 * quad + 0.25 * norm2 * norm2 + gpumpiad.mpi_sum(
            gpumpiad.log(gpumpiad.exp(x) + gpumpiad.exp(-x)).sum(), comm=x.comm)

    return loss, np.zeros(counts[rank_index]), mine


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_dist_lbfgs_matches_one_rank_run():
    world = gpumpiad.Comm()
    counts = [2 + (r % 3) for r in range(world.size)]
    n = sum(counts)

    def run(comm, pieces, index):
        loss, x0, _ = _coupled_problem(comm, pieces, index)
        hist = []
        # stopping short of the rounding floor, where the rounding of each rank count would
        # decide the last iteration
        res = minimize(loss, gpumpiad.tensor(x0, distributed=True, comm=comm),
                       method="dist-lbfgs", options={"maxcor": 3, "gtol": 1e-9, "ftol": 1e-9},
                       callback=lambda r: hist.append((r.x.copy(), r.fun)), trace=False)
        return res, hist

    res, hist = run(world, counts, world.rank)
    # the same algorithm on the gathered vectors, on one rank
    ref, ref_hist = run(gpumpiad.Comm(MPI.COMM_SELF), [n], 0)
    parallel_assert(res.nit == ref.nit and len(hist) == len(ref_hist) and res.nit > 5,
                    f"{res.nit} vs {ref.nit}")
    worst = 0.0
    for (x_piece, f), (x_ref, f_ref) in zip(hist, ref_hist):
        x = np.concatenate(world.mpi.allgather(x_piece))
        worst = max(worst, np.max(np.abs(x - x_ref)), abs(f - f_ref))
    parallel_assert(worst < 1e-10, f"largest difference {worst}")
    parallel_assert(res.nfev == ref.nfev)


@pytest.mark.parallel(nprocs=[1, 2])
def test_scipy_pass_through():
    quad = lambda x: ((x - 3.0) ** 2).sum()  # noqa: E731
    bounded = minimize(quad, np.zeros(3), bounds=[(0, 1), (-1, 5), (None, 2)], trace=False)
    parallel_assert(np.allclose(bounded.x, [1.0, 3.0, 2.0]), f"{bounded.x}")

    seen = []
    short = minimize(rosenbrock, np.array([-1.2, 1.0]), options={"maxiter": 2},
                     callback=lambda xk: seen.append(xk.copy()), trace=False)
    parallel_assert(short.nit == 2 and "ITERATIONS" in short.message, f"{short}")
    if MPI.COMM_WORLD.rank == 0:  # SciPy runs the callback on the root only
        parallel_assert(len(seen) == short.nit and np.array_equal(seen[-1], short.x))
    else:
        parallel_assert(seen == [])

    def stop(intermediate_result):
        raise StopIteration

    stopped = minimize(quad, np.zeros(2), callback=stop, trace=False)
    parallel_assert(stopped.nit == 1 and not stopped.success, f"{stopped}")

    stopped = minimize(quad, np.zeros(2), method="dist-lbfgs", callback=stop, trace=False)
    parallel_assert(stopped.nit == 1 and stopped.status == 99, f"{stopped}")

    other = minimize(quad, np.zeros((2, 2)), method="BFGS", trace=False)
    parallel_assert(other.x.shape == (2, 2) and np.allclose(other.x, 3.0, atol=1e-6))


@pytest.mark.parallel(nprocs=[1, 2])
def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown method 'lbfgs'"):
        minimize(seed_loss, np.ones(1), method="lbfgs")
    with pytest.raises(ValueError, match="does not support bounds"):
        minimize(seed_loss, np.ones(1), method="dist-lbfgs", bounds=[(0, 1)])
    with pytest.raises(ValueError, match="unknown option 'factr'"):
        minimize(seed_loss, np.ones(1), method="dist-lbfgs", options={"factr": 10})
    with pytest.raises(ValueError, match="checkpoint_every"):
        minimize(seed_loss, np.ones(1), checkpoint_every=0)


def _quad(x):
    return ((x - 3.0) ** 2).sum()


def _raised(call):
    """The exception ``call()`` raised on this rank, or None."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the tests look at what was raised
        return exc
    return None


BAD_ARGUMENTS = [
    (dict(options={"maxiter": "10"}), TypeError,
     r"options\['maxiter'\] must be an int >= 0, got '10' \(str\)"),
    (dict(options={"maxiter": 2.0}), TypeError, r"options\['maxiter'\] must be an int"),
    (dict(options={"maxiter": -1}), ValueError, r"options\['maxiter'\] must be an int >= 0, "
                                                r"got -1"),
    (dict(options={"gtol": "small"}), TypeError, r"options\['gtol'\] must be a real number"),
    (dict(options={"ftol": float("nan")}), ValueError, r"options\['ftol'\] must be a finite"),
    (dict(options={"maxiters": 10}), ValueError,
     r"unknown option 'maxiters' for method 'L-BFGS-B'; expected one of \[.*'maxiter'"),
    (dict(options=[("maxiter", 10)]), TypeError, r"options must be a dict or None, got"),
    (dict(options={1: 10}), TypeError, r"options must have str keys"),
    (dict(method="dist-lbfgs", options={"maxiter": "10"}), TypeError,
     r"options\['maxiter'\] must be an int >= 0, got '10' \(str\)"),
    (dict(method="dist-lbfgs", options={"maxcor": 0}), ValueError,
     r"options\['maxcor'\] must be an int >= 1, got 0"),
    (dict(method="dist-lbfgs", options={"c1": 2.0}), ValueError,
     r"options\['c1'\] must be in \(0, 1\), got 2.0"),
    (dict(callback=5), TypeError, r"callback must be callable or None, got 5 \(int\)"),
    (dict(method="dist-lbfgs", callback=5), TypeError, r"callback must be callable or None"),
    (dict(tol="1e-3"), TypeError, r"tol must be a real number >= 0, got '1e-3' \(str\)"),
    (dict(tol=-1.0), ValueError, r"tol must be a finite real number >= 0, got -1.0"),
    (dict(trace="yes"), TypeError, r"trace must be a bool, got 'yes' \(str\)"),
    (dict(checkpoint=5), TypeError, r"checkpoint must be a str or os.PathLike .* got 5"),
    (dict(checkpoint=""), ValueError, r"checkpoint must be a file name or None, got ''"),
    (dict(checkpoint_every=2.0), TypeError,
     r"checkpoint_every must be an int >= 1, got 2.0 \(float\)"),
    (dict(checkpoint_every=0), ValueError, r"checkpoint_every must be an int >= 1, got 0"),
    (dict(bounds=[(0, 1)]), ValueError,
     r"bounds must have one entry per parameter: 2, the global size of x0; got 1"),
    (dict(bounds=[(0, 1)] * 3), ValueError, r"bounds must have one entry per parameter: 2"),
    (dict(bounds=5), TypeError, r"bounds must be a sequence of \(low, high\) pairs or a "
                                r"scipy.optimize.Bounds, got 5 \(int\)"),
    (dict(bounds=[(0, 1), 7]), TypeError, r"bounds\[1\] must be a \(low, high\) pair, got 7"),
    (dict(bounds=[(0, 1), ("a", 1)]), TypeError, r"bounds\[1\] must hold real numbers or None"),
    (dict(bounds=[(0, 1), (2, 1)]), ValueError, r"bounds\[1\] must have low <= high, got "
                                                r"\(2, 1\)"),
    (dict(bounds=scipy.optimize.Bounds([0, 0, 0], [1, 1, 1])), ValueError,
     r"bounds.lb and bounds.ub must have one entry per parameter \(or a scalar\): 2, the "
     r"global size of x0; got 3 and 3"),
    (dict(method="BFGS", bounds=[(0, 1), (0, 1)]), ValueError,
     r"method 'BFGS' does not support bounds"),
    (dict(method="dist-lbfgs", bounds=[(0, 1), (0, 1)]), ValueError,
     r"'dist-lbfgs' does not support bounds"),
    (dict(method="lbfgs"), ValueError, r"unknown method 'lbfgs'; expected 'dist-lbfgs' or"),
    (dict(method=3), TypeError, r"method must be a str, got 3 \(int\)"),
    (dict(method="trust-ncg"), ValueError, r"method 'trust-ncg' needs the Hessian"),
    (dict(fn=5), TypeError, r"fn must be callable, got 5 \(int\)"),
    (dict(x0=np.array(["a", "b"])), TypeError, r"x0 must be real numbers \(int or float\), "
                                                r"got dtype <U1"),
    (dict(x0=np.zeros(0)), ValueError, r"x0 must hold at least one number, got an empty x0"),
    (dict(x0=np.array([1.0, np.nan])), ValueError, r"x0 holds NaN or Inf"),
]


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_argument_errors_on_every_rank():
    rank = MPI.COMM_WORLD.rank
    calls = []

    def counted(x):
        calls.append(1)
        return _quad(x)

    for kwargs, kind, pattern in BAD_ARGUMENTS:
        kwargs = dict(kwargs)
        fn, x0 = kwargs.pop("fn", counted), kwargs.pop("x0", np.zeros(2))
        exc = _raised(lambda: minimize(fn, x0, **{"trace": False, **kwargs}))
        message = str(exc)
        parallel_assert(type(exc) is kind and message.startswith(f"rank {rank}: ")
                        and re.search(pattern, message) is not None,
                        f"{kwargs}: expected {kind.__name__} matching {pattern!r}, got "
                        f"{type(exc).__name__}: {message}")
    parallel_assert(calls == [], "the loss ran before the arguments were checked")
    res = minimize(_quad, np.zeros(2), trace=False)  # the ranks are still in step
    parallel_assert(res.success and np.allclose(res.x, 3.0))


@pytest.mark.parallel(nprocs=[2, 3])
def test_argument_errors_of_one_rank_raise_on_every_rank():
    rank, last = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size - 1
    mine = rank == last

    exc = _raised(lambda: minimize(_quad, np.zeros(2), callback=5 if mine else None,
                                   trace=False))
    parallel_assert(type(exc) is TypeError
                    and str(exc).startswith(f"rank {last}: minimize's callback must be "),
                    f"{exc!r}")

    exc = _raised(lambda: minimize(_quad, np.array(["x"]) if mine else np.zeros(2),
                                   trace=False))
    parallel_assert(type(exc) is TypeError and str(exc).startswith(f"rank {last}: ")
                    and "x0 must be real numbers" in str(exc), f"{exc!r}")

    # dist-lbfgs runs its iteration on every rank: its options must agree
    exc = _raised(lambda: minimize(_quad, np.zeros(2), method="dist-lbfgs",
                                   options={"maxiter": 3 + mine}, trace=False))
    parallel_assert(type(exc) is ValueError and str(exc).startswith(
        f"rank {rank}: minimize's options is not the same on every rank: rank 0: ")
        and f"rank {last}: {{" in str(exc) and "'maxiter': 4" in str(exc), f"{exc!r}")

    x0 = gpumpiad.tensor(np.zeros(2), distributed=True) if mine else np.zeros(2)
    exc = _raised(lambda: minimize(_quad, x0, trace=False))
    parallel_assert(type(exc) is ValueError
                    and "x0 (distributed or not) is not the same on every rank" in str(exc),
                    f"{exc!r}")

    exc = _raised(lambda: minimize(_quad, np.zeros(2), method="BFGS" if mine else "L-BFGS-B",
                                   trace=False))
    parallel_assert(type(exc) is ValueError and "method is not the same on every rank: rank "
                    "0: 'l-bfgs-b'" in str(exc), f"{exc!r}")

    res = minimize(_quad, np.zeros(2), trace=False)  # the ranks are still in step
    parallel_assert(res.success and np.allclose(res.x, 3.0))


@pytest.mark.parallel(nprocs=[1, 2])
def test_numpy_numbers_are_accepted(tmp_path):
    folder = _shared_tmp(tmp_path)
    for method in ("L-BFGS-B", "dist-lbfgs"):
        res = minimize(rosenbrock, np.array([-1.2, 1.0]), method=method,
                       options={"maxiter": np.int64(3), "maxcor": np.int32(4),
                                "maxls": np.int16(20), "gtol": np.float32(1e-9)},
                       checkpoint=os.path.join(folder, f"{method}.ckpt"),
                       checkpoint_every=np.int64(2), trace=np.bool_(False))
        parallel_assert(res.nit == 3, f"{method}: {res}")
    res = minimize(_quad, np.zeros(2), tol=np.float64(1e-12), trace=False,
                   bounds=[(np.float32(0), np.int64(1)), (None, np.float64(5.0))])
    parallel_assert(np.allclose(res.x, [1.0, 3.0]), f"{res.x}")
    res = minimize(_quad, np.zeros(2), trace=False, bounds=scipy.optimize.Bounds(0, 2))
    parallel_assert(np.allclose(res.x, [2.0, 2.0]), f"{res.x}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_loss_error_raises_on_every_rank():
    def distributed_loss(x):
        return (x * x).sum() * (gpumpiad.mpi_rank() + 1)

    for method in ("L-BFGS-B", "dist-lbfgs"):
        with pytest.raises(gpumpiad.LossError, match="distributed"):
            minimize(distributed_loss, np.ones(2), method=method, trace=False)
    res = minimize(seed_loss, np.ones(1), trace=False)  # the ranks are still in step
    parallel_assert(res.x.shape == (1,))


@pytest.mark.parallel(nprocs=[1, 3])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_resume_matches_uninterrupted(tmp_path, method):
    comm = gpumpiad.Comm()
    loss, x0, _, _ = _lsq_problem(comm)
    calls = []

    def counted(x):
        calls.append(1)
        return loss(x)

    x0 = gpumpiad.tensor(x0 + 0.5, distributed=True)
    path = os.path.join(_shared_tmp(tmp_path), "run.ckpt")
    ref = minimize(counted, x0, method=method, tol=1e-12, trace=False)
    ref_calls = len(calls)

    first = minimize(counted, x0, method=method, tol=1e-12, options={"maxiter": 3},
                     checkpoint=path, trace=False)
    parallel_assert(first.nit == 3 and os.path.exists(path))
    del calls[:]
    again = minimize(counted, x0, method=method, tol=1e-12, checkpoint=path,
                     checkpoint_every=2, trace=False)
    parallel_assert(np.array_equal(again.x_local, ref.x_local) and again.fun == ref.fun
                    and again.nit == ref.nit and again.nfev == ref.nfev, f"{again} vs {ref}")
    parallel_assert(len(calls) < ref_calls, f"{len(calls)} evaluations, {ref_calls} afresh")

    del calls[:]  # a finished run replays, evaluating only at x0 to check the problem
    done = minimize(counted, x0, method=method, tol=1e-12, checkpoint=path, trace=False)
    parallel_assert(np.array_equal(done.x_local, ref.x_local) and done.nit == ref.nit)
    parallel_assert(len(calls) == 1, f"{len(calls)} evaluations")

    # a fresh run with a checkpoint hands its evaluation at x0 to the optimiser
    del calls[:]
    fresh = minimize(counted, x0, method=method, tol=1e-12,
                     checkpoint=os.path.join(os.path.dirname(path), "fresh.ckpt"), trace=False)
    parallel_assert(np.array_equal(fresh.x_local, ref.x_local) and fresh.nfev == ref.nfev)
    parallel_assert(len(calls) == ref_calls, f"{len(calls)} evaluations, {ref_calls} without")


@pytest.mark.parallel(nprocs=[2])
def test_checkpoint_of_another_problem_is_refused(tmp_path):
    path = os.path.join(_shared_tmp(tmp_path), "run.ckpt")
    minimize(seed_loss, np.array([0.9]), options={"maxiter": 2}, checkpoint=path, trace=False)
    for method, x0 in (("L-BFGS-B", [0.8]), ("dist-lbfgs", [0.9]), ("L-BFGS-B", [0.9, 0.9])):
        with pytest.raises(CheckpointError, match="another problem"):
            minimize(seed_loss, np.array(x0), method=method, checkpoint=path, trace=False)
    if MPI.COMM_WORLD.rank == 0:
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"xyz")
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(CheckpointError, match="checksum"):
        minimize(seed_loss, np.array([0.9]), checkpoint=path, trace=False)


_LOSS_MISMATCH = re.compile(r"the loss at x0 is (\S+) in the checkpoint, (\S+) in this run")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_checkpoint_of_another_loss_is_refused(tmp_path, method):
    size = MPI.COMM_WORLD.size
    path = os.path.join(_shared_tmp(tmp_path), "run.ckpt")
    x0 = np.array([0.9])
    minimize(seed_loss, x0, method=method, options={"maxiter": 2}, checkpoint=path,
             trace=False)
    # the same method, size and x0, another loss: its value at x0 tells them apart
    exc = _raised(lambda: minimize(lambda t: seed_loss(t, target=3.0), x0, method=method,
                                   checkpoint=path, trace=False))
    message = str(exc)
    found = _LOSS_MISMATCH.search(message)
    s = sum(0.9 ** r for r in range(size))
    parallel_assert(isinstance(exc, CheckpointError) and message.startswith("rank 0: ")
                    and path in message and "written for another problem" in message
                    and found is not None
                    and np.isclose(float(found[1]), (s - 2.0) ** 2, rtol=1e-12)
                    and np.isclose(float(found[2]), (s - 3.0) ** 2, rtol=1e-12),
                    f"{exc!r}")
    parallel_assert(_same_everywhere(message))
    # the file is left alone: the first loss still resumes from it, to the root
    res = minimize(seed_loss, x0, method=method, checkpoint=path, trace=False)
    parallel_assert(res.success and (size == 1 or abs(res.x[0] - SEED_ROOT[size]) < 1e-10),
                    f"{res}")


@pytest.mark.parallel(nprocs=[1, 2, 3])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_checkpoint_of_a_loss_with_another_gradient_is_refused(tmp_path, method):
    rank = MPI.COMM_WORLD.rank
    path = os.path.join(_shared_tmp(tmp_path), "run.ckpt")
    x0 = gpumpiad.tensor(np.zeros(2), distributed=True)

    def shifted(c):  # sum of (x - c)**2 over the global vector: at x0, 2n and gradient -2c
        return lambda x: gpumpiad.mpi_sum(((x - c) ** 2).sum(), comm=x.comm)

    minimize(shifted(1.0), x0, method=method, options={"maxiter": 1}, checkpoint=path,
             trace=False)
    exc = _raised(lambda: minimize(shifted(-1.0), x0, method=method, checkpoint=path,
                                   trace=False))
    parallel_assert(isinstance(exc, CheckpointError) and str(exc).startswith("rank 0: ")
                    and path in str(exc) and "the gradient at x0 differs, largest at index 0: "
                    "-2.0 in the checkpoint, 2.0 in this run" in str(exc),
                    f"rank {rank}: {exc!r}")


@pytest.mark.parallel(nprocs=[1, 2])
@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_checkpoint_check_tolerates_rounding_only(tmp_path, method):
    path = os.path.join(_shared_tmp(tmp_path), "run.ckpt")
    x0 = np.array([0.9])

    def scaled(factor):
        return lambda theta: seed_loss(theta) * factor

    minimize(seed_loss, x0, method=method, options={"maxiter": 2}, checkpoint=path,
             trace=False)
    # rounding of a resume on other hardware or ranks: a few units in the last place
    res = minimize(scaled(1.0 + 1e-13), x0, method=method, checkpoint=path, trace=False)
    parallel_assert(res.success, f"{res}")
    exc = _raised(lambda: minimize(scaled(1.0 + 1e-6), x0, method=method, checkpoint=path,
                                   trace=False))
    parallel_assert(isinstance(exc, CheckpointError) and "the loss at x0 is" in str(exc)
                    and "relative tolerance 1.5e-08, sqrt(eps) of float64" in str(exc),
                    f"{exc!r}")

    # a checkpoint without the loss at x0 cannot be told from another problem's
    if MPI.COMM_WORLD.rank == 0:
        state = checkpoint.load(path)
        del state["f0"], state["g0"]
        checkpoint.save(path, state)
    MPI.COMM_WORLD.Barrier()
    exc = _raised(lambda: minimize(seed_loss, x0, method=method, checkpoint=path,
                                   trace=False))
    parallel_assert(isinstance(exc, CheckpointError) and str(exc).startswith("rank 0: ")
                    and "holds no loss and gradient at x0" in str(exc), f"{exc!r}")


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    import gpumpiad
    from gpumpiad.optimize import minimize

    method, path, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank, size = gpumpiad.mpi_rank(), gpumpiad.mpi_size()
    counts = [4 + r for r in range(size)]
    w = np.linspace(1.0, 20.0, sum(counts))[sum(counts[:rank]):sum(counts[:rank + 1])]

    def loss(x):
        norm2 = gpumpiad.mpi_sum((x * x).sum())
        return gpumpiad.mpi_sum((w * (x - 1.0) ** 2).sum()) + 0.1 * norm2 * norm2

    iterations = []

    def crash(result):
        iterations.append(1)
        if len(iterations) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    res = minimize(loss, gpumpiad.tensor(np.zeros(counts[rank]), distributed=True),
                   method=method, tol=1e-12, checkpoint=path or None, trace=False,
                   callback=(lambda r: crash(r)) if kill_after else None)
    x = np.concatenate(gpumpiad.Comm().mpi.allgather(np.ravel(res.x_local)))
    if rank == 0:
        print("RESULT " + json.dumps({"x": x.tolist(), "fun": res.fun, "nit": int(res.nit)}))
""")


def _mpiexec(script, *args):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_"))}
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, script, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return proc.returncode, json.loads(line[len("RESULT "):])
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["L-BFGS-B", "dist-lbfgs"])
def test_resume_after_kill(tmp_path, method):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    path = tmp_path / "run.ckpt"
    rc, reference = _mpiexec(script, method, "", 0)
    assert rc == 0 and isinstance(reference, dict), reference
    assert reference["nit"] > 5

    rc, out = _mpiexec(script, method, path, 4)
    assert rc != 0 and not isinstance(out, dict), out  # killed before it could finish
    assert path.exists()

    rc, resumed = _mpiexec(script, method, path, 0)
    assert rc == 0 and isinstance(resumed, dict), resumed
    assert resumed == reference
