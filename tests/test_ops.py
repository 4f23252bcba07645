"""Local ops (gpumpiad/ops/*.py): forward values against NumPy and reverse mode against finite
differences of the global objective, float32 and float64, serial, distributed and mixed inputs.

The objective wraps each op as ``mpi_sum(sum(op(*xs) * w))`` with a random distributed weight
``w``, so every op sees a non-trivial cotangent and serial inputs collect their cotangent from
every rank. One rank: each case is its own test; 2-4 ranks: one test per op family loops over
its cases and reports every failing case at once (one ``mpiexec`` per family and size).
"""
from __future__ import annotations

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import mpi_rank, mpi_size, mpi_sum

DTYPES = ("float64", "float32")
LAYOUTS = ("serial", "distributed", "mixed")
FWD_RTOL = {"float64": 1e-12, "float32": 1e-5}


def _pos(shape):
    """Values in [0.5, 1.5): safe for log, sqrt, division and powers."""
    return lambda rng: rng.uniform(0.5, 1.5, shape)


def _any(shape):
    """Values of either sign, at least 0.2 away from zero (abs has a kink there)."""
    return lambda rng: rng.uniform(0.2, 1.0, shape) * rng.choice([-1.0, 1.0], shape)


def _spread(shape, offset):
    """Values on a grid of step 0.1 shifted by ``offset``: two inputs with different offsets are
    at least 0.03 apart everywhere (maximum/minimum have kinks at ties)."""
    n = int(np.prod(shape))
    return lambda rng: (rng.permutation(n) * 0.1 - 0.05 * n).reshape(shape) + offset


_MASK = np.array([[True, False, True, False], [False, False, True, True],
                  [True, True, False, False]])

