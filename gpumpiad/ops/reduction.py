"""Reductions over axes of the local array."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..primitive import primitive


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _expand(g, x, axis, keepdims):
    if axis is None:  # a full reduction: g holds one element, which broadcasts as it is
        if type(g) is np.ndarray and g.size == 1:
            return _broadcast_one(g, x.shape)
        return get_array_module(g).broadcast_to(g, x.shape)
    xp = get_array_module(g)
    if not keepdims:
        for a in _normalize_axes(axis, x.ndim):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, x.shape)


def _broadcast_one(g, shape):
    """``numpy.broadcast_to`` of a one-element NumPy array: a read-only view of it with zero
    strides, made directly (``broadcast_to``'s argument handling costs more than the rest of a
    scalar loss's reverse step)."""
    view = np.ndarray(shape, g.dtype, g, 0, (0,) * len(shape))
    view.flags.writeable = False
    return view


def _sum(x, axis=None, keepdims=False):
    return x.sum(axis=axis, keepdims=keepdims)


sum = primitive(_sum, name="sum")
sum.defvjp(lambda g, ans, x, axis=None, keepdims=False: _expand(g, x, axis, keepdims))


def _mean(x, axis=None, keepdims=False):
    return x.mean(axis=axis, keepdims=keepdims)


def _count(x, axis):
    n = 1
    for a in _normalize_axes(axis, x.ndim):
        n *= x.shape[a]
    return n


mean = primitive(_mean, name="mean")
mean.defvjp(lambda g, ans, x, axis=None, keepdims=False:
            _expand(g / _count(x, axis), x, axis, keepdims))
