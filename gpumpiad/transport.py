"""Moving array data through MPI.

NumPy buffers go to MPI directly. CuPy buffers go directly too when the MPI library is
CUDA-aware (once an event on the current stream, which produced them, has completed: MPI is not
stream-aware); otherwise they are staged through pinned host buffers with copies on the
communication stream (:mod:`gpumpiad.streams`).
Non-contiguous data is packed into a contiguous buffer first, never described to MPI with
derived datatypes.

Value semantics: what a call sends is the value at the time of the call. MPI reads a
non-blocking call's send buffer until the request completes, so the library sends from its own
copy (:func:`send_buffer`), never from memory the caller may write next; a reduction copies into
its result buffer and reduces in place, so the copy costs no extra buffer.

A reduction of host arrays reduces a signature of the array's size and dtype (and a
reduce-scatter's row split) ahead of the data and checks what it combined to
(:func:`reduction_signature`): MPI reduces buffers of different sizes, or splits them by
different counts, without an error, so ranks that pass arrays of different sizes would
otherwise get numbers.

Every issued communication stays registered until it completes, read or not: ``mpi_finalize``
and the interpreter's exit complete them all. At exit a communication that can no longer
complete (a send nobody receives, a receive nobody sends to) is reported, naming the call, and
the job ends with a non-zero code instead of hanging.

Environment
-----------
GPUMPIAD_CUDA_AWARE : ``0`` | ``1``
    Overrides the probe of the MPI library's CUDA support (``MPIX_Query_cuda_support``); read
    at first use.
GPUMPIAD_STAGE_HOST_ARRAYS : ``0`` | ``1``
    Test switch (see :mod:`gpumpiad.backend`): NumPy arrays take the device paths.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import math
import os
import sys
import threading
import time

import numpy
from mpi4py import MPI

from . import backend, streams
from .backend import get_array_module, is_device_array
from .debug import CommunicationMismatch
from .debug import timeout as watchdog_limit
from .debug import wait as _wait

log = logging.getLogger("gpumpiad")


@functools.lru_cache(maxsize=None)
def _probe_cuda_support() -> bool:
    try:
        probe = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        try:
            probe = ctypes.CDLL(_libmpi_path()).MPIX_Query_cuda_support
        except (OSError, AttributeError, TypeError):
            return False
    probe.restype = ctypes.c_int
    return bool(probe())


def _libmpi_path():
    import mpi4py.MPI
    for line in open(f"/proc/{os.getpid()}/maps", encoding="ascii", errors="replace"):
        path = line.split()[-1]
        if "libmpi" in os.path.basename(path) and path.startswith("/"):
            return path
    return mpi4py.MPI.__file__


_aware = {}


def cuda_aware() -> bool:
    """Whether device buffers are handed to MPI directly.

    ``GPUMPIAD_CUDA_AWARE=0|1`` decides when set; otherwise the MPI library is asked through
    ``MPIX_Query_cuda_support`` (False where the library does not export it). Decided once:
    every buffer a device array sends or receives asks.

    Examples
    --------
    >>> import gpumpiad
    >>> isinstance(gpumpiad.cuda_aware(), bool)
    True
    """
    flag = _aware.get("flag")
    if flag is None:
        env = os.environ.get("GPUMPIAD_CUDA_AWARE", "").strip()
        flag = _aware["flag"] = env == "1" if env in ("0", "1") else _probe_cuda_support()
    return flag


def path_description() -> str:
    """Which data path device buffers take: ``"host"``, ``"cuda-aware"`` or ``"staged"``.

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.path_description() in ("host", "cuda-aware", "staged")
    True
    """
    if not backend.device_backend():
        return "host"
    return "cuda-aware" if cuda_aware() else "staged"


def log_path():
    """Log which backend and MPI data path this process uses (``mpi_init`` calls it)."""
    try:
        log.info("gpumpiad: backend %s, MPI data path %s", backend.backend_name(),
                 path_description())
    except backend.BackendError as exc:  # reported again, as an error, at first use
        log.info("gpumpiad: no usable backend yet: %s", exc)


def is_device(array) -> bool:
    """Whether ``array`` takes the device data paths: a CuPy array, or a plain NumPy array when
    ``GPUMPIAD_STAGE_HOST_ARRAYS=1`` (staging buffers themselves are host arrays)."""
    if is_device_array(array):
        return True
    return type(array) is numpy.ndarray and backend.stage_host_arrays()


def send_buffer(array, device=None, private=False):
    """A contiguous copy of ``array`` that MPI may read now and until the send completes,
    whatever the caller writes meanwhile.

    NumPy: a host copy. CuPy: a device copy after the producing stream is synchronised
    (CUDA-aware MPI), or a pinned host copy (staged). ``device``: :func:`is_device` of
    ``array``, when the caller has it already. ``private``: only the library holds ``array``
    and nothing writes it before the send completes, so a contiguous one is sent as it is.
    """
    if not (is_device(array) if device is None else device):
        if type(array) is not numpy.ndarray:
            array = numpy.asarray(array)
        if private and array.flags.c_contiguous:
            return array
        return kept_copy(array)
    if not cuda_aware():
        return streams.device_to_host(array, streams.pinned_empty(array.shape, array.dtype))
    xp = get_array_module(array)
    if private:
        array = xp.ascontiguousarray(array).reshape(array.shape)
    else:
        array = xp.array(array, order="C", copy=True)
    streams.ready_for_mpi(array)
    return array


_POOL_MIN_BYTES = 1 << 18
_POOL_PER_SIZE = 8
_pool = {}
_pool_lock = threading.Lock()


def _reference_counts(bucket):
    """Each buffer's reference count as seen from here."""
    return [sys.getrefcount(base) for base in bucket]


