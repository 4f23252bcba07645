"""The entry points of autodiff.py at their edges: an argument differentiated twice, nested
differentiation (refused), pullback cotangents that are not arrays, a pullback whose tape was
released, debug mode's cross-rank check of a serial value's cotangent, and NumPy's functions on
Tensors (numpy.sum and numpy.mean differentiate; a traced Tensor converted to an array is an
error, not a gradient with a part missing; .numpy() is a copy), and gradients of the values at
the time of the call (a buffer reused by a loop, arguments overwritten before the pullback)."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import mpi_rank, mpi_size, mpi_sum
from gpumpiad.backend import to_numpy


def _close(a, b):
    return bool(np.allclose(to_numpy(a), to_numpy(b), rtol=1e-12, atol=1e-14))


def _objective(x, w):
    """A serial x broadcast and weighted by a distributed w: x's gradient totals over ranks."""
    return gp.sum(mpi_sum(gp.sin(gp.mpi_bcast(x)) * w * w))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_an_argument_named_twice_gets_its_gradient_twice():
    x = np.array([0.3, -1.2, 2.0])
    w = gp.tensor(np.arange(1.0, 4.0) + mpi_rank(), distributed=True)
    value, g = gp.value_and_grad(_objective)(x, w)
    value2, (g0, g1, gw) = gp.value_and_grad(_objective, argnums=(0, -2, 1))(x, w)
    parallel_assert(_close(value, value2) and _close(g0, g) and _close(g1, g),
                    f"argnums (0, -2, 1): {g0}, {g1}; argnums 0: {g}")
    g0[0] += 1.0
    parallel_assert(_close(g1, g), "the two gradients of one argument share memory")
    gp.check_grad(_objective, x, w, argnums=(0, 0, 1, 1))
    _, pullback = gp.vjp(lambda a, b: gp.sin(a) * b, x, w, argnums=(1, 0, 1))
    gb, ga, gb2 = pullback(np.ones(3))
    expected = mpi_sum(gp.tensor(np.cos(x) * to_numpy(w.data), distributed=True)).numpy()
    parallel_assert(_close(gb, np.sin(x)) and _close(gb2, gb) and _close(ga, expected),
                    f"vjp with argnums (1, 0, 1): {gb}, {ga}, {gb2}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_nested_differentiation_is_refused():
    x = np.array([0.5, 2.0])
    cube = lambda b: gp.sum(b * b * b)  # noqa: E731
    cases = {
        "grad of grad": lambda a: gp.sum(gp.grad(cube)(a)),
        "grad of value_and_grad": lambda a: gp.sum(gp.value_and_grad(cube)(a * 2.0)[1]),
        "grad of vjp": lambda a: gp.sum(gp.vjp(lambda b: b * b, a)[1](np.ones(2))),
        "inner fn closes over a traced value": lambda a: gp.sum(
            gp.grad(lambda b: gp.sum(a * b * b))(np.ones(2))),
        "a collective inside the inner fn": lambda a: gp.sum(
            gp.grad(lambda b: gp.sum(mpi_sum(a) * b))(np.ones(2))),
        "the inner fn returns a traced value": lambda a: gp.sum(
            gp.vjp(lambda b: a, np.ones(2))[1](np.ones(2))),
    }
    outcomes = {}
    for name, fn in cases.items():
        try:
            gp.grad(fn)(x)
            outcomes[name] = "no error"
        except NotImplementedError as exc:
            outcomes[name] = str(exc)
    me = f"rank {mpi_rank()}: higher-order derivatives are not supported"
    bad = {k: v for k, v in outcomes.items() if not v.startswith(me)}
    parallel_assert(not bad, f"{bad}")
    _, pullback = gp.vjp(lambda b: b * b, x)
    with pytest.raises(NotImplementedError, match="the pullback's cotangent is traced"):
        gp.grad(lambda a: gp.sum(pullback(a)))(x)
    # An inner derivative of values the outer one does not trace is a constant to it: allowed.
    inner = gp.grad(cube)(np.ones(2))
    g = gp.grad(lambda a: gp.sum(a * gp.grad(cube)(np.ones(2))))(x)
    parallel_assert(_close(g, inner) and _close(inner, 3.0 * np.ones(2)), f"{g}")
    local = gp.tensor(gp.grad(cube)(np.full(2, mpi_rank() + 1.0)), distributed=True)
    gp.check_grad(lambda a: gp.sum(mpi_sum(a * a * local)), x)


@pytest.mark.parallel(nprocs=[1, 2])
def test_pullback_cotangent_must_be_an_array_of_real_numbers():
    me = f"rank {mpi_rank()}"
    _, pullback = gp.vjp(lambda a: a * 2.0, np.ones(3))
    _, scalar = gp.vjp(lambda a: gp.sum(a * 2.0), np.ones(3))
    for bad, what in ((None, "is None"), ("abc", "dtype <U3"), (np.ones(3) * 1j, "complex128"),
                      ([object()] * 3, "dtype object")):
        for pb in (pullback, scalar):
            with pytest.raises(TypeError, match=f"{me}: the pullback's cotangent .*{what}.*"
                                                "expected an array of real numbers"):
                pb(bad)
    with pytest.raises(ValueError, match=r"value's shape \(\), got \(3,\)"):
        scalar(np.ones(3))
    parallel_assert(_close(pullback([1, 2, 3]), [2.0, 4.0, 6.0])
                    and _close(scalar(1), 2 * np.ones(3)))


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_released_pullback_says_so():
    x = np.array([1.0, 2.0])
    _, pullback = gp.vjp(lambda a: gp.mpi_sum(a * a), x)
    same = copy.copy(pullback)
    deep = copy.deepcopy(pullback)
    del pullback  # a copy is the pullback itself: its tape stays
    parallel_assert(_close(same(np.ones(2)), 2 * mpi_size() * x) and _close(deep(np.ones(2)),
                                                                            2 * mpi_size() * x))
    same.__del__()
    with pytest.raises(RuntimeError, match=f"rank {mpi_rank()}: this pullback's recorded "
                                           "operations were already released"):
        deep(np.ones(2))


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_debug_mode_compares_a_serial_cotangent_across_ranks():
    rank, size = mpi_rank(), mpi_size()
    x = np.array([1.0, -2.0])
    w = gp.tensor(np.full(2, rank + 1.0), distributed=True)
    gp.set_debug(True)
    try:
        _, serial = gp.vjp(lambda a: gp.mpi_sum(a * w), x)
        _, dist = gp.vjp(lambda a: a * w, x)
        total = size * (size + 1) / 2
        parallel_assert(_close(serial(np.array([1.0, -0.0 if rank else 0.0])),
                               [total, 0.0]))
        # A distributed value's cotangent is each rank's own piece: not compared.
        parallel_assert(_close(dist(np.full(2, rank)), np.full(2, sum(
            r * (r + 1.0) for r in range(size)))))
        odd = [r for r in range(size) if r % 2]
        with pytest.raises(gp.CommunicationMismatch,
                           match=rf"rank {rank}: the pullback's cotangent differs across ranks "
                                 rf".*{re.escape(f'rank(s) {odd}')} hold one value.*the value "
                                 "is serial"):
            serial(np.array([1.0, rank % 2]))
        # One rank's invalid cotangent: it raises its own error, the others name it.
        if rank == size - 1:
            with pytest.raises(TypeError, match="is None"):
                serial(None)
        else:
            with pytest.raises(ValueError, match=rf"not valid on rank\(s\) \[{size - 1}\]"):
                serial(np.ones(2))
        parallel_assert(_close(serial(np.ones(2)), np.full(2, total)), "after the errors")
    finally:
        gp.set_debug(False)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_numpy_functions_on_tensors_differentiate_or_refuse():
    x = np.array([0.5, -2.0, 3.0]) + mpi_rank()
    w = gp.tensor(x.copy(), distributed=True)
    loss = lambda a: mpi_sum(np.sum(a * a) + np.mean(a, axis=0, keepdims=True)[0])  # noqa: E731
    value, g = gp.value_and_grad(loss)(w)
    expected = 2 * x + 1 / 3
    parallel_assert(_close(g, expected) and _close(value, mpi_sum(gp.tensor(
        (x * x).sum() + x.mean(), distributed=True))), f"numpy.sum/mean: gradient {g}")
    with pytest.raises(TypeError, match=rf"rank {mpi_rank()}: Tensor.sum takes axis and "
                                        "keepdims, got out="):
        np.sum(w, out=np.empty(()))
    with pytest.raises(TypeError, match="Tensor.mean takes axis and keepdims, got dtype="):
        np.mean(w, dtype=np.float32)
    dropped = lambda a: mpi_sum(gp.sum(gp.tensor(np.reshape(a * a, (3,)),  # noqa: E731
                                                 distributed=True)))
    with pytest.raises(TypeError, match=rf"rank {mpi_rank()}: a Tensor that grad, "
                                        "value_and_grad or vjp is tracing was converted"):
        gp.grad(dropped)(w)
    # Outside a differentiation a Tensor is an array like any other; .numpy() is the value now.
    parallel_assert(np.array_equal(np.reshape(w, (3, 1)), x.reshape(3, 1)), "numpy.reshape")
    copied = w.numpy()
    copied[0] = 99.0
    parallel_assert(w.data[0] == x[0] and not np.shares_memory(np.array(w), w.data),
                    "writing into .numpy()'s array changed the Tensor")


@pytest.mark.parallel(nprocs=[1, 2])
def test_results_hold_the_value_at_the_time_of_the_call():
    a = np.arange(6.0) + mpi_rank()
    ring = ((mpi_rank() + 1) % mpi_size(), (mpi_rank() - 1) % mpi_size())
    made = {"tensor": gp.tensor(a), "tensor of a view": gp.tensor(a[::2], distributed=True),
            "tensor of a Tensor": gp.tensor(gp.tensor(a)), "reshape": gp.reshape(a, (2, 3)),
            "transpose": gp.transpose(a), "getitem": gp.getitem(a, slice(1, 4)),
            "mpi_sum": gp.mpi_sum(a), "mpi_send": gp.mpi_send(a, dest=ring[0]),
            "mpi_sendrecv": gp.mpi_sendrecv(a, 0, mpi_size() - 1),
            "custom_op": gp.custom_op(lambda x: x[1:], lambda g, ans, x: None)(a)}
    received = gp.mpi_recv(a, source=ring[1])
    before = {name: t.numpy() for name, t in made.items()}
    a[:] = -1.0
    parallel_assert(np.array_equal(received.numpy(), np.arange(6.0) + ring[1]), "mpi_recv")
    changed = [name for name, t in made.items() if not np.array_equal(t.data, before[name])]
    parallel_assert(not changed, f"writing into the array given changed the result of {changed}")


def _mul_op():
    op = gp.custom_op(lambda t, w: t * w, name="custom_multiply")
    op.defvjp(lambda g, ans, t, w: (g * w, None))
    return op


@pytest.mark.parallel(nprocs=[1, 2])
def test_gradients_hold_the_values_the_arrays_had_at_the_time_of_the_call():
    """A loop that writes each step's factor into one buffer: every recorded op reads the
    buffer as it was when the op ran, as a fresh array each step would give."""
    rng = np.random.default_rng(3)
    x = rng.random(4) + 0.5 + mpi_rank()
    factors = [rng.random(4) + 0.5 for _ in range(3)]
    orders = [rng.permutation(4) for _ in range(3)]
    custom_multiply = _mul_op()
    ops = {
        "multiply": lambda t, w, i: t * w, "divide": lambda t, w, i: t / w,
        "reflected divide": lambda t, w, i: w / t, "power": lambda t, w, i: gp.power(t, w),
        "maximum": lambda t, w, i: gp.maximum(t, w),
        "where": lambda t, w, i: gp.where(w > 1.0, t * t, -t),
        "matmul of a view": lambda t, w, i: gp.matmul(gp.reshape(t, (2, 2)), w.reshape(2, 2)),
        "getitem": lambda t, w, i: t[i] * t, "getitem of a tuple": lambda t, w, i: t[(i,)] * t,
        "custom_op": lambda t, w, i: custom_multiply(t, w)}

    def loss(op, reuse):
        buffer, index = np.empty(4), np.empty(4, dtype=np.int64)

        def fn(t):
            total = 0.0
            for w, i in zip(factors, orders):
                if reuse:
                    buffer[:], index[:] = w, i
                    w, i = buffer, index
                total = total + gp.sum(gp.sin(op(t, w, i)))
            return mpi_sum(total)
        return fn

    wrong = []
    for name, op in ops.items():
        t = gp.tensor(x, distributed=True)
        expected = gp.grad(loss(op, reuse=False))(t)
        if not _close(gp.grad(loss(op, reuse=True))(t), expected):
            wrong.append(name)
    parallel_assert(not wrong, f"a buffer written after the op changed the gradient of {wrong}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_pullback_reads_the_arguments_as_they_were_when_vjp_ran():
    a, w = np.arange(1.0, 5.0), np.full(4, 3.0)

    def fn(t, w):
        return mpi_sum(gp.sum(t * t * w))
    expected = 2 * a * w * mpi_size()  # a serial argument: the total over the ranks' terms
    _, pullback = gp.vjp(fn, a, w, argnums=0)
    a[:], w[:] = -1.0, 0.0
    got = pullback(np.array(1.0))
    parallel_assert(_close(got, expected), f"pullback gave {got}, expected {expected}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_traced_tensor_made_a_python_float_is_an_error_not_a_constant():
    """``float(t)`` and ``t.item()`` inside the function differentiated would hold t fixed and
    drop its part of the gradient (``y * float(y)`` gave half the derivative): an error naming
    the way out; a number taken by ``.numpy()`` is a constant on purpose; ``int`` and ``bool``
    (indices, branches) give piecewise-constant values, whose derivative is zero."""
    x = np.array([1.0, 2.0])
    for name, take in (("float", float), (".item()", lambda t: t.item())):
        def fn(t, take=take):
            y = mpi_sum(gp.sum(t * t))
            return y * take(y)
        with pytest.raises(TypeError, match=rf"rank {mpi_rank()}: a Tensor that grad, "
                                            r"value_and_grad or vjp is tracing was converted to a "
                                            r"Python (float|number)"):
            gp.grad(fn)(x)

    def held_fixed(t):
        y = mpi_sum(gp.sum(t * t))
        branch = 2.0 if bool(y > 1.0) and int(y) > 1 else 3.0
        return y * float(y.numpy()) * branch
    y = mpi_size() * 5.0
    expected = 2 * x * mpi_size() * y * 2.0
    got = gp.grad(held_fixed)(x)
    parallel_assert(_close(got, expected), f"gradient {got}, expected {expected}")
    value = gp.mpi_sum(gp.sum(gp.tensor(x)))
    parallel_assert(float(value) == value.item() == 3.0 * mpi_size(), "float() outside grad")


def test_numpy_asarray_of_a_tensor_cannot_write_into_it():
    """``numpy.asarray(t)`` views the Tensor's memory without a copy, read-only: writing into
    the view would change a value that recorded reverse rules and other results read;
    ``numpy.array(t)`` and ``.numpy()`` are copies to write into."""
    t = gp.tensor(np.arange(3.0))
    view = np.asarray(t)
    assert np.shares_memory(view, t.data) and not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 7.0
    for owned in (np.array(t), t.numpy(), np.asarray(t, copy=True)):
        owned[0] = 7.0
    assert t.data.tolist() == [0.0, 1.0, 2.0]