# name -> (family, gpumpiad function, NumPy reference, input generators)
CASES = {
    "add": ("binary", lambda x, y: x + y, np.add, [_any((3, 4)), _any((3, 4))]),
    "add_broadcast_row": ("binary", lambda x, y: x + y, np.add, [_any((3, 4)), _any((4,))]),
    "add_broadcast_col": ("binary", gp.add, np.add, [_any((3, 1)), _any((1, 4))]),
    "add_scalar": ("unary", lambda x: 2.5 + x, lambda x: 2.5 + x, [_any((3, 4))]),
    "subtract": ("binary", lambda x, y: x - y, np.subtract, [_any((3, 4)), _any((4,))]),
    "rsubtract_scalar": ("unary", lambda x: 1.0 - x, lambda x: 1.0 - x, [_any((5,))]),
    "multiply": ("binary", lambda x, y: x * y, np.multiply, [_any((2, 3, 4)), _any((3, 1))]),
    "divide": ("binary", lambda x, y: x / y, np.divide, [_any((3, 4)), _pos((3, 4))]),
    "rdivide_scalar": ("unary", lambda x: 2.0 / x, lambda x: 2.0 / x, [_pos((4,))]),
    "power_tensor": ("binary", lambda x, y: x ** y, np.power, [_pos((3, 4)), _any((4,))]),
    "power_int": ("unary", lambda x: x ** 3, lambda x: x ** 3, [_any((3, 4))]),
    "power_zero": ("unary", lambda x: x ** 0 + x, lambda x: x ** 0 + x, [_any((4,))]),
    "rpower": ("unary", lambda x: 2.0 ** x, lambda x: 2.0 ** x, [_any((4,))]),
    "negative": ("unary", lambda x: -x, np.negative, [_any((3, 4))]),
    "exp": ("unary", gp.exp, np.exp, [_any((3, 4))]),
    "log": ("unary", gp.log, np.log, [_pos((3, 4))]),
    "sqrt": ("unary", gp.sqrt, np.sqrt, [_pos((3, 4))]),
    "sin": ("unary", gp.sin, np.sin, [_any((3, 4))]),
    "cos": ("unary", gp.cos, np.cos, [_any((3, 4))]),
    "tanh": ("unary", gp.tanh, np.tanh, [_any((3, 4))]),
    "abs": ("unary", gp.abs, np.abs, [_any((3, 4))]),
    "maximum": ("binary", gp.maximum, np.maximum, [_spread((3, 4), 0.02), _spread((3, 4), 0.05)]),
    "minimum": ("binary", gp.minimum, np.minimum, [_spread((3, 4), 0.02), _spread((4,), 0.05)]),
    "where": ("binary", lambda x, y: gp.where(_MASK, x, y), lambda x, y: np.where(_MASK, x, y),
              [_any((3, 4)), _any((4,))]),
    "sum_all": ("reduction", lambda x: gp.sum(x), np.sum, [_any((3, 4))]),
    "sum_axis0": ("reduction", lambda x: x.sum(axis=0), lambda x: x.sum(axis=0), [_any((3, 4))]),
    "sum_axis_neg_keepdims": ("reduction", lambda x: x.sum(axis=-1, keepdims=True),
                              lambda x: x.sum(axis=-1, keepdims=True), [_any((2, 3, 4))]),
    "sum_axes_tuple": ("reduction", lambda x: gp.sum(x, axis=(0, 2)),
                       lambda x: x.sum(axis=(0, 2)), [_any((2, 3, 4))]),
    "mean_all": ("reduction", lambda x: x.mean(), np.mean, [_any((3, 4))]),
    "mean_axis1_keepdims": ("reduction", lambda x: gp.mean(x, axis=1, keepdims=True),
                            lambda x: x.mean(axis=1, keepdims=True), [_any((3, 4))]),
    "mean_axes_tuple": ("reduction", lambda x: x.mean(axis=(1, 2)),
                        lambda x: x.mean(axis=(1, 2)), [_any((2, 3, 4))]),
    "reshape": ("shape", lambda x: x.reshape(4, 3), lambda x: x.reshape(4, 3), [_any((3, 4))]),
    "reshape_tuple_neg": ("shape", lambda x: gp.reshape(x, (2, -1)),
                          lambda x: x.reshape(2, -1), [_any((3, 4))]),
    "transpose": ("shape", lambda x: x.T, lambda x: x.T, [_any((3, 4))]),
    "transpose_axes": ("shape", lambda x: x.transpose(2, 0, 1),
                       lambda x: x.transpose(2, 0, 1), [_any((2, 3, 4))]),
    "transpose_neg_axes": ("shape", lambda x: gp.transpose(x, (0, -1, 1)),
                           lambda x: x.transpose(0, 2, 1), [_any((2, 3, 4))]),
    "concatenate0": ("shape", lambda x, y: gp.concatenate([x, y]),
                     lambda x, y: np.concatenate([x, y]), [_any((2, 3)), _any((4, 3))]),
    "concatenate1": ("shape", lambda x, y: gp.concatenate([x, y, x], axis=1),
                     lambda x, y: np.concatenate([x, y, x], axis=1), [_any((2, 3)), _any((2, 1))]),
    "stack0": ("shape", lambda x, y: gp.stack([x, y]), lambda x, y: np.stack([x, y]),
               [_any((2, 3)), _any((2, 3))]),
    "stack_last": ("shape", lambda x, y: gp.stack([y, x, y], axis=-1),
                   lambda x, y: np.stack([y, x, y], axis=-1), [_any((2, 3)), _any((2, 3))]),
    "index_int": ("indexing", lambda x: x[1], lambda x: x[1], [_any((3, 4))]),
    "index_negative": ("indexing", lambda x: x[-1, 2], lambda x: x[-1, 2], [_any((3, 4))]),
    "slice": ("indexing", lambda x: x[1:3], lambda x: x[1:3], [_any((4, 3))]),
    "slice_step": ("indexing", lambda x: x[:, ::2], lambda x: x[:, ::2], [_any((3, 5))]),
    "ellipsis_newaxis": ("indexing", lambda x: x[None, ..., 1], lambda x: x[None, ..., 1],
                         [_any((2, 3, 4))]),
    "index_array_repeated": ("indexing", lambda x: x[np.array([0, 2, 0, 0])],
                             lambda x: x[np.array([0, 2, 0, 0])], [_any((3, 4))]),
    "index_list_pairs_repeated": ("indexing", lambda x: x[[0, 1, 1, 1], [2, 2, 2, 0]],
                                  lambda x: x[[0, 1, 1, 1], [2, 2, 2, 0]], [_any((3, 4))]),
    "index_tensor": ("indexing", lambda x: x[gp.tensor(np.array([1, 1, 0]))],
                     lambda x: x[np.array([1, 1, 0])], [_any((3, 4))]),
    "index_mixed": ("indexing", lambda x: x[1:, np.array([3, 3, 0])],
                    lambda x: x[1:, np.array([3, 3, 0])], [_any((3, 4))]),
    "index_bool_mask": ("indexing", lambda x: x[_MASK], lambda x: x[_MASK], [_any((3, 4))]),
    "matmul_2d": ("linalg", lambda a, b: a @ b, np.matmul, [_any((3, 4)), _any((4, 2))]),
    "matmul_1d_1d": ("linalg", gp.matmul, np.matmul, [_any((4,)), _any((4,))]),
    "matmul_1d_2d": ("linalg", lambda a, b: a @ b, np.matmul, [_any((4,)), _any((4, 3))]),
    "matmul_2d_1d": ("linalg", gp.matmul, np.matmul, [_any((3, 4)), _any((4,))]),
    "matmul_batched": ("linalg", gp.matmul, np.matmul, [_any((2, 3, 4)), _any((2, 4, 2))]),
    "matmul_batched_broadcast": ("linalg", gp.matmul, np.matmul, [_any((2, 3, 4)), _any((4, 2))]),
    "matmul_batched_1d": ("linalg", gp.matmul, np.matmul, [_any((4,)), _any((2, 4, 3))]),
    "dot_2d": ("linalg", gp.dot, np.dot, [_any((2, 3)), _any((3, 2))]),
    "rmatmul_array": ("linalg", lambda b: np.ones((2, 3), b.dtype) @ b,
                      lambda b: np.ones((2, 3), b.dtype) @ b,
                      [_any((3, 2))]),
    "chain": ("unary", lambda x: gp.tanh(gp.exp(x) * gp.sin(x) - x / 3.0).sum(axis=0),
              lambda x: np.tanh(np.exp(x) * np.sin(x) - x / 3.0).sum(axis=0), [_any((3, 4))]),
}
FAMILIES = sorted({family for family, *_ in CASES.values()})