# What _reference_counts sees of a buffer that only its bucket references (no array or view
# made from it is alive), measured: the interpreter's own references to a local and a call's
# argument differ between versions (Python 3.14 borrows some that 3.13 counted).
_UNREFERENCED = _reference_counts([numpy.empty(1, numpy.uint8)])[0]


def host_empty(shape, dtype):
    """An uninitialised host array for a result handed out: a communication's, or a solve's
    output.

    Large results come from a pool of buffers whose earlier arrays (and every view of them) are
    gone, found by reference count: reusing touched memory avoids the page faults of a fresh
    allocation on every call, which cost as much as the transfer itself. CuPy arrays come from
    CuPy's own pools.
    """
    dtype = numpy.dtype(dtype)
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if nbytes < _POOL_MIN_BYTES:
        return numpy.empty(shape, dtype)
    with _pool_lock:
        bucket = _pool.setdefault(nbytes, [])
        for base, count in zip(bucket, _reference_counts(bucket)):
            if count == _UNREFERENCED:
                break
        else:
            base = numpy.empty(nbytes, numpy.uint8)
            if len(bucket) < _POOL_PER_SIZE:
                bucket.append(base)
    return base.view(dtype).reshape(shape)


def kept_copy(array):
    """A copy of ``array`` for the library to keep: a large NumPy one in a :func:`host_empty`
    buffer (no page faults), any other one (a device array among them) by its own ``copy``."""
    if type(array) is numpy.ndarray and array.nbytes >= _POOL_MIN_BYTES:
        out = host_empty(array.shape, array.dtype)
        numpy.copyto(out, array)
        return out
    return array.copy()


def pooled(ufunc):
    """``ufunc`` with a result of at least the pool's size written into a :func:`host_empty`
    buffer: the elementwise arrays of a large objective and its reverse pass, made anew on every
    call, would otherwise pay their page faults each time (several times over once other
    libraries in the process have freed memory). Other calls, device arrays among them, go to
    ``ufunc`` as they are. The same values either way.

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.transport import pooled
    >>> a = np.ones(1 << 16)
    >>> twice = pooled(np.add)(a, a)
    >>> float(twice[0]), twice.dtype, pooled(np.add)(a[:3], 1).dtype
    (2.0, dtype('float64'), dtype('float64'))
    """
    def call(*args):
        for a in args:
            if type(a) is numpy.ndarray and a.nbytes >= _POOL_MIN_BYTES:
                out = _pooled_out(ufunc, args)
                if out is not None:
                    return ufunc(*args, out=out)
                break
        return ufunc(*args)

    call.__name__, call.__doc__ = ufunc.__name__, ufunc.__doc__
    return call


def _pooled_out(ufunc, args):
    """A :func:`host_empty` buffer for ``ufunc(*args)``'s result, or None where NumPy arrays
    and Python numbers are not all there is."""
    dtypes = []
    for a in args:
        if type(a) is numpy.ndarray:
            dtypes.append(a.dtype)
        elif type(a) in (int, float, complex):
            dtypes.append(type(a))
        else:
            return None
    try:
        dtype = ufunc.resolve_dtypes((*dtypes, None))[-1]
        shape = numpy.broadcast_shapes(*(numpy.shape(a) for a in args))
    except (TypeError, ValueError):
        return None
    return host_empty(shape, dtype)


def recv_buffer(shape, dtype, device):
    """An empty contiguous buffer MPI may write: host memory, device memory, or pinned host
    memory when a device result is staged."""
    if not device:
        return host_empty(shape, dtype)
    if not cuda_aware():
        return streams.pinned_empty(shape, dtype)
    out = backend.array_module().empty(shape, dtype)
    # The pool may return memory that work queued on the stream still reads; MPI writes at once.
    streams.ready_for_mpi(out)
    return out


def deliver(buffer, device):
    """The received ``buffer`` as an array of the wanted kind (device copy when staged)."""
    if device and not is_device(buffer):
        return streams.host_to_device(buffer)
    return buffer


