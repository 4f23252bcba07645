"""``check_grad`` (gradcheck.py): passes right gradients, fails wrong ones loudly, on every rank.

A wrong custom_op vjp is caught for serial and for distributed arguments (naming the argument,
the element, the rank and both values); float32 runs with its own tolerances.
"""
from __future__ import annotations

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import mpi_rank, mpi_size, mpi_sum


def _cube(scale):
    """x ** 3 with a vjp scaled by ``scale`` (1.0 is right, anything else is wrong)."""
    op = gp.custom_op(lambda x: x ** 3, name=f"cube_{scale}")
    op.defvjp(lambda g, ans, x: scale * 3 * x ** 2 * g)
    return op


def _objective(op):
    return lambda x, y: mpi_sum(gp.sum(op(x) * y) + gp.sum(gp.sin(y)))


def _args(dtype):
    rank = mpi_rank()
    serial = np.linspace(0.5, 1.5, 5).astype(dtype)
    distributed = gp.tensor(np.random.default_rng(rank).uniform(0.5, 1.5, rank + 2).astype(dtype),
                            distributed=True)
    return serial, distributed


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_check_grad_passes_and_fails():
    size, rank = mpi_size(), mpi_rank()
    for dtype in (np.float64, np.float32):
        serial, distributed = _args(dtype)
        weights = gp.tensor(np.full(distributed.shape, 0.7, dtype), distributed=True)
        # Right vjp: passes for a serial and for a distributed argument.
        report = gp.check_grad(_objective(_cube(1.0)), serial, np.asarray(serial[::-1]))
        parallel_assert(report["checked"] == 10 and report["max_rank_disagreement"] == 0.0,
                        str(report))
        report = gp.check_grad(_objective(_cube(1.0)), distributed, weights, argnums=0)
        parallel_assert(report["checked"] == rank + 2, str(report))
        # Wrong vjp on a serial argument: every rank raises, naming argument, element and values.
        with pytest.raises(gp.GradientCheckError,
                           match=r"argument 0, element \(np\.int64\(\d\),\) \(serial\): reverse "
                                 r"mode gives -?\d.*finite differences give -?\d") as info:
            gp.check_grad(_objective(_cube(1.1)), serial, np.asarray(serial[::-1]))
        parallel_assert(f"on {size} rank(s)" in str(info.value), str(info.value))
        # Wrong vjp on a distributed argument: the failing rank is named, seen from every rank.
        with pytest.raises(gp.GradientCheckError,
                           match=r"argument 0, element \(np\.int64\(\d\),\) on rank \d+: reverse"
                           ) as info:
            gp.check_grad(_objective(_cube(0.9)), distributed, weights, argnums=0)
        for r in range(size):
            parallel_assert(f"on rank {r}:" in str(info.value), str(info.value))
        # Only the wrong argument is named.
        with pytest.raises(gp.GradientCheckError) as info:
            gp.check_grad(_objective(_cube(2.0)), serial, np.asarray(serial[::-1]))
        parallel_assert("argument 1" not in str(info.value), str(info.value))


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_check_grad_wrong_on_one_rank_only():
    """A vjp that is wrong on the last rank only: distributed arguments fail there and only
    there; serial arguments show the cross-rank disagreement."""
    size, rank = mpi_size(), mpi_rank()
    bad = 1.0 if rank < size - 1 else 1.5
    op = gp.custom_op(lambda x: x * x, lambda g, ans, x: bad * 2 * x * g, name="square")
    x = gp.tensor(np.array([0.5, 1.0]) + rank, distributed=True)
    with pytest.raises(gp.GradientCheckError, match=rf"on rank {size - 1}: reverse") as info:
        gp.check_grad(lambda x: mpi_sum(gp.sum(op(x))), x)
    parallel_assert(all(f"on rank {r}:" not in str(info.value) for r in range(size - 1)))
    if size > 1:
        with pytest.raises(gp.GradientCheckError, match="differs across ranks"):
            gp.check_grad(lambda x: gp.sum(op(x)), np.array([0.5, 1.0]))


def test_check_grad_options_and_errors():
    f = lambda x: gp.sum(gp.exp(x))  # noqa: E731
    x = np.linspace(-1.0, 1.0, 40)
    assert gp.check_grad(f, x)["checked"] == 16
    assert gp.check_grad(f, x, max_elements=5)["checked"] == 5
    assert gp.check_grad(f, x, max_elements=100, eps=1e-5, rtol=1e-6, atol=1e-8)["checked"] == 40
    assert gp.check_grad(lambda x, n: gp.sum(x ** n), x, 3)["checked"] == 16  # int skipped
    with pytest.raises(ValueError, match="no floating-point argument"):
        gp.check_grad(lambda n: gp.tensor(1.0) * n, 3)
    # A too-tight tolerance makes a right gradient fail (float32 at float64 tolerances).
    x32 = np.linspace(0.1, 2.0, 8).astype(np.float32)
    gp.check_grad(lambda x: gp.sum(gp.log(x) * x), x32)
    with pytest.raises(gp.GradientCheckError):
        gp.check_grad(lambda x: gp.sum(gp.log(x) * x), x32, eps=1e-7, rtol=1e-9, atol=1e-12)
