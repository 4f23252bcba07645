"""``halo_exchange``: fill a patch's ghost layers from its neighbours.

The public function works on Tensors and is differentiable, on 1-, 2- and 3-D grids, with any
ghost width, optionally edge and corner ghosts (the axes exchanged in turn, each face spanning
the ghost layers of the axes before it), and several fields in one message per neighbour. It
packs with array slicing, on the library's communication stream for device arrays.

The raw, in-place 2-D forms :func:`start`, :func:`exchange` and :func:`exchange_adjoint` (width
1, no corners) serve the heat solver's time loops. Each packs the four boundary rows/columns
into contiguous buffers (array slicing, or on a device the pack kernels the caller passes),
posts every non-blocking receive, then every send, and finishes with one ``Waitall`` and the
unpacking. Corners are not exchanged (a 5-point stencil does not read them).

:class:`PaddedExchange` is the same in-place width-1 exchange on a grid of any dimension,
its plans, message buffers and (host) persistent requests made once; ``halo_exchange``'s
rounds share its message code, and keep theirs (persistent requests too) from one call to the
next.

Device arrays take :class:`DeviceExchange`: packing, staging copies and unpacking run on the
library's communication stream, ordered by events after the work that wrote the cells and
before the work that reads the ghosts; the host waits only for the packed cells, which MPI
reads (straight from device memory when MPI is CUDA-aware, from pinned host buffers
otherwise), never for the compute stream.
"""
from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from . import streams, trace, transport
from .arguments import is_int
from .backend import get_array_module, is_device_array
from .custom import custom_op
from .debug import CommunicationMismatch, wait
from .grid import check_grid
from .tensor import DISTRIBUTED, Tensor

__all__ = ["halo_exchange", "start", "exchange", "exchange_adjoint", "Exchange",
           "DeviceExchange", "PaddedExchange", "Posted", "Persistent"]

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3
_OPPOSITE = (SOUTH, NORTH, EAST, WEST)
# A message's tag is the side it leaves from; the adjoint's messages travel the other way and
# get their own tags, so an exchange and its adjoint can never match each other's messages.
_ADJOINT_TAG = 4


def halo_exchange(u, grid, width=1, corners=False):
    """Fill the ghost layers of each rank's padded patch with its neighbours' boundary cells.

    Parameters
    ----------
    u : Tensor or array, or a tuple or list of them
        This rank's patch with ``width`` ghost layers on every side along every axis,
        ``local_shape[a] + 2 * width[a]`` cells along axis ``a`` (distributed). Several fields
        travel together: one message per neighbour carries all of them.
    grid : gpumpiad.Grid
        The 1-, 2- or 3-D decomposition ``u`` belongs to.
    width : int or tuple of int, optional
        Ghost layers per side, for every axis or one per axis (``>= 0``; an axis of width 0
        exchanges nothing). At most the cells of every patch along an axis that has neighbours.
    corners : bool, optional
        Also fill the edge and corner ghosts (cells in the ghost layers of two or three axes),
        as a stencil that reads diagonal neighbours needs; by default only the face ghosts
        (interior extent along the other axes) are filled and the others keep ``u``'s values.

    Returns
    -------
    Tensor, or tuple of Tensor
        A distributed copy of ``u`` (a tuple for a tuple or list) whose ghosts facing a
        neighbour hold that neighbour's cells; ghosts on the physical boundary keep ``u``'s
        values (Dirichlet data). Along a periodic axis the patches on its two edges are
        neighbours (one patch along the axis is its own).

    Raises
    ------
    TypeError
        When ``grid`` is not a Grid, a field is not of a floating dtype, or ``width`` or
        ``corners`` is not of its type.
    ValueError
        When a field has another number of axes than ``grid`` or not the padded shape,
        ``width`` is negative, has the wrong number of entries or exceeds the cells of a
        patch along an axis with neighbours, or ``grid`` was freed.

    Notes
    -----
    The axes are exchanged one after another. With ``corners``, the faces of axis ``a`` span
    the ghost layers of the axes before it, so edge and corner ghosts arrive in two or three
    hops and no diagonal message is needed; without, all axes go in one round. The message
    buffers of a grid's first exchange of fields of one shape and dtype serve its later ones
    (forward and adjoint) until :meth:`Grid.free`.

    The exchange is linear, ``v = E u``. Its adjoint sends the cotangent of every ghost filled
    from a neighbour back to the rank that owns the cell and adds it there (axes in reverse
    order with ``corners``):

    .. math:: \\bar u_c = \\bar v_c + \\sum_{g \\,\\text{ghost copy of}\\, c} \\bar v_g ,
              \\qquad \\bar u_g = 0 \\ \\text{for ghosts filled from a neighbour},

    while physical-boundary ghosts pass their cotangent through unchanged.

    Device (CuPy) fields are packed and unpacked on the library's communication stream,
    after the work queued on the current stream; the host waits only for the packed cells,
    and the current stream is ordered after the unpacking.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> grid = gpumpiad.Grid((8, 6, 4), periodic=True)
    >>> u = gpumpiad.tensor(np.ones(tuple(n + 4 for n in grid.local_shape)), distributed=True)
    >>> v = gpumpiad.halo_exchange(u, grid, width=2, corners=True)
    >>> v.shape == u.shape
    True
    >>> a, b = gpumpiad.halo_exchange((u, 2 * u), grid, width=2)
    """
    check_grid(grid, "halo_exchange")
    rank = MPI.COMM_WORLD.Get_rank()
    several = isinstance(u, (tuple, list))
    fields = tuple(u) if several else (u,)
    if not fields:
        raise ValueError(f"rank {rank}: halo_exchange expects u to be a field or a non-empty "
                         f"tuple or list of fields, got an empty {type(u).__name__}")
    if not isinstance(corners, (bool, np.bool_)):
        raise TypeError(f"rank {rank}: halo_exchange's corners must be a bool, got "
                        f"{type(corners).__name__} {corners!r}")
    widths = _check_width(width, grid)
    padded = tuple(n + 2 * w for n, w in zip(grid.local_shape, widths))
    for k, field in enumerate(fields):
        _check_field(field, k if several else None, grid, widths, padded)
    return _halo_nd(*fields, grid=grid, widths=widths, corners=bool(corners), several=several)


