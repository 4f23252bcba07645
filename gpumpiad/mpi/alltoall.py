"""``mpi_alltoall``: every rank sends a block of rows to every rank."""
from __future__ import annotations

from ..tensor import DISTRIBUTED
from ..transport import start_alltoallv
from ._record import (agreed_rows, as_tensor, check_rows, exchange_pieces, pending_tensor,
                      piece, problem_of, record, resolve, row_counts)


def mpi_alltoall(x, rows=None, comm=None):
    """Send rows ``rows[q]`` of ``x`` (in order) to rank q; receive and concatenate, in rank
    order, the blocks every rank sent here.

    Parameters
    ----------
    x : Tensor or array_like
    rows : list of int, optional
        Rows sent to each rank (default: an even split, first blocks one longer).

    Notes
    -----
    Reverse rule (the adjoint of an all-to-all is the all-to-all back): the cotangent blocks
    travel back to the ranks they came from.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> n = gpumpiad.mpi_size()
    >>> y = gpumpiad.mpi_alltoall(np.full(n, float(gpumpiad.mpi_rank())))
    >>> y.numpy().tolist() == [float(q) for q in range(n)]
    True
    """
    comm = resolve(comm)
    x = as_tensor(x, comm)
    problem = problem_of(lambda: check_rows(x, "mpi_alltoall", comm))
    send_rows = None
    if problem is None:
        send_rows, problem = row_counts(rows, x.shape[0], comm, "mpi_alltoall")
        if problem is not None:
            problem = f"rank {comm.rank}: {problem}"
    data = x.data
    box = {}

    def start():
        # Every rank hears from every other: a rank whose trailing shape or dtype differs
        # from anyone's is seen by every rank, so they all raise.
        mine = None if problem else (send_rows,) + piece(data)[1:]
        pieces = exchange_pieces(comm, "mpi_alltoall", mine, problem)
        box["recv"] = agreed_rows([(sent[comm.rank], trailing, dtype)
                                   for sent, trailing, dtype in pieces], comm, "mpi_alltoall")
        return start_alltoallv(comm.mpi, data, send_rows, box["recv"])

    pending = comm.issue("mpi_alltoall", start, array=data, same_shape=False)
    out = pending_tensor(pending, DISTRIBUTED, comm)

    def vjp(gs):
        g = gs[0]
        return [comm.issue("mpi_alltoall (reverse)",
                           lambda: start_alltoallv(comm.mpi, g, box["recv"], send_rows),
                           array=g, same_shape=False).wait()]

    record("mpi_alltoall", vjp, [x], [out], local=[True])
    return out
