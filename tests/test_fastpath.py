"""The hot paths give what the general paths give: one-input local ops recorded as plain tuples
(against the same ops with every argument traced), Tensor operators bound to the elementwise
primitives, the host allreduce (values, value semantics, pooled sizes, dtypes, errors), and the
reverse pass's spans: one per communicating node, none for local ops, waits as waits.
"""
from __future__ import annotations

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import mpi_rank, mpi_size, trace
from gpumpiad.backend import to_numpy
from gpumpiad.primitive import primitive


def _close(a, b):
    return bool(np.allclose(to_numpy(a), to_numpy(b), rtol=1e-12, atol=1e-14))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_one_traced_input_matches_every_input_traced():
    """``x * c`` with only x traced (the tuple node) against ``x * c`` with c traced too (the
    general node): the same gradient of x, serial and distributed, through per-rank ops."""
    r = mpi_rank()
    x = np.array([0.3, -1.1, 2.0])
    c = np.array([1.5, 0.5, -2.0])
    d = gp.tensor(np.arange(3.0) + r, distributed=True)

    def loss(x, c):
        y = gp.sin(x * c) + 0.25 * x ** 2 - x / (c + 3.0)
        z = gp.sum(y * d, axis=0, keepdims=True)     # per-rank: shares of the serial x
        return gp.mpi_sum(gp.sum(gp.tanh(z) + gp.exp(-y).mean()))

    only_x = gp.value_and_grad(loss, argnums=0)(x, c)
    both = gp.value_and_grad(loss, argnums=(0, 1))(x, c)
    parallel_assert(_close(only_x[0], both[0]) and _close(only_x[1], both[1][0]),
                    f"one traced input {only_x} vs all traced {both}")
    xd = gp.tensor(x + r, distributed=True)
    g1 = gp.grad(loss)(xd, c)
    g2 = gp.grad(loss, argnums=(0, 1))(xd, c)[0]
    parallel_assert(_close(g1, g2), f"distributed: {g1} vs {g2}")
    gp.check_grad(loss, x, c)


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_one_input_op_after_a_receive_waits_for_its_cotangent():
    """A deferred cotangent (a reverse-mode receive's) reaching a one-input op is resolved
    before that op's reverse step: the gradient matches finite differences."""
    P, r = mpi_size(), mpi_rank()
    x = gp.tensor(np.array([0.4, 0.9]) * (r + 1), distributed=True)

    def loss(x):
        y = gp.mpi_exchange(gp.sin(x) * 2.0, dest=(r + 1) % P, source=(r - 1) % P)
        return gp.mpi_sum(gp.sum(gp.exp(y * 0.5)))

    gp.check_grad(loss, x)


@pytest.mark.parallel(nprocs=[1, 2])
def test_one_input_vjp_errors_are_the_general_paths():
    """A complex cotangent for a real value is a TypeError naming the op, whether the op's
    node is a one-input tuple or a general node."""
    bad = primitive(lambda x, y: x * y, name="complex_vjp")
    bad.defvjp(lambda g, ans, x, y: g * y * (1 + 1j), lambda g, ans, x, y: g * x * (1 + 1j))
    x, y = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    messages = []
    for argnums in (0, (0, 1)):
        with pytest.raises(TypeError) as info:
            gp.grad(lambda x, y: gp.sum(bad(x, y)), argnums=argnums)(x, y)
        messages.append(str(info.value))
    parallel_assert(all(f"rank {mpi_rank()}:" in m and "'complex_vjp'" in m and "complex" in m
                        for m in messages), f"{messages}")


def test_tensor_operators_are_the_elementwise_primitives():
    x = np.array([0.5, 2.0])
    y = np.array([1.5, -1.0])

    def loss(x, y):
        t = x
        parts = [t + y, y + t, t - y, 1.0 - t, t * y, 2 * t, t / y, 1.0 / t, t ** 2.0, 2.0 ** t]
        keep = (t < y) + (t <= y) + (t > y) + (t >= y)
        return gp.sum(sum(parts[1:], parts[0]) * (1.0 + 0.0 * keep))

    value, (gx, gy) = gp.value_and_grad(loss, argnums=(0, 1))(x, y)
    expected_value = np.sum(x + y + y + x + x - y + 1.0 - x + x * y + 2 * x + x / y + 1.0 / x
                            + x ** 2 + 2.0 ** x)
    ex = 1 + 1 + 1 - 1 + y + 2 + 1 / y - 1 / x ** 2 + 2 * x + np.log(2.0) * 2.0 ** x
    ey = 1 + 1 - 1 + x - x / y ** 2
    assert _close(value, expected_value) and _close(gx, ex) and _close(gy, ey)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32", "int32", "complex128"])
def test_host_allreduce_values_and_value_semantics(dtype):
    """The host allreduce sums what the argument held at the call (the caller overwrites it
    before reading the result), small and pooled (>= 256 KiB) sizes, non-contiguous too."""
    P, r = mpi_size(), mpi_rank()
    for n in (3, 40_000):
        x = (np.arange(2 * n) % 7 + r).astype(dtype)[::2]
        expected = sum((np.arange(2 * n) % 7 + q).astype(dtype)[::2] for q in range(P))
        first = gp.mpi_sum(x)
        second = gp.mpi_sum(gp.tensor(x.copy()))
        x[...] = 99
        parallel_assert(np.array_equal(first.numpy(), expected)
                        and np.array_equal(second.numpy(), expected)
                        and first.numpy().dtype == np.dtype(dtype), f"{dtype} n={n}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_allreduce_errors_name_the_rank_and_argument():
    r = mpi_rank()
    with pytest.raises(TypeError, match=rf"rank {r}: mpi_sum's x must have a dtype"):
        gp.mpi_sum(np.array([True, False]))
    with pytest.raises(ValueError, match=rf"rank {r}: op must be gpumpiad.SUM, MAX, MIN or "
                                         "PROD, got 'sum'"):
        gp.mpi_allreduce(np.ones(2), op="sum")
    m = gp.mpi_allreduce(np.array([1.0, 2.0]) * (r + 1), op=gp.MAX)
    parallel_assert(np.array_equal(m.numpy(), np.array([1.0, 2.0]) * mpi_size()))


@pytest.mark.parallel(nprocs=[1, 2])
def test_reverse_pass_spans_communicating_nodes_and_waits():
    """A profile of a gradient through collectives holds one ``adjoint.<op>`` span name per
    communicating op, none for the local ops, and the waits for results as waits."""
    x = np.array([0.5, 1.5])

    def loss(x):
        y = gp.sin(gp.mpi_bcast(x)) * gp.mpi_rank()
        return gp.mpi_sum(gp.sum(gp.exp(y)))

    with trace.collect() as totals:
        gp.value_and_grad(loss)(x)
    adjoint = {name for name in totals.by_name if name.startswith("adjoint.")}
    parallel_assert(adjoint == {"adjoint.mpi_bcast", "adjoint.mpi_sum"}, f"{adjoint}")
    parallel_assert("mpi.wait" in totals.by_name and totals[trace.WAIT] > 0.0,
                    f"{totals.by_name}")
    parallel_assert(trace.span("adjoint.mpi_sum", trace.ADJOINT)
                    is trace.span("mpi.wait", trace.WAIT) or trace.nvtx_attached())