class Pending:
    """A result MPI is still producing: ``wait()`` completes the requests and returns it.

    ``wait`` is bounded by the watchdog (``GPUMPIAD_TIMEOUT``) and names ``call`` on timeout;
    a failed communication raises on every ``wait``.
    """

    __slots__ = ("requests", "finish", "statuses", "result", "comm", "call", "lock")

    def __init__(self, requests, finish, comm=None, call="communication"):
        self.requests = requests
        self.finish = finish
        # A receive's finish holds the statuses MPI fills (to check the message's size).
        self.statuses = getattr(finish, "statuses", None)
        self.result = None
        self.comm = comm
        self.call = call
        self.lock = threading.Lock()
        if requests:
            _register(self)

    def done(self, block=True) -> bool:
        """Whether the requests have completed (tested now). ``block=False``: False at once
        when another thread holds this result (it is waiting for it), rather than waiting for
        that thread, which may itself wait for other ranks."""
        if self.requests is None:
            return True
        if not self.lock.acquire(blocking=block):
            return False
        try:
            if not self.requests:
                return True
            # Requests that complete here are freed by MPI: their statuses are kept now, and
            # ``requests`` becomes empty (complete, result not yet delivered).
            if MPI.Request.Testall(self.requests, self.statuses):
                self.requests = []
                return True
            return False
        finally:
            self.lock.release()

    def wait(self):
        with self.lock:
            if self.requests is not None:
                statuses = self.statuses
                try:
                    if self.requests:
                        _wait(self.requests, self.comm, self.call, statuses=statuses)
                except MPI.Exception as exc:
                    self.result = mpi_error(self.call, exc, statuses)
                else:
                    try:
                        self.result = self.finish() if self.finish is not None else None
                    except CommunicationMismatch as exc:
                        self.result = exc
                self.requests = self.finish = None
                _unfinished.pop(id(self), None)
            if isinstance(self.result, Exception):
                # Every later reader of a failed result gets the error again, never data.
                raise self.result
        return self.result


def mpi_error(call, exc, statuses=None):
    """The error to raise for an MPI failure of ``call``: MPI's own words where it has some,
    and the usual cause."""
    text = "" if exc.Get_error_class() == MPI.ERR_IN_STATUS else exc.Get_error_string()
    for status in statuses or ():
        if status.Get_error() not in (MPI.SUCCESS, MPI.ERR_PENDING):
            text = MPI.Get_error_string(status.Get_error())
    text = ": " + " ".join(text.split()) if text else ""
    return RuntimeError(
        f"rank {MPI.COMM_WORLD.Get_rank()}: {call} failed in MPI{text}. Ranks passing "
        "different shapes or dtypes to one call is the usual cause (GPUMPIAD_DEBUG=1 compares "
        "every collective's arguments across ranks and names the ranks that differ)")


def check_filled(status, buf, call, source, tag):
    """Raise :class:`CommunicationMismatch` unless the message ``status`` describes filled all
    of ``buf``: MPI accepts a shorter message and leaves the rest unwritten."""
    got = status.Get_count(MPI.BYTE)
    if got != buf.nbytes:
        raise CommunicationMismatch(
            f"rank {MPI.COMM_WORLD.Get_rank()}: {call} from rank {source} (tag {tag}) got a "
            f"message of {got} bytes, expected {buf.nbytes} (shape {tuple(buf.shape)}, "
            f"{buf.dtype}): the sender's array differs from the receiver's")


class _Received:
    """A receive's ``finish``: delivers the buffer once the message has filled all of it."""

    __slots__ = ("out", "device", "source", "tag", "call", "statuses")

    def __init__(self, out, device, source, tag, call):
        self.out, self.device, self.source, self.tag, self.call = out, device, source, tag, call
        self.statuses = [MPI.Status()]

    def __call__(self):
        check_filled(self.statuses[0], self.out, self.call, self.source, self.tag)
        return deliver(self.out, self.device)


_unfinished = {}  # id -> Pending whose requests may not have completed, oldest first
_TESTED_PER_CALL = 2


def _register(pending):
    """Keep ``pending`` (and so its buffers) alive until it completes, read or not: an unread
    result's requests still have to complete before MPI is finalised. Each registration tests
    the oldest entries and drops the complete ones (an unfinished one goes to the back), so a
    send's buffer returns to the pool soon after MPI is done with it, at a constant cost."""
    for _ in range(_TESTED_PER_CALL):
        if not _unfinished:
            break
        try:
            key = next(iter(_unfinished))
        except (StopIteration, RuntimeError):  # emptied, or changed by another thread
            break
        oldest = _unfinished.pop(key, None)
        if oldest is not None and not _finished(oldest):
            _unfinished[key] = oldest
    _unfinished[id(pending)] = pending


