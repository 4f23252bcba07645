"""The :class:`Tensor`: an ndarray (NumPy or CuPy) with a layout, recorded on the active tape."""
from __future__ import annotations

import numpy as _np

from . import streams
from .backend import asarray, device_of, is_device_array

SERIAL = "serial"
DISTRIBUTED = "distributed"


class Tensor:
    """An array that knows its layout and, while a tape records, its cotangent slot.

    A *serial* tensor holds the same value on every rank of :attr:`comm`; a *distributed* tensor
    holds this rank's own piece. Arithmetic, indexing and the functions in :mod:`gpumpiad` work
    on Tensors, arrays and Python scalars alike.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> x = gpumpiad.tensor(np.arange(3.0), distributed=True)
    >>> y = (x * 2).sum()
    >>> y.distributed, y.shape, float(y.numpy())
    (True, (), 6.0)
    """

    __slots__ = ("_data", "_pending", "layout", "comm", "_tape", "_slot", "_stream")
    __array_ufunc__ = None  # NumPy defers to Tensor's reflected operators

    def __init__(self, data, layout=SERIAL, comm=None, pending=None):
        if comm is None:
            from .comm import world
            comm = world()
        self._data = data
        self._pending = pending
        self.layout = layout
        self.comm = comm
        self._tape = None
        self._slot = -1
        # A device array's producing stream: the current one where it was made.
        self._stream = (None if data is None or type(data) is _np.ndarray
                        or not is_device_array(data) else streams.current_stream())

    @property
    def data(self):
        """The underlying NumPy or CuPy array (waits for a pending communication). A device
        array made on another stream than the current one is ordered before the current
        stream first (on the GPU), so whatever reads it next reads finished values."""
        if self._pending is not None:
            self._data = self._pending.wait()
            self._pending = None
        if self._stream is not None:
            streams.order(streams.current_stream(), self._stream)
        return self._data

    @property
    def distributed(self) -> bool:
        return self.layout == DISTRIBUTED

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:<id>"``."""
        return device_of(self.data)

    @property
    def T(self):
        from .ops.shape import transpose
        return transpose(self)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        return f"Tensor({self.data!r}, layout={self.layout!r}, device={self.device!r})"

    def __array__(self, dtype=None, copy=None):
        self._untraced("converted to a NumPy array (numpy.asarray, or a NumPy function gpumpiad "
                       "does not provide)", ".numpy()")
        out = self._host(dtype)
        if out is self._data:
            if copy:
                return out.copy()
            # A view that cannot write: writing into it would change the Tensor, a value.
            out = out.view()
            out.flags.writeable = False
        return out

    def _host(self, dtype=None):
        from .backend import to_numpy
        out = to_numpy(self.data)
        return out if dtype is None else out.astype(dtype)

    def _untraced(self, how, instead):
        """Raise where a differentiation traces this Tensor: a value taken out of it ``how``
        is a constant to the derivative, which would drop this Tensor's part of the gradient."""
        from .tape import traced_outside
        if traced_outside(self, None):
            raise TypeError(
                f"rank {self.comm.rank}: a Tensor that grad, value_and_grad or vjp is tracing "
                f"was {how}, which would drop its part of the gradient: use gpumpiad's "
                f"operations, or {instead} where its value is wanted as a constant (to log it, "
                "or to hold it fixed)")

    def __float__(self):
        self._untraced("converted to a Python float", "float(t.numpy())")
        return float(self.data)

    def __int__(self):
        return int(self.data)

    def __bool__(self):
        return bool(self.data)

    def item(self):
        if self.dtype.kind in "fc":
            self._untraced("converted to a Python number (.item())", ".numpy().item()")
        return self.data.item()

    def numpy(self):
        """A NumPy copy of the data (the value now: writing into it leaves the Tensor as it
        is)."""
        out = self._host()
        return out.copy() if out is self._data else out

    # +, -, *, /, ** and the comparisons are the primitives of gpumpiad.ops.elementwise,
    # which installs them here (called directly: they are every program's hot path).

    def __matmul__(self, other):
        from .ops.linalg import matmul
        return matmul(self, other)

    def __rmatmul__(self, other):
        from .ops.linalg import matmul
        return matmul(other, self)

    def __neg__(self):
        from .ops.elementwise import negative
        return negative(self)

    def __pos__(self):
        return self

    def __getitem__(self, index):
        from .ops.indexing import getitem
        return getitem(self, index)

    def sum(self, axis=None, keepdims=False, **numpy_keywords):
        """:func:`gpumpiad.sum`; also what ``numpy.sum(tensor)`` calls."""
        from .ops.reduction import sum as sum_
        if numpy_keywords:
            _numpy_defaults(self, "sum", numpy_keywords)
        return sum_(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False, **numpy_keywords):
        """:func:`gpumpiad.mean`; also what ``numpy.mean(tensor)`` calls."""
        from .ops.reduction import mean
        if numpy_keywords:
            _numpy_defaults(self, "mean", numpy_keywords)
        return mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        from .ops.shape import reshape
        return reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        from .ops.shape import transpose
        return transpose(self, axes or None)


