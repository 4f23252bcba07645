"""NVTX ranges and per-phase time profiles.

Every phase of gpumpiad's work (a kernel sweep, an MPI call, a reverse pass, a host staging
copy, a wait for a message) runs inside ``span(name, category, payload)``. A span does two
things, each only when someone is looking:

* with an NVTX tool attached (Nsight Systems, or any library named by
  ``NVTX_INJECTION64_PATH``), it pushes a range named ``name`` in the NVTX domain ``gpumpiad``,
  in the registered category ``category`` and with ``payload`` (bytes moved, cells updated) as
  the range's payload;
* while a profile is being collected (:func:`collect`), it adds its time to that category's
  total on this rank.

Otherwise :func:`span` returns one shared no-op context manager: callers put spans on hot
paths and pass constant name strings.

Time is attributed *exclusively*: at every moment the innermost open span owns the clock, so a
``communication`` span inside an ``adjoint`` span takes its time out of the adjoint's, and the
category totals add up to at most the wall time (the rest, outside every span, is "other").
Only spans on the thread that opened the collection count towards it; spans on other threads
still push their NVTX ranges.
"""
from __future__ import annotations

import contextlib
import numbers
import operator
import threading
import time

import nvtx

COMPUTE = "compute"
COMMUNICATION = "communication"
ADJOINT = "adjoint"
STAGING = "staging"
WAIT = "wait"

CATEGORIES = (COMPUTE, COMMUNICATION, ADJOINT, STAGING, WAIT)
DOMAIN = "gpumpiad"

_COLORS = {COMPUTE: 0xFF2E7D32, COMMUNICATION: 0xFF1565C0, ADJOINT: 0xFF6A1B9A,
           STAGING: 0xFFEF6C00, WAIT: 0xFFC62828}

# nvtx.get_domain hands back its dummy domain when no tool is attached; NVTX loads the tool
# (if any) at this first call, so attaching one later in the process has no effect.
_domain = nvtx.get_domain(DOMAIN) if nvtx.enabled() else None
if _domain is not None and not hasattr(_domain, "handle"):
    _domain = None
_category_ids = ({c: _domain.get_category_id(c) for c in CATEGORIES}
                 if _domain is not None else {})

_attributes = threading.local()
_collections = []
_collections_lock = threading.Lock()
_on = _domain is not None


def active():
    """Whether spans do anything now: an NVTX tool is attached or a profile is collecting.
    Callers that build a span's name or payload at some cost check this first.

    Examples
    --------
    >>> from gpumpiad import trace
    >>> with trace.collect():
    ...     trace.active()
    True
    """
    return _on


def nvtx_attached():
    """Whether an NVTX tool is attached to this process (spans then push NVTX ranges).

    Examples
    --------
    >>> from gpumpiad import trace
    >>> isinstance(trace.nvtx_attached(), bool)
    True
    """
    return _domain is not None


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, exc_type, exc, tb):
        return False


_NO_SPAN = _NoSpan()


def span(name, category, payload=None):
    """A context manager marking one phase of work: an NVTX range and a profile interval.

    Parameters
    ----------
    name : str
        The range's name, e.g. ``"heat.forward"``; a constant string (the tool registers it
        once).
    category : str
        One of :data:`COMPUTE`, :data:`COMMUNICATION`, :data:`ADJOINT`, :data:`STAGING`,
        :data:`WAIT`.
    payload : int or float, optional
        A number attached to the NVTX range (bytes moved, cells updated).

    Returns
    -------
    context manager
        With no NVTX tool attached and no profile collecting, one shared no-op context
        manager; its arguments are then not checked, which keeps the call near-free.

    Examples
    --------
    >>> from gpumpiad import trace
    >>> with trace.collect() as totals:
    ...     with trace.span("example.compute", trace.COMPUTE, payload=1024):
    ...         pass
    >>> totals[trace.COMPUTE] >= 0.0
    True
    """
    if not _on:
        return _NO_SPAN
    return _Span(name, category, payload)


def _check(name, category, payload):
    if not isinstance(name, str):
        raise TypeError(f"rank {_rank()}: trace.span: name must be a str, got "
                        f"{type(name).__name__} {name!r}")
    if category not in _COLORS:
        raise ValueError(f"rank {_rank()}: trace.span: category must be one of "
                         f"{', '.join(CATEGORIES)}, got {category!r}")
    if payload is None or type(payload) is int or type(payload) is float:
        return payload
    if not isinstance(payload, bool):
        try:
            return operator.index(payload)
        except TypeError:
            if isinstance(payload, numbers.Real):
                return float(payload)
    raise TypeError(f"rank {_rank()}: trace.span: payload must be an int or a float, got "
                    f"{type(payload).__name__} {payload!r}")


def _rank():
    from mpi4py import MPI
    if MPI.Is_initialized() and not MPI.Is_finalized():
        return MPI.COMM_WORLD.Get_rank()
    return 0


