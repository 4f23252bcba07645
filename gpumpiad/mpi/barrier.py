"""``mpi_barrier``: wait for every rank."""
from __future__ import annotations

from ._record import resolve


def mpi_barrier(comm=None):
    """Wait until every rank of ``comm`` reaches this call (a link of the communicator's chain;
    nothing to differentiate).

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.mpi_barrier()
    """
    comm = resolve(comm)
    comm.issue("mpi_barrier", lambda: ([comm.mpi.Ibarrier()], None)).wait()
