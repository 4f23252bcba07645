"""``halo_exchange``: fill a patch's ghost ring from its neighbours.

The public function works on Tensors and is differentiable; :func:`start`, :func:`exchange` and
:func:`exchange_adjoint` are the raw, in-place forms on arrays that the heat solver's time loops
use. Each exchange packs the four boundary rows/columns into contiguous buffers (the heat
kernels' ``pack`` on a device, NumPy slicing on the host), posts every non-blocking receive,
then every send, and finishes with one ``Waitall`` and ``unpack``. Corners are not exchanged
(a 5-point stencil does not read them). Device buffers go to CUDA-aware MPI directly or
through pinned host staging (:mod:`gpumpiad.transport`).

Environment
-----------
GPUMPIAD_HEAT_KERNELS : ``numpy`` | ``host``
    Kernels for NumPy arrays: the array-slicing reference (``numpy``) or the host build of
    ``kernels/heat.cu`` (``host``, the default when a C++ compiler is available).
"""
from __future__ import annotations

import os

from mpi4py import MPI

from . import trace, transport
from .backend import get_array_module, is_device_array
from .custom import custom_op
from .debug import CommunicationMismatch, wait
from .heat import stencil
from .heat.grid import check_grid
from .tensor import DISTRIBUTED, Tensor

__all__ = ["halo_exchange", "start", "exchange", "exchange_adjoint", "kernels_for", "Exchange",
           "Persistent"]

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3
_OPPOSITE = (SOUTH, NORTH, EAST, WEST)
# A message's tag is the side it leaves from; the adjoint's messages travel the other way and
# get their own tags, so an exchange and its adjoint can never match each other's messages.
_ADJOINT_TAG = 4
_KERNELS = ("numpy", "host", "cuda")


def halo_exchange(u, grid):
    """Fill the ghost ring of each rank's padded patch with its neighbours' boundary cells.

    Parameters
    ----------
    u : Tensor or array, shape (nx + 2, ny + 2)
        This rank's patch with its ghost ring (distributed).
    grid : gpumpiad.heat.Grid
        The decomposition ``u`` belongs to.

    Returns
    -------
    Tensor
        A distributed copy of ``u`` whose ghosts facing a neighbour hold that neighbour's
        boundary row/column; ghosts on the physical boundary (Dirichlet values) and corners are
        ``u``'s own.

    Raises
    ------
    TypeError
        When ``grid`` is not a Grid or ``u`` not of a floating dtype.
    ValueError
        When ``u`` is not of the padded shape, or ``grid`` was freed.

    Notes
    -----
    The exchange is linear, ``v = E u``. Its adjoint sends the cotangent of every received
    ghost back to the rank that owns the cell and adds it there:

    .. math:: \\bar u_c = \\bar v_c + \\sum_{g \\,\\text{ghost copy of}\\, c} \\bar v_g ,
              \\qquad \\bar u_g = 0 \\ \\text{for ghosts facing a neighbour},

    while physical-boundary ghosts pass their cotangent through unchanged.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> from gpumpiad.halo import halo_exchange
    >>> from gpumpiad.heat import Grid
    >>> grid = Grid((8, 6))
    >>> u = gpumpiad.tensor(np.ones(grid.padded_shape), distributed=True)
    >>> halo_exchange(u, grid).shape == grid.padded_shape
    True
    """
    check_grid(grid, "halo_exchange")
    data = u.data if isinstance(u, Tensor) else u
    shape = tuple(getattr(data, "shape", ()))
    kind = getattr(getattr(data, "dtype", None), "kind", None)
    if kind != "f":
        raise TypeError(f"rank {grid.rank}: halo_exchange expects u of a floating dtype "
                        f"(float32 or float64), got {getattr(data, 'dtype', type(data).__name__)}")
    if shape != grid.padded_shape:
        raise ValueError(f"rank {grid.rank}: halo_exchange expects u of padded shape "
                         f"{grid.padded_shape} (nx+2, ny+2), got {shape}")
    return _halo(u, grid=grid)


@custom_op(name="halo_exchange", layout=DISTRIBUTED)
def _halo(u, grid):
    v = u.copy()
    exchange(v, grid)
    return v


