"""Device streams, events and staging copies: the stream-ordered layer between the array backend
and MPI.

The library queues its device work on two streams per device, made on first use: a
*compute* stream (non-blocking) for the solver's kernels, and a *communication* stream
(non-blocking, the device's highest priority) for packing, staging copies and unpacking. Work
on one stream that needs another's results waits for an event on the GPU
(``stream.wait_event``); the host waits for an event only where MPI itself is about to read or
write device or pinned memory, and never for the compute stream inside a time loop.

Ordering at the library's edges: an array from the user is ordered after the stream that is
current where it enters the library (a Tensor made with ``gpumpiad.tensor(x, stream=s)``, after
``s``; a Tensor a library op made, after the stream that op ran on); what the library returns
is ordered before the stream current at the return, so the caller's next kernels read finished
values without any host wait.

All functions here take CuPy arrays; :mod:`gpumpiad.backend` chooses whether there are any.
"""
from __future__ import annotations

import threading

import numpy

from . import backend, trace

_pairs = {}   # device id -> (compute stream, communication stream)
_pairs_lock = threading.Lock()
# Below any device's range (a few values at and below 0); CuPy has no call that reads the range.
_HIGHEST_PRIORITY = -(1 << 20)


def current_device():
    """The id of this thread's current CUDA device."""
    import cupy
    return cupy.cuda.runtime.getDevice()


def _streams():
    device = current_device()
    pair = _pairs.get(device)
    if pair is None:
        import cupy
        with _pairs_lock:
            pair = _pairs.get(device)
            if pair is None:
                # CUDA clamps a priority outside the device's range to the range's end, and the
                # lowest number is the greatest priority: this is the device's highest.
                pair = _pairs[device] = (cupy.cuda.Stream(non_blocking=True),
                                         cupy.cuda.Stream(non_blocking=True,
                                                          priority=_HIGHEST_PRIORITY))
    return pair


def compute_stream():
    """The library's compute stream on the current device (non-blocking)."""
    return _streams()[0]


def comm_stream():
    """The library's communication stream on the current device (non-blocking, highest
    priority): packing, staging copies and unpacking of halos and messages."""
    return _streams()[1]


def current_stream():
    """CuPy's current stream of this thread."""
    import cupy
    return cupy.cuda.get_current_stream()


def new_event():
    """An event for ordering only (no timing: cheaper to record and wait for)."""
    import cupy
    return cupy.cuda.Event(disable_timing=True)


def record(stream, event=None):
    """Record ``event`` (default: a new one) on ``stream``; returns it."""
    event = new_event() if event is None else event
    event.record(stream)
    return event


def order(later, earlier):
    """Work queued on stream ``later`` from now on runs after the work queued on ``earlier``
    so far (an event, waited for on the GPU); nothing when they are one stream."""
    if later.ptr != earlier.ptr:
        later.wait_event(record(earlier))


class on_compute:
    """Run a block's device work on the library's compute stream: on entry ordered after the
    stream current there (which produced the inputs), on exit that stream ordered after the
    block (which produced the outputs). No host wait either way.

    Examples
    --------
    ``with streams.on_compute(): ...`` around kernels that read the caller's arrays and write
    arrays the caller reads next.
    """

    __slots__ = ("caller", "stream")

    def __enter__(self):
        self.caller = current_stream()
        self.stream = compute_stream()
        order(self.stream, self.caller)
        self.stream.__enter__()
        return self.stream

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        order(self.caller, self.stream)


def device_empty(shape, dtype):
    """An uninitialised device array from the current stream's pool (memory that only work
    queued on that stream may still use)."""
    import cupy
    return cupy.empty(shape, dtype)


def pinned_empty(shape, dtype):
    """A NumPy array in page-locked host memory from CuPy's pinned pool."""
    if backend.stage_host_arrays():
        return numpy.empty(shape, dtype).view(backend.StagingBuffer)
    import cupyx
    return cupyx.empty_pinned(shape, dtype=dtype)


def ready_for_mpi(array):
    """Wait on the host until ``array`` (a device array of the current stream) is written: MPI
    reads or writes it next and is not stream-aware. The wait is an event recorded on the
    current stream now, so later work queued there is not waited for."""
    if backend.is_device_array(array):
        record(current_stream()).synchronize()


def device_to_host(array, host):
    """Copy device ``array`` into host ``host`` on the communication stream, after the current
    stream's work so far; returns when the copy is complete (MPI reads ``host`` next).

    The copy, waited for, is a ``staging.device_to_host`` :data:`~gpumpiad.trace.STAGING` span
    of its size in bytes.
    """
    with trace.span("staging.device_to_host", trace.STAGING, int(host.nbytes)):
        if not backend.is_device_array(array):  # GPUMPIAD_STAGE_HOST_ARRAYS
            host[...] = array
            return host
        stream = comm_stream()
        order(stream, current_stream())
        array.get(stream=stream, out=host, blocking=False)
        record(stream).synchronize()
    return host


def host_to_device(host, keepalive=None):
    """Copy ``host`` into a new device array on the communication stream; the current stream is
    ordered after the copy (no host wait).

    ``host`` and ``keepalive`` stay referenced until the copy completes (the pinned pool hands a
    freed block out again at once). The queuing is a ``staging.host_to_device``
    :data:`~gpumpiad.trace.STAGING` span of its size in bytes.
    """
    with trace.span("staging.host_to_device", trace.STAGING, int(host.nbytes)):
        if isinstance(host, backend.StagingBuffer):  # GPUMPIAD_STAGE_HOST_ARRAYS
            return numpy.array(host, subok=False)
        import cupy
        current = current_stream()
        # Allocated on the consuming stream (its pool's memory may still be read by work queued
        # there): the copy starts after that work.
        out = cupy.empty(host.shape, dtype=host.dtype)
        stream = comm_stream()
        order(stream, current)
        out.set(host, stream=stream)
        done = record(stream)
        current.wait_event(done)
        _keep_until_done(done, (host, keepalive))
        return out


_in_flight = []   # (event, objects) of copies that may still read host memory, oldest first
_in_flight_lock = threading.Lock()


def _keep_until_done(event, objects):
    """Hold ``objects`` until ``event`` has completed; forget those of completed copies."""
    with _in_flight_lock:
        _in_flight.append((event, objects))
        while _in_flight and _in_flight[0][0].done:
            _in_flight.pop(0)
