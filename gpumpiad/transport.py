"""Moving array data through MPI: NumPy buffers directly, CuPy buffers directly when the MPI
library is CUDA-aware, otherwise staged through host memory.

Environment
-----------
GPUMPIAD_CUDA_AWARE : ``0`` | ``1``
    Overrides the probe of the MPI library's CUDA support.
"""
from __future__ import annotations

import ctypes
import os

import numpy

from .backend import get_array_module, is_device_array, synchronize


def cuda_aware() -> bool:
    """Whether device buffers are handed to MPI directly (probe, or ``GPUMPIAD_CUDA_AWARE``)."""
    env = os.environ.get("GPUMPIAD_CUDA_AWARE")
    if env is not None:
        return env.strip() == "1"
    try:
        lib = ctypes.CDLL(None)
        probe = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    probe.restype = ctypes.c_int
    return bool(probe())


def allreduce(mpi_comm, array, op):
    """Blocking allreduce of a NumPy or CuPy array into a new array of the same kind."""
    if is_device_array(array) and not cuda_aware():
        host = numpy.ascontiguousarray(array.get())
        out = numpy.empty_like(host)
        mpi_comm.Allreduce(host, out, op=op)
        return get_array_module(array).asarray(out)
    xp = get_array_module(array)
    send = xp.ascontiguousarray(array)
    out = xp.empty_like(send)
    synchronize(send)
    mpi_comm.Allreduce(send, out, op=op)
    return out


def bcast(mpi_comm, array, root):
    """Blocking broadcast of the root's array; returns a new array on every rank."""
    xp = get_array_module(array)
    if is_device_array(array) and not cuda_aware():
        host = numpy.ascontiguousarray(array.get())
        mpi_comm.Bcast(host, root=root)
        return xp.asarray(host)
    buf = xp.array(array, copy=True, order="C")
    synchronize(buf)
    mpi_comm.Bcast(buf, root=root)
    return buf
