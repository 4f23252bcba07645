"""``mpi_scatter``: the root's rows split into blocks, one per rank."""
from __future__ import annotations

from ..tensor import DISTRIBUTED, Tensor
from ..transport import is_device, start_gatherv, start_scatterv
from ._record import (as_tensor, check_root, exchange_pieces, pending_tensor, problem_of,
                      record, resolve, row_counts)


def mpi_scatter(x, root=0, rows=None, comm=None):
    """Split the root's ``x`` along axis 0 and send block p to rank p.

    Parameters
    ----------
    x : Tensor or array_like
        The data on the root; ignored elsewhere (may be ``None`` there).
    root : int
    rows : list of int, optional
        Rows per rank (default: an even split, first blocks one longer); read on the root,
        like ``x``: every rank gets its block of the root's split.
    comm : gpumpiad.Comm, optional

    Returns
    -------
    Tensor
        Distributed: this rank's block.

    Notes
    -----
    Reverse rule (the adjoint of a scatter is a gather): the blocks' cotangents are gathered
    to the root, which receives the whole cotangent; a non-root ``x`` receives zeros.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> n = gpumpiad.mpi_size()
    >>> gpumpiad.mpi_scatter(np.arange(2.0 * n), root=0).shape
    (2,)
    """
    comm = resolve(comm)
    error = problem_of(lambda: check_root(root, comm, "root"))
    root = check_root(root, comm, "root") if error is None else None
    is_root = comm.rank == root
    x = as_tensor(x, comm) if (x is not None or is_root) else None
    # Only the root can check x and rows; its verdict travels with the metadata so that every
    # rank raises (a root-only error would leave the others waiting in the scatter).
    if is_root:
        if x.ndim == 0:
            error = (f"rank {comm.rank}: mpi_scatter needs an array with at least one axis on "
                     "the root, got a scalar")
        else:
            rows, error = row_counts(rows, x.shape[0], comm, "mpi_scatter")
            error = error and f"rank {comm.rank}: {error} (checked on root {root})"
    data = x.data if x is not None else None
    box = {}

    def start():
        meta = ((list(rows), tuple(data.shape[1:]), data.dtype.str, is_device(data))
                if is_root and error is None else None)
        views = exchange_pieces(comm, "mpi_scatter", meta, error, root)
        box["rows"], box["trailing"], dtype, device = views[root]
        return start_scatterv(comm.mpi, data, box["rows"], root, box["trailing"], dtype,
                              device)

    pending = comm.issue("mpi_scatter", start, root=root)
    out = pending_tensor(pending, DISTRIBUTED, comm)

    def vjp(gs):
        g = gs[0]
        whole = comm.issue("mpi_scatter (reverse: gather)",
                           lambda: start_gatherv(comm.mpi, g, box["rows"], root,
                                                 box["trailing"]), root=root).wait()
        if not isinstance(x, Tensor):
            return [None]
        return [whole.reshape(x.shape) if is_root else None]

    record("mpi_scatter", vjp, [x], [out], local=[True])
    return out