def _inputs(name, dtype, layout):
    """This rank's inputs: serial ones equal on every rank, distributed ones rank-dependent."""
    gens = CASES[name][3]
    rank = mpi_rank()
    out = []
    for k, gen in enumerate(gens):
        distributed = layout == "distributed" or (layout == "mixed" and k == 0)
        rng = np.random.default_rng([len(name), k, 1000 + rank if distributed else 0])
        out.append(gp.tensor(gen(rng).astype(dtype), distributed=distributed))
    return out


def _weight(shape, dtype):
    rng = np.random.default_rng([7, mpi_rank()])
    return gp.tensor(rng.uniform(-1.0, 1.0, shape).astype(dtype), distributed=True)


def _layouts(name):
    return LAYOUTS if len(CASES[name][3]) > 1 else LAYOUTS[:2]


def _check_case(name, dtype, layout):
    """Forward against NumPy, layout rule, then check_grad of the global objective."""
    _, fn, ref, _ = CASES[name]
    xs = _inputs(name, dtype, layout)
    out = fn(*xs)
    expected = ref(*[x.numpy() for x in xs])
    np.testing.assert_allclose(out.numpy(), expected, rtol=FWD_RTOL[dtype], atol=1e-6)
    assert out.shape == np.shape(expected), (out.shape, np.shape(expected))
    assert out.dtype == np.dtype(dtype), f"{name}: {out.dtype} from {dtype} inputs"
    assert out.distributed == (layout != "serial"), f"{name}: layout {out.layout}"
    w = _weight(out.shape, dtype)

    def objective(*args):
        return mpi_sum((fn(*args) * w).sum())

    gp.check_grad(objective, *xs, max_elements=6)