def _finished(pending):
    """Whether ``pending``'s requests are complete, without waiting for a thread that holds
    it; a failed one counts as finished (its error is raised where it is read)."""
    try:
        return pending.done(block=False)
    except MPI.Exception:
        return True


def unfinished():
    """The registered communications that have not completed (tested now)."""
    return [p for p in list(_unfinished.values()) if not _finished(p)]


class Unfinished(RuntimeError):
    """Communication that can no longer complete: every rank has reached the end of its
    communication (``mpi_finalize`` or exit) and these were never matched."""


# The communicator on which ranks meet at the end: a duplicate of the world made (without
# waiting) at import, so that the meeting cannot match a collective some rank left unfinished.
_meeting = MPI.COMM_WORLD.Idup()


def settle(call, grace=1.0):
    """Complete every registered communication, then meet the other ranks of the world.

    A rank whose communication is complete waits for the others (bounded by the watchdog);
    once every rank has arrived, nothing more can be matched, so whatever is still unfinished
    after ``grace`` seconds raises :class:`Unfinished` naming each call. Collective.
    """
    limit = watchdog_limit()
    deadline = math.inf if limit is None else time.monotonic() + limit
    meeting, made = _meeting
    arrived = None
    everyone_at = None
    rank = MPI.COMM_WORLD.Get_rank()
    while True:
        stuck = unfinished()
        if arrived is None and made.Test():
            arrived = meeting.Ibarrier()
        met = arrived is not None and arrived.Test()
        if met and not stuck:
            _unfinished.clear()
            return
        now = time.monotonic()
        if met and everyone_at is None:
            everyone_at = now
        if (everyone_at is not None and now - everyone_at > grace) or now > deadline:
            what = "; ".join(p.call for p in stuck) or "the other ranks did not arrive"
            why = ("every rank has arrived, so no rank will match them"
                   if everyone_at is not None else
                   f"not completed within {limit:g} s (the watchdog)")
            raise Unfinished(f"rank {rank}: {call}: {len(stuck)} communication(s) never "
                             f"completed ({why}): {what}")
        time.sleep(1e-3)


