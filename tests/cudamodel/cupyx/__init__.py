"""``cupyx`` of the model: pinned host memory from a pool that reuses a freed block at once."""
from __future__ import annotations

import weakref

import numpy as _np

from cupy._array import PINNED_POOL, _rounded
from cupy._model import MODEL


class _PinnedBlock(bytearray):
    """The bytes of one pinned allocation; ``_allocation`` carries its stamps."""


_serial = [0]


def empty_pinned(shape, dtype=float, order="C"):
    """A NumPy array in (modelled) page-locked memory, reused from the pool when one is free."""
    dtype = _np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, _np.integer)) else tuple(shape)
    nbytes = int(_np.prod(shape, dtype=_np.int64)) * dtype.itemsize
    key = _rounded(nbytes)
    _serial[0] += 1
    label = f"pinned buffer #{_serial[0]} {shape} {dtype}"
    alloc = PINNED_POOL.take(key, key, label)
    if not isinstance(getattr(alloc, "block", None), _PinnedBlock):
        alloc.block = _PinnedBlock(key)
        alloc.block._allocation = alloc
        alloc.base = _np.frombuffer(alloc.block, _np.uint8)
    array = _np.frombuffer(alloc.block, _np.uint8, count=nbytes).view(dtype).reshape(
        shape, order=order)
    weakref.finalize(array, PINNED_POOL.give, key, alloc)
    return array


def zeros_pinned(shape, dtype=float, order="C"):
    array = empty_pinned(shape, dtype, order)
    MODEL.host_op("zeros_pinned", writes=[array])
    array[...] = 0
    return array
