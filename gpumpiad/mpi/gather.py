"""``mpi_gather``: row blocks of every rank, concatenated on a root rank."""
from __future__ import annotations

from ..tensor import DISTRIBUTED
from ..transport import is_device, start_gatherv, start_scatterv
from ._record import (agreed_rows, as_tensor, check_root, check_rows, exchange_pieces,
                      pending_tensor, piece, problem_of, record, resolve)


def mpi_gather(x, root=0, comm=None):
    """Concatenate every rank's ``x`` along axis 0 on ``root`` (pieces may differ in length).

    Parameters
    ----------
    x : Tensor or array_like
        This rank's rows; the trailing shape and dtype must agree across ranks.
    root : int
    comm : gpumpiad.Comm, optional

    Returns
    -------
    Tensor
        Distributed: the concatenation on the root, an empty ``(0, ...)`` array elsewhere.

    Notes
    -----
    Reverse rule (the adjoint of a gather is a scatter): the root's cotangent is split into the
    ranks' row blocks and scattered back.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> g = gpumpiad.mpi_gather(np.ones((2, 3)), root=0)
    >>> g.shape[0] == (2 * gpumpiad.mpi_size() if gpumpiad.mpi_rank() == 0 else 0)
    True
    """
    comm = resolve(comm)
    x = as_tensor(x, comm)
    problem = problem_of(lambda: check_root(root, comm, "root"),
                         lambda: check_rows(x, "mpi_gather", comm))
    root = check_root(root, comm, "root") if problem is None else None
    data = x.data
    trailing = tuple(data.shape[1:])
    box = {}

    def start():
        pieces = exchange_pieces(comm, "mpi_gather", None if problem else piece(data),
                                 problem, root)
        box["rows"] = agreed_rows(pieces, comm, "mpi_gather")
        return start_gatherv(comm.mpi, data, box["rows"], root, trailing)

    pending = comm.issue("mpi_gather", start, root=root, array=data, same_shape=False)
    out = pending_tensor(pending, DISTRIBUTED, comm)

    def vjp(gs):
        g = gs[0]
        return [comm.issue("mpi_gather (reverse: scatter)",
                           lambda: start_scatterv(comm.mpi, g, box["rows"], root, trailing,
                                                  g.dtype, is_device(x.data)),
                           root=root).wait()]

    record("mpi_gather", vjp, [x], [out], local=[True])
    return out
