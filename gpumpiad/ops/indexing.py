"""Indexing and slicing; the VJP scatters (adds) the cotangent into a zero array."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, is_device_array
from ..comm import RANK_DEPENDENT, RankInt
from ..primitive import primitive
from ..tape import active_tape
from ..tensor import Tensor

# Passed as an extra positional argument when the index differs from rank to rank, so that the
# primitive's layout rule makes ``serial[mpi_rank()]`` distributed (its cotangent is then this
# rank's share, which the tape allreduces).
_RANK_DEPENDENT = RankInt(0)


def _is_basic(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, slice)) or p is None or p is Ellipsis for p in parts)


def _getitem_vjp(g, ans, x, index, rank_dependent=None):
    xp = get_array_module(g)
    out = xp.zeros(x.shape, dtype=g.dtype)
    if _is_basic(index):
        out[index] += g
    else:
        xp.add.at(out, index, g)
    return out


_getitem = primitive(lambda x, index, rank_dependent=None: x[index], name="getitem")
_getitem.defvjp(_getitem_vjp)


def _raw_index(index, recording=False):
    if isinstance(index, tuple):
        # The reverse rule reads the index arrays when the reverse pass runs: those the caller
        # gave inside a tuple are copied here (the primitive copies a lone array itself).
        return tuple(_raw_index(i, recording) for i in index)
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, int) and not isinstance(index, bool):
        return int(index)
    if recording and (type(index) is np.ndarray or is_device_array(index)):
        return index.copy()
    return index


def _rank_dependent(index):
    """True when ``index`` holds a rank (:class:`RankInt`) or a distributed Tensor."""
    if isinstance(index, (tuple, list)):
        return any(_rank_dependent(i) for i in index)
    if isinstance(index, slice):
        return any(isinstance(v, RANK_DEPENDENT) for v in (index.start, index.stop, index.step))
    return isinstance(index, RANK_DEPENDENT) or (isinstance(index, Tensor) and index.distributed)


def getitem(x, index):
    """``x[index]`` for basic and integer-array indexing.

    The result is distributed when ``x`` is or when the index depends on the rank. The
    reverse rule scatter-adds into ``x``'s shape (repeated indices accumulate).

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> gpumpiad.grad(lambda x: x[np.array([0, 0, 2])].sum())(np.zeros(3)).tolist()
    [2.0, 0.0, 1.0]
    """
    raw = _raw_index(index, isinstance(index, tuple) and active_tape() is not None)
    if _rank_dependent(index):
        return _getitem(x, raw, _RANK_DEPENDENT)
    return _getitem(x, raw)
