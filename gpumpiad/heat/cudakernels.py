"""CuPy loader and launchers for the CUDA kernels in ``kernels/heat.cu``.

CuPy is imported lazily, so importing this module works without it.  The
``launch_*`` helpers mirror :mod:`gpumpiad.heat.stencil` (``step``,
``adjoint``, ``pack``, ``unpack``) so a solver can dispatch between
``stencil``, ``hostkernels`` and this module with identical calls.  Kernels
run on CuPy's current device and current stream.
"""

from __future__ import annotations

import numpy as np

from .. import kernelbuild
from .stencil import check_rect, grads

# Launches return at once: the solver overlaps halo exchanges with interior kernels.
ASYNCHRONOUS = True

__all__ = [
    "BLOCK_X",
    "BLOCK_Y",
    "HALO_BLOCK",
    "KERNEL_NAMES",
    "source",
    "get_module",
    "get_kernel",
    "launch_step",
    "launch_adjoint",
    "launch_pack",
    "launch_unpack",
    "launch_copy4",
    "step",
    "adjoint",
    "pack",
    "unpack",
    "wrap",
    "copy4",
]

#: Block shape of the 2-D compute kernels (x runs along the contiguous j axis).
BLOCK_X = 32
BLOCK_Y = 8
#: Block size of the 1-D kernels (pack/unpack/copy4).
HALO_BLOCK = 256
#: Grid-dimension cap; the kernels use grid-stride loops beyond it.
_MAX_GRID_Y = 65535
_MAX_GRID_X = 1 << 20

_OPS = ("heat_step", "heat_adjoint", "halo_pack", "halo_unpack", "halo_wrap", "copy4")
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
#: Every extern "C" kernel in heat.cu.
KERNEL_NAMES = tuple(f"{op}_{d}" for op in _OPS for d in ("float32", "float64"))

_OPTIONS = (
    "-std=c++17",
    f"-DHEAT_BLOCK_X={BLOCK_X}",
    f"-DHEAT_BLOCK_Y={BLOCK_Y}",
    f"-DHALO_BLOCK={HALO_BLOCK}",
)

_kernels: dict[tuple[int, str], object] = {}


def source() -> str:
    """Text of ``kernels/heat.cu``.

    Returns
    -------
    str
        The CUDA source, as shipped in package ``gpumpiad.kernels``
        (:func:`gpumpiad.kernelbuild.source`).
    """
    return kernelbuild.source("heat.cu")


def get_module(device_id: int | None = None):
    """The compiled ``cupy.RawModule`` for a device (built once per device).

    Parameters
    ----------
    device_id : int, optional
        CUDA device; defaults to CuPy's current device.

    Returns
    -------
    cupy.RawModule
    """
    return kernelbuild.cuda_module("heat.cu", _OPTIONS, device_id)


def get_kernel(name: str, device_id: int | None = None):
    """A ``cupy.RawKernel`` from ``heat.cu`` by its extern "C" name.

    Parameters
    ----------
    name : str
        E.g. ``"heat_step_float64"``; see :data:`KERNEL_NAMES`.
    device_id : int, optional
        CUDA device; defaults to CuPy's current device.

    Returns
    -------
    cupy.RawKernel
    """
    import cupy

    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")
    if device_id is None:
        device_id = cupy.cuda.runtime.getDevice()
    key = (device_id, name)
    k = _kernels.get(key)
    if k is None:
        with cupy.cuda.Device(device_id):
            k = get_module(device_id).get_function(name)
        _kernels[key] = k
    return k


def _suffix(name, a):
    try:
        return _DTYPES[np.dtype(a.dtype)]
    except KeyError:
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}") from None


def _overlap(a, b):
    """Whether the memory of contiguous device arrays ``a`` and ``b`` overlaps."""
    pa, pb = a.data.ptr, b.data.ptr
    return pa < pb + b.nbytes and pb < pa + a.nbytes


