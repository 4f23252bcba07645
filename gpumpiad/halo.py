"""``halo_exchange``: fill a patch's ghost ring from its neighbours.

The public function works on Tensors and is differentiable; :func:`start`, :func:`exchange` and
:func:`exchange_adjoint` are the raw, in-place forms on arrays that the heat solver's time loops
use. Each exchange packs the four boundary rows/columns into contiguous buffers (the heat
kernels' ``pack`` on a device, NumPy slicing on the host), posts every non-blocking receive,
then every send, and finishes with one ``Waitall`` and ``unpack``. Corners are not exchanged
(a 5-point stencil does not read them).

Device arrays take :class:`DeviceExchange`: packing, staging copies and unpacking run on the
library's communication stream, ordered by events after the work that wrote the cells and
before the work that reads the ghosts; the host waits only for the packed cells, which MPI
reads (straight from device memory when MPI is CUDA-aware, from pinned host buffers
otherwise), never for the compute stream.
"""
from __future__ import annotations

from mpi4py import MPI

from . import streams, trace, transport
from .backend import get_array_module, is_device_array
from .custom import custom_op
from .debug import CommunicationMismatch, wait
from .grid import check_grid
from .tensor import DISTRIBUTED, Tensor

__all__ = ["halo_exchange", "start", "exchange", "exchange_adjoint", "Exchange",
           "DeviceExchange", "Posted", "Persistent"]

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3
_OPPOSITE = (SOUTH, NORTH, EAST, WEST)
# A message's tag is the side it leaves from; the adjoint's messages travel the other way and
# get their own tags, so an exchange and its adjoint can never match each other's messages.
_ADJOINT_TAG = 4


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
    check_grid(grid, "halo_exchange", ndim=2)
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

    __slots__ = ("_array", "_requests", "_received", "_adjoint", "_keep", "_verify", "_error",
                 "_nbytes")

    def __init__(self, array, requests, received, adjoint, keep, verify, nbytes=0):
        self._nbytes = nbytes
        self._array = array
        self._requests = requests
        self._received = received
        self._adjoint = adjoint
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
            edge = _edge(self._array, side, ghost)
            if add:
                edge += buf
            else:
                edge[...] = buf
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
        (default :mod:`gpumpiad.cuda_kernels`); a host array's move through NumPy slicing.
    verify : bool
        Check that every message filled its buffer, as it does unless a neighbour's array has
        another dtype (a half-filled buffer would be unpacked). The heat solver, which checks
        dtypes across ranks once per solve, skips it.

    Raises
    ------
    ValueError
        When ``grid`` was freed.
    """
    if len(grid.neighbours) != 4:
        check_grid(grid, "halo exchange", ndim=2)
    if _abandoned:
        _release_finished()
    if is_device_array(a):
        exchange = DeviceExchange(grid, a.shape, a.dtype, kernels)
        exchange.post(a, adjoint)
        return Posted(exchange, a, adjoint, verify)
    xp = get_array_module(a)
    mpi = grid.cart.mpi
    nx, ny = a.shape[0] - 2, a.shape[1] - 2
    links = _links(grid)
    tag0 = _ADJOINT_TAG if adjoint else 0
    requests, received, keep = [], [], []
    nbytes = sum(ny if side < 2 else nx for side, _ in links) * a.dtype.itemsize
    ghost = 1 if adjoint else 0
    with trace.span("halo_exchange", trace.COMMUNICATION, payload=nbytes):
        try:
            for side, peer in links:
                buf = transport.recv_buffer((ny if side < 2 else nx,), a.dtype, False)
                # Messages travel as bytes (both ends): a message of another dtype is then a
                # size that the receive can report, not a type MPI may fail an assertion on.
                requests.append(mpi.Irecv([buf, MPI.BYTE], source=peer,
                                          tag=tag0 + _OPPOSITE[side]))
                received.append((side, buf, peer, tag0 + _OPPOSITE[side]))
            for side, peer in links:
                # A row or column moves through slicing on the host: cheaper than a kernel call.
                send = xp.ascontiguousarray(_edge(a, side, ghost))
                if send.base is not None:
                    send = send.copy()  # MPI reads it until the send completes: the library's
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
    return Exchange(a, requests, received, adjoint, keep, verify, nbytes)


def _links(grid):
    """``(side, peer)`` of the sides facing a neighbour; asks whether ``grid`` was freed when
    there are none (no message would fail on a freed grid's communicator)."""
    links = [(side, peer) for side, peer in enumerate(grid.neighbours) if peer != MPI.PROC_NULL]
    if not links:
        check_grid(grid, "halo exchange")
    return links


class Posted:
    """A :class:`DeviceExchange` posted for ``array``: :meth:`wait` finishes it (once)."""

    __slots__ = ("_exchange", "_array", "_adjoint", "_verify", "_done")

    def __init__(self, exchange, array, adjoint=False, verify=False):
        self._exchange, self._array = exchange, array
        self._adjoint, self._verify, self._done = adjoint, verify, False

    def wait(self):
        if not self._done:
            self._done = True
            self._exchange.finish(self._array, self._adjoint, self._verify)
        return self._array


class DeviceExchange:
    """Stream-ordered halo exchanges of device arrays of one padded shape and dtype over
    ``grid``, with buffers made once and reused by every exchange.

    :meth:`post` queues the packing of the cells to send on the communication stream, after the
    work queued on the current stream so far (which wrote them); :meth:`finish` waits on the
    host for the packing alone, exchanges the cells through MPI, queues the unpacking on the
    communication stream and orders the current stream after it. Kernels queued between the two
    calls that read no exchanged ghost run while the halos travel; nothing waits on the host
    for them. Staged (MPI not CUDA-aware), the packed cells are copied to pinned host buffers
    and the received ones back, on the communication stream too.

    Every rank of ``grid`` posts and finishes in step. Unverified by default: the caller has
    agreed dtypes and shapes across ranks (``finish(..., verify=True)`` checks each message's
    size).

    Parameters
    ----------
    grid : gpumpiad.heat.Grid
    shape : tuple of int
        ``grid.padded_shape``.
    dtype : numpy dtype
    kernels : module, optional
        Device kernels with ``pack`` and ``unpack`` (default :mod:`gpumpiad.cuda_kernels`).
    """

    __slots__ = ("_grid", "_links", "_kernels", "_send", "_recv", "_staged_send",
                 "_staged_recv", "_packed", "_filled", "_keep", "nbytes")

    def __init__(self, grid, shape, dtype, kernels=None):
        if kernels is None:
            from . import cuda_kernels as kernels
        import cupy
        self._grid, self._kernels = grid, kernels
        self._links = _links(grid)
        nx, ny = shape[0] - 2, shape[1] - 2
        sizes = [ny if side < 2 else nx for side, _ in self._links]
        # Made on the communication stream, the only one that touches them.
        with streams.comm_stream():
            self._send = [cupy.empty(n, dtype) for n in sizes]
            self._recv = [cupy.empty(n, dtype) for n in sizes]
        staged = not transport.cuda_aware()
        self._staged_send = [streams.pinned_empty(n, dtype) for n in sizes] if staged else None
        self._staged_recv = [streams.pinned_empty(n, dtype) for n in sizes] if staged else None
        self._packed, self._filled = streams.new_event(), streams.new_event()
        self._keep = None
        #: Bytes one exchange sends from this rank.
        self.nbytes = sum(sizes) * cupy.dtype(dtype).itemsize

    def post(self, a, adjoint=False):
        """Queue the packing of ``a``'s boundary cells (``adjoint``: its ghosts facing a
        neighbour, then zero them) after the current stream's work so far."""
        if not self._links:
            return
        stream = streams.comm_stream()
        streams.order(stream, streams.current_stream())
        ghost = 1 if adjoint else 0
        with trace.span("halo_exchange.pack", trace.COMMUNICATION, payload=self.nbytes), stream:
            for k, (side, _) in enumerate(self._links):
                self._kernels.pack(a, self._send[k], side, ghost)
                if self._staged_send is not None:
                    self._send[k].get(stream=stream, out=self._staged_send[k], blocking=False)
            if adjoint:
                # Ghost copies go to their owners: their cotangent lives there from now on.
                for side, _ in self._links:
                    _ghost(a, side).fill(0)
        self._packed.record(stream)

    def finish(self, a, adjoint=False, verify=False):
        """Exchange the posted cells and write what arrives into ``a`` (ghosts; ``adjoint``:
        added into the boundary cells); the current stream is ordered after the writes."""
        if not self._links:
            return a
        sent = self._staged_send if self._staged_send is not None else self._send
        into = self._staged_recv if self._staged_recv is not None else self._recv
        tag0 = _ADJOINT_TAG if adjoint else 0
        mpi = self._grid.cart.mpi
        call = "adjoint halo exchange" if adjoint else "halo exchange"
        requests, received = [], []
        with trace.span("halo_exchange", trace.COMMUNICATION, payload=self.nbytes):
            # MPI reads the packed cells and writes buffers the last unpack read: both are
            # queued before the packing's event.
            self._packed.synchronize()
            try:
                for (side, peer), buf in zip(self._links, into):
                    tag = tag0 + _OPPOSITE[side]
                    requests.append(mpi.Irecv([buf, MPI.BYTE], source=peer, tag=tag))
                    received.append((buf, peer, tag))
                for (side, peer), buf in zip(self._links, sent):
                    requests.append(mpi.Isend([buf, MPI.BYTE], dest=peer, tag=tag0 + side))
            except MPI.Exception:
                check_grid(self._grid, "halo exchange")
                raise
            statuses = [MPI.Status() for _ in requests] if verify else None
            try:
                wait(requests, call=call, statuses=statuses)
            except MPI.Exception as exc:
                raise transport.mpi_error(call, exc, statuses) from None
            except BaseException:
                # The watchdog: MPI may still use the buffers; keep them.
                _abandoned.append((requests, self, None))
                raise
            for (buf, peer, tag), status in zip(received, statuses or ()):
                transport.check_filled(status, buf, call, peer, tag)
        stream = streams.comm_stream()
        ghost, add = (0, 1) if adjoint else (1, 0)
        with trace.span("halo_exchange.unpack", trace.COMMUNICATION, payload=self.nbytes), \
                stream:
            for k, (side, _) in enumerate(self._links):
                if self._staged_recv is not None:
                    self._recv[k].set(self._staged_recv[k], stream=stream)
                self._kernels.unpack(a, self._recv[k], side, ghost, add)
        self._filled.record(stream)
        streams.current_stream().wait_event(self._filled)
        return a


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


def _edge(a, side, ghost):
    """View of the boundary (``ghost=0``) or ghost (``ghost=1``) row/column of padded ``a``,
    interior extent."""
    return a[(_ghost_index if ghost else _edge_index)(side)]


def _ghost(a, side):
    if side == NORTH:
        return a[0, 1:-1]
    if side == SOUTH:
        return a[-1, 1:-1]
    if side == WEST:
        return a[1:-1, 0]
    return a[1:-1, -1]

