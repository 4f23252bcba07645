"""Indexing and slicing; the VJP scatters (adds) the cotangent into a zero array."""
from __future__ import annotations

from ..backend import get_array_module
from ..primitive import primitive
from ..tensor import Tensor


def _is_basic(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


def _getitem_vjp(g, ans, x, index):
    xp = get_array_module(g)
    out = xp.zeros(x.shape, dtype=g.dtype)
    if _is_basic(index):
        out[index] += g
    else:
        xp.add.at(out, index, g)
    return out


_getitem = primitive(lambda x, index: x[index], name="getitem")
_getitem.defvjp(_getitem_vjp)


def _raw_index(index):
    if isinstance(index, tuple):
        return tuple(_raw_index(i) for i in index)
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, int) and not isinstance(index, bool):
        return int(index)
    return index


def getitem(x, index):
    """``x[index]`` for basic and integer-array indexing."""
    return _getitem(x, _raw_index(index))
