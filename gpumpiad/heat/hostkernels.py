"""Host (CPU) build of ``kernels/heat.cu``, loaded through :mod:`ctypes`.

The CUDA source is compiled as C++ with ``-DGPUMPIAD_HOST`` (see
``kernels/host_cuda.h``), so the numerics are the per-cell functions of the
GPU kernels themselves.  The shared library is cached under
``$XDG_CACHE_HOME/gpumpiad`` (default ``~/.cache/gpumpiad``) keyed by a hash
of the sources, compiler and flags, and is built atomically so several MPI
ranks may build it at once.

The public functions mirror :mod:`gpumpiad.heat.stencil` and accept NumPy
``float32``/``float64`` C-contiguous arrays.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from .stencil import check_rect, grads

__all__ = [
    "available",
    "library_path",
    "step",
    "adjoint",
    "pack",
    "unpack",
    "copy4",
    "CXXFLAGS",
]

#: Flags used for the host build (no -march: the binary may move between hosts).
CXXFLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-DGPUMPIAD_HOST", "-x", "c++")
_SOURCES = ("heat.cu", "host_cuda.h")
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}

_lock = threading.Lock()
_lib = None
_lib_error: Exception | None = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpumpiad"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _read_sources() -> dict[str, str]:
    root = importlib.resources.files("gpumpiad.kernels")
    return {name: root.joinpath(name).read_text() for name in _SOURCES}


def _build_key(cxx: str, sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    for part in (cxx, version, " ".join(CXXFLAGS)):
        h.update(part.encode())
        h.update(b"\0")
    for name in sorted(sources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(sources[name].encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    sources = _read_sources()
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"heat_host-{_build_key(cxx, sources)}.so"
    if target.exists():
        return target
    # Private build dir + atomic rename: concurrent ranks never see a partial .so.
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        for name, text in sources.items():
            Path(tmp, name).write_text(text)
        out = Path(tmp, target.name)
        cmd = [cxx, *CXXFLAGS, "-I", tmp, str(Path(tmp, "heat.cu")), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"host kernel build failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(out, target)
    return target


def _declare(lib) -> None:
    p = ctypes.c_void_p
    i = ctypes.c_int
    for suffix, real in (("float32", ctypes.c_float), ("float64", ctypes.c_double)):
        sigs = {
            "host_heat_step": [p, p, p, p, i, i, real, real, i, i, i, i],
            "host_heat_adjoint": [p, p, p, p, p, p, i, i, real, real, i, i, i, i, i],
            "host_halo_pack": [p, p, i, i, i, i],
            "host_halo_unpack": [p, p, i, i, i, i, i],
            "host_copy4": [p, p, p, p, ctypes.c_longlong],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = None


def _load():
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            if _lib_error is not None:
                raise RuntimeError(f"host kernels unavailable: {_lib_error}") from _lib_error
            try:
                lib = ctypes.CDLL(str(_build()))
                _declare(lib)
            except Exception as exc:  # remembered so available() stays cheap
                _lib_error = exc
                raise
            _lib = lib
    return _lib


def available() -> bool:
    """Whether the host kernels can be built/loaded here; never raises.

    Returns
    -------
    bool
        ``True`` once the shared library is loaded.
    """
    try:
        _load()
        return True
    except Exception:
        return False


def library_path() -> Path:
    """Path of the (built on demand) host shared library.

    Returns
    -------
    pathlib.Path
        The cached ``.so`` file.
    """
    return _build()


# --------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------


def _check_array(name, a, dtype=None, writable=False):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype}, expected {dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return a


def _check_fields(inputs, outputs):
    """Check padded 2-D fields (name, array) pairs; return (dtype, nx, ny)."""
    first_name, first = inputs[0]
    _check_array(first_name, first)
    if first.ndim != 2 or first.shape[0] < 3 or first.shape[1] < 3:
        raise ValueError(f"{first_name} must be 2-D of shape (nx+2, ny+2) with nx, ny >= 1, "
                         f"got shape {first.shape}")
    fields = inputs + outputs
    for k, (name, a) in enumerate(fields):
        _check_array(name, a, first.dtype, writable=k >= len(inputs))
        if a.shape != first.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {first.shape}")
    for k in range(len(inputs), len(fields)):
        oname, o = fields[k]
        for m, (name, a) in enumerate(fields):
            if m != k and np.may_share_memory(a, o):
                raise ValueError(f"{oname} must not overlap {name}")
    nx, ny = first.shape[0] - 2, first.shape[1] - 2
    return first.dtype, nx, ny


def _check_halo(u, buf, side, ghost, buf_writable):
    _check_array("u", u, writable=not buf_writable)
    if u.ndim != 2 or u.shape[0] < 3 or u.shape[1] < 3:
        raise ValueError(f"u must be 2-D of shape (nx+2, ny+2) with nx, ny >= 1, got {u.shape}")
    _check_array("buf", buf, u.dtype, writable=buf_writable)
    side, ghost = int(side), int(ghost)
    if side not in (0, 1, 2, 3):
        raise ValueError(f"side must be 0..3, got {side}")
    if ghost not in (0, 1):
        raise ValueError(f"ghost must be 0 or 1, got {ghost}")
    nx, ny = u.shape[0] - 2, u.shape[1] - 2
    n = ny if side < 2 else nx
    if buf.size < n:
        raise ValueError(f"buf has {buf.size} elements, need at least {n}")
    if np.may_share_memory(u, buf):
        raise ValueError("buf must not overlap u")
    return nx, ny, side, ghost


_functions = {}


def _fn(name, dtype):
    fn = _functions.get((name, dtype))
    if fn is None:
        fn = _functions[name, dtype] = getattr(_load(), f"{name}_{_DTYPES[dtype]}")
    return fn


def _fields(inputs, outputs):
    """:func:`_check_fields` at a cost a small patch's kernel call can bear; also returns the
    fields' data addresses: ``(dtype, nx, ny, addresses)``. One pass of cheap tests; the
    detailed checks, which name the problem, run only when one fails."""
    fields = inputs + outputs
    first = inputs[0][1]
    if type(first) is np.ndarray and first.dtype in _DTYPES and first.ndim == 2 and \
            first.shape[0] >= 3 and first.shape[1] >= 3:
        shape, dtype, count = first.shape, first.dtype, len(inputs)
        addresses = []
        for _, a in fields:
            if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape:
                break
            flags = a.flags
            if not flags.c_contiguous or (len(addresses) >= count and not flags.writeable):
                break
            addresses.append(_address(a, flags.writeable))
        else:
            # Equal-sized contiguous fields overlap exactly when their starts are closer
            # than their size.
            nbytes = first.nbytes
            if not any(m != k and abs(addresses[m] - addresses[k]) < nbytes
                       for k in range(count, len(fields)) for m in range(len(fields))):
                return dtype, shape[0] - 2, shape[1] - 2, addresses
    dtype, nx, ny = _check_fields(inputs, outputs)
    return dtype, nx, ny, [_address(a, a.flags.writeable) for _, a in fields]


def _rect(nx, ny, i0, i1, j0, j1):
    """:func:`check_rect`, without its conversions for plain ints in range."""
    if type(i0) is type(i1) is type(j0) is type(j1) is int and \
            1 <= i0 <= i1 <= nx + 1 and 1 <= j0 <= j1 <= ny + 1:
        return i0, i1, j0, j1
    return check_rect(nx, ny, i0, i1, j0, j1)


def _address(a, writable):
    """``a``'s data address. ``ndarray.ctypes`` builds a helper object per call, a fifth of a
    small patch's step: a writable array's address is read through ctypes directly."""
    if writable:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    return a.ctypes.data


# --------------------------------------------------------------------------
# public kernels (same signatures as gpumpiad.heat.stencil)
# --------------------------------------------------------------------------


def step(u, kappa, f, u_new, r, dt, i0, i1, j0, j1):
    """Forward step on ``[i0, i1) x [j0, j1)``; see :func:`gpumpiad.heat.stencil.step`.

    Raises
    ------
    ValueError
        On wrong dtype, layout, shape, overlap or sub-rectangle.
    """
    dtype, nx, ny, addresses = _fields([("u", u), ("kappa", kappa), ("f", f)],
                                       [("u_new", u_new)])
    i0, i1, j0, j1 = _rect(nx, ny, i0, i1, j0, j1)
    _fn("host_heat_step", dtype)(*addresses, nx, ny, float(r), float(dt), i0, i1, j0, j1)


def adjoint(lam_next, kappa, u, lam, kappa_bar, f_bar, r, dt, i0, i1, j0, j1):
    """Fused adjoint on ``[i0, i1) x [j0, j1)``; see :func:`gpumpiad.heat.stencil.adjoint`
    (``kappa_bar``, ``f_bar`` and, without ``kappa_bar``, ``u`` may be ``None``).

    Raises
    ------
    ValueError
        On wrong dtype, layout, shape, overlap or sub-rectangle.
    """
    mask = grads(u, kappa_bar, f_bar)
    inputs = [("lam_next", lam_next), ("kappa", kappa)] + ([("u", u)] if u is not None else [])
    outputs = [("lam", lam)] + [(name, a) for name, a in (("kappa_bar", kappa_bar),
                                                         ("f_bar", f_bar)) if a is not None]
    dtype, nx, ny, found = _fields(inputs, outputs)
    i0, i1, j0, j1 = _rect(nx, ny, i0, i1, j0, j1)
    address = dict(zip([name for name, _ in inputs + outputs], found))
    _fn("host_heat_adjoint", dtype)(
        address["lam_next"], address["kappa"], address.get("u"), address["lam"],
        address.get("kappa_bar"), address.get("f_bar"), nx, ny, float(r), float(dt),
        i0, i1, j0, j1, mask,
    )


def pack(u, buf, side, ghost):
    """Copy a halo row/column of ``u`` into ``buf``; see :func:`gpumpiad.heat.stencil.pack`.

    Raises
    ------
    ValueError
        On wrong dtype, layout, size or side/ghost value.
    """
    nx, ny, side, ghost = _check_halo(u, buf, side, ghost, buf_writable=True)
    _fn("host_halo_pack", u.dtype)(u.ctypes.data, buf.ctypes.data, nx, ny, side, ghost)


def unpack(u, buf, side, ghost, add):
    """Write/add ``buf`` into a halo row/column of ``u``; see :func:`gpumpiad.heat.stencil.unpack`.

    Raises
    ------
    ValueError
        On wrong dtype, layout, size or side/ghost value.
    """
    nx, ny, side, ghost = _check_halo(u, buf, side, ghost, buf_writable=False)
    _fn("host_halo_unpack", u.dtype)(
        u.ctypes.data, buf.ctypes.data, nx, ny, side, ghost, 1 if add else 0
    )


def copy4(a, b, c, d):
    """``d[:] = a + b + c`` (3 reads + 1 write), the bandwidth reference.

    Parameters
    ----------
    a, b, c : numpy.ndarray
        Inputs, same dtype and size as ``d``.
    d : numpy.ndarray
        Output.
    """
    _check_array("a", a)
    for name, x in (("b", b), ("c", c), ("d", d)):
        _check_array(name, x, a.dtype, writable=name == "d")
        if x.size != a.size:
            raise ValueError(f"{name} has {x.size} elements, expected {a.size}")
    _fn("host_copy4", a.dtype)(a.ctypes.data, b.ctypes.data, c.ctypes.data, d.ctypes.data, a.size)