@_halo.defvjp
def _halo_vjp(g, ans, u, grid):
    g = g.copy()
    exchange_adjoint(g, grid)
    return g


def kernels_for(array, backend=None):
    """The heat-kernel module (``step``, ``adjoint``, ``pack``, ``unpack``) for ``array``.

    Parameters
    ----------
    array : numpy.ndarray or cupy.ndarray
    backend : {"numpy", "host", "cuda"}, optional
        ``numpy``: :mod:`gpumpiad.heat.stencil` (NumPy or CuPy slicing); ``host``: the host build
        :mod:`gpumpiad.heat.hostkernels` (NumPy arrays); ``cuda``: :mod:`gpumpiad.cuda_kernels`
        (CuPy arrays). Default: ``cuda`` for CuPy arrays; for NumPy arrays
        ``GPUMPIAD_HEAT_KERNELS`` if set, else ``host`` when it builds here, else ``numpy``.
    """
    device = is_device_array(array)
    choice = backend
    if choice is None and not device:
        choice = os.environ.get("GPUMPIAD_HEAT_KERNELS", "").strip().lower() or None
    if choice is not None and choice not in _KERNELS:
        source = "backend" if backend is not None else "GPUMPIAD_HEAT_KERNELS"
        raise ValueError(f"{source}: heat kernels must be one of {_KERNELS}, got {choice!r}")
    if choice is None:
        choice = "cuda" if device else "host"
        if choice == "host":
            from .heat import hostkernels
            if not hostkernels.available():
                choice = "numpy"
    if choice == "numpy":
        from .heat import stencil
        return stencil
    if (choice == "cuda") != device:
        raise ValueError(f"heat kernels {choice!r} cannot run on a "
                         f"{'CuPy' if device else 'NumPy'} array")
    if choice == "cuda":
        from . import cuda_kernels
        return cuda_kernels
    from .heat import hostkernels
    return hostkernels


# Exchanges dropped before their wait (an error between start and wait): MPI may still write
# their receive buffers and read their send buffers, which therefore stay here, never freed
# for reuse, until their requests complete.
_abandoned = []


def _release_finished():
    """Forget the abandoned exchanges whose requests have completed."""
    kept = []
    for entry in _abandoned:
        try:
            if MPI.Request.Testall(entry[0]):
                continue
        except MPI.Exception:
            continue    # failed: MPI is done with the buffers
        kept.append(entry)
    _abandoned[:] = kept


class Exchange:
    """An exchange in flight: :meth:`wait` completes it and writes the received data."""

    __slots__ = ("_array", "_requests", "_received", "_adjoint", "_edges", "_device", "_keep",
                 "_verify", "_error", "_nbytes")

    def __init__(self, array, requests, received, adjoint, edges, device, keep, verify,
                 nbytes=0):
        self._nbytes = nbytes
        self._array = array
        self._requests = requests
        self._received = received
        self._adjoint = adjoint
        self._edges = edges
        self._device = device
        self._keep = keep
        self._verify = verify
        self._error = None

    def __del__(self):
        if self._requests is not None and _abandoned is not None:
            _abandoned.append((self._requests, self._received, self._keep))

    def wait(self):
        """Wait for every message, then unpack (assign ghosts, or add into boundary cells)."""
        if self._error is not None:
            raise self._error
        if self._requests is None:
            return self._array
        with trace.span("halo_exchange.wait", trace.COMMUNICATION, payload=self._nbytes):
            return self._finish()

    def _finish(self):
        call = "adjoint halo exchange" if self._adjoint else "halo exchange"
        statuses = [MPI.Status() for _ in self._requests] if self._verify else None
        try:
            # A watchdog timeout propagates from here and leaves the requests to wait for again.
            wait(self._requests, call=call, statuses=statuses)
            for (_, buf, peer, tag), status in zip(self._received, statuses or ()):
                transport.check_filled(status, buf, call, peer, tag)
        except MPI.Exception as exc:
            self._error = transport.mpi_error(call, exc, statuses)
        except CommunicationMismatch as exc:
            self._error = exc
        self._requests = None
        if self._error is not None:
            raise self._error
        ghost, add = (0, 1) if self._adjoint else (1, 0)
        for side, buf, _, _ in self._received:
            self._edges.unpack(self._array, transport.deliver(buf, self._device), side,
                               ghost, add)
        self._received = self._keep = None
        return self._array


