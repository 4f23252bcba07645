"""``mpi_bcast``: broadcast from a root rank."""
from __future__ import annotations

from ..backend import get_array_module
from ..tensor import SERIAL, Tensor
from ..transport import bcast
from ._record import as_tensor, record, resolve


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
    Reverse rule: the result's cotangent is the serial total ``ȳ`` (the tape has already summed
    every rank's share, i.e. reduced them). A distributed ``x`` receives ``ȳ`` on the root and
    zero elsewhere; a serial ``x`` receives ``ȳ`` on every rank.

    Examples
    --------
    >>> import gpumpiad
    >>> y = gpumpiad.mpi_bcast(gpumpiad.tensor([2.0]) * gpumpiad.mpi_rank(), root=0)
    >>> float(y.item())
    0.0
    """
    comm = resolve(comm)
    x = as_tensor(x, comm)
    out = Tensor(bcast(comm.mpi, x.data, root), SERIAL, comm)

    def vjp(gs):
        g = gs[0]
        if x.distributed and comm.rank != root:
            return [get_array_module(g).zeros_like(g)]
        return [g]

    record("mpi_bcast", vjp, [x], [out], communicates=False)
    return out
