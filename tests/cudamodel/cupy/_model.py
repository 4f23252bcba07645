"""Happens-before bookkeeping of the CUDA stream model.

Every agent that touches memory (the host thread(s), each stream) keeps a vector clock: one
counter per agent. An operation on a stream ticks that stream's counter and stamps every element
it reads or writes with (stream, count). A later access by agent X is ordered after that
operation exactly when X's clock has seen the stamp: ``clock_X[stream] >= count``. Edges come
only from what CUDA orders: program order on one stream, the host's order when it enqueues work
(everything the host did before enqueueing happens before the work), event record/wait, stream
and event synchronisation, and the legacy default stream's implicit barriers with blocking
streams. Values are computed at once on the host; the stamps say whether a real device could have
seen other values.

An access that is not ordered after the last write of an element (read-after-write,
write-after-write) or, for a write, after every read since (write-after-read) is a hazard:
:class:`Hazard` is raised at once, naming both operations.
"""
from __future__ import annotations

import threading

import numpy as np

MAX_AGENTS = 32
#: Bytes per tracked word: an access to any byte of a word touches the word.
WORD = 4


class Hazard(AssertionError):
    """An access that CUDA does not order after the access it conflicts with."""


class Agent:
    """A host thread or a stream: a name and a vector clock."""

    def __init__(self, model, name, blocking=False, legacy=False):
        self.id = model._new_id()
        self.name = name
        self.blocking = blocking  # ordered with the legacy default stream
        self.legacy = legacy
        self.clock = np.zeros(MAX_AGENTS, np.int64)

    def __repr__(self):
        return self.name


