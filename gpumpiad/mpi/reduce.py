"""``mpi_reduce``: sum onto a root rank."""
from __future__ import annotations

from mpi4py import MPI

from ..tensor import DISTRIBUTED
from ..transport import start_bcast, start_reduce
from ._record import as_tensor, check_root, pending_tensor, record, resolve


def mpi_reduce(x, root=0, comm=None):
    """Sum ``x`` over the ranks of ``comm`` onto ``root``.

    The root's result is the sum; every other rank's result is zeros of the same shape (never
    uninitialised memory). The result is distributed (it differs between root and the rest).

    Notes
    -----
    Reverse rule (the adjoint of a reduction to the root is a broadcast from it):
    ``x̄_p = bcast(ȳ_root)`` on every rank p.

    Examples
    --------
    >>> import gpumpiad
    >>> y = gpumpiad.mpi_reduce(gpumpiad.tensor([1.0]), root=0)
    >>> float(y.item()) == (gpumpiad.mpi_size() if gpumpiad.mpi_rank() == 0 else 0.0)
    True
    """
    comm = resolve(comm)
    root = check_root(root, comm, "root")
    x = as_tensor(x, comm)
    data = x.data
    pending = comm.issue("mpi_reduce",
                         lambda: start_reduce(comm.mpi, data, root, MPI.SUM, "mpi_reduce"),
                         root=root, array=data)
    out = pending_tensor(pending, DISTRIBUTED, comm)

    def vjp(gs):
        g = gs[0]
        return [comm.issue("mpi_reduce (reverse: bcast)",
                           lambda: start_bcast(comm.mpi, g, root, "mpi_reduce (reverse: bcast)"),
                           root=root, array=g).wait()]

    record("mpi_reduce", vjp, [x], [out], local=[True])
    return out
