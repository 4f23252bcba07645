"""Array backend: NumPy on the CPU, CuPy on a CUDA device.

CuPy is imported only here, in :mod:`gpumpiad.streams` (streams, events, device and pinned
buffers), by the CUDA kernels' loader and launchers and by the PyTorch bridge; all other code
works on whichever array module :func:`array_module` (or :func:`get_array_module` of an array)
returns.

A CuPy that is installed but fails to import, or a CUDA runtime that fails for a reason other
than having no device or driver, is reported (a warning, and an error when
``GPUMPIAD_BACKEND=cupy``), never silently replaced by NumPy.

Environment
-----------
GPUMPIAD_BACKEND : ``numpy`` | ``cupy``
    Overrides the automatic choice (CuPy when a CUDA device is usable, else NumPy).
GPUMPIAD_DEVICE : int
    Overrides the device a rank binds to (default: node-local rank modulo device count).
GPUMPIAD_STAGE_HOST_ARRAYS : ``0`` | ``1``
    Test switch, read at first use: the transport treats plain NumPy arrays as device arrays, so
    the staging path (and the CUDA-aware one) runs on a machine without a GPU; "pinned" buffers
    are then ordinary host arrays of type :class:`StagingBuffer` and the copies are NumPy
    copies.
"""
from __future__ import annotations

import os
import threading
import warnings

import numpy

from . import trace

_state = {"xp": None, "device": None}
_choice_lock = threading.Lock()
_thread = threading.local()  # .bound: this thread's current device is the rank's


class BackendError(RuntimeError):
    """The requested array backend cannot be used."""


def _cupy_or_why():
    """``(cupy, None)`` when a CUDA device is usable, else ``(None, why)``: ``why`` is None when
    CuPy is not installed or the machine has no device or driver, and the failure's text when
    CuPy is installed but broken."""
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name == "cupy":
            return None, None
        return None, f"CuPy is installed but does not import: {exc!r}"
    except Exception as exc:  # a broken installation: missing libraries, ABI mismatch
        return None, f"CuPy is installed but does not import: {exc!r}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        text = str(exc)
        if any(word in text for word in _NO_DEVICE):
            return None, None
        return None, f"the CUDA runtime failed: {text}"
    except Exception as exc:
        return None, f"the CUDA runtime failed: {exc!r}"
    return (cupy, None) if count > 0 else (None, None)


# The CUDA runtime's words for a machine without a GPU or driver: NumPy is the right choice.
_NO_DEVICE = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "no CUDA-capable device")


def array_module():
    """Return the array module chosen for this process (``numpy`` or ``cupy``).

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.backend.array_module().__name__ in ("numpy", "cupy")
    True
    """
    xp = _state["xp"]
    if xp is None:
        with _choice_lock:
            if _state["xp"] is None:
                _state["xp"] = _choose()
        xp = _state["xp"]
    if xp is not numpy and not getattr(_thread, "bound", False):
        _bind_thread()
    return xp


def _choose():
    choice = os.environ.get("GPUMPIAD_BACKEND", "").strip().lower()
    if choice not in ("", "numpy", "cupy"):
        raise BackendError(f"GPUMPIAD_BACKEND must be 'numpy' or 'cupy', got {choice!r}")
    if choice == "numpy":
        return numpy
    cupy, why = _cupy_or_why()
    if cupy is None and choice == "cupy":
        raise BackendError(
            "GPUMPIAD_BACKEND=cupy but no usable CUDA device was found"
            + (f": {why}" if why else " (is cupy installed, e.g. pip install "
               "'gpumpiad[cuda]', and a GPU visible?)"))
    if cupy is None:
        if why is not None:
            warnings.warn(f"gpumpiad: computing with NumPy on the CPU because {why}",
                          RuntimeWarning, stacklevel=3)
        return numpy
    bind_device()
    return cupy


def backend_name() -> str:
    """``"numpy"`` or ``"cupy"``.

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.backend_name() in ("numpy", "cupy")
    True
    """
    return array_module().__name__


def is_device_array(x) -> bool:
    """True when ``x`` is a CuPy array (checked without importing CuPy)."""
    kind = type(x)
    return kind is not numpy.ndarray and kind.__module__.split(".")[0] == "cupy"


def get_array_module(x):
    """The array module (``numpy`` or ``cupy``) that owns array ``x``."""
    if is_device_array(x):
        import cupy
        return cupy
    return numpy