def _settle_at_exit():
    """At interpreter exit (before mpi4py finalises MPI): complete what was issued; a
    communication that never can be is reported and the job aborted with a non-zero code."""
    if not MPI.Is_initialized() or MPI.Is_finalized():
        return
    try:
        settle("exit")
    except Unfinished as exc:
        sys.stderr.write(f"gpumpiad: {exc}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


atexit.register(_settle_at_exit)


def start_allreduce(mpi_comm, array, op, call="allreduce"):
    """Post a non-blocking allreduce; return ``(requests, finish)``. A reduction of a host
    array, or of a device array staged through host memory, is checked by
    :func:`reduction_signature` (``call`` names it in the error)."""
    if type(array) is not numpy.ndarray and isinstance(array, numpy.generic):
        array = numpy.asarray(array)  # a NumPy scalar, what a sum returns: a host array too
    if type(array) is numpy.ndarray and not backend.stage_host_arrays():
        # The common case, a host array: its copy is the result, reduced in place.
        size = mpi_comm.Get_size()
        signature = reduction_signature(array, op, size) if size > 1 else None
        if signature is not None:
            buf, out = _signed_copy(array, signature[0])
            request = mpi_comm.Iallreduce(MPI.IN_PLACE, buf, op=op)
            return [request], _Checked(buf, out, signature[1], call)
        if array.nbytes < _POOL_MIN_BYTES:
            out = array.copy()
        else:
            out = host_empty(array.shape, array.dtype)
            numpy.copyto(out, array)
        if size == 1:
            # The reduction of one term is the term: no MPI call, whose code would be one more
            # thing for the caches to hold.
            return [], _Result(out)
        request = mpi_comm.Iallreduce(MPI.IN_PLACE, out, op=op)
        return [request], _Result(out)
    device = is_device(array)
    size = mpi_comm.Get_size()
    signature = (reduction_signature(array, op, size)
                 if device and size > 1 and not cuda_aware() else None)
    if signature is not None:
        pinned, data = _signed_pinned(array, signature[0])
        request = mpi_comm.Iallreduce(MPI.IN_PLACE, pinned, op=op)
        return [request], _Checked(pinned, data, signature[1], call, device=True)
    out = send_buffer(array, device=device)
    request = mpi_comm.Iallreduce(MPI.IN_PLACE, out, op=op)
    return [request], lambda: deliver(out, device)


def reduction_signature(array, op, size, blocks=()):
    """``(head, combined)`` for a reduction of ``array`` with ``op`` over ``size`` ranks, or
    None where no exact check exists (PROD; a dtype too narrow for the sum). ``blocks``: a
    reduce-scatter's rows per rank, which every rank must pass alike too.

    ``head``, an array of ``array``'s dtype, goes before the data in the reduced buffer and is
    combined like the data. Its first two elements are numbers from the array's size (element
    count: what MPI reduces; the shape is each rank's view of it) and dtype, a signature s and
    s² for a sum, s and limit - s for MAX and MIN; they combine to ``combined`` when every rank
    passed an array of this size and dtype, and then only (totals P s and P s² arise from equal
    signatures alone), so every rank finds out: MPI itself reduces buffers of different sizes
    without a word. Arrays that differ yet hash alike pass: about one chance in ``2**20`` for
    float64. The rest of ``head`` is zeros that keep a large array's data at the buffer's
    64-byte alignment.
    """
    kind = ("sum" if op is MPI.SUM or op == MPI.SUM
            else "order" if op == MPI.MAX or op == MPI.MIN else None)
    return (None if kind is None
            else _reduction_head(array.size, array.dtype, kind, size, tuple(blocks)))


@functools.lru_cache(maxsize=256)
def _reduction_head(count, dtype, kind, size, blocks):
    factor = size if kind == "sum" else 1
    if dtype.kind not in "fciu":
        return None
    # Sums of `factor` squares of signatures below `limit` are exact in the dtype.
    bits = (numpy.finfo(dtype).nmant + 1 if dtype.kind in "fc"
            else dtype.itemsize * 8 - (dtype.kind == "i"))
    limit = min(1 << 20, math.isqrt((1 << bits) // factor))
    if limit < 3:
        return None
    # A hash of ints only: the same in every process (a str's is salted per process).
    s = 1 + hash((count, dtype.num, dtype.itemsize, blocks)) % (limit - 2)
    pair = (s, s * s) if kind == "sum" else (s, limit - s)
    large = count * dtype.itemsize >= _POOL_MIN_BYTES
    head = numpy.zeros(max(2, 64 // dtype.itemsize) if large else 2, dtype)
    head[:2] = pair
    head.flags.writeable = False
    return head, [factor * pair[0], factor * pair[1]] if kind == "sum" else list(pair)


def _sign(buf, head, data):
    """Write ``head`` then ``data`` into flat ``buf``; return the data's view in ``buf``."""
    buf[:head.size] = head
    out = buf[head.size:].reshape(data.shape)
    numpy.copyto(out, data)
    return out


def _signed_copy(array, head):
    """``(buf, out)``: a new host buffer holding ``head`` and a copy of ``array``, and the
    copy's view ``out``."""
    if array.nbytes < _POOL_MIN_BYTES:
        buf = numpy.concatenate((head, array.reshape(-1)))
        return buf, buf[head.size:].reshape(array.shape)
    buf = host_empty((head.size + array.size,), array.dtype)
    return buf, _sign(buf, head, array)


def _signed_pinned(array, head):
    """:func:`_signed_copy` of a device array staged through a pinned host buffer (signed
    there, as a host array is)."""
    buf = streams.pinned_empty((head.size + array.size,), array.dtype)
    buf[:head.size] = head
    return buf, streams.device_to_host(array, buf[head.size:].reshape(array.shape))


class _Checked:
    """A signed host reduction's ``finish``: its data, once the combined signature is the one
    every rank's matching array gives (``device``: copied to the device, for a staged one)."""

    __slots__ = ("buf", "out", "combined", "call", "shape", "keep", "device", "rows")

    def __init__(self, buf, out, combined, call, shape=None, keep=None, device=False,
                 rows=None):
        self.buf, self.out, self.combined, self.call = buf, out, combined, call
        self.shape = out.shape if shape is None else shape  # of the array this rank passed
        self.keep = keep  # a send buffer MPI reads until the reduction completes
        self.device = device
        self.rows = rows  # a reduce-scatter's rows per rank

    def __call__(self):
        if self.buf[:2].tolist() != self.combined:
            differ, mine = "sizes or dtypes", f"{self.out.dtype} {self.shape}"
            if self.rows is not None:
                differ, mine = differ + " or row splits", mine + f", rows {list(self.rows)}"
            raise CommunicationMismatch(
                f"rank {MPI.COMM_WORLD.Get_rank()}: {self.call}: the ranks passed arrays of "
                f"different {differ} (this rank: {mine}); GPUMPIAD_DEBUG=1 names the ranks "
                "that differ")
        return deliver(self.out, True) if self.device else self.out


class _Result:
    """A host result's ``finish``: the buffer MPI wrote, as it is."""

    __slots__ = ("out",)

    def __init__(self, out):
        self.out = out

    def __call__(self):
        return self.out


def start_bcast(mpi_comm, array, root, call="broadcast"):
    """Post a non-blocking broadcast of the root's ``array`` (elsewhere ``array`` gives the
    shape and dtype). Through host memory the message ends with the root's dtype, which every
    other rank checks (:func:`_typed_message`)."""
    device = is_device(array)
    if not _typed(device):
        if mpi_comm.Get_rank() == root:
            buf = send_buffer(array, device=device)
        else:
            buf = recv_buffer(array.shape, array.dtype, device)
        request = mpi_comm.Ibcast(buf, root=root)
        return [request], lambda: deliver(buf, device)
    if mpi_comm.Get_rank() == root:
        buf = _typed_message(array, device, writable=True)
    else:
        buf = _typed_buffer(_prod(array.shape) * array.dtype.itemsize, device)
    request = mpi_comm.Ibcast([buf, MPI.BYTE], root=root)
    return [request], _Broadcast(buf, device, tuple(array.shape), array.dtype, root, call)


class _Broadcast:
    """A typed broadcast's ``finish``: the data, once its trailer is this rank's dtype."""

    __slots__ = ("buf", "device", "shape", "dtype", "root", "call")

    def __init__(self, buf, device, shape, dtype, root, call):
        self.buf, self.device, self.shape, self.dtype = buf, device, shape, dtype
        self.root, self.call = root, call

    def __call__(self):
        data, what = _typed_data(self.buf, self.shape, self.dtype)
        if data is None:
            raise CommunicationMismatch(
                f"rank {MPI.COMM_WORLD.Get_rank()}: {self.call} from root {self.root} got a "
                f"message of {what} (shape {self.shape}, {self.dtype}): the root's array "
                "differs from this rank's")
        return deliver(data, self.device)


def _signed_operands(mpi_comm, array, op, blocks=()):
    """``(device, array, signature)`` of a reduction: whether ``array`` takes the device paths,
    the array (a host one as NumPy), and its :func:`reduction_signature` (of ``blocks`` too),
    None where the reduction goes unsigned (one rank, CUDA-aware device buffers, no exact
    check)."""
    device = is_device(array)
    size = mpi_comm.Get_size()
    if not device:
        array = numpy.asarray(array)
    signature = (None if size == 1 or (device and cuda_aware())
                 else reduction_signature(array, op, size, blocks))
    return device, array, signature


def start_reduce(mpi_comm, array, root, op, call="reduce"):
    """Post a non-blocking reduce to ``root``; the others' result is zeros (never garbage).
    A reduction of a host array, or of a device array staged through host memory, is checked
    at the root by :func:`reduction_signature`."""
    device, array, signature = _signed_operands(mpi_comm, array, op)
    if signature is not None:
        buf, data = (_signed_pinned if device else _signed_copy)(array, signature[0])
        if mpi_comm.Get_rank() == root:
            request = mpi_comm.Ireduce(MPI.IN_PLACE, buf, op=op, root=root)
            return [request], _Checked(buf, data, signature[1], call, device=device)
        out = recv_buffer(data.shape, data.dtype, device)
        out[...] = 0
        request = mpi_comm.Ireduce(buf, None, op=op, root=root)
        return [request], lambda keep=buf: deliver(out, device)
    send = send_buffer(array, device=device)
    if mpi_comm.Get_rank() != root:
        out = recv_buffer(send.shape, send.dtype, device)
        out[...] = 0
        request = mpi_comm.Ireduce(send, None, op=op, root=root)
    else:
        out = send
        request = mpi_comm.Ireduce(MPI.IN_PLACE, out, op=op, root=root)
    return [request], lambda keep=send: deliver(out, device)


def start_gatherv(mpi_comm, array, rows, root, trailing):
    """Post a gather of row blocks (``rows[p]`` rows from rank p) to ``root``."""
    device = is_device(array)
    send = send_buffer(array, device=device)
    unit = _prod(trailing)
    if mpi_comm.Get_rank() == root:
        out = recv_buffer((sum(rows),) + trailing, send.dtype, device)
        request = mpi_comm.Igatherv(send, [out, [r * unit for r in rows]], root=root)
    else:
        out = recv_buffer((0,) + trailing, send.dtype, device)
        request = mpi_comm.Igatherv(send, None, root=root)
    return [request], lambda keep=send: deliver(out, device)


def start_allgatherv(mpi_comm, array, rows, trailing):
    """Post an allgather of row blocks (``rows[p]`` rows from rank p)."""
    device = is_device(array)
    send = send_buffer(array, device=device)
    out = recv_buffer((sum(rows),) + trailing, send.dtype, device)
    request = mpi_comm.Iallgatherv(send, [out, [r * _prod(trailing) for r in rows]])
    return [request], lambda keep=send: deliver(out, device)


def start_scatterv(mpi_comm, array, rows, root, trailing, dtype, device):
    """Post a scatter of the root's row blocks (``rows[p]`` rows to rank p)."""
    mine = rows[mpi_comm.Get_rank()]
    out = recv_buffer((mine,) + trailing, dtype, device)
    if mpi_comm.Get_rank() == root:
        send = send_buffer(array, device=device)
        request = mpi_comm.Iscatterv([send, [r * _prod(trailing) for r in rows]], out, root=root)
    else:
        send = None
        request = mpi_comm.Iscatterv(None, out, root=root)
    return [request], lambda keep=send: deliver(out, device)


def start_reduce_scatter(mpi_comm, array, rows, op, call="reduce-scatter"):
    """Post a reduce-scatter: rank p gets rows ``rows[p]`` of the sum over ranks. A host
    array's blocks, or a device array's staged through host memory, each carry the
    :func:`reduction_signature` (of the row split too) checked by their rank."""
    device, array, signature = _signed_operands(mpi_comm, array, op, rows)
    if signature is not None:
        # Staged: the device array comes to the host once, then its blocks are signed there.
        host = (streams.device_to_host(array, streams.pinned_empty(array.shape, array.dtype))
                if device else array)
        start, unit = signature[0].size, _prod(array.shape[1:])
        counts = [start + n * unit for n in rows]
        send = (streams.pinned_empty if device else host_empty)((sum(counts),), array.dtype)
        offset = row = 0
        for n, count in zip(rows, counts):
            _sign(send[offset:offset + count], signature[0], host[row:row + n])
            offset, row = offset + count, row + n
        me = mpi_comm.Get_rank()
        out = recv_buffer((counts[me],), array.dtype, device)
        request = mpi_comm.Ireduce_scatter(send, out, counts, op=op)
        return [request], _Checked(out, out[start:].reshape((rows[me],) + array.shape[1:]),
                                   signature[1], call, array.shape, keep=send, device=device,
                                   rows=rows)
    send = send_buffer(array, device=device)
    trailing = tuple(array.shape[1:])
    out = recv_buffer((rows[mpi_comm.Get_rank()],) + trailing, send.dtype, device)
    request = mpi_comm.Ireduce_scatter(send, out, [r * _prod(trailing) for r in rows], op=op)
    return [request], lambda keep=send: deliver(out, device)


def start_alltoallv(mpi_comm, array, send_rows, recv_rows):
    """Post an all-to-all of row blocks: ``send_rows[q]`` rows go to rank q."""
    device = is_device(array)
    send = send_buffer(array, device=device)
    trailing = tuple(array.shape[1:])
    unit = _prod(trailing)
    out = recv_buffer((sum(recv_rows),) + trailing, send.dtype, device)
    request = mpi_comm.Ialltoallv([send, [r * unit for r in send_rows]],
                                  [out, [r * unit for r in recv_rows]])
    return [request], lambda keep=send: deliver(out, device)


_SIGNATURE_BYTES = 64


def _signature(shape, dtype):
    """A message's trailer in debug mode: the sender's dtype and shape, as text."""
    text = f"{numpy.dtype(dtype).str} {tuple(shape)}".encode()[:_SIGNATURE_BYTES]
    return numpy.frombuffer(text.ljust(_SIGNATURE_BYTES), numpy.uint8)


_DTYPE_BYTES = 8


@functools.lru_cache(maxsize=64)
def _dtype_trailer(dtype):
    """A message's last bytes outside debug mode: the sender's dtype, as text (``<f8``)."""
    return dtype.str.encode()[:_DTYPE_BYTES].ljust(_DTYPE_BYTES)


def _dtype_name(trailer):
    text = trailer.decode(errors="replace").strip()
    try:
        return numpy.dtype(text).name
    except TypeError:
        return repr(text)


def _typed(device):
    """Whether a message ends with its dtype: whenever MPI reads or writes host memory (a host
    array's, or a device one's staged through pinned memory), so that both ends decide alike;
    a device buffer handed to CUDA-aware MPI goes as it is."""
    return not device or not cuda_aware()


def _typed_buffer(nbytes, device):
    """A host buffer (pinned, for a device array) for ``nbytes`` of data and their trailer."""
    if not device and nbytes < _POOL_MIN_BYTES:
        return numpy.empty(nbytes + _DTYPE_BYTES, numpy.uint8)
    return (streams.pinned_empty if device else host_empty)((nbytes + _DTYPE_BYTES,),
                                                            numpy.uint8)


def _typed_message(array, device, writable=False):
    """A copy of ``array``'s bytes followed by its dtype's trailer, in host memory: immutable
    ``bytes`` for a small host array unless ``writable`` (the cheapest copy; MPI only reads a
    send), otherwise a :func:`_typed_buffer`."""
    if not device:
        array = numpy.asarray(array)
    nbytes = array.nbytes
    if not device and nbytes < _POOL_MIN_BYTES:
        message = array.tobytes() + _dtype_trailer(array.dtype)
        return numpy.frombuffer(bytearray(message), numpy.uint8) if writable else message
    buf = _typed_buffer(nbytes, device)
    buf[nbytes:] = numpy.frombuffer(_dtype_trailer(array.dtype), numpy.uint8)
    data = buf[:nbytes].view(array.dtype).reshape(array.shape)
    if device:
        streams.device_to_host(array, data)
    else:
        numpy.copyto(data, array)
    return buf


def _typed_data(buf, shape, dtype):
    """``(data, None)``: the data of a :func:`_typed_buffer` whose trailer is ``dtype``'s, as
    an array of ``shape``; else ``(None, what)``, ``what`` naming the dtype that came."""
    nbytes = buf.nbytes - _DTYPE_BYTES
    sent = buf[nbytes:].tobytes()
    if sent != _dtype_trailer(dtype):
        return None, f"{_dtype_name(sent)} data, expected {dtype.name}"
    return buf[:nbytes].view(dtype).reshape(shape), None


def start_send(mpi_comm, array, dest, tag, signed=False):
    """Post a non-blocking send; ``finish`` returns nothing. ``signed`` (debug mode, at both
    ends): the message carries the array's dtype and shape for the receive to check; outside
    debug mode a message through host memory carries the dtype (:func:`_dtype_trailer`): one
    of the same size (float64 against int64) would arrive as reinterpreted bytes."""
    device = is_device(array)
    if signed:
        send = send_buffer(array, device=device)
        xp = get_array_module(send)
        send = xp.concatenate([send.reshape(-1).view(xp.uint8),
                               xp.asarray(_signature(array.shape, array.dtype))])
        streams.ready_for_mpi(send)
    elif _typed(device):
        send = _typed_message(array, device)
    else:
        send = send_buffer(array, device=device)
    request = mpi_comm.Isend([send, MPI.BYTE], dest=dest, tag=tag)
    return [request], lambda keep=send: None


def start_recv(mpi_comm, shape, dtype, device, source, tag, call="receive", signed=False):
    """Post a non-blocking receive into a new buffer; ``finish`` checks the message's size
    and the sender's dtype (and, ``signed``, its shape)."""
    dtype = numpy.dtype(dtype)
    if signed:
        nbytes = _prod(shape) * dtype.itemsize
        out = recv_buffer((nbytes + _SIGNATURE_BYTES,), numpy.uint8, device)
        finish = _SignedReceived(out, device, source, tag, call, shape, dtype)
    elif _typed(device):
        out = _typed_buffer(_prod(shape) * dtype.itemsize, device)
        finish = _TypedReceived(out, device, source, tag, call, shape, dtype)
    else:
        out = recv_buffer(shape, dtype, device)
        finish = _Received(out, device, source, tag, call)
    # As bytes, like every send: another dtype's message is a size to report, not a type
    # MPI may fail an internal assertion on.
    request = mpi_comm.Irecv([out, MPI.BYTE], source=source, tag=tag)
    return [request], finish


class _TypedReceived(_Received):
    """A receive's ``finish`` outside debug mode, for a message through host memory: the
    message must fill the buffer and end with the receiver's dtype (a NumPy dtype)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, out, device, source, tag, call, shape, dtype):
        super().__init__(out, device, source, tag, call)
        self.shape, self.dtype = tuple(shape), dtype

    def __call__(self):
        got = self.statuses[0].Get_count(MPI.BYTE)
        if got != self.out.nbytes:
            what = f"{got - _DTYPE_BYTES} bytes, expected {self.out.nbytes - _DTYPE_BYTES}"
        else:
            data, what = _typed_data(self.out, self.shape, self.dtype)
            if data is not None:
                return deliver(data, self.device)
        raise CommunicationMismatch(
            f"rank {MPI.COMM_WORLD.Get_rank()}: {self.call} from rank {self.source} (tag "
            f"{self.tag}) got a message of {what} (shape {self.shape}, {self.dtype}): the "
            "sender's array differs from the receiver's")


class _SignedReceived(_TypedReceived):
    """A debug-mode receive's ``finish``: the sender's dtype and shape must be the receiver's."""

    __slots__ = ()

    def __call__(self):
        mine = _signature(self.shape, self.dtype)
        got = self.statuses[0].Get_count(MPI.BYTE)
        data_bytes = self.out.nbytes - _SIGNATURE_BYTES
        trailer = (backend.to_numpy(self.out[got - _SIGNATURE_BYTES:got])
                   if got >= _SIGNATURE_BYTES else None)
        if got != self.out.nbytes or not numpy.array_equal(trailer, mine):
            sent = ("an unsigned message (is debug mode on on every rank?)" if trailer is None
                    else bytes(trailer).decode(errors="replace").strip())
            raise CommunicationMismatch(
                f"rank {MPI.COMM_WORLD.Get_rank()}: {self.call} from rank {self.source} (tag "
                f"{self.tag}): the sender sent {sent}, this rank expects "
                f"{self.dtype.str} {self.shape} (debug mode's message check)")
        data = self.out[:data_bytes].view(self.dtype).reshape(self.shape)
        return deliver(data, self.device)


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n