class Allocation:
    """One device or pinned allocation: per-element stamps of the last write and the reads
    since, and the operation that made each stamp (for messages)."""

    def __init__(self, model, nbytes, label):
        self.model = model
        self.label = label
        self.nbytes = nbytes
        n = max(-(-nbytes // WORD), 1)
        self.write_agent = np.full(n, -1, np.int64)
        self.write_count = np.zeros(n, np.int64)
        self.reads = np.zeros((MAX_AGENTS, n), np.int32)
        self.ops = {}  # (agent id, count) -> description
        self.base = None  # the uint8 host array holding the bytes

    def word_index(self, view):
        """The words of this allocation that ``view`` covers (an index array)."""
        start = view.__array_interface__["data"][0] - self.base.__array_interface__["data"][0]
        if view.size == 0:
            return np.zeros(0, np.int64)
        offsets = np.zeros(view.shape, np.int64) + start
        for axis, (n, stride) in enumerate(zip(view.shape, view.strides)):
            shape = [1] * view.ndim
            shape[axis] = n
            offsets = offsets + (np.arange(n, dtype=np.int64) * stride).reshape(shape)
        offsets = offsets.reshape(-1, 1) + np.arange(view.itemsize, dtype=np.int64)
        return np.unique(offsets // WORD)


class Model:
    """The clocks, the allocations and the log of one process."""

    def __init__(self):
        self._ids = 0
        self._lock = threading.RLock()
        self._host = Agent(self, "host")
        self.null = Agent(self, "null stream", blocking=True, legacy=True)
        self.streams = [self.null]
        self.host_syncs = []  # (what, stream name) per host wait on device work
        self.enqueued = []  # (agent name, what) in host enqueue order
        self.log = []  # both, interleaved: ("sync", what, stream) and ("op", stream, what)

    def _new_id(self):
        self._ids += 1
        if self._ids > MAX_AGENTS:
            raise RuntimeError("stream model: more than %d streams and threads" % MAX_AGENTS)
        return self._ids - 1

    def host(self):
        """The host's agent. Host threads share it: their own synchronisation (joins, locks,
        queues) is not modelled, so a wait on one thread orders what every host thread does
        afterwards (races between host threads go unseen; no false hazard comes from them)."""
        return self._host

    def stream(self, name, blocking):
        agent = Agent(self, name, blocking=blocking)
        self.streams.append(agent)
        return agent

    # -- ordering edges -------------------------------------------------------------------
    def _join(self, into, clock):
        np.maximum(into.clock, clock, out=into.clock)

    def _enqueue_edges(self, stream):
        self._join(stream, self.host().clock)
        if stream.legacy:
            for other in self.streams:
                if other.blocking and other is not stream:
                    self._join(stream, other.clock)
        elif stream.blocking:
            self._join(stream, self.null.clock)

    def synchronize(self, stream, what):
        """The host waits for everything enqueued on ``stream`` so far."""
        with self._lock:
            self._join(self.host(), stream.clock)
            self.host_syncs.append((what, stream.name))
            self.log.append(("sync", what, stream.name))

    def record(self, stream):
        """An event recorded on ``stream`` now: a snapshot of its clock."""
        with self._lock:
            self._enqueue_edges(stream)
            return stream.clock.copy()

    def wait(self, stream, snapshot):
        """``stream`` waits for a recorded event (later work on it is ordered after it)."""
        with self._lock:
            self._enqueue_edges(stream)
            self._join(stream, snapshot)

    def host_after(self, snapshot):
        """Whether the host is ordered after the work a snapshot of clocks describes."""
        with self._lock:
            return bool((self.host().clock >= snapshot).all())

    def host_wait(self, snapshot, what, stream="event"):
        """The host waits for an event recorded on ``stream`` (its name)."""
        with self._lock:
            self._join(self.host(), snapshot)
            self.host_syncs.append((what, stream))
            self.log.append(("sync", what, stream))

    # -- accesses -------------------------------------------------------------------------
    def device_op(self, stream, what, reads=(), writes=()):
        """An operation enqueued on ``stream`` that reads and writes the given array views."""
        with self._lock:
            self._enqueue_edges(stream)
            self.enqueued.append((stream.name, what))
            self.log.append(("op", stream.name, what))
            self._access(stream, what, reads, writes)

    def host_op(self, what, reads=(), writes=()):
        """The calling host thread reads and writes memory (a copy, MPI, a NumPy call)."""
        with self._lock:
            self._access(self.host(), what, reads, writes)

    def _access(self, agent, what, reads, writes):
        agent.clock[agent.id] += 1
        stamp = (agent.id, int(agent.clock[agent.id]))
        touched = []
        for view in reads:
            alloc = allocation_of(view)
            if alloc is not None:
                index = alloc.word_index(view)
                self._check_after_write(agent, what, alloc, index, "reads")
                touched.append((alloc, index, False))
        for view in writes:
            alloc = allocation_of(view)
            if alloc is not None:
                index = alloc.word_index(view)
                self._check_after_write(agent, what, alloc, index, "writes")
                self._check_after_reads(agent, what, alloc, index)
                touched.append((alloc, index, True))
        for alloc, index, write in touched:
            alloc.ops[stamp] = what
            if write:
                alloc.write_agent[index] = stamp[0]
                alloc.write_count[index] = stamp[1]
                alloc.reads[:, index] = 0
            else:
                alloc.reads[stamp[0], index] = np.maximum(alloc.reads[stamp[0], index], stamp[1])

    def _check_after_write(self, agent, what, alloc, index, verb):
        writers = alloc.write_agent[index]
        written = writers >= 0
        if not written.any():
            return
        seen = agent.clock[np.where(written, writers, 0)]
        late = written & (seen < alloc.write_count[index])
        if late.any():
            k = int(np.argmax(late))
            other = (int(writers[k]), int(alloc.write_count[index][k]))
            raise Hazard(f"{agent.name}: {what} {verb} {alloc.label} (word {int(index[k])}) "
                         f"before {self._name(other[0])}'s {alloc.ops.get(other, '?')} that "
                         f"writes it is ordered before it")

    def _check_after_reads(self, agent, what, alloc, index):
        reads = alloc.reads[:, index]
        late = reads > agent.clock[:, None]
        late[agent.id] = False
        if late.any():
            a, k = np.unravel_index(int(np.argmax(late)), late.shape)
            other = (int(a), int(reads[a, k]))
            raise Hazard(f"{agent.name}: {what} writes {alloc.label} (word {int(index[k])}) "
                         f"before {self._name(other[0])}'s {alloc.ops.get(other, '?')} that "
                         f"reads it is ordered before it")

    def _name(self, agent_id):
        for agent in [self._host] + self.streams:
            if agent.id == agent_id:
                return agent.name
        return f"agent {agent_id}"


MODEL = Model()


def allocation_of(view):
    """The tracked allocation behind an array view, or None for untracked host memory."""
    base = view
    while base is not None:
        alloc = getattr(base, "_allocation", None)
        if alloc is not None:
            return alloc
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None