def _numpy_defaults(t, method, keywords):
    """NumPy's ``numpy.sum(t)`` and ``numpy.mean(t)`` call the method with ``out`` and ``dtype``
    keywords: their defaults pass, anything else is refused by name."""
    given = {k: v for k, v in keywords.items() if v is not None or k not in ("out", "dtype")}
    if given:
        raise TypeError(f"rank {t.comm.rank}: Tensor.{method} takes axis and keepdims, got "
                        f"{', '.join(f'{k}={v!r:.40}' for k, v in given.items())}: its result "
                        "is a new Tensor of the input's dtype")


def tensor(data, distributed=False, dtype=None, comm=None, stream=None):
    """Make a Tensor on the process's backend holding a copy of ``data``.

    The Tensor holds ``data``'s value at the time of the call, as ``numpy.array`` and
    ``torch.tensor`` do: writing into ``data`` afterwards leaves the Tensor alone.

    Parameters
    ----------
    data : array_like or Tensor
        The values; NumPy data moves to the GPU when the backend is CuPy.
    distributed : bool
        False (default): the value is the same on every rank (serial). True: each rank holds its
        own piece.
    dtype : dtype, optional
    comm : gpumpiad.Comm, optional
        The communicator the layout refers to (default: the world).
    stream : cupy.cuda.Stream, optional
        The CUDA stream that produces ``data`` (a CuPy array): whatever reads the Tensor is
        ordered after that stream's work queued so far. Default: the stream current here, as
        for any array passed to the library. A value computed under ``with stream:`` and used
        after the block needs it (or the library's call made inside the block).

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> a = np.array([1.0, 2.0])
    >>> t = gpumpiad.tensor(a)
    >>> a[0] = 5.0
    >>> t.numpy()
    array([1., 2.])
    """
    return wrap(data, distributed, dtype, comm, stream, copy=True)


def wrap(data, distributed=False, dtype=None, comm=None, stream=None, copy=False):
    """:func:`tensor` for the library's own calls: an array of the backend's kind is held as
    is (no copy) unless ``copy``; the caller does not write into it while the Tensor lives."""
    from .comm import resolve
    comm = resolve(comm)
    if isinstance(data, Tensor):
        data = data.data
    if copy and stream is not None and is_device_array(data):
        # The copy, on the current stream, reads what ``stream`` makes: it waits for it.
        streams.order(streams.current_stream(), stream)
        stream = None
    if not isinstance(distributed, (bool, _np.bool_)):
        raise TypeError(f"rank {comm.rank}: tensor's distributed must be True or False, got "
                        f"{distributed!r}")
    try:
        array = asarray(data, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"rank {comm.rank}: tensor's data must be array_like with a numeric "
                        f"dtype{'' if dtype is None else f' convertible to {dtype!r}'}, got "
                        f"{type(data).__name__}: {exc}") from None
    if array.dtype.kind not in "biufc":
        hint = (" (a device array the backend cannot read: it exposes "
                "__cuda_array_interface__ but the backend is NumPy; pass a CuPy array or "
                "copy it to the host)" if hasattr(data, "__cuda_array_interface__") else "")
        raise TypeError(f"rank {comm.rank}: tensor's data must have a numeric dtype (bool, int, "
                        f"float or complex), got dtype {array.dtype} from "
                        f"{type(data).__name__}{hint}")
    if copy and (array is data or array.base is not None):
        array = array.copy()
    out = Tensor(array, DISTRIBUTED if distributed else SERIAL, comm)
    if stream is not None:
        if out._stream is None:
            raise TypeError(f"rank {comm.rank}: tensor's stream orders a CuPy array, but data "
                            f"is a {type(array).__module__.split('.')[0]} array")
        out._stream = stream
    return out


def raw(x):
    """The array inside a Tensor; anything else unchanged."""
    return x.data if isinstance(x, Tensor) else x