def _check_width(width, grid):
    """``width`` as one int per axis of ``grid``, each no larger than any patch along an axis
    that exchanges (checked alike on every rank: every rank knows every patch's size)."""
    rank, d = MPI.COMM_WORLD.Get_rank(), grid.ndim
    if is_int(width):
        widths = (int(width),) * d
    else:
        try:
            widths = tuple(width)
        except TypeError:
            widths = None
        if widths is None or not all(is_int(w) for w in widths):
            raise TypeError(f"rank {rank}: halo_exchange's width must be an int or {d} ints "
                            f"(one per axis of the {d}-D grid), got {width!r}")
        if len(widths) != d:
            raise ValueError(f"rank {rank}: halo_exchange's width must be an int or {d} ints "
                             f"(one per axis of the {d}-D grid), got {len(widths)}: {width!r}")
        widths = tuple(int(w) for w in widths)
    if min(widths) < 0:
        raise ValueError(f"rank {rank}: halo_exchange's width must be >= 0 along every axis, "
                         f"got {width!r}")
    for axis, w in enumerate(widths):
        if w == 0 or (grid.dims[axis] == 1 and not grid.periodic[axis]):
            continue
        smallest = min(grid.sizes[axis])
        if w <= smallest:
            continue
        n, who = smallest, (f"the patch at position {grid.sizes[axis].index(smallest)} of "
                            f"{grid.dims[axis]} along axis {axis},")
        if grid.local_shape[axis] < w:
            n, who = grid.local_shape[axis], "this rank's patch,"
        for side in (2 * axis + 1, 2 * axis):
            peer = grid.neighbours[side]
            if peer != MPI.PROC_NULL:
                size = grid.sizes[axis][grid.cart.mpi.Get_coords(peer)[axis]]
                if size < w:
                    whose = "this rank's own patch" if peer == grid.rank else \
                        f"the patch of grid rank {peer}"
                    n, who = size, f"{whose}, its neighbour on side {side},"
        raise ValueError(f"rank {rank}: halo_exchange's width along axis {axis} is {w}, larger "
                         f"than {who} which has {n} cell(s) along axis {axis}: expected a width "
                         f"of at most {smallest} there (the smallest patch along axis {axis} of "
                         f"grid {grid.shape} split {grid.dims})")
    return widths


def _check_field(field, k, grid, widths, padded):
    rank = MPI.COMM_WORLD.Get_rank()
    name = "u" if k is None else f"u[{k}]"
    data = field.data if isinstance(field, Tensor) else field
    shape = tuple(getattr(data, "shape", ()))
    kind = getattr(getattr(data, "dtype", None), "kind", None)
    if kind != "f":
        raise TypeError(f"rank {rank}: halo_exchange expects {name} of a floating dtype "
                        f"(float32 or float64), got {getattr(data, 'dtype', type(data).__name__)}")
    if len(shape) != grid.ndim:
        raise ValueError(f"rank {rank}: halo_exchange expects {name} with {grid.ndim} axes, "
                         f"one per axis of the {grid.ndim}-D grid {grid.shape}, got shape "
                         f"{shape} ({len(shape)} axes)")
    if shape != padded:
        raise ValueError(f"rank {rank}: halo_exchange expects {name} of padded shape {padded} "
                         f"(local shape {grid.local_shape} + 2 * width {widths}), got {shape}")


@custom_op(name="halo_exchange", layout=DISTRIBUTED, reads_args=False)
def _halo_nd(*fields, grid, widths, corners, several):
    out = tuple(_copy(f) for f in fields)
    _exchange_nd(out, grid, widths, corners, adjoint=False)
    return out if several else out[0]


@_halo_nd.defvjp
def _halo_nd_vjp(g, ans, *fields, grid, widths, corners, several):
    gs = g if several else (g,)
    xp = get_array_module(fields[0])
    out = tuple(xp.zeros_like(f) if c is None else _copy(c) for c, f in zip(gs, fields))
    _exchange_nd(out, grid, widths, corners, adjoint=True)
    return out


def _copy(a):
    """A copy of ``a`` to return; on the host from the transport's pool of touched memory (a
    fresh large array costs more in page faults than the exchange itself)."""
    if is_device_array(a):
        return a.copy()
    out = transport.host_empty(a.shape, a.dtype)
    out[...] = a
    return out


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
            _Sliced.unpack(self._array, buf, side, ghost, add)
        self._received = self._keep = None
        return self._array


