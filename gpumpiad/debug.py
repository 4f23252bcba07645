"""Debug mode and the watchdog: turn mismatched or stuck communication into errors.

Debug mode (``GPUMPIAD_DEBUG=1`` or :func:`set_debug`) exchanges a small signature before every
collective — the call, its number among the communicator's collectives, the issuing thread's name,
root, dtype, shape, layout, and a checksum of values declared serial — and raises on every rank,
naming the call, the argument and the ranks that differ, instead of hanging or mixing data.
Two threads racing collectives on one communicator show up as differing thread names or calls.

The watchdog (``GPUMPIAD_TIMEOUT=seconds`` or :func:`set_timeout`) bounds every wait for
communication: a wait that does not complete in time raises :class:`CommunicationTimeout` naming
the call this rank is in.

Both environment variables are read once, at first use (every wait would otherwise pay for an
environment lookup); the two functions change the settings at run time.
"""
from __future__ import annotations

import math
import os
import threading
import time
import zlib

import numpy as np
from mpi4py import MPI

from . import trace

_UNREAD = object()
_settings = {"debug": None, "timeout": _UNREAD, "timeout from": "GPUMPIAD_TIMEOUT"}


class CommunicationMismatch(RuntimeError):
    """Ranks disagree about a communication: a collective's call or arguments (detected in
    debug mode), or the size of a message and the receive that matched it."""


class CommunicationTimeout(RuntimeError):
    """A communication did not complete within GPUMPIAD_TIMEOUT seconds."""


def set_debug(enabled=True):
    """Switch debug mode on or off for this process (overrides ``GPUMPIAD_DEBUG``).

    Every rank must make the same choice: the checks are collective.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> gpumpiad.set_debug(True)          # every collective's signature is compared
    >>> gpumpiad.mpi_sum(np.ones(2)).numpy().tolist() == [gpumpiad.mpi_size()] * 2
    True
    >>> gpumpiad.set_debug(False)
    """
    _settings["debug"] = bool(enabled)


def debug_enabled() -> bool:
    if _settings["debug"] is None:
        _settings["debug"] = os.environ.get("GPUMPIAD_DEBUG", "0").strip() not in ("", "0")
    return _settings["debug"]


def set_timeout(seconds):
    """Bound every wait for a communication by ``seconds`` (``None``: no bound); overrides
    ``GPUMPIAD_TIMEOUT``.

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.set_timeout(30.0)
    >>> gpumpiad.set_timeout(None)
    """
    if seconds is not None:
        if (isinstance(seconds, (bool, np.bool_))
                or not isinstance(seconds, (int, float, np.number))
                or not 0 < seconds < math.inf):
            raise ValueError(f"rank {MPI.COMM_WORLD.Get_rank()}: set_timeout needs a positive "
                             f"number of seconds or None, got {seconds!r}")
        seconds = float(seconds)
    _settings["timeout"] = seconds
    _settings["timeout from"] = "gpumpiad.set_timeout"


def timeout() -> float | None:
    """The watchdog's bound in seconds (``GPUMPIAD_TIMEOUT`` or :func:`set_timeout`), or
    ``None``."""
    seconds = _settings["timeout"]
    if seconds is _UNREAD:
        value = os.environ.get("GPUMPIAD_TIMEOUT", "").strip()
        try:
            seconds = float(value) if value else None
        except ValueError:
            seconds = math.nan
        if seconds is not None and not 0 < seconds < math.inf:
            raise ValueError(f"rank {MPI.COMM_WORLD.Get_rank()}: GPUMPIAD_TIMEOUT must be a "
                             f"positive number of seconds (e.g. 60), got {value!r}")
        _settings["timeout"] = seconds
    return seconds


def _code(text) -> int:
    return zlib.crc32(str(text).encode()) & 0x7FFFFFFF


_FIELDS = ("call", "sequence", "thread", "root", "dtype", "shape", "layout", "serial value",
           "argument list")


