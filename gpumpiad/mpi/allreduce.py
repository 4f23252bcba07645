"""``mpi_sum``: allreduce-sum across ranks."""
from __future__ import annotations

from ..tensor import SERIAL, Tensor
from ._record import as_tensor, record, resolve


def mpi_sum(x, comm=None):
    """Sum ``x`` over all ranks of ``comm``; the result is serial (the same on every rank).

    Parameters
    ----------
    x : Tensor or array_like
        This rank's term. A serial ``x`` contributes on every rank, so the result is ``P * x``.
    comm : gpumpiad.Comm, optional
        Default: the world.

    Notes
    -----
    Reverse rule: the serial cotangent ``s̄`` passes unchanged to every rank's input. For a
    serial input each rank's ``s̄`` is only its share, so the tape allreduces it: ``x̄ = P s̄``.

    Examples
    --------
    >>> import gpumpiad
    >>> r = gpumpiad.mpi_rank()
    >>> s = gpumpiad.mpi_sum(gpumpiad.tensor([1.0]) * (r + 1))
    >>> int(s.item()) == gpumpiad.mpi_size() * (gpumpiad.mpi_size() + 1) // 2
    True
    """
    comm = resolve(comm)
    x = as_tensor(x, comm)
    out = Tensor(comm.allreduce_sum(x.data), SERIAL, comm)
    record("mpi_sum", lambda gs: [gs[0]], [x], [out], local=[True], communicates=False)
    return out