def start(a, grid, adjoint=False, kernels=None, verify=True):
    """Start filling the ghosts of padded ``a`` in place; returns an :class:`Exchange`.

    Compute whatever does not read the ghosts, then call ``.wait()``.

    Parameters
    ----------
    a : array, shape (nx + 2, ny + 2)
        C-contiguous NumPy or CuPy array, modified in place by ``wait()``.
    grid : gpumpiad.heat.Grid
    adjoint : bool
        False: receive the neighbours' boundary cells into the ghosts. True: the adjoint, send
        the ghosts to their owners, zero them, and add what arrives into the boundary cells.
    kernels : module, optional
        Heat-kernel module whose ``pack``/``unpack`` move a device array's rows and columns
        (default :func:`kernels_for` ``(a)``); a host array's move through NumPy slicing.
    verify : bool
        Check that every message filled its buffer, as it does unless a neighbour's array has
        another dtype (a half-filled buffer would be unpacked). The heat solver, which checks
        dtypes across ranks once per solve, skips it.

    Raises
    ------
    ValueError
        When ``grid`` was freed.
    """
    kernels = kernels_for(a) if kernels is None else kernels
    if _abandoned:
        _release_finished()
    device = is_device_array(a)
    # A row or column moves through NumPy slicing on the host: cheaper than a kernel call.
    edges = kernels if device else stencil
    xp = get_array_module(a)
    mpi = grid.cart.mpi
    nx, ny = a.shape[0] - 2, a.shape[1] - 2
    links = [(side, peer) for side, peer in enumerate(grid.neighbours) if peer != MPI.PROC_NULL]
    if not links:
        # No message to fail on a freed grid's communicator: ask.
        check_grid(grid, "halo exchange")
    tag0 = _ADJOINT_TAG if adjoint else 0
    requests, received, keep = [], [], []
    nbytes = sum(ny if side < 2 else nx for side, _ in links) * a.dtype.itemsize
    with trace.span("halo_exchange", trace.COMMUNICATION, payload=nbytes):
        try:
            for side, peer in links:
                buf = transport.recv_buffer((ny if side < 2 else nx,), a.dtype, device)
                # Messages travel as bytes (both ends): a message of another dtype is then a
                # size that the receive can report, not a type MPI may fail an assertion on.
                requests.append(mpi.Irecv([buf, MPI.BYTE], source=peer,
                                          tag=tag0 + _OPPOSITE[side]))
                received.append((side, buf, peer, tag0 + _OPPOSITE[side]))
            for side, peer in links:
                packed = xp.empty((ny if side < 2 else nx,), a.dtype)
                edges.pack(a, packed, side, 1 if adjoint else 0)
                send = transport.send_buffer(packed, private=True)
                keep.append(send)
                requests.append(mpi.Isend([send, MPI.BYTE], dest=peer, tag=tag0 + side))
        except MPI.Exception:
            # A freed grid's communicator fails the first call: say so, not MPI's words.
            check_grid(grid, "halo exchange")
            raise
        if adjoint:
            # Ghost copies were just sent to their owners: their cotangent now lives there.
            for side, _ in links:
                _ghost(a, side)[...] = 0
    return Exchange(a, requests, received, adjoint, edges, device, keep, verify, nbytes)


def exchange(a, grid, kernels=None, verify=True):
    """Fill the ghosts of padded ``a`` from the neighbours, in place (blocking); returns ``a``.
    ``verify``: see :func:`start`."""
    return start(a, grid, False, kernels, verify).wait()


def exchange_adjoint(a, grid, kernels=None, verify=True):
    """Adjoint of :func:`exchange`, in place: ghosts facing a neighbour are sent to their owner,
    zeroed here, and the ghosts received are added into ``a``'s boundary cells; returns ``a``."""
    return start(a, grid, True, kernels, verify).wait()


