"""Communicators, ranks and the MPI session.

:class:`Comm` wraps an ``mpi4py`` intracommunicator. Every gpumpiad primitive takes ``comm=``
(default: the world). ``mpi_rank()`` returns a :class:`RankInt`: a plain ``int`` in Python
control flow and indexing, but a rank-dependent (distributed) value when combined with a Tensor.
"""
from __future__ import annotations

import contextlib
import functools
import threading

from mpi4py import MPI

from . import control, trace, transport
from .arguments import as_int, is_int
from .debug import check_signature, debug_enabled

# Each MPI communicator caches its one Comm (MPI attribute caching): the reverse-mode message
# numbering and the call counts live there, so a communicator passed as mpi4py's object at every
# call must find the same Comm every time. MPI drops the attribute when the communicator is freed.
_COMM_KEYVAL = MPI.Comm.Create_keyval()
_C_INT_MAX = 2**31 - 1


def _rank_dependent(op, base):
    def method(self, *args):
        res = getattr(base, op)(self, *args)
        if res is NotImplemented and args and isinstance(args[0], float):
            res = getattr(float, op)(float(self), *args)
        if type(res) is int:
            return RankInt(res)
        if type(res) is float:
            return RankFloat(res)
        return res
    method.__name__ = op
    return method


_ARITHMETIC = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
               "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__",
               "__rmod__", "__neg__", "__pow__", "__rpow__")


class RankInt(int):
    """An ``int`` that differs from rank to rank; arithmetic on it stays rank-dependent.

    Python gives a float on the left the first go, so write ``rank * 0.5``, not ``0.5 * rank``
    (the latter is a plain float).

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> r = gpumpiad.mpi_rank()
    >>> (gpumpiad.tensor(np.ones(2)) * r).distributed     # a per-rank value
    True
    """

    for _op in _ARITHMETIC:
        locals()[_op] = _rank_dependent(_op, int)

    def __repr__(self):
        return f"RankInt({int(self)})"

    __str__ = int.__repr__


class RankFloat(float):
    """A ``float`` computed from a rank: rank-dependent, like :class:`RankInt`."""

    for _op in _ARITHMETIC:
        locals()[_op] = _rank_dependent(_op, float)
    del _op

    def __repr__(self):
        return f"RankFloat({float(self)})"

    __str__ = float.__repr__


RANK_DEPENDENT = (RankInt, RankFloat)


