"""CuPy launchers of the CUDA kernels in ``kernels/heat3d.cu`` (3-D heat step and its adjoint).

The 3-D counterpart of :mod:`gpumpiad.heat.cudakernels`: :func:`step` and :func:`adjoint` take
the arguments of :mod:`gpumpiad.heat.stencil3d`'s, so that a solver dispatches between
``stencil3d``, :mod:`gpumpiad.heat.hostkernels3d` and this module with identical calls. Kernels
run on CuPy's current device and are queued on its current stream; the launchers return at once.
CuPy is imported lazily, so importing this module works without it.

A block is a tile of :data:`BLOCK_X` threads along ``k`` (the contiguous axis) by
:data:`BLOCK_Y` along ``j``; each thread marches along ``i`` through :data:`MARCH` cells.

Examples
--------
>>> import cupy as cp                                              # doctest: +SKIP
>>> from gpumpiad.heat import cudakernels3d
>>> u = cp.random.random((66, 66, 66)); out = cp.zeros_like(u)     # doctest: +SKIP
>>> cudakernels3d.step(u, u, u, out, 0.1, 1e-3)                    # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from .. import kernelbuild
from ..backend import _rank
from .cudakernels import _grid1d, check_outputs_apart
from .stencil import grads
from .stencil3d import check_box

# Launches return at once: the solver overlaps halo exchanges with interior kernels.
ASYNCHRONOUS = True

__all__ = ["ASYNCHRONOUS", "BLOCK_X", "BLOCK_Y", "MARCH", "KERNEL_NAMES", "source",
           "get_kernel", "step", "adjoint", "wrap"]

#: Threads of a block along k (the contiguous axis) and along j.
BLOCK_X = 32
BLOCK_Y = 8
#: Cells along i each thread marches through.
MARCH = 16
_MAX_GRID_YZ = 65535

_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
#: Every extern "C" kernel in heat3d.cu.
KERNEL_NAMES = tuple(f"{op}_{d}" for op in ("heat3d_step", "heat3d_adjoint", "heat3d_wrap")
                     for d in ("float32", "float64"))
#: Threads per block of the 1-D wrap kernel.
WRAP_BLOCK = 256

_OPTIONS = (
    "-std=c++17",
    f"-DHEAT3D_BLOCK_X={BLOCK_X}",
    f"-DHEAT3D_BLOCK_Y={BLOCK_Y}",
    f"-DHEAT3D_MARCH={MARCH}",
)

_kernels: dict[tuple[int, str], object] = {}


def source() -> str:
    """Text of ``kernels/heat3d.cu`` (:func:`gpumpiad.kernelbuild.source`).

    Examples
    --------
    >>> from gpumpiad.heat import cudakernels3d
    >>> "heat3d_adjoint_" in cudakernels3d.source()
    True
    """
    return kernelbuild.source("heat3d.cu")


def get_kernel(name: str, device_id: int | None = None):
    """A ``cupy.RawKernel`` of ``heat3d.cu`` by its extern "C" name, compiled once per device.

    Parameters
    ----------
    name : str
        One of :data:`KERNEL_NAMES`, e.g. ``"heat3d_step_float64"``.
    device_id : int, optional
        CUDA device; defaults to CuPy's current device.

    Returns
    -------
    cupy.RawKernel

    Examples
    --------
    >>> from gpumpiad.heat import cudakernels3d
    >>> cudakernels3d.get_kernel("heat3d_step_float64")              # doctest: +SKIP
    """
    import cupy

    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")
    if device_id is None:
        device_id = cupy.cuda.runtime.getDevice()
    key = (device_id, name)
    kernel = _kernels.get(key)
    if kernel is None:
        with cupy.cuda.Device(device_id):
            kernel = kernelbuild.cuda_module("heat3d.cu", _OPTIONS, device_id).get_function(name)
        _kernels[key] = kernel
    return kernel


def _check(fields, box, inputs):
    """Check padded C-contiguous device fields ((name, array) pairs, the first ``inputs`` of
    them read, the others written) and the sub-box; return ``(dtype, (nx, ny, nz), box)``.
    Raises ``ValueError`` prefixed with the rank."""
    try:
        first_name, first = fields[0]
        dtype = np.dtype(first.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"{first_name} must be float32 or float64, got {dtype}")
        if first.ndim != 3 or min(first.shape) < 3:
            raise ValueError(f"{first_name} must be 3-D of shape (nx+2, ny+2, nz+2) with "
                             f"nx, ny, nz >= 1, got shape {first.shape}")
        for name, a in fields:
            if a.dtype != dtype:
                raise ValueError(f"{name} has dtype {a.dtype}, expected {dtype}")
            if a.shape != first.shape:
                raise ValueError(f"{name} has shape {a.shape}, expected {first.shape}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous")
        check_outputs_apart(fields, inputs)
        box = check_box(first.shape, *box)
        nx, ny, nz = (n - 2 for n in first.shape)
        i0, i1, j0, j1, k0, k1 = box
        grid = _grid(i0, i1, j0, j1, k0, k1)
        if grid[1] > _MAX_GRID_YZ:
            raise ValueError(f"the sub-box's {j1 - j0} cells along j need {grid[1]} blocks, "
                             f"more than CUDA's {_MAX_GRID_YZ}")
    except ValueError as exc:
        raise ValueError(f"rank {_rank()}: {exc}") from None
    return dtype, (nx, ny, nz), box


def _grid(i0, i1, j0, j1, k0, k1):
    """Blocks along x (k), y (j) and z (marches along i); z capped (the kernels stride)."""
    return (-(-(k1 - k0) // BLOCK_X), -(-(j1 - j0) // BLOCK_Y),
            min(-(-(i1 - i0) // MARCH), _MAX_GRID_YZ))


def step(u, kappa, f, u_new, r, dt, i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """Queue ``heat3d_step`` on the current stream: ``u_new = u + r*kappa*lap(u) + dt*f`` on
    ``[i0, i1) x [j0, j1) x [k0, k1)``; see :func:`gpumpiad.heat.stencil3d.step`.

    Parameters
    ----------
    u, kappa, f : cupy.ndarray, shape (nx+2, ny+2, nz+2)
        State (ghosts filled), diffusivity, source: C-contiguous, float32 or float64, one dtype.
    u_new : cupy.ndarray, shape (nx+2, ny+2, nz+2)
        Output, overlapping no input; only the sub-box is written.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1, k0, k1 : int, optional
        Half-open interior sub-box in padded indices; by default the whole interior.

    Raises
    ------
    ValueError
        On a wrong dtype, layout, shape, overlap or sub-box (naming the rank and the
        argument).

    Examples
    --------
    >>> import cupy as cp                                          # doctest: +SKIP
    >>> from gpumpiad.heat import cudakernels3d
    >>> u = cp.ones((3, 3, 3)); out = cp.zeros_like(u)             # doctest: +SKIP
    >>> cudakernels3d.step(u, u, u, out, 0.1, 0.5)                 # doctest: +SKIP
    >>> float(out[1, 1, 1])                                        # doctest: +SKIP
    1.5
    """
    dtype, (nx, ny, nz), box = _check(
        [("u", u), ("kappa", kappa), ("f", f), ("u_new", u_new)], (i0, i1, j0, j1, k0, k1), 3)
    i0, i1, j0, j1, k0, k1 = box
    if i0 == i1 or j0 == j1 or k0 == k1:
        return
    t, i32 = dtype.type, np.int32
    get_kernel(f"heat3d_step_{_DTYPES[dtype]}")(
        _grid(*box), (BLOCK_X, BLOCK_Y, 1),
        (u, kappa, f, u_new, i32(nx), i32(ny), i32(nz), t(r), t(dt), *(i32(b) for b in box)))


def adjoint(lam_next, kappa, u, lam, kappa_bar, f_bar, r, dt,
            i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """Queue the fused ``heat3d_adjoint`` on the current stream:
    ``lam = lam_next + r*lap(kappa*lam_next)``, ``kappa_bar += r*lam_next*lap(u)``,
    ``f_bar += dt*lam_next`` on the sub-box; see :func:`gpumpiad.heat.stencil3d.adjoint`.

    Parameters
    ----------
    lam_next, kappa : cupy.ndarray, shape (nx+2, ny+2, nz+2)
        Cotangent of ``u^{n+1}`` and diffusivity, ghosts filled.
    u : cupy.ndarray or None
        The state ``u^n``; read only for ``kappa_bar``, may be ``None`` without it.
    lam : cupy.ndarray
        Output cotangent of ``u^n``; only the sub-box is written.
    kappa_bar, f_bar : cupy.ndarray or None
        Accumulated on the sub-box; ``None``: not computed. No output may overlap another
        argument.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1, k0, k1 : int, optional
        Half-open interior sub-box in padded indices; by default the whole interior.

    Raises
    ------
    ValueError
        As :func:`step`; also when ``kappa_bar`` is given without ``u``.

    Examples
    --------
    >>> import cupy as cp                                          # doctest: +SKIP
    >>> from gpumpiad.heat import cudakernels3d
    >>> lam_next = cp.zeros((4, 3, 3)); lam_next[1, 1, 1] = 1.0    # doctest: +SKIP
    >>> lam, f_bar = cp.zeros_like(lam_next), cp.zeros_like(lam_next)  # doctest: +SKIP
    >>> cudakernels3d.adjoint(lam_next, cp.ones_like(lam), None, lam, None, f_bar,
    ...                       0.125, 0.5)                          # doctest: +SKIP
    >>> float(lam[2, 1, 1])                                        # doctest: +SKIP
    0.125
    """
    try:
        mask = grads(u, kappa_bar, f_bar)
    except ValueError as exc:
        raise ValueError(f"rank {_rank()}: {exc}") from None
    fields = (("lam_next", lam_next), ("kappa", kappa), ("u", u),
              ("lam", lam), ("kappa_bar", kappa_bar), ("f_bar", f_bar))
    given = [(n, a) for n, a in fields if a is not None]
    dtype, (nx, ny, nz), box = _check(given, (i0, i1, j0, j1, k0, k1),
                                      sum(n in ("lam_next", "kappa", "u") for n, _ in given))
    i0, i1, j0, j1, k0, k1 = box
    if i0 == i1 or j0 == j1 or k0 == k1:
        return
    t, i32 = dtype.type, np.int32
    # A pointer the kernel does not read (its bit in `grads` is clear) is given a valid array,
    # not NULL: CuPy has no portable way to pass a null pointer.
    u, kappa_bar, f_bar = (lam_next if a is None else a for a in (u, kappa_bar, f_bar))
    get_kernel(f"heat3d_adjoint_{_DTYPES[dtype]}")(
        _grid(*box), (BLOCK_X, BLOCK_Y, 1),
        (lam_next, kappa, u, lam, kappa_bar, f_bar, i32(nx), i32(ny), i32(nz), t(r), t(dt),
         *(i32(b) for b in box), i32(mask)))


def wrap(u, wrap_i, wrap_j, wrap_k):
    """Queue ``heat3d_wrap`` on the current stream: one kernel for the ghost faces of a patch
    that is its own neighbour along each axis flagged, each from the opposite boundary face
    (interior extent): what a halo exchange with itself writes.

    Parameters
    ----------
    u : cupy.ndarray, shape (nx+2, ny+2, nz+2)
        C-contiguous float32 or float64 field, its ghosts written in place.
    wrap_i, wrap_j, wrap_k : bool

    Raises
    ------
    ValueError
        On a wrong dtype, layout or shape (naming the rank).

    Examples
    --------
    >>> import cupy as cp                                          # doctest: +SKIP
    >>> from gpumpiad.heat import cudakernels3d
    >>> u = cp.arange(64.0).reshape(4, 4, 4)                       # doctest: +SKIP
    >>> cudakernels3d.wrap(u, True, False, False)                  # doctest: +SKIP
    >>> bool((u[0, 1:-1, 1:-1] == u[2, 1:-1, 1:-1]).all())         # doctest: +SKIP
    True
    """
    dtype, (nx, ny, nz), _ = _check([("u", u)], (1, None, 1, None, 1, None), 1)
    n = 2 * ((ny * nz if wrap_i else 0) + (nx * nz if wrap_j else 0) +
             (nx * ny if wrap_k else 0))
    if n == 0:
        return
    i32 = np.int32
    get_kernel(f"heat3d_wrap_{_DTYPES[dtype]}")(
        *_grid1d(n, WRAP_BLOCK), (u, i32(nx), i32(ny), i32(nz), i32(bool(wrap_i)),
                                  i32(bool(wrap_j)), i32(bool(wrap_k))))
