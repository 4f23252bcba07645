"""MPI as the stream model sees it: every buffer gpumpiad hands to MPI is host access to that
memory when the call is posted (a read for what MPI sends, a write for what it receives into),
so device or pinned memory whose last device access is not yet ordered before the host (by a
stream or event synchronisation) is a hazard, on the staged path (pinned buffers) and the
CUDA-aware one (device arrays)."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from cupy._model import MODEL


def _arrays(spec):
    if isinstance(spec, np.ndarray):
        return [spec]
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], np.ndarray):
        return [spec[0]]
    return []


def _reads(name, spec):
    MODEL.host_op(f"MPI {name}", reads=_arrays(spec))


def _writes(name, spec):
    MODEL.host_op(f"MPI {name}", writes=_arrays(spec))


class _Checked:
    """Overrides of the calls gpumpiad's transport and halo exchange make."""

    def Isend(self, buf, dest, tag=0):
        _reads("Isend", buf)
        return super().Isend(buf, dest, tag)

    def Irecv(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
        _writes("Irecv", buf)
        return super().Irecv(buf, source, tag)

    def Iallreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        if sendbuf is MPI.IN_PLACE:
            MODEL.host_op("MPI Iallreduce", reads=_arrays(recvbuf), writes=_arrays(recvbuf))
        else:
            _reads("Iallreduce", sendbuf)
            _writes("Iallreduce", recvbuf)
        return super().Iallreduce(sendbuf, recvbuf, op)

    def Ibcast(self, buf, root=0):
        (_reads if self.Get_rank() == root else _writes)("Ibcast", buf)
        return super().Ibcast(buf, root)

    def Ireduce(self, sendbuf, recvbuf, op=MPI.SUM, root=0):
        if sendbuf is MPI.IN_PLACE:
            MODEL.host_op("MPI Ireduce", reads=_arrays(recvbuf), writes=_arrays(recvbuf))
        else:
            _reads("Ireduce", sendbuf)
            _writes("Ireduce", recvbuf)
        return super().Ireduce(sendbuf, recvbuf, op, root)

    def Igatherv(self, sendbuf, recvbuf, root=0):
        _reads("Igatherv", sendbuf)
        _writes("Igatherv", recvbuf)
        return super().Igatherv(sendbuf, recvbuf, root)

    def Iallgatherv(self, sendbuf, recvbuf):
        _reads("Iallgatherv", sendbuf)
        _writes("Iallgatherv", recvbuf)
        return super().Iallgatherv(sendbuf, recvbuf)

    def Iscatterv(self, sendbuf, recvbuf, root=0):
        _reads("Iscatterv", sendbuf)
        _writes("Iscatterv", recvbuf)
        return super().Iscatterv(sendbuf, recvbuf, root)

    def Ialltoallv(self, sendbuf, recvbuf):
        _reads("Ialltoallv", sendbuf)
        _writes("Ialltoallv", recvbuf)
        return super().Ialltoallv(sendbuf, recvbuf)

    def Send_init(self, buf, dest, tag=0):
        _reads("Send_init", buf)
        return super().Send_init(buf, dest, tag)

    def Recv_init(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
        _writes("Recv_init", buf)
        return super().Recv_init(buf, source, tag)


class CheckedIntracomm(_Checked, MPI.Intracomm):
    pass


class CheckedCartcomm(_Checked, MPI.Cartcomm):
    pass


def checked(mpi_comm):
    if isinstance(mpi_comm, _Checked):
        return mpi_comm
    kind = CheckedCartcomm if isinstance(mpi_comm, MPI.Cartcomm) else CheckedIntracomm
    return kind(mpi_comm)


def install():
    """Route every communicator gpumpiad creates (and the world it made at import) through the
    checks above."""
    import gpumpiad
    from gpumpiad.comm import Comm

    original = Comm.__init__

    def __init__(self, mpi_comm=None, owned=False):
        original(self, mpi_comm, owned)
        self.mpi = checked(self.mpi)

    Comm.__init__ = __init__
    world = gpumpiad.comm.world()
    world.mpi = checked(world.mpi)