class Persistent:
    """Preposted halo exchanges of host (NumPy) arrays of one padded shape and dtype over
    ``grid``: persistent MPI requests made once (``Send_init``/``Recv_init``) and restarted by
    each :meth:`exchange`, for a time loop that exchanges every step.

    Each exchange copies the boundary rows/columns of the array it is given into the
    requests' send buffers, starts every request, waits (bounded by the watchdog, as every
    wait is) and copies the received rows/columns into the ghosts, as :func:`exchange` does
    (unverified: the caller has agreed dtypes and shapes across ranks). Every rank of
    ``grid`` must make one and exchange in step with it. :meth:`free` releases the requests.

    Parameters
    ----------
    grid : gpumpiad.heat.Grid
    dtype : numpy dtype
        The arrays' dtype; their shape is ``grid.padded_shape``.

    Raises
    ------
    ValueError
        When ``grid`` was freed.

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.halo import Persistent
    >>> from gpumpiad.heat import Grid
    >>> grid = Grid((4, 3), periodic=True)
    >>> u = np.arange(30.0).reshape(grid.padded_shape)
    >>> with Persistent(grid, u.dtype) as halo:
    ...     _ = halo.exchange(u)
    >>> bool((u[0, 1:-1] == u[-2, 1:-1]).all())
    True
    """

    __slots__ = ("_requests", "_send", "_recv", "_active", "nbytes")

    def __init__(self, grid, dtype):
        check_grid(grid, "halo exchange")
        import numpy as np
        nx, ny = grid.local_shape
        links = [(side, peer) for side, peer in enumerate(grid.neighbours)
                 if peer != MPI.PROC_NULL]
        mpi = grid.cart.mpi
        self._send, self._recv, self._requests = [], [], []
        self._active = False
        try:
            for side, peer in links:
                buf = np.empty(ny if side < 2 else nx, dtype)
                self._recv.append((_ghost_index(side), buf))
                self._requests.append(mpi.Recv_init([buf, MPI.BYTE], source=peer,
                                                    tag=_OPPOSITE[side]))
            for side, peer in links:
                buf = np.empty(ny if side < 2 else nx, dtype)
                self._send.append((_edge_index(side), buf))
                self._requests.append(mpi.Send_init([buf, MPI.BYTE], dest=peer, tag=side))
        except MPI.Exception:
            check_grid(grid, "halo exchange")
            raise
        #: Bytes one exchange sends from this rank.
        self.nbytes = sum(buf.nbytes for _, buf in self._send)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def __del__(self):
        self.free()

    def exchange(self, a):
        """Fill the ghosts of ``a`` (``grid.padded_shape``, this exchange's dtype) facing a
        neighbour from that neighbour, in place; returns ``a``."""
        requests = self._requests
        if not requests:
            return a
        with trace.span("halo_exchange", trace.COMMUNICATION, payload=self.nbytes):
            for index, buf in self._send:
                buf[...] = a[index]
            try:
                MPI.Prequest.Startall(requests)
                self._active = True
                wait(requests, call="halo exchange")
            except MPI.Exception as exc:
                raise transport.mpi_error("halo exchange", exc) from None
            self._active = False
            for index, buf in self._recv:
                a[index] = buf
        return a

    def free(self):
        """Release the requests (those still in flight after a failed wait once complete)."""
        requests, self._requests = getattr(self, "_requests", None), []
        if not requests or MPI.Is_finalized():
            return
        if self._active and _abandoned is not None:
            # Interrupted (the watchdog): MPI may still use the buffers; keep them.
            _abandoned.append((requests, self._recv, self._send))
            return
        for request in requests:
            try:
                request.Free()
            except MPI.Exception:
                pass


def _edge_index(side):
    """Index of the boundary row/column (interior extent) a side sends."""
    return ((1, slice(1, -1)), (-2, slice(1, -1)), (slice(1, -1), 1),
            (slice(1, -1), -2))[side]


def _ghost_index(side):
    """Index of a side's ghost row/column (interior extent)."""
    return ((0, slice(1, -1)), (-1, slice(1, -1)), (slice(1, -1), 0),
            (slice(1, -1), -1))[side]


def _ghost(a, side):
    if side == NORTH:
        return a[0, 1:-1]
    if side == SOUTH:
        return a[-1, 1:-1]
    if side == WEST:
        return a[1:-1, 0]
    return a[1:-1, -1]

