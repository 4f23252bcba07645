"""Shape manipulation: reshape, transpose, concatenate, stack."""
from __future__ import annotations

from ..backend import get_array_module
from ..comm import world
from ..primitive import primitive

reshape = primitive(lambda x, shape: x.reshape(shape), name="reshape")
reshape.defvjp(lambda g, ans, x, shape: g.reshape(x.shape))


def _transpose(x, axes=None):
    return x.transpose(axes) if axes is not None else x.T


def _transpose_vjp(g, ans, x, axes=None):
    if axes is None:
        return g.T
    inverse = [0] * len(axes)
    for i, a in enumerate(axes):
        inverse[a % len(axes)] = i
    return g.transpose(inverse)


transpose = primitive(_transpose, name="transpose")
transpose.defvjp(_transpose_vjp)


def _concatenate(*arrays, axis=0):
    return get_array_module(arrays[0]).concatenate(arrays, axis=axis)


def _concatenate_vjp(g, ans, *arrays, axis=0):
    xp = get_array_module(g)
    bounds = [0]
    for a in arrays:
        bounds.append(bounds[-1] + a.shape[axis])
    return [xp.take(g, xp.arange(bounds[i], bounds[i + 1]), axis=axis) for i in range(len(arrays))]


_concatenate_p = primitive(_concatenate, name="concatenate", reads_args=False)
_concatenate_p.defvjp_all(_concatenate_vjp)


def concatenate(tensors, axis=0):
    """Join a sequence of Tensors/arrays along an existing ``axis``.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> f = lambda a, b: (gpumpiad.concatenate([a, 2 * b]) ** 2).sum()
    >>> [g.tolist() for g in gpumpiad.grad(f, argnums=(0, 1))(np.ones(2), np.ones(1))]
    [[2.0, 2.0], [8.0]]
    """
    return _concatenate_p(*_sequence(tensors, "concatenate"), axis=axis)


def _stack(*arrays, axis=0):
    return get_array_module(arrays[0]).stack(arrays, axis=axis)


def _stack_vjp(g, ans, *arrays, axis=0):
    xp = get_array_module(g)
    return [xp.take(g, i, axis=axis) for i in range(len(arrays))]


_stack_p = primitive(_stack, name="stack", reads_args=False)
_stack_p.defvjp_all(_stack_vjp)


def stack(tensors, axis=0):
    """Join a sequence of same-shaped Tensors/arrays along a new ``axis``.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> gpumpiad.stack([np.zeros(2), np.ones(2)], axis=1).shape
    (2, 2)
    """
    return _stack_p(*_sequence(tensors, "stack"), axis=axis)


def _sequence(tensors, name):
    """``tensors`` as a tuple of at least one Tensor or array."""
    expected = "a non-empty sequence of Tensors or arrays"
    try:
        items = tuple(tensors)
    except TypeError:
        raise TypeError(f"rank {world().rank}: {name}'s tensors must be {expected}, got "
                        f"{type(tensors).__name__}") from None
    if not items:
        raise ValueError(f"rank {world().rank}: {name}'s tensors must be {expected}, got an "
                         f"empty {type(tensors).__name__}")
    return items
