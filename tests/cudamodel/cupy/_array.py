"""Device arrays of the model: NumPy arrays in tracked allocations, every operation on them an
operation on the current stream."""
from __future__ import annotations

import weakref

import numpy as _np

from . import _model
from ._model import MODEL, Allocation, allocation_of


class ndarray(_np.ndarray):
    """A device array: ufuncs, NumPy functions, indexing and copies are operations on the
    current stream that read and write its allocation."""

    __module__ = "cupy"

    def __array_finalize__(self, obj):
        if obj is None or self.base is not None or allocation_of(obj) is None:
            return
        # A method that made fresh memory without going through this class (a copy).
        _adopt(self, "ndarray method copy", reads=[obj])

    @property
    def device(self):
        from .cuda import Device
        return Device(0)

    @property
    def data(self):
        return _Pointer(self.__array_interface__["data"][0])

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host(inputs, ufunc.__name__)
        if out is not None:
            # As in setitem: an input whose memory bounds overlap an output's (and that is not
            # that output itself) is copied first.
            inputs = tuple(x.copy() if isinstance(x, ndarray) and any(
                x is not o and _np.may_share_memory(_raw(x), _raw(o)) for o in out) else x
                for x in inputs)
        raw_inputs = [_raw(x) for x in inputs]
        if out is not None:
            raw_out = tuple(_raw(o) for o in out)
            kwargs["out"] = raw_out
        what = f"{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        stream = current_agent()
        with _np.errstate(all="ignore"):
            result = getattr(ufunc, method)(*raw_inputs, **kwargs)
        reads = [x for x in inputs if allocation_of(x) is not None]
        if method == "at":
            MODEL.device_op(stream, what, reads=reads, writes=[inputs[0]])
            return None
        if out is not None:
            MODEL.device_op(stream, what, reads=reads, writes=list(out))
            return out[0] if len(out) == 1 else out
        results = result if isinstance(result, tuple) else (result,)
        wrapped = tuple(_fresh(_np.asarray(r), stream) for r in results)
        MODEL.device_op(stream, what, reads=reads, writes=wrapped)
        return wrapped if isinstance(result, tuple) else wrapped[0]

    def __array_function__(self, func, types, args, kwargs):
        arrays = []
        _collect(args, arrays)
        _collect(kwargs, arrays)
        _refuse_host(arrays, func.__name__)
        out = kwargs.get("out")
        stream = current_agent()
        with _np.errstate(all="ignore"):
            result = func(*_unwrap(args), **_unwrap(kwargs))
        reads = [a for a in arrays if allocation_of(a) is not None and a is not out
                 and not func.__name__.endswith("_like")]  # *_like reads metadata only
        if out is not None:
            MODEL.device_op(stream, func.__name__, reads=reads, writes=[out])
            return out
        if not isinstance(result, _np.ndarray):
            if isinstance(result, (tuple, list)):
                return type(result)(_wrap_result(r, arrays, stream, func.__name__, reads)
                                    for r in result)
            if isinstance(result, _np.generic):
                result = _np.asarray(result)
            else:
                MODEL.device_op(stream, func.__name__, reads=reads)
                return result
        return _wrap_result(result, arrays, stream, func.__name__, reads)

    def __getitem__(self, key):
        key = _unwrap(key)
        result = _np.ndarray.__getitem__(self, key)
        if isinstance(result, ndarray) and result.base is not None:
            return result  # a view: no access
        stream = current_agent()
        raw = _np.asarray(_np.ndarray.__getitem__(self.view(_np.ndarray), key))
        fresh = _fresh(raw, stream)
        MODEL.device_op(stream, "gather (fancy index)", reads=[self], writes=[fresh])
        return fresh

    def __setitem__(self, key, value):
        if isinstance(value, _np.ndarray) and not isinstance(value, ndarray) and value.ndim:
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")
        key = _unwrap(key)
        target = _np.ndarray.__getitem__(self, key)
        if isinstance(value, ndarray) and isinstance(target, ndarray) and \
                _np.may_share_memory(_raw(target), _raw(value)):
            # CuPy's kernels copy an input whose memory bounds overlap the output's first
            # (one more kernel and a temporary array).
            value = value.copy()
        stream = current_agent()
        reads = [value] if allocation_of(value) is not None else []
        if isinstance(target, ndarray):
            MODEL.device_op(stream, "setitem", reads=reads, writes=[target])
        else:  # one element through an integer key: a one-element write
            MODEL.device_op(stream, "setitem", reads=reads, writes=[self])
        _np.ndarray.__setitem__(self.view(_np.ndarray), key, _raw(value))

    def copy(self, order="C"):
        stream = current_agent()
        out = _fresh(_np.array(self.view(_np.ndarray), order=order), stream)
        MODEL.device_op(stream, "copy", reads=[self], writes=[out])
        return out

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if not copy and _np.dtype(dtype) == self.dtype:
            return self
        stream = current_agent()
        out = _fresh(self.view(_np.ndarray).astype(dtype, order=order, casting=casting), stream)
        MODEL.device_op(stream, "astype", reads=[self], writes=[out])
        return out

    def fill(self, value):
        MODEL.device_op(current_agent(), "fill", writes=[self])
        self.view(_np.ndarray).fill(value)

    # -- host transfers -------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        """Device-to-host copy on ``stream`` (default: current); the host waits for it unless
        ``blocking=False`` and a stream is given (as CuPy does for pinned ``out``)."""
        from .cuda import get_current_stream
        agent = (stream or get_current_stream())._agent
        if out is None:
            out = _np.empty(self.shape, self.dtype)
        MODEL.device_op(agent, "copy device to host", reads=[self], writes=[out])
        out[...] = self.view(_np.ndarray)
        if stream is None or blocking:
            MODEL.synchronize(agent, "ndarray.get")
        return out

    def set(self, arr, stream=None):
        """Host-to-device copy on ``stream`` (default: current), asynchronous for the host."""
        from .cuda import get_current_stream
        agent = (stream or get_current_stream())._agent
        MODEL.device_op(agent, "copy host to device", reads=[arr], writes=[self])
        self.view(_np.ndarray)[...] = arr

    def item(self):
        return self.get().item()

    def __float__(self):
        return float(self.get())

    def __int__(self):
        return int(self.get())

    def __bool__(self):
        return bool(self.get())

    def tolist(self):
        return self.get().tolist()

    def __repr__(self):
        return "model." + repr(self.view(_np.ndarray))

    def __reduce__(self):
        raise TypeError("stream model: a device array cannot be pickled")


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


def current_agent():
    from .cuda import get_current_stream
    return get_current_stream()._agent


class _Pool:
    """CuPy's pools as the model sees them: a freed device block goes back to the stream it was
    allocated on and is reused there at once (no wait for other streams' work on it); a freed
    pinned block is reused at once by any caller."""

    def __init__(self):
        self.free = {}

    def take(self, key, nbytes, label):
        blocks = self.free.get(key)
        if blocks:
            alloc = blocks.pop()
            alloc.label = label
            return alloc
        alloc = Allocation(MODEL, nbytes, label)
        alloc.base = _np.zeros(max(nbytes, 1), _np.uint8)
        return alloc

    def give(self, key, alloc):
        self.free.setdefault(key, []).append(alloc)


DEVICE_POOL = _Pool()
PINNED_POOL = _Pool()
_serial = [0]


def _rounded(nbytes):
    return max(512, -(-nbytes // 512) * 512)


def empty(shape, dtype=float, order="C"):
    """An uninitialised device array from the current stream's pool."""
    dtype = _np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, _np.integer)) else tuple(shape)
    nbytes = int(_np.prod(shape, dtype=_np.int64)) * dtype.itemsize
    stream = current_agent()
    key = (stream.id, _rounded(nbytes))
    _serial[0] += 1
    alloc = DEVICE_POOL.take(key, key[1], f"device array #{_serial[0]} {shape} {dtype}")
    raw = alloc.base[:nbytes].view(dtype).reshape(shape, order=order)
    array = raw.view(ndarray)
    array._allocation = alloc
    weakref.finalize(array, DEVICE_POOL.give, key, alloc)
    return array


