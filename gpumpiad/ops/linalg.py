"""Matrix products."""
from __future__ import annotations

from ..backend import get_array_module
from ..primitive import primitive, unbroadcast


def _matmul(a, b):
    return get_array_module(a).matmul(a, b)


def _matmul_vjp(g, ans, a, b):
    xp = get_array_module(g)
    if a.ndim == 1 and b.ndim == 1:
        return [g * b, g * a]
    if a.ndim == 1:
        return [unbroadcast(xp.matmul(b, g[..., None])[..., 0], a.shape),
                unbroadcast(a[:, None] * g[..., None, :], b.shape)]
    if b.ndim == 1:
        return [unbroadcast(g[..., :, None] * b, a.shape),
                unbroadcast(xp.matmul(xp.swapaxes(a, -1, -2), g[..., None])[..., 0], b.shape)]
    return [unbroadcast(xp.matmul(g, xp.swapaxes(b, -1, -2)), a.shape),
            unbroadcast(xp.matmul(xp.swapaxes(a, -1, -2), g), b.shape)]


matmul = primitive(_matmul, name="matmul").defvjp_all(_matmul_vjp)


def dot(a, b):
    """``dot`` of vectors and matrices (same as :func:`matmul` for 1-D and 2-D operands).

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> gpumpiad.grad(lambda v: gpumpiad.dot(v, v))(np.array([1.0, 2.0])).tolist()
    [2.0, 4.0]
    """
    return matmul(a, b)
