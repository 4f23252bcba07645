"""``mpi_reduce_scatter``: sum over ranks, then each rank keeps its block of rows."""
from __future__ import annotations

from mpi4py import MPI

from ..tensor import DISTRIBUTED
from ..transport import start_allgatherv, start_reduce_scatter
from ._record import as_tensor, check_rows, pending_tensor, record, resolve, row_counts


def mpi_reduce_scatter(x, rows=None, comm=None):
    """Sum ``x`` over ranks and give rank p rows ``rows[p]`` of the sum.

    Parameters
    ----------
    x : Tensor or array_like
        Same shape on every rank.
    rows : list of int, optional
        Rows per rank (default: an even split, first blocks one longer).

    Notes
    -----
    Reverse rule (the adjoint of a reduce-scatter is an allgather): ``x̄_p`` is the
    concatenation of every rank's block cotangent.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> n = gpumpiad.mpi_size()
    >>> y = gpumpiad.mpi_reduce_scatter(np.ones(n))
    >>> float(y.item()) == n
    True
    """
    comm = resolve(comm)
    x = as_tensor(x, comm)
    check_rows(x, "mpi_reduce_scatter", comm)
    rows, problem = row_counts(rows, x.shape[0], comm, "mpi_reduce_scatter")
    if problem:
        raise ValueError(f"rank {comm.rank}: {problem}")
    data = x.data
    pending = comm.issue("mpi_reduce_scatter",
                         lambda: start_reduce_scatter(comm.mpi, data, rows, MPI.SUM,
                                                      "mpi_reduce_scatter"),
                         array=data)
    out = pending_tensor(pending, DISTRIBUTED, comm)

    def vjp(gs):
        g = gs[0]
        return [comm.issue("mpi_reduce_scatter (reverse: allgather)",
                           lambda: start_allgatherv(comm.mpi, g, rows, tuple(data.shape[1:])),
                           array=g, same_shape=False).wait()]

    record("mpi_reduce_scatter", vjp, [x], [out], local=[True])
    return out