class FreedOnExit:
    """``with`` support for an object with a collective ``free()``: freed when the block ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
        return False


class Comm(FreedOnExit):
    """A communicator for gpumpiad primitives.

    One MPI communicator has one ``Comm``: wrapping the same mpi4py communicator again (or
    passing it as ``comm=``) gives the same object, with the same message numbering.

    Parameters
    ----------
    mpi_comm : mpi4py.MPI.Intracomm, optional
        The communicator to wrap (default ``MPI.COMM_WORLD``).

    Examples
    --------
    >>> import gpumpiad
    >>> from mpi4py import MPI
    >>> world = gpumpiad.Comm()
    >>> world.size >= 1
    True
    >>> gpumpiad.Comm(MPI.COMM_WORLD) is world
    True
    """

    def __new__(cls, mpi_comm=None, owned=False):
        known = _registered(_usable_mpi_comm(mpi_comm))
        return known if known is not None else super().__new__(cls)

    def __init__(self, mpi_comm=None, owned=False):
        if getattr(self, "mpi", None) is not None:
            return  # the communicator's existing Comm, from __new__
        self.mpi = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        self.lock = threading.RLock()
        self.sequence = 0      # calls issued on this communicator
        self.collectives = 0   # of which collectives: the same count on every rank
        self.p2p_counts = {}   # messages per (kind, peer, tag): numbers reverse-mode tags
        self.owned = owned  # created by split/dup/cart: free() releases it
        self.freed = False
        self.mpi.Set_attr(_COMM_KEYVAL, self)

    def __repr__(self):
        return f"Comm(rank={self.rank}, size={self.size})"

    def free(self):
        """Release a communicator made by :meth:`split`, :meth:`dup` or :meth:`cart`
        (``MPI_Comm_free``; collective). MPI has a limited number of communicators per process
        (about 2000 with MPICH), so a program that makes them in a loop frees them, or uses
        ``with``. Communicators gpumpiad did not create (the world, a wrapped mpi4py one) are
        left alone. Idempotent.

        Examples
        --------
        >>> import gpumpiad
        >>> with gpumpiad.Comm().dup() as comm:
        ...     comm.size == gpumpiad.mpi_size()
        True
        """
        if self.owned and not self.freed and self.mpi != MPI.COMM_NULL:
            if MPI.Is_finalized():
                raise RuntimeError(f"rank {self.rank}: {self!r}.free() after MPI was finalized")
            self.mpi.Free()
            self.freed = True

    def split(self, color, key=None):
        """A sub-communicator of the ranks that pass the same ``color`` (``MPI_Comm_split``).

        Collective. ``color`` is an int >= 0 (it may differ between ranks), ``key`` an int
        ordering the ranks of the new communicator (default: this rank). Bad arguments on any
        rank raise ``ValueError`` on every rank, naming the rank(s).
        """
        problem = None
        if not is_int(color) or not 0 <= color <= _C_INT_MAX:
            problem = (f"color must be an int >= 0 and <= {_C_INT_MAX} (a C int), got "
                       f"{color!r} on rank {self.rank}")
        elif key is not None and (not is_int(key) or not -_C_INT_MAX <= key <= _C_INT_MAX):
            problem = (f"key must be an int of at most {_C_INT_MAX} in magnitude (a C int) or "
                       f"None, got {key!r} on rank {self.rank}")
        # Colors differ between ranks, so one rank's complaint must reach all of them before
        # the Split that the others would otherwise wait in.
        return Comm(_create(self, "split", lambda: self.mpi.Split(
            int(color), self.rank if key is None else int(key)), problem=problem), owned=True)

    def dup(self):
        """A duplicate communicator: same ranks, separate message space (``MPI_Comm_dup``)."""
        return Comm(_create(self, "dup", self.mpi.Dup), owned=True)

    def cart(self, dims=None, periods=None, ndims=2):
        """A Cartesian communicator; ``dims`` default to ``MPI.Compute_dims(size, ndims)``.

        Collective, with the same arguments on every rank. ``dims``: non-negative ints whose
        positive entries multiply to ``size`` (zeros are filled in); ``periods``: one bool per
        dimension.
        """
        ndims = as_int(ndims, "Comm.cart's ndims", self.rank, low=1)
        dims = [0] * ndims if dims is None else dims
        try:
            dims = [d for d in dims]
        except TypeError:
            raise ValueError(f"rank {self.rank}: Comm.cart's dims must be a sequence of ints, "
                             f"got {dims!r}") from None
        if not dims or any(not is_int(d) or d < 0 for d in dims):
            raise ValueError(f"rank {self.rank}: Comm.cart's dims must be non-negative ints, "
                             f"got {dims!r}")
        dims = [int(d) for d in dims]
        fixed = 1
        for d in dims:
            fixed *= d if d > 0 else 1
        if self.size % fixed or (0 not in dims and fixed != self.size):
            raise ValueError(f"rank {self.rank}: Comm.cart's dims {dims} do not fit a "
                             f"communicator of {self.size} rank(s): expected the positive "
                             f"entries to multiply to {self.size}")
        dims = list(MPI.Compute_dims(self.size, dims))
        periods = [False] * len(dims) if periods is None else list(periods)
        if len(periods) != len(dims):
            raise ValueError(f"rank {self.rank}: Comm.cart's periods must give one bool per "
                             f"dimension ({len(dims)}), got {periods!r}")
        return make_cart(self, dims, [bool(p) for p in periods])

    def issue(self, call, start, *, collective=True, root=None, array=None, layout=None,
              same_shape=True, serial_value=False):
        """Issue one communication as the next link of this communicator's chain.

        ``start()`` posts non-blocking MPI calls and returns ``(requests, finish)``; the result
        is a :class:`~gpumpiad.transport.Pending`. Issuing is serialised per communicator, so
        every rank issues its calls on a communicator in one order, whichever thread calls; in
        debug mode a collective is first checked against every other rank's view of it.
        The call runs in a :data:`~gpumpiad.trace.COMMUNICATION` span named by its primitive
        (``mpi.bcast``, ``mpi.reduce.reverse``, ...), with ``array``'s size in bytes as payload.
        """
        if trace.active():
            with trace.span(_span_name(call), trace.COMMUNICATION,
                            None if array is None else int(array.nbytes)):
                return self._issue(call, start, collective, root, array, layout, same_shape,
                                   serial_value)
        return self._issue(call, start, collective, root, array, layout, same_shape,
                           serial_value)

    def _issue(self, call, start, collective, root, array, layout, same_shape, serial_value):
        with self.lock:
            self.sequence += 1
            if collective:
                self.collectives += 1
            if collective and debug_enabled():
                check_signature(self, call, root=root, array=array, layout=layout,
                                same_shape=same_shape, serial_value=serial_value)
            requests, finish = start()
        return transport.Pending(requests, finish, self, call)

    @contextlib.contextmanager
    def exclusive(self, call):
        """Hold this communicator for a collective ``call`` of several MPI steps, issued and
        completed inside the ``with`` block (the control path's, :mod:`gpumpiad.control`):
        no other thread issues on it meanwhile, and debug mode checks ``call`` like any
        collective. Yields the mpi4py communicator; the block is one ``mpi.control``
        :data:`~gpumpiad.trace.COMMUNICATION` span."""
        with trace.span("mpi.control", trace.COMMUNICATION), self.lock:
            self.sequence += 1
            self.collectives += 1
            if debug_enabled():
                check_signature(self, call)
            yield self.mpi

    def agree(self, call, arguments):
        """Debug mode: check that every rank calls ``call`` with the same ``arguments`` (text),
        as one collective; raises :class:`~gpumpiad.CommunicationMismatch` naming the ranks
        that differ. Outside debug mode nothing is checked and nothing is sent."""
        if debug_enabled():
            with self.lock:
                self.sequence += 1
                self.collectives += 1
                check_signature(self, call, agreed=arguments)

    def allreduce_sum(self, array):
        """Allreduce-sum of a NumPy or CuPy array, waited for; returns a new array."""
        call = "allreduce of serial cotangent shares"
        return self.issue(call, lambda: transport.start_allreduce(self.mpi, array, MPI.SUM, call),
                          array=array).wait()


_INTERNAL_CALLS = {"allreduce of serial cotangent shares": "mpi.allreduce.cotangents",
                   "agreement on reverse-mode allreduces": "mpi.allreduce.agreement"}


@functools.lru_cache(maxsize=512)
def _span_name(call):
    """The trace span of an issued ``call``: ``mpi.<primitive>`` from the public primitive's
    name (``.reverse`` for its reverse rule), ``mpi.control`` for the library's own checks."""
    if call in _INTERNAL_CALLS:
        return _INTERNAL_CALLS[call]
    if not call.startswith("mpi_"):
        return "mpi.control"
    head = call[4:].split(" ", 1)[0].split("(", 1)[0]
    return f"mpi.{head}.reverse" if "(reverse" in call else f"mpi.{head}"


def _create(comm, name, make, agreed=None, problem=None):
    """``make()``, a new MPI communicator; MPI's refusal comes back with what to do about it.

    MPI creates communicators in blocking calls the watchdog cannot bound, and leaves ranks
    that pass different topologies undefined: first every rank shows up with the call, its
    ``agreed`` arguments and its ``problem`` with its own arguments (or None), in one watched
    allgather; any problem is raised on every rank.
    """
    views = control.allgather(comm, (name, agreed, problem), f"Comm.{name}")
    problems = [p for _, _, p in views if p is not None]
    if problems:
        raise ValueError(f"rank {comm.rank}: Comm.{name}: " + "; ".join(problems))
    if any(v != views[0] for v in views):
        detail = "; ".join(f"rank {r}: Comm.{n}" + (f" with {a}" if a is not None else "")
                           for r, (n, a, _) in enumerate(views))
        raise ValueError(f"rank {comm.rank}: ranks create communicators differently ({detail})"
                         ": every rank must make the same call with the same arguments")
    try:
        return make()
    except MPI.Exception as exc:
        raise RuntimeError(
            f"rank {comm.rank}: Comm.{name} could not create a communicator: {exc}. If the "
            "program makes communicators (Comm.split/dup/cart, heat.Grid) repeatedly, free "
            "the ones it no longer uses: .free(), or a `with` block") from None


def make_cart(comm, dims, periods, what=None):
    """A :class:`CartComm` of validated ``dims`` and ``periods``, made once every rank agrees on
    them and on ``what`` (the caller's own arguments, e.g. a grid's shape)."""
    agreed = f"dims {list(dims)}, periods {list(periods)}" + (f", {what}" if what else "")
    return CartComm(_create(comm, "cart", lambda: comm.mpi.Create_cart(
        dims, periods=periods, reorder=False), agreed), owned=True)


class CartComm(Comm):
    """A :class:`Comm` with a Cartesian topology."""

    def __init__(self, mpi_comm, owned=False):
        super().__init__(mpi_comm, owned)
        self.dims = tuple(mpi_comm.Get_topo()[0])
        self.periods = tuple(bool(p) for p in mpi_comm.Get_topo()[1])
        self.coords = tuple(mpi_comm.Get_coords(self.rank))

    def shift(self, direction, disp=1):
        """``(source, dest)`` ranks for a shift along ``direction`` (``MPI.PROC_NULL`` at edges)."""
        return self.mpi.Shift(direction, disp)


_world = {}


def world() -> Comm:
    """The world communicator (one :class:`Comm` per process)."""
    comm = _world.get("comm")
    if comm is None:
        comm = _world["comm"] = Comm(MPI.COMM_WORLD)
    return comm


def resolve(comm) -> Comm:
    """``comm`` as a usable :class:`Comm`: ``None`` means the world, an mpi4py communicator
    gives its one Comm; a freed communicator, or any after MPI was finalized, is an error."""
    if comm is None:
        comm = world()
    elif not isinstance(comm, Comm):
        return Comm(comm)
    if comm.freed or MPI.Is_finalized():
        _usable_mpi_comm(comm.mpi if not comm.freed else MPI.COMM_NULL)
    return comm


def _usable_mpi_comm(mpi_comm):
    """``mpi_comm`` (``None``: the world) if gpumpiad can communicate on it; else a clear
    error: a wrong type, a freed communicator, or MPI finalized."""
    rank = MPI.COMM_WORLD.Get_rank() if not MPI.Is_finalized() else _world["comm"].rank
    if mpi_comm is None:
        mpi_comm = MPI.COMM_WORLD
    if isinstance(mpi_comm, MPI.Comm) and mpi_comm == MPI.COMM_NULL:
        raise ValueError(f"rank {rank}: the communicator was freed (Comm.free(), a `with` "
                         "block's end, or Grid.free()); make a new one")
    if not isinstance(mpi_comm, MPI.Intracomm):
        raise TypeError(f"rank {rank}: comm must be a gpumpiad.Comm or an mpi4py "
                        f"Intracomm (e.g. MPI.COMM_WORLD), got {mpi_comm!r} "
                        f"({type(mpi_comm).__name__})")
    if MPI.Is_finalized():
        raise RuntimeError(f"rank {rank}: MPI was finalized (MPI.Finalize); no communication "
                           "is possible afterwards, and MPI cannot be started again in the "
                           "same process")
    return mpi_comm


def _registered(mpi_comm):
    """The :class:`Comm` already made for ``mpi_comm``, or None."""
    try:
        return mpi_comm.Get_attr(_COMM_KEYVAL)
    except MPI.Exception:
        # Another Python object of a communicator freed through a different one.
        raise ValueError(f"rank {MPI.COMM_WORLD.Get_rank()}: the communicator was freed; "
                         "make a new one") from None


def mpi_init():
    """Start gpumpiad's MPI session (idempotent) and return the world :class:`Comm`.

    MPI itself is initialised when ``mpi4py.MPI`` is imported (thread level MULTIPLE).

    Examples
    --------
    >>> import gpumpiad
    >>> world = gpumpiad.mpi_init()
    >>> world.size == gpumpiad.mpi_size()
    True
    """
    if MPI.Is_finalized():
        _usable_mpi_comm(None)  # raises: MPI cannot be started twice in one process
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    transport.log_path()
    return world()


def mpi_finalize():
    """End gpumpiad's MPI session: complete every outstanding communication (sends, and
    results never read), then meet the other ranks. Collective.

    A communication that can no longer complete (a send no rank receives) raises
    ``RuntimeError`` naming it, once every rank has arrived, instead of hanging.

    ``MPI_Finalize`` itself runs at interpreter exit (mpi4py's handler), so a program may call
    this and still let other libraries use MPI until it ends.

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.mpi_finalize()     # sends completed, every rank past this point
    >>> gpumpiad.mpi_size() >= 1    # MPI remains usable until the interpreter exits
    True
    """
    if MPI.Is_initialized() and not MPI.Is_finalized():
        comm = world()
        with comm.exclusive("mpi_finalize"):
            transport.settle("mpi_finalize")


def mpi_rank(comm=None) -> RankInt:
    """This process's rank in ``comm`` as a :class:`RankInt`.

    Examples
    --------
    >>> import gpumpiad
    >>> r = gpumpiad.mpi_rank()
    >>> isinstance(r, int)
    True
    """
    return RankInt(resolve(comm).rank)


def mpi_size(comm=None) -> int:
    """The number of ranks in ``comm``.

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.mpi_size() == gpumpiad.Comm().size
    True
    """
    return resolve(comm).size


world()  # made at import: its rank is still known after MPI_Finalize
