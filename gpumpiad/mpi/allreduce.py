"""``mpi_allreduce`` / ``mpi_sum``: combine values across ranks; the result is serial."""
from __future__ import annotations

from mpi4py import MPI

from ..tensor import DISTRIBUTED, SERIAL
from ..transport import start_allgatherv, start_allreduce
from ._record import as_tensor, pending_tensor, record, resolve

SUM, MAX, MIN, PROD = MPI.SUM, MPI.MAX, MPI.MIN, MPI.PROD
_NAMES = ((SUM, "SUM"), (MAX, "MAX"), (MIN, "MIN"), (PROD, "PROD"))
_CALLS = {"SUM": "mpi_sum(SUM)", "MAX": "mpi_allreduce(MAX)", "MIN": "mpi_allreduce(MIN)",
          "PROD": "mpi_allreduce(PROD)"}


def mpi_allreduce(x, op=SUM, comm=None):
    """Combine ``x`` over all ranks of ``comm`` with ``op``; the result is serial.

    Parameters
    ----------
    x : Tensor or array_like
        This rank's term (same shape on every rank).
    op : gpumpiad.SUM, MAX, MIN or PROD
    comm : gpumpiad.Comm, optional
        Default: the world.

    Notes
    -----
    Reverse rules, with ``s̄`` the serial (total) cotangent of the result:

    - SUM: ``x̄_p = s̄`` on every rank (a serial ``x`` then totals ``P s̄`` via the tape).
    - MAX/MIN: ``x̄_p = s̄`` where rank p holds the extremum, else 0; ties go to the lowest rank
      holding it (one extra allreduce of rank ids in the reverse pass).
    - PROD: ``x̄_p = s̄ ∏_{q≠p} x_q`` (from an allgather of the terms, exact with zeros).

    Examples
    --------
    >>> import gpumpiad
    >>> m = gpumpiad.mpi_allreduce(gpumpiad.tensor([1.0]) * gpumpiad.mpi_rank(), op=gpumpiad.MAX)
    >>> int(m.item()) == gpumpiad.mpi_size() - 1
    True
    """
    comm = resolve(comm)
    if op is SUM:
        op_name = "SUM"
    else:
        for known, op_name in _NAMES:
            if op == known:
                break
        else:
            raise ValueError(f"rank {comm.rank}: op must be gpumpiad.SUM, MAX, MIN or PROD, "
                             f"got {op!r}")
    x = as_tensor(x, comm)
    name = "mpi_allreduce" if op != SUM else "mpi_sum"
    data = x.data
    kind = data.dtype.kind
    if kind == "b" or (kind == "c" and op in (MAX, MIN)):
        allowed = "int, float, complex" if op in (SUM, PROD) else "int, float"
        raise TypeError(f"rank {comm.rank}: {name}'s x must have a dtype that {op_name} is "
                        f"defined on ({allowed}), got {data.dtype}")
    mpi = comm.mpi
    pending = comm.issue(_CALLS[op_name], lambda: start_allreduce(mpi, data, op, _CALLS[op_name]),
                         array=data, layout=x.layout, serial_value=x.layout != DISTRIBUTED)
    out = pending_tensor(pending, SERIAL, comm)

    def vjp(gs):
        g = gs[0]
        if op == SUM:
            return [g]
        if op == PROD:
            return [g * _exclusive_product(comm, data)]
        return [g * _holds_extremum(comm, data, out.data)]

    record(name, vjp, [x], [out], local=_PER_RANK, communicates=op != SUM)
    return out


_PER_RANK = (True,)


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
    return mpi_allreduce(x, SUM, comm)


def _holds_extremum(comm, x, extremum):
    """1 where this rank is the lowest rank whose ``x`` equals the extremum, else 0."""
    from ..backend import get_array_module
    xp = get_array_module(x)
    mine = xp.where(x == extremum, comm.rank, comm.size).astype(xp.int32)
    call = "mpi_allreduce(MIN) of extremum owners"
    owner = comm.issue(call, lambda: start_allreduce(comm.mpi, mine, MIN, call),
                       array=mine).wait()
    return (owner == comm.rank).astype(x.dtype)


def _exclusive_product(comm, x):
    """``∏_{q≠p} x_q`` for this rank p."""
    from ..backend import get_array_module
    xp = get_array_module(x)
    flat = x.reshape(1, -1)
    every = comm.issue("mpi_allgather of PROD terms",
                       lambda: start_allgatherv(comm.mpi, flat, [1] * comm.size,
                                                (flat.shape[1],)), array=flat).wait()
    others = xp.concatenate([every[:comm.rank], every[comm.rank + 1:]])
    return others.prod(axis=0).reshape(x.shape)