def start(a, grid, adjoint=False, kernels=None, verify=True):
    """Start filling the ghosts of padded ``a`` in place; returns an :class:`Exchange`.

    Compute whatever does not read the ghosts, then call ``.wait()``. A device array's exchange
    goes through a :class:`DeviceExchange` that an earlier one over ``grid`` made for arrays of
    its shape and dtype and has finished with (buffers and events made once, not per call).

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
        (default: array slicing, as a host array's always do).
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
        idle, exchange = _take_idle(grid, (a.shape, a.dtype, kernels,
                                           streams.current_device(), transport.cuda_aware()))
        if exchange is None:
            exchange = DeviceExchange(grid, a.shape, a.dtype, kernels)
        exchange.post(a, adjoint)
        return Posted(exchange, a, adjoint, verify, idle)
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
    """A :class:`DeviceExchange` or :class:`PaddedExchange` posted for ``array``: :meth:`wait`
    finishes it (once), then puts it back into ``idle``, if given, for a later exchange."""

    __slots__ = ("_exchange", "_array", "_adjoint", "_verify", "_done", "_idle")

    def __init__(self, exchange, array, adjoint=False, verify=False, idle=None):
        self._exchange, self._array = exchange, array
        self._adjoint, self._verify, self._done = adjoint, verify, False
        self._idle = idle

    def wait(self):
        if not self._done:
            self._done = True
            self._exchange.finish(self._array, self._adjoint, self._verify)
            if self._idle is not None:
                _put_back(self._idle, self._exchange)
        return self._array


_IDLE_EXCHANGES = 4


def _take_idle(grid, key):
    """``(idle, exchange)``: the list of ``grid``'s idle exchanges made for ``key``, and one
    taken from it, or None when it has none (exchanges in flight together each have their
    own)."""
    idle = grid._exchanges.setdefault(key, [])
    try:
        return idle, idle.pop()
    except IndexError:
        return idle, None


def _put_back(idle, exchange):
    """An exchange that finished without error (no MPI call holds its buffers any more): into
    ``idle`` for a later exchange, or freed where a few wait there already."""
    if len(idle) < _IDLE_EXCHANGES:
        idle.append(exchange)
    else:
        exchange.free()


class DeviceExchange:
    """Stream-ordered halo exchanges of device arrays of one padded shape and dtype over
    ``grid``, with buffers made once and reused by every exchange.

    :meth:`post` queues the packing of the cells to send on the communication stream, after the
    work queued on the current stream so far (which wrote them); :meth:`finish` waits on the
    host for the packing alone, exchanges the cells through MPI, queues the unpacking on the
    communication stream and orders the current stream after it. Kernels queued between the two
    calls that read no exchanged ghost run while the halos travel; nothing waits on the host
    for them. Staged (MPI not CUDA-aware), the packed cells are copied to pinned host buffers
    and the received ones back, on the communication stream too. A side whose neighbour is this
    rank itself (a periodic axis of one patch) involves no MPI, no staging and no host wait:
    forward, ``post`` copies the opposite boundary cells into its ghosts (the kernels'
    ``wrap``, one launch for all such sides; on the current stream when no side faces another
    rank, and ``finish`` then has nothing to do); the adjoint adds the ghosts packed for the
    opposite side.

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
        Device kernels with ``pack``, ``unpack`` and optionally ``wrap``
        (``gpumpiad.heat.cudakernels``, whose ``wrap`` fills every ghost facing this rank in
        one launch; default: array slicing).
    """

    __slots__ = ("_grid", "_links", "_local", "_remote", "_kernels", "_wrap", "_wraps",
                 "_send", "_recv", "_staged_send", "_staged_recv", "_packed", "_filled",
                 "_keep", "nbytes")

    def __init__(self, grid, shape, dtype, kernels=None):
        if kernels is None:
            kernels = _Sliced
        self._grid, self._kernels = grid, kernels
        # Sides facing this rank send no message that would fail on a freed grid.
        check_grid(grid, "halo exchange")
        self._links = _links(grid)
        # For a side facing this rank: the index of the opposite side, whose packed cells it
        # receives; None for a side facing another rank.
        index = {side: k for k, (side, _) in enumerate(self._links)}
        self._local = [index[_OPPOSITE[side]] if peer == grid.cart.rank else None
                       for side, peer in self._links]
        self._remote = [k for k, source in enumerate(self._local) if source is None]
        # A periodic axis of one patch faces this rank on both sides.
        facing = {self._links[k][0] for k, source in enumerate(self._local)
                  if source is not None}
        self._wraps = (NORTH in facing, WEST in facing)
        self._wrap = getattr(kernels, "wrap", _Sliced.wrap)
        nx, ny = shape[0] - 2, shape[1] - 2
        sizes = [ny if side < 2 else nx for side, _ in self._links]
        remote = [n if source is None else 0 for n, source in zip(sizes, self._local)]
        # Made on the communication stream, the only one that touches them.
        with streams.comm_stream():
            self._send = [streams.device_empty(n, dtype) for n in sizes]
            self._recv = [streams.device_empty(n, dtype) for n in remote]
        staged = not transport.cuda_aware()
        self._staged_send = [streams.pinned_empty(n, dtype) for n in remote] if staged else None
        self._staged_recv = [streams.pinned_empty(n, dtype) for n in remote] if staged else None
        self._packed, self._filled = streams.new_event(), streams.new_event()
        self._keep = None
        #: Bytes one exchange sends from this rank.
        self.nbytes = sum(sizes) * np.dtype(dtype).itemsize

    def post(self, a, adjoint=False):
        """Queue the packing of ``a``'s boundary cells (``adjoint``: its ghosts facing a
        neighbour, then zero them) after the current stream's work so far; forward, the ghosts
        facing this rank are copied from the opposite boundary cells, on the current stream
        when no side faces another rank."""
        if not self._links:
            return
        if not adjoint and not self._remote:
            with trace.span("halo_exchange.copy", trace.COMMUNICATION, payload=self.nbytes):
                self._copy_across(a)
            return
        stream = streams.comm_stream()
        streams.order(stream, streams.current_stream())
        ghost = 1 if adjoint else 0
        # Forward, only the sides facing another rank go through a buffer.
        packed = range(len(self._links)) if adjoint else self._remote
        with trace.span("halo_exchange.pack", trace.COMMUNICATION, payload=self.nbytes), stream:
            for k in packed:
                self._kernels.pack(a, self._send[k], self._links[k][0], ghost)
                if self._staged_send is not None and self._local[k] is None:
                    self._send[k].get(stream=stream, out=self._staged_send[k], blocking=False)
            if adjoint:
                # Ghost copies go to their owners: their cotangent lives there from now on.
                for side, _ in self._links:
                    _ghost(a, side).fill(0)
            else:
                self._copy_across(a)
        self._packed.record(stream)

    def free(self):
        """Done with this exchange: its buffers stay until the work queued on the communication
        stream so far has run (the pinned pool hands a freed block out again at once, and an
        unpacking may still read one)."""
        streams._keep_until_done(streams.record(streams.comm_stream()),
                                 (self._send, self._recv, self._staged_send, self._staged_recv))

    def _copy_across(self, a):
        """The ghosts facing this rank, from the opposite sides' boundary cells."""
        if any(self._wraps):
            self._wrap(a, *self._wraps)

    def finish(self, a, adjoint=False, verify=False):
        """Exchange the posted cells and write what arrives into ``a`` (ghosts; ``adjoint``:
        added into the boundary cells); the current stream is ordered after the writes."""
        if not self._links or not adjoint and not self._remote:
            return a
        sent = self._staged_send if self._staged_send is not None else self._send
        into = self._staged_recv if self._staged_recv is not None else self._recv
        tag0 = _ADJOINT_TAG if adjoint else 0
        mpi = self._grid.cart.mpi
        requests, received = [], []
        if self._remote:
            with trace.span("halo_exchange", trace.COMMUNICATION, payload=self.nbytes):
                # MPI reads the packed cells and writes buffers the last unpack read: both are
                # queued before the packing's event.
                self._packed.synchronize()
                try:
                    for k in self._remote:
                        side, peer = self._links[k]
                        tag = tag0 + _OPPOSITE[side]
                        requests.append(mpi.Irecv([into[k], MPI.BYTE], source=peer, tag=tag))
                        received.append((into[k], peer, tag))
                    for k in self._remote:
                        side, peer = self._links[k]
                        requests.append(mpi.Isend([sent[k], MPI.BYTE], dest=peer,
                                                  tag=tag0 + side))
                except MPI.Exception:
                    check_grid(self._grid, "halo exchange")
                    raise
                _complete(requests, received, self, adjoint, verify)
        stream = streams.comm_stream()
        ghost, add = (0, 1) if adjoint else (1, 0)
        with trace.span("halo_exchange.unpack", trace.COMMUNICATION, payload=self.nbytes), \
                stream:
            for k, (side, _) in enumerate(self._links):
                source = self._local[k]
                if source is not None:
                    if adjoint:
                        # Packed on this stream, earlier: what an MPI message to itself would
                        # carry. (Forward, post copied these ghosts.)
                        self._kernels.unpack(a, self._send[source], side, ghost, add)
                    continue
                if self._staged_recv is not None:
                    self._recv[k].set(self._staged_recv[k], stream=stream)
                self._kernels.unpack(a, self._recv[k], side, ghost, add)
        self._filled.record(stream)
        streams.current_stream().wait_event(self._filled)
        return a


