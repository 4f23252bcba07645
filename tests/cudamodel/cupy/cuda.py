"""``cupy.cuda`` of the model: devices, streams, events and the runtime calls gpumpiad makes."""
from __future__ import annotations

import os
import threading

from ._model import MODEL

_local = threading.local()
_next_ptr = [0x1000]


def _ptr():
    _next_ptr[0] += 0x10
    return _next_ptr[0]


class Stream:
    """A CUDA stream: a blocking stream is ordered with the legacy default stream, a
    non-blocking one is not."""

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None, _agent=None):
        if _agent is not None:
            self._agent = _agent
            self.ptr = 0
        else:
            kind = "non-blocking" if non_blocking else "blocking"
            self._agent = MODEL.stream(f"{kind} stream #{len(MODEL.streams)}",
                                       blocking=not non_blocking)
            self.ptr = _ptr()
        # As CUDA: a priority outside the device's range [-5, 0] is clamped to its end.
        self.priority = 0 if priority is None else min(max(int(priority), -5), 0)

    def __enter__(self):
        stack = _stack()
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _stack().pop()

    def use(self):
        _stack()[-1] = self
        return self

    def synchronize(self):
        MODEL.synchronize(self._agent, "Stream.synchronize")

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        MODEL.wait(self._agent, event._snapshot)

    @property
    def done(self):
        # As Event.done: True only for work the host is already ordered after.
        return MODEL.host_after(self._agent.clock)

    def __eq__(self, other):
        return isinstance(other, Stream) and other._agent is self._agent

    def __hash__(self):
        return hash(self._agent.id)

    def __repr__(self):
        return f"<model {self._agent.name}>"


Stream.null = Stream(_agent=MODEL.null)


def _stack():
    stack = getattr(_local, "streams", None)
    if stack is None:
        stack = _local.streams = [Stream.null]
    return stack


def get_current_stream(device_id=None):
    return _stack()[-1]


class Event:
    """A CUDA event: a snapshot of the recording stream's clock."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._snapshot = None
        self._stream = None
        self.disable_timing = disable_timing

    def record(self, stream=None):
        stream = get_current_stream() if stream is None else stream
        self._snapshot = MODEL.record(stream._agent)
        self._stream = stream._agent.name

    def synchronize(self):
        if self._snapshot is not None:
            MODEL.host_wait(self._snapshot, "Event.synchronize", self._stream)

    @property
    def done(self):
        # A query answers True only for work the host is already ordered after: the model
        # cannot know when a GPU would have finished, so a query never orders anything.
        return self._snapshot is None or MODEL.host_after(self._snapshot)


def get_elapsed_time(start_event, end_event):
    return 0.0


class Device:
    def __init__(self, device=None):
        self.id = _current_device() if device is None else int(device)

    def use(self):
        _local.device = self.id

    def __enter__(self):
        self._previous = _current_device()
        _local.device = self.id
        return self

    def __exit__(self, *exc):
        _local.device = self._previous

    def synchronize(self):
        for stream in list(MODEL.streams):
            MODEL.synchronize(stream, "Device.synchronize")

    @property
    def compute_capability(self):
        return "90"


def _current_device():
    return getattr(_local, "device", 0)


class runtime:
    """The few runtime calls gpumpiad makes."""

    class CUDARuntimeError(RuntimeError):
        pass

    @staticmethod
    def getDeviceCount():
        return int(os.environ.get("CUPY_MODEL_DEVICES", "1"))

    @staticmethod
    def getDevice():
        return _current_device()

    @staticmethod
    def runtimeGetVersion():
        return 12080

    @staticmethod
    def driverGetVersion():
        return 12080

    @staticmethod
    def getDeviceProperties(device):
        return {"name": b"CPU model of CuPy (tests/cudamodel)"}

    @staticmethod
    def memGetInfo():
        """(free, total) bytes: ``CUPY_MODEL_FREE_BYTES`` free (1 TiB by default)."""
        free = int(os.environ.get("CUPY_MODEL_FREE_BYTES", 1 << 40))
        return free, max(free, 1 << 40)


class MemoryPool:
    def used_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self):
        pass