def asarray(data, dtype=None):
    """Convert ``data`` to an array of the process's backend (no copy when already one)."""
    xp = array_module()
    if xp is numpy and is_device_array(data):
        data = data.get()
    return xp.asarray(data, dtype=dtype)


def all_finite(x) -> bool:
    """Whether array ``x`` (NumPy or CuPy) holds no NaN or Inf: one pass, a sum, with no
    boolean array of ``x``'s size; the element-wise test only when the sum is not finite,
    which a sum of huge finite values can also be."""
    xp = get_array_module(x)
    with numpy.errstate(all="ignore"):
        return bool(xp.isfinite(xp.sum(x))) or bool(xp.isfinite(x).all())


def device_backend() -> bool:
    """Whether this process computes on a CUDA device (the CuPy backend)."""
    return array_module() is not numpy


def operand(a):
    """A non-Tensor operand as the backend's kernels take it: a NumPy array becomes a device
    array on the CuPy backend (CuPy refuses to mix the two); anything else is returned as is."""
    if type(a) is numpy.ndarray:
        xp = array_module()
        if xp is not numpy:
            return xp.asarray(a)
    return a


def to_numpy(x):
    """A NumPy copy (or view) of a NumPy or CuPy array; a device array's copy is a
    ``staging.to_numpy`` :data:`~gpumpiad.trace.STAGING` span of its size in bytes."""
    if type(x) is numpy.ndarray:
        return x
    if is_device_array(x):
        with trace.span("staging.to_numpy", trace.STAGING, int(x.nbytes)):
            return x.get()
    return numpy.asarray(x)


# Node-local rank as launchers publish it (MPICH/Hydra, Open MPI, MVAPICH2, Slurm), read in this
# order; reading it needs no communication, so binding may happen lazily on one thread.
_LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                         "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def node_local_rank(comm=None) -> int:
    """This process's rank among the processes on its node.

    Read from the launcher's environment where it publishes one; otherwise from a shared-memory
    split of ``comm`` (default: the world), which is collective: every rank must get here.
    """
    for name in _LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def bind_device(comm=None) -> int:
    """Bind this rank to one GPU by its node-local rank; return the device id.

    Ranks sharing a node take distinct devices (node-local rank modulo the device count, see
    :func:`node_local_rank`). ``GPUMPIAD_DEVICE`` overrides the choice.
    """
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    override = os.environ.get("GPUMPIAD_DEVICE")
    if override is None:
        device = node_local_rank(comm) % count
    elif override.strip().isdigit():
        device = int(override)
    else:
        raise BackendError(f"rank {_rank()}: GPUMPIAD_DEVICE must be a device number (an int "
                           f">= 0), got {override!r}")
    if not 0 <= device < count:
        raise BackendError(f"rank {_rank()}: GPUMPIAD_DEVICE={device} but only {count} CUDA "
                           "device(s) are visible")
    cupy.cuda.Device(device).use()
    _state["device"] = device
    _thread.bound = True
    return device


def _bind_thread():
    """Make the rank's device current on this thread too: CUDA's current device is per
    thread, and a thread that never chose one computes on device 0."""
    import cupy
    cupy.cuda.Device(_state["device"]).use()
    _thread.bound = True


def _rank():
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank()


def device_of(x) -> str:
    """``"cpu"`` or ``"cuda:<id>"`` for array ``x``."""
    if is_device_array(x):
        return f"cuda:{x.device.id}"
    return "cpu"


def synchronize(x):
    """Wait on the host for the current CUDA stream when ``x`` is a device array."""
    if is_device_array(x):
        import cupy
        cupy.cuda.get_current_stream().synchronize()


_stage = {}


def stage_host_arrays() -> bool:
    """Whether ``GPUMPIAD_STAGE_HOST_ARRAYS=1`` (NumPy arrays stand in for device arrays); read
    once, as it is asked for every array MPI moves."""
    flag = _stage.get("host arrays")
    if flag is None:
        flag = _stage["host arrays"] = (
            os.environ.get("GPUMPIAD_STAGE_HOST_ARRAYS", "0").strip() == "1")
    return flag


class StagingBuffer(numpy.ndarray):
    """A host staging buffer standing in for pinned memory under GPUMPIAD_STAGE_HOST_ARRAYS."""