class PaddedExchange:
    """Width-1 halo exchanges (no corners) of padded arrays of one shape and dtype over a grid
    of any dimension, in place, with the messages' buffers made once, for time loops.

    :meth:`post` starts filling the ghosts facing a neighbour (``adjoint``: sending them back);
    :meth:`finish` completes it. Host arrays: ``post`` packs the boundary cells and starts
    persistent MPI requests made once, ``finish`` waits for them (bounded by the watchdog) and
    writes what arrived. Device arrays: ``post`` queues the packing on the communication
    stream after the work queued on the current stream so far; ``finish`` waits on the host
    for the packing alone, exchanges the cells through MPI (staged through pinned host buffers
    unless MPI is CUDA-aware), queues the unpacking on the communication stream and orders
    the current stream after it. Work queued between the two calls that reads no ghost runs
    while the halos travel. Ghosts facing this rank itself (a periodic axis of one patch) are
    filled by ``post``: by the ``wrap`` of ``kernels`` in one launch, or by one copy each.

    Every rank of ``grid`` makes one and posts and finishes in step. What travels is what the
    array holds at :meth:`post`; the buffers are the exchange's own, never shared with an
    array.

    Parameters
    ----------
    grid : gpumpiad.Grid
        The 1-, 2- or 3-D decomposition.
    shape : tuple of int
        ``grid.padded_shape``: one ghost layer on every side.
    dtype : numpy dtype
        The arrays' dtype.
    device : bool, optional
        Whether the arrays are device (CuPy) arrays.
    kernels : module, optional
        Kernels whose ``wrap(a, *flags)`` (one flag per axis) fills the ghosts of ``a``
        along the flagged axes from the opposite boundary cells, e.g.
        ``gpumpiad.heat.cudakernels3d`` for 3-D device arrays; default: array slicing.

    Raises
    ------
    TypeError
        When ``grid`` is not a Grid or ``device`` not a bool.
    ValueError
        When ``grid`` was freed or ``shape`` is not ``grid.padded_shape``.

    Notes
    -----
    The exchange is linear, ``v = E u``; ``adjoint=True`` applies ``E^T``: ghosts facing a
    neighbour are sent to their owner and zeroed, and what arrives is added into the boundary
    cells, as :func:`halo_exchange`'s reverse pass does.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> from mpi4py import MPI
    >>> from gpumpiad.halo import PaddedExchange
    >>> grid = gpumpiad.Grid((4, 3, 2), comm=gpumpiad.Comm(MPI.COMM_SELF), periodic=True)
    >>> u = np.arange(6.0 * 5 * 4).reshape(grid.padded_shape)
    >>> with PaddedExchange(grid, u.shape, u.dtype) as halo:
    ...     halo.post(u)
    ...     u[1:-1, 1:-1, 1:-1] += 1     # after the post: not sent
    ...     _ = halo.finish(u)
    >>> bool((u[0, 1:-1, 1:-1] == u[-2, 1:-1, 1:-1] - 1).all())
    True
    """

    __slots__ = ("_grid", "_shape", "_dtype", "_device", "_plans", "_wrap", "_round",
                 "_posted", "nbytes")

    def __init__(self, grid, shape, dtype, device=False, kernels=None):
        check_grid(grid, "PaddedExchange")
        rank = MPI.COMM_WORLD.Get_rank()
        if not isinstance(device, (bool, np.bool_)):
            raise TypeError(f"rank {rank}: PaddedExchange's device must be a bool, got "
                            f"{type(device).__name__} {device!r}")
        try:
            padded = tuple(int(n) for n in shape)
        except (TypeError, ValueError):
            padded = None
        if padded != grid.padded_shape:
            raise ValueError(f"rank {rank}: PaddedExchange's shape must be the grid's padded "
                             f"shape {grid.padded_shape} (local shape {grid.local_shape} + 2), "
                             f"got {shape!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"rank {rank}: PaddedExchange's dtype must be a NumPy dtype, got "
                            f"{dtype!r}") from None
        self._grid, self._shape, self._dtype = grid, padded, dtype
        self._device = bool(device)
        self._plans = [_Plan((self._dtype,), padded, (1,) * grid.ndim, side, peer, False)
                       for side, peer in enumerate(grid.neighbours) if peer != MPI.PROC_NULL]
        wrap = getattr(kernels, "wrap", None)
        flags = [grid.neighbours[2 * axis] == grid.cart.rank for axis in range(grid.ndim)]
        self._wrap = None if wrap is None or not any(flags) else (lambda a: wrap(a, *flags))
        self._round = None
        self._posted = None
        #: Bytes one exchange sends from this rank.
        self.nbytes = sum(plan.nbytes for plan in self._plans)

    def _check(self, a, call):
        if a.shape != self._shape or a.dtype != self._dtype or \
                is_device_array(a) != self._device:
            where = "device" if self._device else "host"
            got = "device" if is_device_array(a) else "host"
            raise ValueError(f"rank {MPI.COMM_WORLD.Get_rank()}: PaddedExchange.{call} expects "
                             f"a {where} array of shape {self._shape} and dtype {self._dtype} "
                             f"(the exchange's), got a {got} array of shape {tuple(a.shape)} "
                             f"and dtype {a.dtype}")

    def post(self, a, adjoint=False):
        """Start the exchange of padded ``a``: its boundary cells (``adjoint``: its ghosts
        facing a neighbour, which are then zeroed) as they are now."""
        check_grid(self._grid, "PaddedExchange.post", argument=None)
        self._check(a, "post")
        if self._posted is not None:
            raise RuntimeError(f"rank {MPI.COMM_WORLD.Get_rank()}: PaddedExchange.post called "
                               "while an exchange is posted: expected finish() first")
        adjoint = bool(adjoint)
        if self._plans:
            if self._round is None:
                self._round = _Round(self._grid, self._plans, self._device, _PADDED_TAG,
                                     persistent=not self._device, wrap=self._wrap)
            if self._device:
                self._round.post_device((a,), adjoint)
            else:
                with trace.span("halo_exchange", trace.COMMUNICATION, payload=self.nbytes):
                    self._round.post_host((a,), adjoint)
        self._posted = adjoint

    def finish(self, a, adjoint=False, verify=False):
        """Complete the posted exchange of ``a``: the ghosts facing a neighbour hold its
        boundary cells (``adjoint``: what the neighbours sent back is added into ``a``'s
        boundary cells); on a device, the current stream is ordered after these writes.
        ``verify``: check that every message filled its buffer (unverified by default: the
        caller has agreed dtypes across ranks). Returns ``a``."""
        self._check(a, "finish")
        rank = MPI.COMM_WORLD.Get_rank()
        if self._posted is None:
            raise RuntimeError(f"rank {rank}: PaddedExchange.finish called with no exchange "
                               "posted: expected post() first")
        if bool(adjoint) != self._posted:
            raise ValueError(f"rank {rank}: PaddedExchange.finish's adjoint is {bool(adjoint)}, "
                             f"but the exchange was posted with adjoint={self._posted}")
        self._posted = None
        if not self._plans:
            return a
        try:
            if self._device:
                self._round.finish_device((a,), bool(adjoint), verify)
            else:
                with trace.span("halo_exchange.wait", trace.COMMUNICATION,
                                payload=self.nbytes):
                    self._round.finish_host((a,), bool(adjoint), verify)
        except BaseException:
            # The buffers may still be in MPI's hands: the next post makes new ones.
            messages, self._round = self._round, None
            messages.free()
            raise
        return a

    def exchange(self, a):
        """Fill padded ``a``'s ghosts from the neighbours and return ``a``: :meth:`post`, then
        :meth:`finish` (a time loop with nothing to do while the halos travel)."""
        self.post(a)
        return self.finish(a)

    def free(self):
        """Release the MPI requests (those of an exchange still in flight once it completes).
        Idempotent; the next :meth:`post` makes new ones."""
        messages, self._round = getattr(self, "_round", None), None
        self._posted = None
        if messages is not None:
            messages.free()

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass    # at interpreter exit: MPI or CUDA may be gone already

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()


