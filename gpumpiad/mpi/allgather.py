"""``mpi_allgather``: row blocks of every rank, concatenated on every rank."""
from __future__ import annotations

from ..tensor import SERIAL
from ..transport import start_allgatherv
from ._record import (agreed_rows, as_tensor, check_rows, exchange_pieces, offsets,
                      pending_tensor, piece, problem_of, record, resolve)


def mpi_allgather(x, comm=None):
    """Concatenate every rank's ``x`` along axis 0 on every rank; the result is serial.

    Pieces may differ in length; the trailing shape and dtype must agree.

    Notes
    -----
    Reverse rule (the adjoint of an allgather is a reduce-scatter): each rank takes its own
    rows of the result's cotangent. That cotangent is the serial total, in which the tape has
    already summed (reduced) every rank's share, so what remains is the scatter: a slice.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> gpumpiad.mpi_allgather(np.ones((1, 2))).shape == (gpumpiad.mpi_size(), 2)
    True
    """
    comm = resolve(comm)
    x = as_tensor(x, comm)
    problem = problem_of(lambda: check_rows(x, "mpi_allgather", comm))
    data = x.data
    trailing = tuple(data.shape[1:])
    box = {}

    def start():
        pieces = exchange_pieces(comm, "mpi_allgather", None if problem else piece(data),
                                 problem)
        box["rows"] = agreed_rows(pieces, comm, "mpi_allgather")
        return start_allgatherv(comm.mpi, data, box["rows"], trailing)

    pending = comm.issue("mpi_allgather", start, array=data, same_shape=False)
    out = pending_tensor(pending, SERIAL, comm)

    def vjp(gs):
        bounds = offsets(box["rows"])
        return [gs[0][bounds[comm.rank]:bounds[comm.rank + 1]]]

    record("mpi_allgather", vjp, [x], [out], local=[True], communicates=False)
    return out