class _Span:
    __slots__ = ("name", "category", "payload", "pushed", "collections")

    def __init__(self, name, category, payload):
        self.payload = _check(name, category, payload)
        self.name = name
        self.category = category
        self.pushed = False
        self.collections = ()

    def __enter__(self):
        if _domain is not None:
            # One attributes object per thread, name and category, its payload set per push:
            # building one per push costs more than the push.
            cache = _attributes.__dict__
            key = (self.name, self.category)
            attributes = cache.get(key)
            if attributes is None:
                attributes = cache[key] = _domain.get_event_attributes(
                    self.name, _COLORS[self.category], _category_ids[self.category])
            attributes.payload = self.payload
            _domain.push_range(attributes)
            self.pushed = True
        if _collections:
            now = time.perf_counter()
            ident = threading.get_ident()
            mine = [c for c in _collections if c.thread == ident]
            for c in mine:
                c.enter(self.category, self.name, now)
            self.collections = mine
        return None

    def __exit__(self, exc_type, exc, tb):
        if self.collections:
            now = time.perf_counter()
            for c in self.collections:
                c.leave(now)
        if self.pushed:
            _domain.pop_range()
        return False


class Totals(dict):
    """Seconds per category on this rank, filled while :func:`collect` runs.

    A ``dict`` from each category in :data:`CATEGORIES` to its exclusive time in seconds, with
    ``wall`` (seconds from the start of the collection to its end, or to now while it runs)
    and ``other`` (wall time outside every span); ``by_name`` holds the same exclusive
    seconds per span name.
    """

    def __init__(self):
        super().__init__((c, 0.0) for c in CATEGORIES)
        self.thread = threading.get_ident()
        self.start = time.perf_counter()
        self.end = None
        self.by_name = {}
        self._stack = []
        self._since = self.start

    @property
    def wall(self):
        return (self.end if self.end is not None else time.perf_counter()) - self.start

    @property
    def other(self):
        return max(0.0, self.wall - sum(self[c] for c in CATEGORIES))

    def snapshot(self):
        """A plain ``dict`` copy: every category's seconds, ``"wall"``, ``"other"`` and
        ``"by_name"`` (a copy of :attr:`by_name`)."""
        out = dict(self)
        wall = self.wall
        out["wall"] = wall
        out["other"] = max(0.0, wall - sum(self[c] for c in CATEGORIES))
        out["by_name"] = dict(self.by_name)
        return out

    def _charge(self, category, name, seconds):
        self[category] += seconds
        self.by_name[name] = self.by_name.get(name, 0.0) + seconds

    def enter(self, category, name, now):
        if self._stack:
            self._charge(*self._stack[-1], now - self._since)
        self._stack.append((category, name))
        self._since = now

    def leave(self, now):
        if self._stack:
            self._charge(*self._stack.pop(), now - self._since)
        self._since = now

    def stop(self, now):
        # Spans still open when the collection ends are charged up to their end.
        if self._stack:
            self._charge(*self._stack[-1], now - self._since)
            self._stack.clear()
        self.end = now


@contextlib.contextmanager
def collect():
    """Collect this rank's time per category while the ``with`` block runs.

    Yields
    ------
    Totals
        Seconds per category (exclusive: nested spans take their time out of the enclosing
        one's), with ``.wall`` and ``.other``; final once the block ends. Collections may
        nest; each sees every span its thread runs while it is open.

    Examples
    --------
    >>> import time
    >>> from gpumpiad import trace
    >>> with trace.collect() as totals:
    ...     with trace.span("example.wait", trace.WAIT):
    ...         time.sleep(0.01)
    >>> totals[trace.WAIT] >= 0.01 and totals[trace.WAIT] <= totals.wall
    True
    """
    global _on
    totals = Totals()
    with _collections_lock:
        _collections.append(totals)
        _on = True
    try:
        yield totals
    finally:
        totals.stop(time.perf_counter())
        with _collections_lock:
            _collections.remove(totals)
            _on = _domain is not None or bool(_collections)


def profile_totals():
    """This rank's seconds per category in the innermost profile being collected.

    Returns
    -------
    dict
        A copy, ``{category: seconds}`` plus ``"wall"``, ``"other"`` and ``"by_name"``
        (seconds per span name); all zeros when no profile is being collected on this
        thread.

    Examples
    --------
    >>> from gpumpiad import trace
    >>> with trace.collect():
    ...     sorted(trace.profile_totals())[:3]
    ['adjoint', 'by_name', 'communication']
    """
    ident = threading.get_ident()
    for totals in reversed(_collections):
        if totals.thread == ident:
            return totals.snapshot()
    out = {c: 0.0 for c in CATEGORIES}
    out.update(wall=0.0, other=0.0, by_name={})
    return out