def _family_failures(family):
    failures = []
    for name, (fam, *_) in CASES.items():
        if fam != family:
            continue
        for dtype in DTYPES:
            for layout in _layouts(name):
                try:
                    _check_case(name, dtype, layout)
                except Exception as exc:  # collected so every failing case is reported
                    failures.append(f"{name}[{dtype}, {layout}]: {type(exc).__name__}: {exc}")
    return failures


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,layout", [(n, lay) for n in CASES for lay in _layouts(n)])
def test_op_one_rank(name, layout, dtype):
    _check_case(name, dtype, layout)


@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_op_family_parallel(family):
    failures = _family_failures(family)
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_distributed_sizes_differ_by_rank():
    """Distributed pieces of different sizes per rank (rank r holds r + 1 rows)."""
    rank, size = mpi_rank(), mpi_size()
    x = gp.tensor(np.random.default_rng(rank).uniform(0.5, 1.5, (rank + 1, 3)), distributed=True)
    theta = gp.tensor(np.array([0.3, -0.2, 0.1]))

    def objective(x, theta):
        y = gp.tanh(x * theta) + 0.1 * gp.concatenate([x, x[:1]]).sum(axis=0) ** 2
        return mpi_sum(gp.exp(y).mean(axis=1).sum()) / size

    report = gp.check_grad(objective, x, theta, max_elements=8)
    parallel_assert(report["checked"] == min((rank + 1) * 3, 8) + 3, str(report))
    rows = sum(range(1, size + 1))
    total = mpi_sum(gp.sum(x)).item()
    expected = sum(np.random.default_rng(r).uniform(0.5, 1.5, (r + 1, 3)).sum()
                   for r in range(size))
    parallel_assert(abs(total - expected) < 1e-12 * rows * 3, f"{total} != {expected}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_rank_dependent_index_is_distributed():
    """``serial[mpi_rank()]`` differs by rank, so it is distributed and its gradient totals."""
    size = mpi_size()
    x = np.arange(1.0, size + 2.0)
    y = gp.tensor(x)[mpi_rank()]
    parallel_assert(y.distributed, f"x[rank] has layout {y.layout}")
    g1 = gp.grad(lambda t: mpi_sum(t[mpi_rank():mpi_rank() + 1] ** 2).sum())(x)
    expected = np.concatenate([2 * x[:size], [0.0]])
    parallel_assert(np.allclose(g1, expected), f"slice by rank: {g1} != {expected}")
    g2 = gp.grad(lambda t: mpi_sum(t[(mpi_rank() + 1) % size] * 3.0))(x)
    expected2 = np.concatenate([3.0 * np.ones(size), [0.0]])
    parallel_assert(np.allclose(g2, expected2), f"index by rank: {g2} != {expected2}")


def test_concatenate_and_stack_need_a_non_empty_sequence():
    me = f"rank {mpi_rank()}"
    for fn, name in ((gp.concatenate, "concatenate"), (gp.stack, "stack")):
        for empty, kind in (([], "list"), ((), "tuple")):
            with pytest.raises(ValueError, match=f"{me}: {name}'s tensors must be a non-empty "
                                                 f"sequence of Tensors or arrays, got an empty "
                                                 f"{kind}"):
                fn(empty)
        with pytest.raises(TypeError, match=f"{me}: {name}'s tensors must be a non-empty "
                                            "sequence of Tensors or arrays, got NoneType"):
            fn(None)
        joined = fn(x for x in (np.ones(2), gp.tensor(np.zeros(2))))
        assert joined.size == 4


def test_a_complex_cotangent_for_a_real_value_is_an_error():
    """The reverse rules are real: casting a complex cotangent to a real input's dtype would
    drop its imaginary part and give a wrong gradient (here the sign of d|ix|/dx)."""
    with pytest.raises(TypeError, match=f"rank {mpi_rank()}: the vjp of 'multiply' returned a "
                                        r"complex cotangent \(complex128\) for a real value "
                                        r"\(float64\)"):
        gp.grad(lambda x: gp.sum(gp.abs(x * 1j)))(np.array([1.0, -2.0]))
