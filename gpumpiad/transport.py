"""Moving array data through MPI.

NumPy buffers go to MPI directly. CuPy buffers go directly too when the MPI library is
CUDA-aware (after synchronising the producing stream: MPI is not stream-aware); otherwise they
are staged through pinned host buffers with asynchronous copies on the comm stream.
Non-contiguous data is packed into a contiguous buffer first, never described to MPI with
derived datatypes.

Environment
-----------
GPUMPIAD_CUDA_AWARE : ``0`` | ``1``
    Overrides the probe of the MPI library's CUDA support (``MPIX_Query_cuda_support``).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import numpy

from . import backend
from .backend import get_array_module, is_device_array

log = logging.getLogger("gpumpiad")


@functools.lru_cache(maxsize=None)
def _probe_cuda_support() -> bool:
    try:
        probe = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        try:
            from mpi4py import MPI  # noqa: F401  (loads libmpi into the process)
            probe = ctypes.CDLL(_libmpi_path()).MPIX_Query_cuda_support
        except (OSError, AttributeError, TypeError):
            return False
    probe.restype = ctypes.c_int
    return bool(probe())


def _libmpi_path():
    import mpi4py.MPI
    for line in open(f"/proc/{os.getpid()}/maps", encoding="ascii", errors="replace"):
        path = line.split()[-1]
        if "libmpi" in os.path.basename(path) and path.startswith("/"):
            return path
    return mpi4py.MPI.__file__


def cuda_aware() -> bool:
    """Whether device buffers are handed to MPI directly.

    ``GPUMPIAD_CUDA_AWARE=0|1`` decides when set; otherwise the MPI library is asked through
    ``MPIX_Query_cuda_support`` (False where the library does not export it).
    """
    env = os.environ.get("GPUMPIAD_CUDA_AWARE")
    if env is not None and env.strip() in ("0", "1"):
        return env.strip() == "1"
    return _probe_cuda_support()


def path_description() -> str:
    """Which data path device buffers take: ``"host"``, ``"cuda-aware"`` or ``"staged"``."""
    if backend.backend_name() == "numpy":
        return "host"
    return "cuda-aware" if cuda_aware() else "staged"


def log_path():
    """Log once which data path this process uses (called at start-up by the CLI)."""
    log.info("gpumpiad: backend %s, MPI data path %s", backend.backend_name(), path_description())


def send_buffer(array, staged=None):
    """A contiguous buffer holding ``array`` that MPI may read now.

    NumPy: the array (packed if not contiguous). CuPy: the device array after the producing
    stream is synchronised (CUDA-aware MPI), or a pinned host copy (staged).
    """
    if not is_device_array(array):
        return numpy.ascontiguousarray(array)
    staged = (not cuda_aware()) if staged is None else staged
    xp = get_array_module(array)
    array = xp.ascontiguousarray(array)
    if staged:
        return backend.device_to_host(array, backend.pinned_empty(array.shape, array.dtype))
    backend.synchronize(array)
    return array


def recv_buffer(shape, dtype, device, staged=None):
    """An empty contiguous buffer MPI may write: host memory, device memory, or pinned host
    memory when a device result is staged."""
    if not device:
        return numpy.empty(shape, dtype)
    staged = (not cuda_aware()) if staged is None else staged
    if staged:
        return backend.pinned_empty(shape, dtype)
    return backend.array_module().empty(shape, dtype)


def deliver(buffer, device):
    """The received ``buffer`` as an array of the wanted kind (device copy when staged)."""
    if device and not is_device_array(buffer):
        return backend.host_to_device(buffer)
    return buffer


class Pending:
    """A result that MPI is still producing: ``wait()`` completes the requests and returns it."""

    __slots__ = ("requests", "finish", "result")

    def __init__(self, requests, finish):
        self.requests = requests
        self.finish = finish
        self.result = None

    def wait(self):
        if self.requests is not None:
            from mpi4py import MPI
            MPI.Request.Waitall(self.requests)
            self.requests = None
            self.result = self.finish()
            self.finish = None
        return self.result


def allreduce(mpi_comm, array, op):
    """Blocking allreduce of a NumPy or CuPy array into a new array of the same kind."""
    device = is_device_array(array)
    send = send_buffer(array)
    out = recv_buffer(send.shape, send.dtype, device, staged=device and not is_device_array(send))
    mpi_comm.Allreduce(send, out, op=op)
    return deliver(out, device)


def bcast(mpi_comm, array, root):
    """Blocking broadcast of the root's array; returns a new array on every rank."""
    device = is_device_array(array)
    if mpi_comm.Get_rank() == root:
        buf = send_buffer(array)
        buf = buf.copy() if buf is array else buf
    else:
        buf = recv_buffer(array.shape, array.dtype, device)
    mpi_comm.Bcast(buf, root=root)
    return deliver(buf, device)
