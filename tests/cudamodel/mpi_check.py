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

    def Ibcast(self, buf, root=0):
        (_reads if self.Get_rank() == root else _writes)("Ibcast", buf)
        return super().Ibcast(buf, root)

    def Send_init(self, buf, dest, tag=0):
        _reads("Send_init", buf)
        return super().Send_init(buf, dest, tag)

    def Recv_init(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
        _writes("Recv_init", buf)
        return super().Recv_init(buf, source, tag)


def _send_and_receive(name):
    """An override of a call whose first two arguments are what MPI sends and receives into
    (``IN_PLACE``: the second is both)."""
    def call(self, sendbuf, recvbuf, *args, **kwargs):
        if sendbuf is MPI.IN_PLACE:
            MODEL.host_op(f"MPI {name}", reads=_arrays(recvbuf), writes=_arrays(recvbuf))
        else:
            _reads(name, sendbuf)
            _writes(name, recvbuf)
        return getattr(super(_Checked, self), name)(sendbuf, recvbuf, *args, **kwargs)
    call.__name__ = name
    return call


for _name in ("Iallreduce", "Ireduce", "Igatherv", "Iallgatherv", "Iscatterv", "Ialltoallv"):
    setattr(_Checked, _name, _send_and_receive(_name))


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