def _fresh(raw, stream):
    """A new device array holding ``raw``'s values (the caller records the write)."""
    array = empty(raw.shape, raw.dtype)
    array.view(_np.ndarray)[...] = raw
    return array


def _adopt(array, what, reads):
    """Track memory a NumPy method allocated for a device array."""
    alloc = Allocation(MODEL, array.nbytes, f"device array (from {what})")
    alloc.base = array.view(_np.uint8).reshape(-1) if array.nbytes else _np.zeros(1, _np.uint8)
    array._allocation = alloc
    MODEL.device_op(current_agent(), what, reads=reads, writes=[array])


def _wrap_result(result, arrays, stream, what, reads):
    for a in arrays:
        if isinstance(a, ndarray) and _np.may_share_memory(result, a.view(_np.ndarray)):
            return result.view(ndarray)  # a view of an input: no access
    fresh = _fresh(result, stream)
    MODEL.device_op(stream, what, reads=reads, writes=[fresh])
    return fresh


def _raw(x):
    return x.view(_np.ndarray) if isinstance(x, ndarray) else x


def _unwrap(x):
    if isinstance(x, ndarray):
        return x.view(_np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _collect(x, into):
    if isinstance(x, _np.ndarray):
        into.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _collect(v, into)
    elif isinstance(x, dict):
        for v in x.values():
            _collect(v, into)


def _refuse_host(values, name):
    for x in values:
        if isinstance(x, _np.ndarray) and not isinstance(x, ndarray) and x.ndim:
            raise TypeError(f"{name}: Unsupported type <class 'numpy.ndarray'> "
                            "(a host array where the model expects a device array)")


_model.ndarray = ndarray
