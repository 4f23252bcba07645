"""Point-to-point: ``mpi_send``, ``mpi_recv``, ``mpi_sendrecv`` and ``mpi_exchange``.

Sends never block: they are posted and completed later (their buffers kept alive), and a
receive waits only when its data is read. In the reverse pass a send's rule (a receive) returns
a deferred cotangent that the tape waits for only when it is needed, and a receive's rule (a
send) runs as soon as the received value's cotangent is complete rather than in reverse
order. So any pattern of sends and receives that MPI can match completes, in the forward and in
the reverse pass, whatever order ranks post them in (receive-before-send rings included).

Each reverse message carries a tag derived from the user's tag and the message's position in
the forward stream between the two ranks, so cotangents sent out of order still reach the
right receive.
"""
from __future__ import annotations

from ..arguments import as_int
from ..debug import CommunicationMismatch, debug_enabled
from ..tape import Deferred
from ..tensor import DISTRIBUTED, Tensor
from ..transport import is_device, start_recv, start_send
from ._record import (REVERSE_TAG, as_tensor, check_root, passed_on, pending_tensor, record,
                      resolve, zeros_like)


def _check_tag(tag, comm):
    return as_int(tag, "tag", comm.rank, low=0, high=REVERSE_TAG)


def _window():
    from mpi4py import MPI
    upper = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) or 32767
    return max(1, min(REVERSE_TAG, (upper - 2 * REVERSE_TAG) // REVERSE_TAG))


_WINDOW = _window()


def _reverse_tag(comm, kind, peer, tag):
    """The tag of the cotangent of the next forward message (``kind`` "send" or "recv") between
    this rank and ``peer`` with ``tag``: both ends count the same messages in the same order."""
    with comm.lock:
        counts = comm.p2p_counts
        k = counts.get((kind, peer, tag), 0)
        counts[(kind, peer, tag)] = k + 1
    return REVERSE_TAG + (k % _WINDOW) * REVERSE_TAG + tag


def _post_send(comm, array, dest, tag, call):
    comm.issue(f"{call} to rank {dest} (tag {tag})",
               lambda: start_send(comm.mpi, array, dest, tag, signed=debug_enabled()),
               collective=False, array=array)


def _recv_now(comm, like, source, tag, call):
    return comm.issue(f"{call} from rank {source} (tag {tag})",
                      lambda: start_recv(comm.mpi, like.shape, like.dtype, is_device(like.data),
                                         source, tag, call, signed=debug_enabled()),
                      collective=False, array=like.data)


def mpi_send(x, dest, tag=0, comm=None):
    """Send ``x`` to rank ``dest`` (non-blocking); return ``x`` for further local use.

    The returned value is distributed (only the sending ranks hold it as their own).

    Notes
    -----
    Reverse rule (the adjoint of a send is a receive): the cotangent of what ``dest``
    received comes back and is added to the local cotangent of the returned value.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> y = gpumpiad.mpi_send(np.ones(2), dest=gpumpiad.mpi_rank())
    >>> z = gpumpiad.mpi_recv(np.ones(2), source=gpumpiad.mpi_rank())
    >>> z.numpy().tolist()
    [1.0, 1.0]
    """
    comm = resolve(comm)
    dest = check_root(dest, comm, "dest")
    tag = _check_tag(tag, comm)
    given, x = x, as_tensor(x, comm)
    _post_send(comm, x.data, dest, tag, "mpi_send")
    back_tag = _reverse_tag(comm, "send", dest, tag)
    # Distributed even for a serial x: the returned value's cotangent is this rank's own, so it
    # joins the received one as a share (a serial result would count its total once per rank).
    out = Tensor(passed_on(x, given), DISTRIBUTED, comm)

    def vjp(gs):
        return [Deferred(_recv_now(comm, x, dest, back_tag, "mpi_send (reverse: recv)"),
                         plus=gs[0])]

    record("mpi_send", vjp, [x], [out], local=[True], takes_none=True)
    return out


def mpi_recv(like, source, tag=0, comm=None):
    """Receive from rank ``source`` an array shaped like ``like`` (its values are not used).

    The result is distributed; its data arrives asynchronously and is waited for when read.

    Notes
    -----
    Reverse rule (the adjoint of a receive is a send): the result's cotangent is sent back to
    ``source``; ``like`` gets no cotangent.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> r, P = gpumpiad.mpi_rank(), gpumpiad.mpi_size()
    >>> x = gpumpiad.tensor(np.full(2, float(r)), distributed=True)
    >>> _ = gpumpiad.mpi_send(x, dest=(r + 1) % P)          # every rank sends before receiving
    >>> gpumpiad.mpi_recv(x, source=(r - 1) % P).numpy().tolist() == [float((r - 1) % P)] * 2
    True
    """
    comm = resolve(comm)
    source = check_root(source, comm, "source")
    tag = _check_tag(tag, comm)
    like = as_tensor(like, comm)
    out = pending_tensor(_recv_now(comm, like, source, tag, "mpi_recv"), DISTRIBUTED, comm)
    back_tag = _reverse_tag(comm, "recv", source, tag)

    def vjp(gs):
        _post_send(comm, gs[0], source, back_tag, "mpi_recv (reverse: send)")
        return [None]

    record("mpi_recv", vjp, [like], [out], eager=True)
    return out


def mpi_sendrecv(x, dest, source, tag=0, comm=None):
    """Rank ``source`` sends its ``x`` to rank ``dest``, whose result is what it received;
    every other rank's result is its own ``x`` (a send on ``source``, a receive on ``dest``).

    Equivalent to ``mpi_send`` on ``source`` and ``mpi_recv`` on ``dest``. Every rank calls it
    with the same ``dest`` and ``source`` (one message that all ranks name alike); the result is
    distributed on every rank (also when ``dest == source``, a copy-free identity). For
    ``MPI_Sendrecv``'s form, where each rank names its own peers (ring shifts, pairwise swaps),
    use :func:`mpi_exchange`. Debug mode checks that every rank passed the same ``dest`` and
    ``source``.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> r = gpumpiad.mpi_rank()
    >>> a = gpumpiad.mpi_sendrecv(gpumpiad.tensor(np.ones(2)) * r, 0, gpumpiad.mpi_size() - 1)
    >>> a.numpy().tolist() == ([gpumpiad.mpi_size() - 1.0] * 2 if r == 0 else [float(r)] * 2)
    True
    """
    comm = resolve(comm)
    dest = check_root(dest, comm, "dest")
    source = check_root(source, comm, "source")
    tag = _check_tag(tag, comm)
    given, x = x, as_tensor(x, comm)
    try:
        comm.agree("mpi_sendrecv", f"dest={dest}, source={source}, tag={tag}")
    except CommunicationMismatch as exc:
        raise CommunicationMismatch(f"{exc}. mpi_sendrecv moves one message that every rank "
                                    "names alike; for MPI_Sendrecv's form, each rank naming "
                                    "its own peers, use mpi_exchange") from None
    # One node on every rank, result distributed everywhere, x in a per-rank position
    # everywhere: ranks then agree on the reverse allreduce of a serial x's shares (a send on
    # one rank and a receive on another would disagree and mix the reverse allreduces).
    back_tag = None
    if comm.rank == dest != source:
        out = pending_tensor(_recv_now(comm, x, source, tag, "mpi_sendrecv (recv)"),
                             DISTRIBUTED, comm)
        back_tag = _reverse_tag(comm, "recv", source, tag)
    else:
        if comm.rank == source != dest:
            _post_send(comm, x.data, dest, tag, "mpi_sendrecv (send)")
            back_tag = _reverse_tag(comm, "send", dest, tag)
        out = Tensor(passed_on(x, given), DISTRIBUTED, comm)

    def vjp(gs):
        g = gs[0]
        if dest == source:
            return [g]
        if comm.rank == source:
            return [Deferred(_recv_now(comm, x, dest, back_tag,
                                       "mpi_sendrecv (reverse: recv)"), plus=g)]
        if comm.rank == dest:
            if g is None:
                g = zeros_like(x.data)
            _post_send(comm, g, source, back_tag, "mpi_sendrecv (reverse: send)")
            return [None]  # dest's own x went nowhere
        return [g]

    record("mpi_sendrecv", vjp, [x], [out], local=[True], eager=comm.rank == dest != source,
           takes_none=True)
    return out


def mpi_exchange(x, dest, source, tag=0, comm=None):
    """Send ``x`` to rank ``dest`` and receive, from rank ``source``, an array shaped like
    ``x``: ``MPI_Sendrecv``, where each rank names its own peers.

    A ring shift is ``mpi_exchange(x, dest=(r + 1) % P, source=(r - 1) % P)``, a pairwise swap
    ``mpi_exchange(x, dest=partner, source=partner)``. ``dest=None`` sends nothing and
    ``source=None`` receives nothing (the result is then zeros), as at the open ends of a
    non-periodic shift. Every message must be matched: the rank named as ``dest`` must name
    this rank as its ``source``.

    Parameters
    ----------
    x : Tensor or array_like
        What this rank sends; the received message must have its shape and dtype.
    dest, source : int or None
        The rank to send to and the rank to receive from.
    tag : int
    comm : gpumpiad.Comm, optional

    Returns
    -------
    Tensor
        Distributed: what ``source`` sent.

    Notes
    -----
    Reverse rule (the adjoint of an exchange is the exchange reversed): the result's cotangent
    goes back to ``source``, and the cotangent ``dest`` sends back is ``x``'s cotangent.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> r, P = gpumpiad.mpi_rank(), gpumpiad.mpi_size()
    >>> x = gpumpiad.tensor(np.full(2, float(r)), distributed=True)
    >>> y = gpumpiad.mpi_exchange(x, dest=(r + 1) % P, source=(r - 1) % P)
    >>> y.numpy().tolist() == [float((r - 1) % P)] * 2
    True
    """
    comm = resolve(comm)
    dest = None if dest is None else check_root(dest, comm, "dest")
    source = None if source is None else check_root(source, comm, "source")
    tag = _check_tag(tag, comm)
    x = as_tensor(x, comm)
    if dest is not None:
        _post_send(comm, x.data, dest, tag, "mpi_exchange (send)")
        send_back = _reverse_tag(comm, "send", dest, tag)
    if source is not None:
        out = pending_tensor(_recv_now(comm, x, source, tag, "mpi_exchange (recv)"),
                             DISTRIBUTED, comm)
        recv_back = _reverse_tag(comm, "recv", source, tag)
    else:
        out = Tensor(zeros_like(x.data), DISTRIBUTED, comm)

    def vjp(gs):
        if source is not None:
            g = gs[0] if gs[0] is not None else zeros_like(x.data)
            _post_send(comm, g, source, recv_back, "mpi_exchange (reverse: send)")
        if dest is None:
            return [None]
        return [Deferred(_recv_now(comm, x, dest, send_back, "mpi_exchange (reverse: recv)"))]

    # Eager: the cotangent goes back as soon as it is complete, whatever this rank's reverse
    # order, so that a ring of exchanges cannot wait on itself.
    record("mpi_exchange", vjp, [x], [out], local=[True], eager=True, takes_none=True)
    return out
