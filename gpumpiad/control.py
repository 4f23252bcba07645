"""Collectives of the control path, bounded by the watchdog.

Argument checks, gradient checks, the optimiser's messages and checkpoint agreement exchange
small Python objects between ranks. mpi4py's object collectives (``comm.allgather(obj)``) block
inside MPI, where the watchdog cannot reach them: a rank that never arrives (it took another
branch, or failed without aborting the job) would leave the others waiting forever even with
``GPUMPIAD_TIMEOUT`` set. Here each is a pickle plus two non-blocking collectives (the sizes,
then the bytes) completed by :func:`gpumpiad.debug.wait`, so a stuck one raises
:class:`~gpumpiad.debug.CommunicationTimeout` naming ``call``. Every rank takes the same path
whatever its settings, so ranks never disagree about how many collectives a call issues.

All functions take an mpi4py communicator and are collective over it.

Examples
--------
>>> from mpi4py import MPI
>>> from gpumpiad import control
>>> control.allgather(MPI.COMM_SELF, {"steps": 10}, "an example")
[{'steps': 10}]
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
    sizes = np.empty(comm.size, _COUNT)
    wait(comm.Iallgather(np.array([data.size], _COUNT), sizes), None, call)
    out = np.empty(int(sizes.sum()), np.uint8)
    wait(comm.Iallgatherv(data, [out, _layout(sizes), MPI.BYTE]), None, call)
    return _loads(out, sizes)


def bcast(comm, obj, root, call):
    """``root``'s ``obj`` on every rank (a copy, on ``root`` too)."""
    data = _dumps(obj) if comm.rank == root else None
    size = np.array([0 if data is None else data.size], _COUNT)
    wait(comm.Ibcast(size, root=root), None, call)
    if data is None:
        data = np.empty(int(size[0]), np.uint8)
    wait(comm.Ibcast(data, root=root), None, call)
    return pickle.loads(data)


def gather(comm, obj, root, call):
    """Every rank's ``obj`` as a list on ``root``; ``None`` elsewhere."""
    data = _dumps(obj)
    mine = comm.rank == root
    sizes = np.empty(comm.size, _COUNT) if mine else None
    wait(comm.Igather(np.array([data.size], _COUNT), sizes, root=root), None, call)
    out = np.empty(int(sizes.sum()), np.uint8) if mine else None
    wait(comm.Igatherv(data, [out, _layout(sizes), MPI.BYTE] if mine else None, root=root),
         None, call)
    return _loads(out, sizes) if mine else None


def scatter(comm, objs, root, call):
    """This rank's item of ``root``'s list ``objs`` (one per rank; ignored elsewhere)."""
    mine = comm.rank == root
    pieces = [_dumps(o) for o in objs] if mine else None
    sizes = np.array([p.size for p in pieces], _COUNT) if mine else None
    size = np.empty(1, _COUNT)
    wait(comm.Iscatter(sizes, size, root=root), None, call)
    send = [np.concatenate(pieces), _layout(sizes), MPI.BYTE] if mine else None
    data = np.empty(int(size[0]), np.uint8)
    wait(comm.Iscatterv(send, data, root=root), None, call)
    return pickle.loads(data)


def allreduce(comm, value, op, call):
    """``value`` (a float) reduced over the ranks with the MPI ``op``, as a float."""
    out = np.empty(1)
    wait(comm.Iallreduce(np.array([float(value)]), out, op=op), None, call)
    return float(out[0])


def barrier(comm, call):
    """Every rank has arrived."""
    wait(comm.Ibarrier(), None, call)


__all__ = ["allgather", "bcast", "gather", "scatter", "allreduce", "barrier"]