def exchange(a, grid, kernels=None, verify=True):
    """Fill the ghosts of padded ``a`` from the neighbours, in place (blocking); returns ``a``.
    ``verify``: see :func:`start`."""
    return start(a, grid, False, kernels, verify).wait()


def exchange_adjoint(a, grid, kernels=None, verify=True):
    """Adjoint of :func:`exchange`, in place: ghosts facing a neighbour are sent to their owner,
    zeroed here, and the ghosts received are added into ``a``'s boundary cells; returns ``a``."""
    return start(a, grid, True, kernels, verify).wait()


class Persistent:
    """Preposted halo exchanges of host (NumPy) arrays of one padded shape and dtype over a
    1-, 2- or 3-D ``grid``: persistent MPI requests made once (``Send_init``/``Recv_init``)
    and restarted by each :meth:`exchange`, for a time loop that exchanges every step.

    Each exchange copies the boundary faces of the array it is given into the requests' send
    buffers, starts every request, waits (bounded by the watchdog, as every wait is) and
    copies the received faces into the ghosts, as :func:`exchange` does (unverified: the
    caller has agreed dtypes and shapes across ranks); the ghosts facing this rank itself (a
    periodic axis the grid does not split) are copied from the opposite boundary, with no
    message. Width 1, no corners. Every rank of ``grid`` must make one and exchange in step
    with it. :meth:`free` releases the requests.

    Parameters
    ----------
    grid : gpumpiad.Grid
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

    __slots__ = ("_requests", "_send", "_recv", "_across", "_active", "nbytes")

    def __init__(self, grid, dtype):
        check_grid(grid, "halo exchange")
        shape, rank = grid.local_shape, grid.cart.rank
        links = [(side, peer) for side, peer in enumerate(grid.neighbours)
                 if peer != MPI.PROC_NULL and peer != rank]
        # (ghost face, the opposite boundary face) of each side facing this rank.
        self._across = [(_face(side, len(shape), True), _face(side ^ 1, len(shape), False))
                        for side, peer in enumerate(grid.neighbours) if peer == rank]
        mpi = grid.cart.mpi
        self._send, self._recv, self._requests = [], [], []
        self._active = False
        try:
            for side, peer in links:
                buf = np.empty(_face_shape(shape, side), dtype)
                self._recv.append((_face(side, len(shape), True), buf))
                self._requests.append(mpi.Recv_init([buf, MPI.BYTE], source=peer,
                                                    tag=side ^ 1))
            for side, peer in links:
                buf = np.empty(_face_shape(shape, side), dtype)
                self._send.append((_face(side, len(shape), False), buf))
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
        neighbour from that neighbour, in place; returns ``a``. After :meth:`free`, a
        ``RuntimeError``."""
        requests = self._requests
        if not requests:
            if requests is None:
                raise RuntimeError(f"rank {MPI.COMM_WORLD.rank}: halo.Persistent.exchange after "
                                   "free(): its requests are released")
            for ghost, edge in self._across:
                a[ghost] = a[edge]
            return a
        with trace.span("halo_exchange", trace.COMMUNICATION, payload=self.nbytes):
            for index, buf in self._send:
                buf[...] = a[index]
            try:
                MPI.Prequest.Startall(requests)
                self._active = True
                for ghost, edge in self._across:
                    a[ghost] = a[edge]
                wait(requests, call="halo exchange")
            except MPI.Exception as exc:
                raise transport.mpi_error("halo exchange", exc) from None
            self._active = False
            for index, buf in self._recv:
                a[index] = buf
        return a

    def free(self):
        """Release the requests (those still in flight after a failed wait once complete)."""
        requests, self._requests = getattr(self, "_requests", None), None
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


