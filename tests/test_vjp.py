"""``gpumpiad.vjp``: vector-Jacobian products of non-scalar, serial or distributed values.

The pullback of a cotangent ȳ must equal the gradient of the serial scalar ⟨f(x), ȳ⟩ (summed
over ranks for a distributed value), which value_and_grad computes and check_grad verifies.
"""
from __future__ import annotations

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import mpi_rank, mpi_size
from gpumpiad.backend import to_numpy


def _close(a, b):
    return bool(np.allclose(to_numpy(a), to_numpy(b), rtol=1e-12, atol=1e-14))


def _programs():
    r = mpi_rank()
    w = gp.tensor(np.arange(1.0, 4.0) + r, distributed=True)
    return {
        "local serial": (lambda x: gp.sin(x) * x, False),
        "mpi_sum": (lambda x: gp.mpi_sum(x * x), False),
        "distributed": (lambda x: x * w, True),
        "allgather": (lambda x: gp.mpi_allgather(gp.reshape(x * w, (1, 3))), False),
        "bcast of a distributed value": (lambda x: gp.mpi_bcast(x * w, root=mpi_size() - 1),
                                         False),
    }


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_pullback_is_the_gradient_of_the_inner_product():
    rank = mpi_rank()
    x = np.array([0.3, -1.1, 2.0])
    for name, (fn, distributed) in _programs().items():
        value, pullback = gp.vjp(fn, x)
        rng = np.random.default_rng(rank if distributed else 7)  # serial: same ȳ everywhere
        ybar = rng.standard_normal(np.shape(value))

        def inner(t, fn=fn, ybar=ybar, distributed=distributed):
            dot = gp.sum(fn(t) * ybar)
            return gp.mpi_sum(dot) if distributed else dot

        expected_value, expected = gp.value_and_grad(inner)(x)
        got = pullback(ybar)
        again = pullback(gp.tensor(ybar, distributed=distributed))
        parallel_assert(_close(got, expected) and _close(again, expected),
                        f"{name}: pullback {got} / {again}, gradient of <f, ȳ> {expected}")
        parallel_assert(_close(np.sum(to_numpy(value) * ybar) if not distributed
                               else gp.mpi_sum(gp.tensor(np.sum(to_numpy(value) * ybar),
                                                         distributed=True)).item(),
                               expected_value), f"{name}: value {value}")
        gp.check_grad(inner, x)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_mpi_sum_pullback_follows_the_convention():
    """mpi_sum's reverse rule: ȳ to each rank's term; a serial x (a term on every rank) gets
    P·ȳ, a distributed x gets ȳ."""
    P = mpi_size()
    ybar = np.array([1.0, -2.0, 0.5])
    _, serial = gp.vjp(gp.mpi_sum, np.ones(3))
    _, dist = gp.vjp(gp.mpi_sum, gp.tensor(np.ones(3) * mpi_rank(), distributed=True))
    gs, gd = serial(ybar), dist(ybar)
    parallel_assert(_close(gs, P * ybar) and _close(gd, ybar), f"{gs}, {gd}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_repeated_pullbacks_agree_on_shares_once():
    """A pullback through mpi_sum issues no agreement collective on where the reverse
    allreduces go (its last sink and a small serial leaf need none), on the first pass or a
    repeated one, and a serial argument's shares still add up."""
    world = gp.comm.world()
    P = mpi_size()
    x = gp.tensor(np.arange(3.0) + mpi_rank(), distributed=True)
    s = np.arange(3.0)
    for arg, scale in ((x, 1), (s, P)):  # a serial x is a term on every rank: P * ybar
        _, pullback = gp.vjp(gp.mpi_sum, arg)
        before = world.collectives
        first = pullback(np.ones(3))
        between = world.collectives
        second = pullback(np.full(3, 2.0))
        # The serial argument's shares need their allreduce on every pass.
        per_pass = 1 if (P > 1 and arg is s) else 0
        parallel_assert(between - before == per_pass
                        and world.collectives - between == per_pass,
                        f"collectives: first pass {between - before}, second "
                        f"{world.collectives - between}")
        parallel_assert(np.array_equal(to_numpy(first), np.full(3, float(scale)))
                        and np.array_equal(to_numpy(second), np.full(3, 2.0 * scale)),
                        f"{first} {second}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_argnums_tuple_and_release():
    x, y = np.array([1.0, 2.0]), np.array([3.0, -1.0])
    value, pullback = gp.vjp(lambda a, b: a * b, x, y, argnums=(0, 1))
    ga, gb = pullback(np.array([1.0, 10.0]))
    parallel_assert(_close(value, x * y) and _close(ga, [3.0, -10.0]) and _close(gb, [1.0, 20.0]))
    # The recorded operations are kept exactly as long as the pullback.
    seen = []
    _, pullback = gp.vjp(lambda a: seen.append(a) or a * 2.0, x)
    tape = seen.pop()._tape
    parallel_assert(len(tape.nodes) == 1)
    del pullback  # no cycle holds it: dropping it releases the tape at once
    parallel_assert(tape.nodes == [], "the pullback's tape outlived it")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_what_comes_back_is_the_callers_alone():
    """Reverse rules pass cotangents straight through (an identity, an addition, a reshape, the
    sum over ranks of a distributed value): no returned value or gradient may share memory with
    an argument, the cotangent or another gradient, so writing into one changes nothing else."""
    @gp.custom_op(layout="distributed")
    def half_square(a):
        return 0.5 * a * a

    @half_square.defvjp
    def _(g, ans, a):
        return a  # right for the cotangent 1 alone; what matters is whose memory it is

    programs = {
        "identity": (lambda a, b: a, (0,)),
        "custom op whose reverse rule returns its input": (lambda a, b: half_square(a), (0,)),
        "addition": (lambda a, b: a + b, (0, 1)),
        "reshape": (lambda a, b: gp.reshape(a, (3, 1)), (0,)),
        "slice": (lambda a, b: a[1:], (0,)),
        "mpi_sum of a distributed value": (lambda a, b: gp.mpi_sum(a), (0,)),
    }
    for name, (fn, nums) in programs.items():
        x = gp.tensor(np.array([1.0, 2.0, 3.0]), distributed=True)
        y = np.array([4.0, 5.0, 6.0])
        value, pullback = gp.vjp(fn, x, y, argnums=nums)
        expected_value = to_numpy(value).copy()
        ybar = np.full(np.shape(value), 2.0)
        grads = pullback(ybar)
        grads = grads if isinstance(grads, tuple) else (grads,)
        expected = [to_numpy(g).copy() for g in grads]
        x.data[...] = -1.0
        y[...] = -1.0
        ybar[...] = -1.0
        parallel_assert(np.array_equal(to_numpy(value), expected_value), f"{name}: value changed")
        parallel_assert(all(np.array_equal(to_numpy(g), e) for g, e in zip(grads, expected)),
                        f"{name}: a gradient changed with the arguments or the cotangent")
        grads[0][...] = 7.0
        parallel_assert(all(np.array_equal(to_numpy(g), e)
                            for g, e in zip(grads[1:], expected[1:])),
                        f"{name}: a gradient changed with another")
    _, (ga, gb) = gp.value_and_grad(lambda a, b: a + b, argnums=(0, 1))(np.array(2.0),
                                                                         np.array(3.0))
    ga[...] = 5.0
    parallel_assert(float(gb) == 1.0, "value_and_grad: one gradient is another")


@pytest.mark.parallel(nprocs=[1, 2])
def test_bad_input_is_named():
    me = f"rank {mpi_rank()}"
    _, pullback = gp.vjp(lambda a: a * 2.0, np.ones(3))
    with pytest.raises(ValueError, match=f"{me}: the pullback's cotangent must have the value's "
                                         r"shape \(3,\), got \(2,\)"):
        pullback(np.ones(2))
    with pytest.raises(TypeError, match=f"{me}: vjp's fn must return a gpumpiad Tensor, got "
                                        "float"):
        gp.vjp(lambda a: 1.0, np.ones(3))
    with pytest.raises(TypeError, match=f"{me}: vjp's fn must return a Tensor of real floating "
                                        "dtype, got bool"):
        gp.vjp(lambda a: a > 0.0, np.ones(3))
    with pytest.raises(TypeError, match=f"{me}: vjp's fn must be callable"):
        gp.vjp("f", np.ones(3))