def _check_fields(fields, inputs):
    """Check padded C-contiguous device fields ((name, array) pairs, the first ``inputs`` of
    them read, the others written: no output may overlap another field); return
    (dtype, nx, ny)."""
    first_name, first = fields[0]
    if first.ndim != 2 or first.shape[0] < 3 or first.shape[1] < 3:
        raise ValueError(f"{first_name} must be 2-D of shape (nx+2, ny+2) with nx, ny >= 1, "
                         f"got shape {first.shape}")
    _suffix(first_name, first)
    for name, a in fields:
        if a.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {a.dtype}, expected {first.dtype}")
        if a.shape != first.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {first.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    check_outputs_apart(fields, inputs)
    return np.dtype(first.dtype), first.shape[0] - 2, first.shape[1] - 2


def check_outputs_apart(fields, inputs):
    """Raise ``ValueError`` where an output (a field after the first ``inputs`` of the
    ``(name, array)`` pairs) overlaps another field; all are contiguous device arrays of one
    size."""
    # Equal-sized contiguous arrays overlap exactly when their starts are closer than their
    # size.
    starts = [a.data.ptr for _, a in fields]
    size = fields[0][1].nbytes
    for k in range(inputs, len(fields)):
        for m in range(len(fields)):
            if m != k and abs(starts[m] - starts[k]) < size:
                raise ValueError(f"{fields[k][0]} must not overlap {fields[m][0]}")


def _grid2d(i0, i1, j0, j1):
    gx = min((j1 - j0 + BLOCK_X - 1) // BLOCK_X, _MAX_GRID_X)
    gy = min((i1 - i0 + BLOCK_Y - 1) // BLOCK_Y, _MAX_GRID_Y)
    return (gx, gy, 1), (BLOCK_X, BLOCK_Y, 1)


def _grid1d(n, block=HALO_BLOCK):
    """Grid and block of a 1-D grid-stride launch over ``n`` items."""
    return (min((n + block - 1) // block, _MAX_GRID_X), 1, 1), (block, 1, 1)


def launch_step(u, kappa, f, u_new, r, dt, i0, i1, j0, j1):
    """Launch ``heat_step`` on ``[i0, i1) x [j0, j1)``; see :func:`gpumpiad.heat.stencil.step`.

    Parameters
    ----------
    u, kappa, f, u_new : cupy.ndarray, shape (nx+2, ny+2)
        Padded C-contiguous fields of one dtype; ``u_new`` must not alias inputs.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1 : int
        Half-open interior sub-rectangle.
    """
    dtype, nx, ny = _check_fields([("u", u), ("kappa", kappa), ("f", f), ("u_new", u_new)], 3)
    i0, i1, j0, j1 = check_rect(nx, ny, i0, i1, j0, j1)
    if i0 == i1 or j0 == j1:
        return
    grid, block = _grid2d(i0, i1, j0, j1)
    t, i32 = dtype.type, np.int32
    get_kernel(f"heat_step_{_DTYPES[dtype]}")(
        grid, block,
        (u, kappa, f, u_new, i32(nx), i32(ny), t(r), t(dt), i32(i0), i32(i1), i32(j0), i32(j1)),
    )


def launch_adjoint(lam_next, kappa, u, lam, kappa_bar, f_bar, r, dt, i0, i1, j0, j1):
    """Launch the fused ``heat_adjoint``; see :func:`gpumpiad.heat.stencil.adjoint`.

    Parameters
    ----------
    lam_next, kappa, u : cupy.ndarray, shape (nx+2, ny+2)
        Inputs (ghosts included); ``u`` may be ``None`` when ``kappa_bar`` is.
    lam, kappa_bar, f_bar : cupy.ndarray, shape (nx+2, ny+2)
        ``lam`` is written, ``kappa_bar`` and ``f_bar`` accumulated, on the
        sub-rectangle; none may alias another argument. ``kappa_bar`` or
        ``f_bar`` ``None``: not computed.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1 : int
        Half-open interior sub-rectangle.
    """
    mask = grads(u, kappa_bar, f_bar)
    fields = (("lam_next", lam_next), ("kappa", kappa), ("u", u),
              ("lam", lam), ("kappa_bar", kappa_bar), ("f_bar", f_bar))
    dtype, nx, ny = _check_fields([(n, a) for n, a in fields if a is not None],
                                  2 if u is None else 3)
    i0, i1, j0, j1 = check_rect(nx, ny, i0, i1, j0, j1)
    if i0 == i1 or j0 == j1:
        return
    grid, block = _grid2d(i0, i1, j0, j1)
    t, i32 = dtype.type, np.int32
    # A pointer the kernel does not read (its bit in `grads` is clear) is given a valid array,
    # not NULL: CuPy has no portable way to pass a null pointer.
    u, kappa_bar, f_bar = (lam_next if a is None else a for a in (u, kappa_bar, f_bar))
    get_kernel(f"heat_adjoint_{_DTYPES[dtype]}")(
        grid, block,
        (lam_next, kappa, u, lam, kappa_bar, f_bar, i32(nx), i32(ny), t(r), t(dt),
         i32(i0), i32(i1), i32(j0), i32(j1), i32(mask)),
    )


def _check_halo(u, buf, side, ghost):
    dtype, nx, ny = _check_fields([("u", u)], 1)
    if buf.dtype != dtype:
        raise ValueError(f"buf has dtype {buf.dtype}, expected {dtype}")
    if not buf.flags.c_contiguous:
        raise ValueError("buf must be C-contiguous")
    side, ghost = int(side), int(ghost)
    if side not in (0, 1, 2, 3):
        raise ValueError(f"side must be 0..3, got {side}")
    if ghost not in (0, 1):
        raise ValueError(f"ghost must be 0 or 1, got {ghost}")
    n = ny if side < 2 else nx
    if buf.size < n:
        raise ValueError(f"buf has {buf.size} elements, need at least {n}")
    if _overlap(u, buf):
        raise ValueError("buf must not overlap u")
    return dtype, nx, ny, side, ghost, n


def launch_pack(u, buf, side, ghost):
    """Launch ``halo_pack``; see :func:`gpumpiad.heat.stencil.pack`.

    Parameters
    ----------
    u : cupy.ndarray, shape (nx+2, ny+2)
        Source field.
    buf : cupy.ndarray
        Contiguous destination with at least ``ny`` (side 0/1) or ``nx`` (2/3) entries.
    side, ghost : int
        Side 0..3 (north, south, west, east); ghost 1 for the ghost row/column.
    """
    dtype, nx, ny, side, ghost, n = _check_halo(u, buf, side, ghost)
    grid, block = _grid1d(n)
    i32 = np.int32
    get_kernel(f"halo_pack_{_DTYPES[dtype]}")(
        grid, block, (u, buf, i32(nx), i32(ny), i32(side), i32(ghost))
    )


def launch_unpack(u, buf, side, ghost, add):
    """Launch ``halo_unpack``; see :func:`gpumpiad.heat.stencil.unpack`.

    Parameters
    ----------
    u : cupy.ndarray, shape (nx+2, ny+2)
        Destination field, modified in place.
    buf : cupy.ndarray
        Contiguous source with at least ``ny`` or ``nx`` entries.
    side, ghost : int
        As in :func:`launch_pack`.
    add : int
        Non-zero to accumulate instead of assign.
    """
    dtype, nx, ny, side, ghost, n = _check_halo(u, buf, side, ghost)
    grid, block = _grid1d(n)
    i32 = np.int32
    get_kernel(f"halo_unpack_{_DTYPES[dtype]}")(
        grid, block, (u, buf, i32(nx), i32(ny), i32(side), i32(ghost), i32(1 if add else 0))
    )


def launch_wrap(u, wrap_i, wrap_j):
    """Launch ``halo_wrap``: one kernel for the ghost rows (``wrap_i``) and columns
    (``wrap_j``) of a patch that is its own neighbour; see :func:`gpumpiad.heat.stencil.wrap`.

    Parameters
    ----------
    u : cupy.ndarray, shape (nx+2, ny+2)
        C-contiguous field, its ghosts written in place.
    wrap_i, wrap_j : bool
    """
    dtype, nx, ny = _check_fields([("u", u)], 1)
    n = (2 * ny if wrap_i else 0) + (2 * nx if wrap_j else 0)
    if n == 0:
        return
    grid, block = _grid1d(n)
    i32 = np.int32
    get_kernel(f"halo_wrap_{_DTYPES[dtype]}")(
        grid, block, (u, i32(nx), i32(ny), i32(bool(wrap_i)), i32(bool(wrap_j))))


def launch_copy4(a, b, c, d):
    """Launch ``copy4``: ``d = a + b + c`` (3 reads + 1 write bandwidth reference).

    Parameters
    ----------
    a, b, c, d : cupy.ndarray
        Contiguous arrays of one dtype and size.
    """
    suffix = _suffix("a", a)
    for name, x in (("a", a), ("b", b), ("c", c), ("d", d)):
        if x.dtype != a.dtype or x.size != a.size or not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous with a's dtype and size")
        if name != "d" and _overlap(d, x):
            raise ValueError(f"d must not overlap {name}")
    if a.size == 0:
        return
    grid, block = _grid1d(a.size)
    get_kernel(f"copy4_{suffix}")(grid, block, (a, b, c, d, np.int64(a.size)))


# Aliases with the exact names of gpumpiad.heat.stencil / hostkernels.
step = launch_step
adjoint = launch_adjoint
pack = launch_pack
unpack = launch_unpack
wrap = launch_wrap
copy4 = launch_copy4
