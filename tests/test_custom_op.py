"""``custom_op`` (custom.py): decorator and function forms, several outputs, keyword arguments,
a vjp that communicates, the errors for a missing or malformed vjp, and the copies of the
arrays given that the vjp reads."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad.backend import to_numpy
from gpumpiad import mpi_rank, mpi_size, mpi_sum


@gp.custom_op
def scaled_square(x, scale=1.0):
    return scale * x * x


@scaled_square.defvjp
def _(g, ans, x, scale=1.0):
    return 2.0 * scale * x * g


def _polar(r, phi):
    return r * np.cos(phi), r * np.sin(phi)


def _polar_vjp(g, ans, r, phi):
    gx, gy = g
    return (gx * np.cos(phi) + gy * np.sin(phi), -gx * r * np.sin(phi) + gy * r * np.cos(phi))


polar = gp.custom_op(_polar, _polar_vjp, name="polar")


def test_decorator_form_with_kwargs():
    x = np.array([1.0, -2.0, 0.5])
    assert scaled_square.name == "scaled_square"
    np.testing.assert_allclose(scaled_square(gp.tensor(x), scale=3.0).numpy(), 3.0 * x * x)
    g = gp.grad(lambda x: gp.sum(scaled_square(x, scale=3.0)))(x)
    np.testing.assert_allclose(g, 6.0 * x)
    gp.check_grad(lambda x: gp.sum(scaled_square(x, scale=0.5) * gp.sin(x)), x)


def test_function_form_multi_output():
    r, phi = np.array([1.0, 2.0]), np.array([0.3, -1.1])
    x, y = polar(gp.tensor(r), gp.tensor(phi))
    np.testing.assert_allclose(x.numpy(), r * np.cos(phi))
    np.testing.assert_allclose(y.numpy(), r * np.sin(phi))
    gp.check_grad(lambda r, phi: gp.sum(polar(r, phi)[0] * 2.0 + polar(r, phi)[1] ** 3), r, phi)
    # Only one output used: the other output's cotangent arrives as zeros.
    g = gp.grad(lambda r, phi: gp.sum(polar(r, phi)[1]), argnums=1)(r, phi)
    np.testing.assert_allclose(g, r * np.cos(phi))


def test_non_tensor_arguments_and_none_cotangent():
    op = gp.custom_op(lambda x, n: x ** n, lambda g, ans, x, n: (n * x ** (n - 1) * g, None),
                      name="power_n")
    x = np.array([0.5, 1.5])
    np.testing.assert_allclose(gp.grad(lambda x: gp.sum(op(x, 3)))(x), 3 * x ** 2)
    gp.check_grad(lambda x: gp.sum(op(x, 4)), x)


def test_missing_and_malformed_vjp():
    op = gp.custom_op(lambda x: x + 1.0, name="no_vjp")
    with pytest.raises(NotImplementedError, match=r"'no_vjp' has no vjp.*@no_vjp\.defvjp"):
        op(gp.tensor([1.0]))
    with pytest.raises(NotImplementedError, match="no vjp"):
        gp.grad(lambda x: gp.sum(op(x)))(np.ones(2))
    two = gp.custom_op(lambda x, y: x * y, lambda g, ans, x, y: g * y, name="one_cotangent")
    with pytest.raises(ValueError, match=r"'one_cotangent' returned 1 cotangent\(s\) for 2"):
        gp.grad(lambda x: gp.sum(two(x, x)))(np.ones(2))
    with pytest.raises(ValueError, match="layout"):
        gp.custom_op(lambda x: x, layout="replicated")
    lay = gp.custom_op(lambda x: (x, x), lambda g, ans, x: g[0] + g[1], layout=("serial",))
    with pytest.raises(ValueError, match="layout names 1 outputs, forward returned 2"):
        lay(gp.tensor([1.0]))


@pytest.mark.parallel(nprocs=[1, 2])
def test_what_forward_and_vjp_return_is_checked():
    """Scalars are arrays; lists, strings and complex cotangents of real arguments are errors
    that name the op and the argument."""
    me = f"rank {mpi_rank()}"
    x = np.array([0.5, -1.5])

    def run(forward, vjp, *args):
        op = gp.custom_op(forward, vjp, name="op")
        return gp.grad(lambda *a: gp.sum(op(*a)) if len(a) == 1 else gp.sum(op(*a) * a[1]),
                       argnums=tuple(range(len(args))))(*args)

    # A 0-d argument's cotangent may be a Python number, a forward's output a Python float.
    g = run(lambda s: 3.0 * s, lambda g, ans, s: 3.0, np.array(2.0))
    parallel_assert(np.allclose(g[0], 3.0), f"{g}")
    op = gp.custom_op(lambda s: float(s) ** 2, lambda g, ans, s: 2 * s * g, name="to_float")
    gp.check_grad(lambda s: op(s) * 1.5, np.array(0.7))
    for forward, vjp, match in (
            (lambda a: 2 * a, lambda g, ans, a: (2 * g).astype(complex) + 1j,
             f"{me}: vjp of custom_op 'op' returned a complex cotangent \\(dtype complex128\\) "
             "for argument 0, which has dtype float64; expected an array of real numbers of "
             "its shape \\(2,\\)"),
            (lambda a: 2 * a, lambda g, ans, a: "2",
             f"{me}: vjp of custom_op 'op' returned a non-numeric cotangent \\(dtype <U1\\) "
             "for argument 0"),
            (lambda a: [a, a], lambda g, ans, a: g,
             f"{me}: forward of custom_op 'op' returned list; expected an array \\(a tuple of "
             "arrays for several outputs\\)"),
            (lambda a: (a, "x"), lambda g, ans, a: g[0],
             f"{me}: forward of custom_op 'op' returned str as output 1; expected an array")):
        with pytest.raises(TypeError, match=match):
            run(forward, vjp, x)
    with pytest.raises(ValueError, match=f"{me}: vjp of custom_op 'op' returned a cotangent of "
                                         r"shape \(\) for argument 0, expected its shape "
                                         r"\(2,\)"):
        run(lambda a: 2 * a, lambda g, ans, a: 2.0, x)
    # The second argument is real: a complex cotangent for it would lose its imaginary part.
    with pytest.raises(TypeError, match="complex cotangent .* for argument 1"):
        run(lambda a, b: a * b, lambda g, ans, a, b: (g * b, g * a + 1j), x, x)


def test_layouts():
    op = gp.custom_op(lambda x: 2 * x, lambda g, ans, x: 2 * g, name="double")
    assert not op(gp.tensor([1.0])).distributed
    assert op(gp.tensor([1.0], distributed=True)).distributed
    pair = gp.custom_op(lambda x: (x, 2 * x), lambda g, ans, x: g[0] + 2 * g[1],
                        layout=("serial", "distributed"))
    a, b = pair(gp.tensor([1.0]))
    assert not a.distributed and b.distributed


# -- a user-written distributed dot product: mpi4py inside forward and vjp ----------------------

def _dot_forward(x, y):
    return np.array(MPI.COMM_WORLD.allreduce(float(x @ y), op=MPI.SUM))


def _dot_vjp(g, ans, x, y):
    # All outputs serial, inputs distributed: each rank's cotangent is its own piece.
    return g * y, g * x


dist_dot = gp.custom_op(_dot_forward, _dot_vjp, name="dist_dot", layout="serial")


def _norm_forward(x):
    return np.array(np.sqrt(MPI.COMM_WORLD.allreduce(float(x @ x), op=MPI.SUM)))


def _norm_vjp(g, ans, x):
    # The vjp communicates too: it recomputes the global norm (every rank runs it, also where
    # no cotangent arrives, so the collective always matches).
    norm = np.sqrt(MPI.COMM_WORLD.allreduce(float(x @ x), op=MPI.SUM))
    return g * x / norm


dist_norm = gp.custom_op(_norm_forward, _norm_vjp, name="dist_norm", layout="serial")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_communicating_custom_ops():
    size, rank = mpi_size(), mpi_rank()
    rng = np.random.default_rng(rank)
    x = gp.tensor(rng.standard_normal(rank + 2), distributed=True)
    y = gp.tensor(rng.standard_normal(rank + 2), distributed=True)
    d = dist_dot(x, y)
    expected = MPI.COMM_WORLD.allreduce(float(x.numpy() @ y.numpy()))
    parallel_assert(not d.distributed and abs(d.item() - expected) < 1e-12)
    gx, gy = gp.grad(lambda x, y: dist_dot(x, y) * 2.0, argnums=(0, 1))(x, y)
    parallel_assert(np.allclose(to_numpy(gx), 2 * y.numpy())
                    and np.allclose(to_numpy(gy), 2 * x.numpy()))
    gp.check_grad(lambda x, y: dist_dot(gp.sin(x), y) ** 2, x, y)
    gp.check_grad(lambda x: dist_norm(x) + dist_dot(x, x), x)
    # A serial parameter feeding a distributed op, then the communicating custom op.
    theta = np.array([0.7])
    gp.check_grad(lambda t, x: dist_dot(x * t, x + t), theta, x)
    # Rank-dependent control flow outside the custom op; it still runs (and its vjp still
    # communicates) on every rank, also where no cotangent reaches it.
    gp.check_grad(lambda x: dist_norm(x) * 0.0 + dist_dot(x, x), x)
    gp.grad(lambda t: mpi_sum(gp.sum(t * x)) + dist_norm(x))(theta)


def test_the_vjp_reads_copies_of_arrays_given_unless_it_reads_no_values():
    """By default the vjp gets a copy of an array the caller passed as it is, made at the call;
    with ``reads_args=False`` it gets the array itself (no copy made)."""
    seen = {}
    for reads in (True, False):
        def vjp(g, ans, x, w, reads=reads):
            seen[reads] = w
            return g * w, None
        op = gp.custom_op(lambda x, w: x * w, vjp, name="weighted", reads_args=reads)
        w = np.array([2.0, 3.0])
        grad = gp.grad(lambda x: gp.sum(op(x, w)))(np.ones(2))
        np.testing.assert_array_equal(grad, [2.0, 3.0])
        assert (seen[reads] is w) == (not reads), reads
