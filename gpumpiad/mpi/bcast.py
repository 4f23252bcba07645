"""``mpi_bcast``: broadcast from a root rank; the result is serial."""
from __future__ import annotations

from ..tensor import SERIAL
from ..transport import start_bcast
from ._record import as_tensor, check_root, pending_tensor, record, resolve


def mpi_bcast(x, root=0, comm=None):
    """Broadcast the root's ``x`` to every rank; the result is serial.

    Parameters
    ----------
    x : Tensor or array_like
        On the root, the value to send; elsewhere it gives the shape and dtype.
    root : int
    comm : gpumpiad.Comm, optional

    Notes
    -----
    Reverse rule (the adjoint of a broadcast is a reduction to the root): the result's
    cotangent is the serial total ``ȳ``, in which the tape has already summed every rank's
    share. A distributed ``x`` receives ``ȳ`` on the root and zero elsewhere; a serial ``x``
    receives ``ȳ`` on every rank.

    Examples
    --------
    >>> import gpumpiad
    >>> y = gpumpiad.mpi_bcast(gpumpiad.tensor([2.0]) * gpumpiad.mpi_rank(), root=0)
    >>> float(y.item())
    0.0
    """
    comm = resolve(comm)
    root = check_root(root, comm, "root")
    x = as_tensor(x, comm)
    data = x.data
    pending = comm.issue("mpi_bcast", lambda: start_bcast(comm.mpi, data, root, "mpi_bcast"),
                         root=root, array=data)
    out = pending_tensor(pending, SERIAL, comm)

    # A serial x of a larger communicator (e.g. the world's, broadcast on a split) is one value
    # feeding every group: each group's root contributes ȳ as a share, which the tape sums.
    cross = not x.distributed and x.comm.mpi != comm.mpi

    def vjp(gs):
        if (x.distributed or cross) and comm.rank != root:
            return [None]  # structurally zero: nothing upstream of x runs for it
        return [gs[0]]

    record("mpi_bcast", vjp, [x], [out], local=[cross], communicates=False)
    return out