def _face(side, ndim, ghost):
    """Index of a side's face of a padded array, interior extent: its ghost layer, or (not
    ``ghost``) the boundary layer it sends. Sides 2a and 2a + 1 are axis a's low and high."""
    index = [slice(1, -1)] * ndim
    index[side // 2] = (0 if ghost else 1) if side % 2 == 0 else (-1 if ghost else -2)
    return tuple(index)


def _face_shape(shape, side):
    """The shape of a side's face of a patch of interior ``shape``."""
    return tuple(n for axis, n in enumerate(shape) if axis != side // 2)


class _Sliced:
    """``pack`` and ``unpack`` of a row or column by array slicing (on the current stream for
    a device array)."""

    @staticmethod
    def pack(a, buf, side, ghost):
        buf[...] = _edge(a, side, ghost)

    @staticmethod
    def wrap(a, wrap_i, wrap_j):
        sides = ((NORTH, SOUTH) if wrap_i else ()) + ((WEST, EAST) if wrap_j else ())
        for side in sides:
            _edge(a, side, 1)[...] = _edge(a, _OPPOSITE[side], 0)

    @staticmethod
    def unpack(a, buf, side, ghost, add):
        edge = _edge(a, side, ghost)
        if add:
            edge += buf
        else:
            edge[...] = buf


def _edge(a, side, ghost):
    """View of the boundary (``ghost=0``) or ghost (``ghost=1``) row/column of padded ``a``,
    interior extent."""
    return a[_face(side, 2, ghost)]


def _ghost(a, side):
    if side == NORTH:
        return a[0, 1:-1]
    if side == SOUTH:
        return a[-1, 1:-1]
    if side == WEST:
        return a[1:-1, 0]
    return a[1:-1, -1]


# The N-D exchange's messages: tag = the side a message leaves from (0 to 5), its adjoint's
# tags follow, so that an exchange and its adjoint never match each other's messages.
_ND_ADJOINT_TAG = 6
# PaddedExchange's messages: the same scheme from 12 on (12-17, adjoint 18-23), so that they
# never match those of the other exchanges, which an overlapping caller may have in flight.
_PADDED_TAG = 12
# Fields of several dtypes share one message; each field's cells start at a multiple of this.
_ALIGN = 16


def _exchange_nd(fields, grid, widths, corners, adjoint):
    """Fill (``adjoint``: send back and add) the ghosts of padded ``fields`` in place, axis by
    axis with ``corners`` (reverse order for the adjoint), all axes in one round without."""
    if _abandoned:
        _release_finished()
    # A reverse pass may run after its grid was freed; rounds facing only this rank send no
    # message that would fail on it.
    check_grid(grid, "halo exchange")
    shape = tuple(fields[0].shape)
    axes = [a for a, w in enumerate(widths)
            if w and (grid.neighbours[2 * a] != MPI.PROC_NULL
                      or grid.neighbours[2 * a + 1] != MPI.PROC_NULL)]
    if not axes:
        return fields
    device = is_device_array(fields[0])
    dtypes = tuple(field.dtype for field in fields)
    idle, rounds = _take_idle(grid, ("rounds", shape, dtypes, tuple(widths), corners, device)
                              + ((streams.current_device(), transport.cuda_aware()) if device
                                 else ()))
    if rounds is None:
        rounds = _Rounds(grid, shape, dtypes, widths, corners, axes, device)
    for messages in reversed(rounds) if adjoint else rounds:
        if device:
            messages.post_device(fields, adjoint)
            messages.finish_device(fields, adjoint, verify=True)
        else:
            with trace.span("halo_exchange", trace.COMMUNICATION, payload=messages.nbytes):
                messages.post_host(fields, adjoint)
                messages.finish_host(fields, adjoint, verify=True)
    # The next exchange of fields of this shape and these dtypes over the grid reuses them.
    _put_back(idle, rounds)
    return fields


class _Rounds(tuple):
    """The rounds of an N-D exchange of fields of ``dtypes`` and padded ``shape`` over ``axes``:
    one per axis with ``corners``, else one; made together, reused together."""

    __slots__ = ()

    def __new__(cls, grid, shape, dtypes, widths, corners, axes, device):
        return super().__new__(cls, (
            _Round(grid, [_Plan(dtypes, shape, widths, side, grid.neighbours[side], corners)
                          for a in round_axes for side in (2 * a, 2 * a + 1)
                          if grid.neighbours[side] != MPI.PROC_NULL], device, 0,
                   persistent=not device)
            for round_axes in ([[a] for a in axes] if corners else [axes])))

    def free(self):
        for messages in self:
            messages.free()


class _Plan:
    """One side of one round: the peer, the boundary slab sent (``edge``) and the ghost slab
    filled (``ghost``), and where each field's cells lie in the message (bytes)."""

    __slots__ = ("side", "peer", "edge", "ghost", "slab", "offsets", "nbytes", "dtypes")

    def __init__(self, dtypes, shape, widths, side, peer, corners):
        axis = side // 2
        # With corners, axis a's faces span the ghost layers of the axes exchanged before it.
        extent = [slice(None) if corners and b < axis else slice(w, n - w)
                  for b, (n, w) in enumerate(zip(shape, widths))]
        n, w = shape[axis], widths[axis]
        edge, ghost = list(extent), list(extent)
        if side % 2 == 0:
            edge[axis], ghost[axis] = slice(w, 2 * w), slice(0, w)
        else:
            edge[axis], ghost[axis] = slice(n - 2 * w, n - w), slice(n - w, n)
        self.side, self.peer = side, peer
        self.edge, self.ghost = tuple(edge), tuple(ghost)
        self.slab = tuple(len(range(*s.indices(m))) for s, m in zip(self.edge, shape))
        count = math.prod(self.slab)
        self.offsets, offset = [], 0
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        for dtype in self.dtypes:
            offset = -(-offset // _ALIGN) * _ALIGN
            self.offsets.append(offset)
            offset += count * dtype.itemsize
        self.nbytes = offset

    def views(self, buf):
        """Each field's cells in message buffer ``buf`` (bytes), shaped as the slab."""
        count = math.prod(self.slab)
        return [buf[o:o + count * d.itemsize].view(d).reshape(self.slab)
                for d, o in zip(self.dtypes, self.offsets)]

    def pack(self, views, fields, adjoint):
        source = self.ghost if adjoint else self.edge
        for view, field in zip(views, fields):
            view[...] = field[source]

    def unpack(self, views, fields, adjoint):
        for view, field in zip(views, fields):
            if adjoint:
                target = field[self.edge]
                target += view
            else:
                field[self.ghost] = view


def _post(grid, plans, recvs, sends, tag0, persistent=False):
    """Post every receive, then every send, of one round (``persistent``: make the requests,
    not started); returns the requests and the ``(buffer, peer, tag)`` of each receive. A
    message's tag is ``tag0`` plus the side it leaves from."""
    mpi = grid.cart.mpi
    recv, send = (mpi.Recv_init, mpi.Send_init) if persistent else (mpi.Irecv, mpi.Isend)
    requests, received = [], []
    try:
        for plan, buf in zip(plans, recvs):
            tag = tag0 + (plan.side ^ 1)
            requests.append(recv([buf, MPI.BYTE], source=plan.peer, tag=tag))
            received.append((buf, plan.peer, tag))
        for plan, buf in zip(plans, sends):
            requests.append(send([buf, MPI.BYTE], dest=plan.peer, tag=tag0 + plan.side))
    except MPI.Exception:
        # A freed grid's communicator fails the first call: say so, not MPI's words.
        check_grid(grid, "halo exchange")
        raise
    return requests, received


def _complete(requests, received, keep, adjoint, verify=True):
    """Wait for one round's messages and (``verify``) check that each filled its buffer;
    ``keep`` holds the buffers until MPI is done with them, should the wait fail."""
    call = "adjoint halo exchange" if adjoint else "halo exchange"
    statuses = [MPI.Status() for _ in requests] if verify else None
    try:
        wait(requests, call=call, statuses=statuses)
    except MPI.Exception as exc:
        raise transport.mpi_error(call, exc, statuses) from None
    except BaseException:
        # The watchdog: MPI may still use the buffers; keep them.
        _abandoned.append((requests, received, keep))
        raise
    for (buf, peer, tag), status in zip(received, statuses or ()):
        transport.check_filled(status, buf, call, peer, tag)


class _Round:
    """The messages of one round over ``grid``: a send and a receive buffer per plan, made
    once, holding each plan's cells as bytes (host memory; on a device, memory of the
    communication stream, plus pinned host buffers MPI reads and writes unless it is
    CUDA-aware). ``post_*`` packs and starts the messages, ``finish_*`` completes them and
    unpacks, in either direction; ``tag0`` is the first forward tag, the adjoint's follow
    ``_ND_ADJOINT_TAG`` later. ``persistent`` (host): MPI requests made on first use in each
    direction and restarted by every post. A plan whose peer is this rank (a periodic axis of
    one patch) sends no message: forward, ``post_*`` copies the opposite side's boundary cells
    straight into its ghosts (one copy per side, or one ``wrap`` call per field for them all;
    on a device on the current stream when the round has no message at all); adjoint, it
    unpacks from the opposite side's send buffer. On a device those cells never leave it."""

    __slots__ = ("grid", "plans", "device", "tag0", "wrap", "nbytes", "remote", "remote_plans",
                 "remote_sends", "across", "sends", "recvs", "staged_sends", "staged_recvs",
                 "send_views", "recv_views", "packed", "filled", "persistent", "requests",
                 "received")

    def __init__(self, grid, plans, device, tag0, persistent=False, wrap=None):
        self.grid, self.plans, self.device, self.tag0 = grid, plans, device, tag0
        # Fills every ghost facing this rank of a field at once, or None: one copy each.
        self.wrap = wrap
        self.nbytes = sum(plan.nbytes for plan in plans)
        # Indices of the plans that exchange with another rank, which alone have messages.
        self.remote = [k for k, p in enumerate(plans) if p.peer != grid.cart.rank]
        self.remote_plans = remote = [plans[k] for k in self.remote]
        self.staged_sends = self.staged_recvs = self.packed = self.filled = None
        if device:
            # Made on the communication stream, the only one that touches them.
            with streams.comm_stream():
                self.sends = [streams.device_empty(p.nbytes, np.uint8) for p in plans]
                self.recvs = [streams.device_empty(p.nbytes, np.uint8) for p in remote]
            if not transport.cuda_aware():
                self.staged_sends = [streams.pinned_empty(p.nbytes, np.uint8) for p in remote]
                self.staged_recvs = [streams.pinned_empty(p.nbytes, np.uint8) for p in remote]
            self.packed, self.filled = streams.new_event(), streams.new_event()
        else:
            self.sends = [np.empty(p.nbytes, np.uint8) for p in plans]
            self.recvs = [np.empty(p.nbytes, np.uint8) for p in remote]
        self.remote_sends = [self.sends[k] for k in self.remote]
        self.send_views = [p.views(buf) for p, buf in zip(plans, self.sends)]
        # A plan facing this rank reads what its opposite side packed: the two slabs have one
        # shape, so their messages one layout.
        received = iter(self.recvs)
        opposite = {p.side ^ 1: k for k, p in enumerate(plans)}
        self.recv_views = [p.views(next(received)) if p.peer != grid.cart.rank
                           else self.send_views[opposite[p.side]] for p in plans]
        # The forward copies of the plans facing this rank: (ghost slab, opposite edge slab).
        self.across = [(p.ghost, plans[opposite[p.side]].edge) for p in plans
                       if p.peer == grid.cart.rank]
        self.persistent = {} if persistent else None
        self.requests = self.received = None

    def _tag0(self, adjoint):
        return self.tag0 + (_ND_ADJOINT_TAG if adjoint else 0)

    def _zero_ghosts(self, fields):
        # Ghost copies were just sent to their owners: their cotangent now lives there.
        for plan in self.plans:
            for field in fields:
                field[plan.ghost].fill(0)

    def _copy_across(self, fields):
        if self.wrap is not None and self.across:
            for field in fields:
                self.wrap(field)
            return
        for ghost, edge in self.across:
            for field in fields:
                field[ghost] = field[edge]

    def _packed_plans(self, adjoint):
        """Indices of the plans whose cells go through their send buffer."""
        return range(len(self.plans)) if adjoint else self.remote

    def post_host(self, fields, adjoint):
        for k in self._packed_plans(adjoint):
            self.plans[k].pack(self.send_views[k], fields, adjoint)
        if not adjoint:
            self._copy_across(fields)
        if self.remote and self.persistent is None:
            self.requests, self.received = self._post(self.recvs, adjoint)
        elif self.remote:
            made = self.persistent.get(adjoint)
            if made is None:
                made = self.persistent[adjoint] = self._post(self.recvs, adjoint, True)
            self.requests, self.received = made
            MPI.Prequest.Startall(self.requests)
        if adjoint:
            self._zero_ghosts(fields)

    def _post(self, recvs, adjoint, persistent=False, staged=False):
        """The remote plans' messages (``staged``: from and into the pinned buffers)."""
        sends = self.staged_sends if staged else self.remote_sends
        return _post(self.grid, self.remote_plans, recvs, sends, self._tag0(adjoint), persistent)

    def finish_host(self, fields, adjoint, verify):
        requests, received, self.requests = self.requests, self.received, None
        if requests:
            _complete(requests, received, self, adjoint, verify)
        for k in self._packed_plans(adjoint):
            self.plans[k].unpack(self.recv_views[k], fields, adjoint)

    def post_device(self, fields, adjoint):
        """Queue the packing (forward: and the copies across) on the communication stream
        after the current stream's work; a forward round with no message copies on the
        current stream."""
        if not adjoint and not self.remote:
            with trace.span("halo_exchange.copy", trace.COMMUNICATION, payload=self.nbytes):
                self._copy_across(fields)
            return
        stream = streams.comm_stream()
        streams.order(stream, streams.current_stream())
        with trace.span("halo_exchange.pack", trace.COMMUNICATION, payload=self.nbytes), \
                stream:
            for k in self._packed_plans(adjoint):
                self.plans[k].pack(self.send_views[k], fields, adjoint)
            if not adjoint:
                self._copy_across(fields)
            for send, staged in zip(self.remote_sends, self.staged_sends or ()):
                send.get(stream=stream, out=staged, blocking=False)
            if adjoint:
                self._zero_ghosts(fields)
        self.packed.record(stream)

    def finish_device(self, fields, adjoint, verify):
        """Wait on the host for the packing, exchange, queue the unpacking on the
        communication stream and order the current stream after it."""
        if not adjoint and not self.remote:
            return
        staged = self.staged_sends is not None
        if self.remote:
            with trace.span("halo_exchange", trace.COMMUNICATION, payload=self.nbytes):
                # MPI reads the packed cells and writes buffers the last unpacking read: both
                # are queued before the packing's event.
                self.packed.synchronize()
                requests, received = self._post(self.staged_recvs if staged else self.recvs,
                                                adjoint, staged=staged)
                _complete(requests, received, self, adjoint, verify)
        stream = streams.comm_stream()
        with trace.span("halo_exchange.unpack", trace.COMMUNICATION, payload=self.nbytes), \
                stream:
            for recv, staged_recv in zip(self.recvs, self.staged_recvs if staged else ()):
                recv.set(staged_recv, stream=stream)
            for k in self._packed_plans(adjoint):
                self.plans[k].unpack(self.recv_views[k], fields, adjoint)
        self.filled.record(stream)
        streams.current_stream().wait_event(self.filled)

    def free(self):
        """Release the persistent requests; those still in flight (a wait the watchdog
        interrupted) stay, with the buffers, until they complete. A device round's buffers
        stay until the work queued on the communication stream so far has run (the pinned
        pool hands a freed block out again at once)."""
        if self.device:
            streams._keep_until_done(streams.record(streams.comm_stream()),
                                     (self.sends, self.recvs, self.staged_sends,
                                      self.staged_recvs))
        made, self.persistent = self.persistent, None
        if not made or MPI.Is_finalized():
            return
        for requests, _ in made.values():
            try:
                done = MPI.Request.Testall(requests)
            except MPI.Exception:
                done = True
            if not done:
                if _abandoned is not None:
                    _abandoned.append((requests, self, None))
                continue
            for request in requests:
                try:
                    request.Free()
                except MPI.Exception:
                    pass
