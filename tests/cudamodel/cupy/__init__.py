"""A CPU model of the parts of CuPy that gpumpiad uses, for the test suite.

Put ``tests/cudamodel`` first on ``sys.path`` (``PYTHONPATH``) and ``import cupy`` gets this
package: device arrays are NumPy arrays in tracked allocations, streams and events are vector
clocks (see :mod:`cupy._model`), and every read or write of device or pinned memory is checked
against the operation that last wrote it (and, for a write, the reads since). An access CUDA
would not order raises :class:`Hazard`. Kernels run through host implementations registered in
:data:`KERNELS` (name -> function of the launch arguments returning ``(reads, writes, run)``).
``MODEL.host_syncs`` lists every host wait on device work, in order, with ``MODEL.enqueued``.
"""
from __future__ import annotations

import numpy as _np

from . import cuda
from ._array import (DEVICE_POOL, PINNED_POOL, _fresh, current_agent, empty, ndarray)
from ._model import MODEL, Hazard

__version__ = "14.0.0+model"
KERNELS = {}


def asarray(a, dtype=None, order=None):
    """``a`` as a device array: itself when it is one (cast on the current stream if ``dtype``
    differs), else a host-to-device copy on the current stream."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    raw = _np.asarray(a, dtype=dtype, order=order)
    fresh = _fresh(raw, current_agent())
    MODEL.device_op(current_agent(), "copy host to device", reads=[a] if isinstance(
        a, _np.ndarray) else [], writes=[fresh])
    return fresh


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        out = a.copy() if copy else a
        return out if dtype is None else out.astype(dtype, copy=False)
    return asarray(a, dtype=dtype)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return _np.asarray(a, order=order)


_memory_pool = cuda.MemoryPool()


def get_default_memory_pool():
    return _memory_pool


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def from_dlpack(x):
    if isinstance(x, ndarray):
        return x
    raise TypeError("stream model: from_dlpack of a host object")


def _created(func):
    """A NumPy creation function whose result is written on the current stream."""
    def create(*args, **kwargs):
        raw = func(*args, **kwargs)
        out = _fresh(_np.asarray(raw), current_agent())
        MODEL.device_op(current_agent(), func.__name__, writes=[out])
        return out
    create.__name__ = func.__name__
    return create


zeros = _created(_np.zeros)
ones = _created(_np.ones)
full = _created(_np.full)
arange = _created(_np.arange)
linspace = _created(_np.linspace)
eye = _created(_np.eye)


class RawModule:
    """Compiles nothing: its functions run the host implementations in :data:`KERNELS`."""

    def __init__(self, code=None, options=(), name_expressions=None, backend="nvrtc", **kwargs):
        self.code = code
        self.options = tuple(options)
        self.name_expressions = name_expressions

    def compile(self, *args, **kwargs):
        return self

    def get_function(self, name):
        return RawKernel(self.code, name)


class RawKernel:
    def __init__(self, code, name, options=(), **kwargs):
        self.name = name
        self.attributes = {"num_regs": 32}

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        handler = KERNELS.get(self.name)
        if handler is None:
            raise NotImplementedError(f"stream model: no host implementation of kernel "
                                      f"{self.name!r} in cupy.KERNELS")
        reads, writes, run = handler(args)
        agent = (stream if stream is not None else cuda.get_current_stream())._agent
        MODEL.device_op(agent, self.name, reads=reads, writes=writes)
        run()


def __getattr__(name):
    # NumPy's ufuncs and functions dispatch to the device array class (``__array_ufunc__``,
    # ``__array_function__``) when an argument is a device array.
    return getattr(_np, name)
