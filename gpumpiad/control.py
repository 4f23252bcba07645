"""Collectives of the control path, bounded by the watchdog.

Argument checks, gradient checks, communicator creation, the optimiser's messages and
checkpoint agreement exchange small Python objects between ranks. mpi4py's object collectives
(``comm.allgather(obj)``) block inside MPI, where the watchdog cannot reach them: a rank that
never arrives (it took another branch, or failed without aborting the job) would leave the
others waiting forever even with ``GPUMPIAD_TIMEOUT`` set. Here each is a pickle plus two
non-blocking collectives (the sizes, then the bytes) completed by :func:`gpumpiad.debug.wait`,
so a stuck one raises :class:`~gpumpiad.debug.CommunicationTimeout` naming ``call``. Every
rank takes the same path whatever its settings, so ranks never disagree about how many
collectives a call issues.

All functions take a :class:`gpumpiad.Comm` and are collective over it. Each holds the
communicator for its steps (:meth:`~gpumpiad.Comm.exclusive`): a primitive issued meanwhile by
another thread cannot slip between them, and debug mode checks each call like any collective
(the same call on every rank, from one thread at a time).

Examples
--------
>>> import gpumpiad
>>> from gpumpiad import control
>>> control.allgather(gpumpiad.Comm(), "ok", "an example") == ["ok"] * gpumpiad.mpi_size()
True
"""
from __future__ import annotations

import pickle

import numpy as np
from mpi4py import MPI

from .debug import wait

_COUNT = np.int64


def _dumps(obj):
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)


def _loads(data, sizes):
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    return [pickle.loads(data[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def _layout(sizes):
    """``(counts, displacements)`` for a v-collective of byte strings of ``sizes``."""
    counts = [int(s) for s in sizes]
    return counts, np.concatenate(([0], np.cumsum(counts[:-1]))).astype(int).tolist()


def allgather(comm, obj, call):
    """Every rank's ``obj``, as a list indexed by rank."""
    data = _dumps(obj)
    with comm.exclusive(call) as mpi:
        sizes = np.empty(comm.size, _COUNT)
        wait(mpi.Iallgather(np.array([data.size], _COUNT), sizes), comm, call)
        out = np.empty(int(sizes.sum()), np.uint8)
        wait(mpi.Iallgatherv(data, [out, _layout(sizes), MPI.BYTE]), comm, call)
    return _loads(out, sizes)


def allgather_floats(comm, values, call):
    """Every rank's ``values`` (floats, as many on every rank) as a ``(comm.size,
    len(values))`` table: one collective, no pickling (on one rank, no MPI call)."""
    mine = np.array(values, dtype=np.float64)
    with comm.exclusive(call) as mpi:
        if comm.size == 1:
            return mine.reshape(1, -1)
        table = np.empty((comm.size, mine.size))
        wait(mpi.Iallgather(mine, table), comm, call)
    return table


def allgather_ints(comm, call, values):
    """Every rank's ``values`` (ints, as many on every rank) as a ``(comm.size, len(values))``
    table: one collective, no pickling. Issued as the next link of ``comm``'s chain but not
    among the collectives debug mode checks, as debug mode's own argument check uses it."""
    mine = np.array(values, dtype=np.int64)
    table = np.empty((comm.size, mine.size), dtype=np.int64)
    comm.issue(call, lambda: ([comm.mpi.Iallgather(mine, table)], None),
               collective=False).wait()
    return table


def bcast(comm, obj, root, call):
    """``root``'s ``obj`` on every rank (a copy, on ``root`` too)."""
    data = _dumps(obj) if comm.rank == root else None
    with comm.exclusive(call) as mpi:
        size = np.array([0 if data is None else data.size], _COUNT)
        wait(mpi.Ibcast(size, root=root), comm, call)
        if data is None:
            data = np.empty(int(size[0]), np.uint8)
        wait(mpi.Ibcast(data, root=root), comm, call)
    return pickle.loads(data)


def allreduce(comm, value, op, call):
    """``value`` (a float) reduced over the ranks with the MPI ``op``, as a float."""
    out = np.empty(1)
    with comm.exclusive(call) as mpi:
        wait(mpi.Iallreduce(np.array([float(value)]), out, op=op), comm, call)
    return float(out[0])


def barrier(comm, call):
    """Every rank has arrived."""
    with comm.exclusive(call) as mpi:
        wait(mpi.Ibarrier(), comm, call)


__all__ = ["allgather", "allgather_floats", "allgather_ints", "bcast", "allreduce", "barrier"]