def check_signature(comm, call, root=None, array=None, layout=None, same_shape=True,
                    serial_value=False, agreed=None):
    """Collectively compare this rank's view of a collective with every other rank's.

    ``agreed``: text of further arguments every rank must pass alike.

    Raises :class:`CommunicationMismatch` on every rank when any field differs.
    """
    from .backend import to_numpy
    shape = tuple(array.shape) if (array is not None and same_shape) else ()
    if array is not None and not same_shape:
        shape = tuple(array.shape[1:])
    checksum = 0
    if serial_value and array is not None:
        checksum = zlib.crc32(np.ascontiguousarray(to_numpy(array)).tobytes()) & 0x7FFFFFFF
    mine = np.array([
        _code(call), comm.collectives, _code(threading.current_thread().name),
        -1 if root is None else root,
        _code(array.dtype) if array is not None else 0, _code(shape),
        _code(layout), checksum, _code(agreed)], dtype=np.int64)
    table = np.empty((comm.size, mine.size), dtype=np.int64)
    request = comm.mpi.Iallgather(mine, table)
    wait(request, comm, f"debug signature check of {call}")
    differing = [k for k in range(mine.size) if np.any(table[:, k] != table[0, k])]
    if not differing:
        return
    views = comm.mpi.allgather((call, threading.current_thread().name, root,
                                None if array is None else str(array.dtype), shape, layout,
                                agreed))
    field = _FIELDS[differing[0]]
    groups = {}
    for rank in range(comm.size):
        groups.setdefault(int(table[rank, differing[0]]), []).append(rank)
    detail = "; ".join(
        f"rank(s) {ranks}: {_describe(views[ranks[0]], field)}" for ranks in groups.values())
    raise CommunicationMismatch(
        f"rank {comm.rank}: collective #{comm.collectives} on {comm!r} does not match across "
        f"ranks: the {field} differs — {detail}")


def _describe(view, field):
    call, thread, root, dtype, shape, layout, agreed = view
    text = {"call": call, "thread": f"thread {thread!r} in {call}", "root": f"root={root}",
            "dtype": f"dtype {dtype}", "shape": f"shape {shape}", "layout": f"layout {layout}",
            "sequence": f"{call}", "serial value": "a different value declared serial",
            "argument list": f"{agreed}"}
    return f"{call}: " + text[field] if field not in ("call", "thread") else text[field]


def wait(requests, comm=None, call="communication", idle=False, statuses=None):
    """Complete MPI request(s), bounded by the watchdog when ``GPUMPIAD_TIMEOUT`` is set.

    ``idle``: the wait may be long and nothing else runs meanwhile (a worker waiting for its
    next instruction): poll with short sleeps instead of MPI's busy wait, leaving the core to
    other ranks. ``statuses``: a list of ``MPI.Status``, one per request, to fill.

    The wait is an ``mpi.wait`` :data:`~gpumpiad.trace.WAIT` span: time this rank spends
    waiting for others, not moving data.
    """
    requests = requests if isinstance(requests, list) else [requests]
    limit = timeout()
    if limit is None and not idle and not trace.active():
        # The common case, without a span: it runs once per communication.
        MPI.Request.Waitall(requests, statuses)
        return
    with trace.span("mpi.wait", trace.WAIT):
        if limit is None and not idle:
            MPI.Request.Waitall(requests, statuses)
            return
        _poll(requests, comm, call, idle, statuses, limit)


# A watched wait tests without sleeping for this long: one sleep costs 0.1-0.3 ms on a loaded
# node, more than most waits for a message already on its way. Between tests the core goes to
# any other runnable process (the peer rank, when ranks outnumber cores) and comes straight
# back otherwise. An idle wait spins only briefly.
SPIN_SECONDS = 2e-3
IDLE_SPIN_SECONDS = 5e-5
_yield = getattr(os, "sched_yield", lambda: None)


def _poll(requests, comm, call, idle, statuses, limit):
    """Test ``requests`` until they complete: without sleeping for a short spin budget, then
    with sleeps of at most a tenth of the time waited so far (a fixed 0.2 ms when ``idle``),
    until the watchdog's ``limit`` (seconds, or None)."""
    test = MPI.Request.Testall
    if test(requests, statuses):
        return
    clock = time.perf_counter
    start = clock()
    spin = start + (IDLE_SPIN_SECONDS if idle else SPIN_SECONDS)
    while clock() < spin:
        _yield()
        if test(requests, statuses):
            return
    deadline = start + limit if limit is not None else math.inf
    while not test(requests, statuses):
        now = clock()
        if now > deadline:
            rank = MPI.COMM_WORLD.Get_rank()
            where = f" on {comm!r} (call #{comm.sequence})" if comm is not None else ""
            raise CommunicationTimeout(
                f"rank {rank}: {call}{where} did not complete within {limit:g} s (the "
                f"watchdog, {_settings['timeout from']}); another rank is probably in a "
                "different call or has failed")
        time.sleep(2e-4 if idle else min(0.1 * (now - start), 1e-2))
