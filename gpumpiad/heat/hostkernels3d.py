"""Host (CPU) build of ``kernels/heat3d.cu``, loaded through :mod:`ctypes`.

The 3-D counterpart of :mod:`gpumpiad.heat.hostkernels`: the CUDA source compiled as C++ with
``-DGPUMPIAD_HOST`` by :func:`gpumpiad.kernelbuild.host_library` (for this CPU when the
compiler accepts ``-march=native``, portably otherwise; no fused multiply-adds in either), so
the numerics are the per-cell functions of the GPU kernels themselves. :func:`step` and
:func:`adjoint` take the arguments of :mod:`gpumpiad.heat.stencil3d`'s and give the same bits:
the same operations in the same order.

Examples
--------
>>> import numpy as np
>>> from gpumpiad.heat import hostkernels3d, stencil3d
>>> rng = np.random.default_rng(0)
>>> u, kappa, f = (rng.random((6, 5, 7)) for _ in range(3))
>>> got, want = np.zeros_like(u), np.zeros_like(u)
>>> hostkernels3d.step(u, kappa, f, got, 0.1, 1e-3)
>>> stencil3d.step(u, kappa, f, want, 0.1, 1e-3)
>>> bool((got == want).all())
True
"""

from __future__ import annotations

import ctypes
import threading

from .. import kernelbuild
from ..backend import _rank
from .hostkernels import _DTYPES, BoundLoop, _address, _bare, _check_fields
from .stencil import grads
from .stencil3d import check_box

__all__ = ["available", "build_info", "step", "adjoint", "Loop", "DEEP_DEPTHS", "SHALLOW_DEPTHS",
           "MAX_DEPTH"]

_lock = threading.Lock()
_lib = None
_lib_error: Exception | None = None
_built: dict = {}
_functions: dict = {}


def _load():
    global _lib, _lib_error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            if _lib_error is not None:
                raise RuntimeError(f"3-D host kernels unavailable: {_lib_error}") from _lib_error
            import ctypes
            try:
                info = kernelbuild.host_library("heat3d.cu", includes=("host_cuda.h",))
                lib = ctypes.CDLL(str(info["path"]))
                _declare(lib)
            except Exception as exc:  # remembered so that available() stays cheap
                _lib_error = exc
                raise
            _built.update(info)
            _lib = lib
    return _lib


def _declare(lib) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    for suffix, real in (("float32", ctypes.c_float), ("float64", ctypes.c_double)):
        sigs = {
            "host_heat3d_step": [p, p, p, p, i, i, i, real, real, i, i, i, i, i, i],
            "host_heat3d_adjoint": [p, p, p, p, p, p, i, i, i, real, real, i, i, i, i, i, i, i],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = None


def available() -> bool:
    """Whether the 3-D host kernels can be built and loaded here; never raises.

    Returns
    -------
    bool
        ``True`` once the shared library is loaded.

    Examples
    --------
    >>> from gpumpiad.heat import hostkernels3d
    >>> hostkernels3d.available() in (True, False)
    True
    """
    try:
        _load()
        return True
    except Exception:
        return False


def build_info() -> dict:
    """How the loaded library was built: what :func:`gpumpiad.kernelbuild.host_library`
    returns (``path``, ``march``, ``flags``, ``compiler``, ``version``, ``cpu``, ``refused``).

    Examples
    --------
    >>> from gpumpiad.heat import hostkernels3d
    >>> hostkernels3d.build_info()["march"] in ("native", "portable")
    True
    """
    _load()
    return dict(_built)


def _fn(name, dtype):
    fn = _functions.get((name, dtype))
    if fn is None:
        fn = _functions[name, dtype] = getattr(_load(), f"{name}_{_DTYPES[dtype]}")
    return fn


def _fields(inputs, outputs, box):
    """Check padded 3-D fields ((name, array) pairs) and the sub-box; return
    ``(dtype, (nx, ny, nz), box, addresses)``. Raises ``ValueError`` prefixed with the rank."""
    try:
        dtype, nx, ny, nz = _check_fields(inputs, outputs, ndim=3)
        box = check_box((nx + 2, ny + 2, nz + 2), *box)
    except ValueError as exc:
        raise ValueError(f"rank {_rank()}: {exc}") from None
    return dtype, (nx, ny, nz), box, [_address(a, a.flags.writeable)
                                      for _, a in inputs + outputs]


def step(u, kappa, f, u_new, r, dt, i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """Forward step ``u_new = u + r*kappa*lap(u) + dt*f`` on ``[i0, i1) x [j0, j1) x [k0, k1)``.

    The host build of :func:`gpumpiad.heat.stencil3d.step`, with its arguments and its bits.

    Parameters
    ----------
    u, kappa, f : numpy.ndarray, shape (nx+2, ny+2, nz+2)
        State (ghosts filled), diffusivity, source: C-contiguous, float32 or float64, one dtype.
    u_new : numpy.ndarray, shape (nx+2, ny+2, nz+2)
        Output, writable, overlapping no input; only the sub-box is written.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1, k0, k1 : int, optional
        Half-open interior sub-box in padded indices; by default the whole interior.

    Raises
    ------
    ValueError
        On a wrong type, dtype, layout, shape, overlap or sub-box (the message names the rank,
        the argument, what was expected and what was given).

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat import hostkernels3d
    >>> u = np.ones((3, 3, 3)); out = np.zeros_like(u)
    >>> hostkernels3d.step(u, np.ones_like(u), np.ones_like(u), out, 0.1, 0.5)
    >>> float(out[1, 1, 1])
    1.5
    """
    dtype, (nx, ny, nz), box, addresses = _fields(
        [("u", u), ("kappa", kappa), ("f", f)], [("u_new", u_new)], (i0, i1, j0, j1, k0, k1))
    _fn("host_heat3d_step", dtype)(*addresses, nx, ny, nz, float(r), float(dt), *box)


def adjoint(lam_next, kappa, u, lam, kappa_bar, f_bar, r, dt,
            i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """Fused adjoint of :func:`step` on a sub-box: ``lam = lam_next + r*lap(kappa*lam_next)``,
    ``kappa_bar += r*lam_next*lap(u)``, ``f_bar += dt*lam_next``.

    The host build of :func:`gpumpiad.heat.stencil3d.adjoint`, with its arguments and its bits.

    Parameters
    ----------
    lam_next, kappa : numpy.ndarray, shape (nx+2, ny+2, nz+2)
        Cotangent of ``u^{n+1}`` and diffusivity, ghosts filled.
    u : numpy.ndarray, shape (nx+2, ny+2, nz+2), or None
        The state ``u^n`` (ghosts filled); read only for ``kappa_bar``, may be ``None`` without.
    lam : numpy.ndarray, shape (nx+2, ny+2, nz+2)
        Output cotangent of ``u^n``; only the sub-box is written.
    kappa_bar, f_bar : numpy.ndarray, shape (nx+2, ny+2, nz+2), or None
        Accumulated (``+=``) on the sub-box; ``None``: not computed (nor read).
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1, k0, k1 : int, optional
        Half-open interior sub-box in padded indices; by default the whole interior.

    Raises
    ------
    ValueError
        As :func:`step`, for every array given; also when ``kappa_bar`` is given without ``u``.

    Notes
    -----
    The gather form of the step's transpose: with ``w = kappa*lam_next``, each cell receives
    ``r*w`` from its six neighbours and ``-6r*w`` from itself, so ``lam_next`` and ``kappa``
    need their ghosts filled (see :func:`gpumpiad.heat.stencil3d.adjoint`).

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat import hostkernels3d
    >>> shape = (4, 3, 3)
    >>> lam_next = np.zeros(shape); lam_next[1, 1, 1] = 1.0
    >>> lam, f_bar = np.zeros(shape), np.zeros(shape)
    >>> hostkernels3d.adjoint(lam_next, np.ones(shape), None, lam, None, f_bar, 0.125, 0.5)
    >>> float(lam[1, 1, 1]), float(lam[2, 1, 1]), float(f_bar[1, 1, 1])
    (0.25, 0.125, 0.5)
    """
    try:
        mask = grads(u, kappa_bar, f_bar)
    except ValueError as exc:
        raise ValueError(f"rank {_rank()}: {exc}") from None
    inputs = [("lam_next", lam_next), ("kappa", kappa)] + ([("u", u)] if u is not None else [])
    outputs = [("lam", lam)] + [(name, a) for name, a in (("kappa_bar", kappa_bar),
                                                         ("f_bar", f_bar)) if a is not None]
    dtype, (nx, ny, nz), box, found = _fields(inputs, outputs, (i0, i1, j0, j1, k0, k1))
    address = dict(zip([name for name, _ in inputs + outputs], found))
    _fn("host_heat3d_adjoint", dtype)(
        address["lam_next"], address["kappa"], address.get("u"), address["lam"],
        address.get("kappa_bar"), address.get("f_bar"), nx, ny, nz, float(r), float(dt),
        *box, mask)


#: Steps per sweep over the planes of a patch no other rank borders (no ghosts wrapped along
#: i), ``(forward, reverse)``, for fields of at least
#: :data:`gpumpiad.heat.hostkernels.DEEP_SWEEP_BYTES` (padded) and for smaller ones, which fit
#: the caches (1: a step at a time). Measured in ``bench/results/heat3d_solver_cpu.md``; every
#: depth gives the same bits.
DEEP_DEPTHS = (8, 4)
SHALLOW_DEPTHS = (1, 1)
MAX_DEPTH = 64


class Loop(BoundLoop):
    """The 3-D host kernels of one solve's time loops, bound to its padded ``kappa`` and ``f``
    with their arguments checked and converted once: the methods of
    :class:`gpumpiad.heat.hostkernels.BoundLoop`, as the 2-D loop has them (the checks cost as
    much as the step of a 24³ patch).

    ``wrap``: ``(along i, along j, along k)``, whether the patch is its own neighbour along
    that axis (one patch along a periodic axis): those ghosts are then filled by the kernels,
    not MPI. ``depths``: steps per sweep over the planes where no ghost is wrapped along i,
    ``(forward, reverse)`` (the reverse one 1 or even); by default :data:`DEEP_DEPTHS` or
    :data:`SHALLOW_DEPTHS` by the fields' size.

    Raises
    ------
    ValueError
        On a wrong dtype, layout or shape of ``kappa`` or ``f``, or on depths that are not ints
        from 1 to :data:`MAX_DEPTH` (the reverse one 1 or even).

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat import hostkernels3d
    >>> rng = np.random.default_rng(0)
    >>> u, kappa, f = (rng.random((6, 5, 7)) for _ in range(3))
    >>> got, want = np.zeros_like(u), np.zeros_like(u)
    >>> loop = hostkernels3d.Loop(kappa, f, r=0.1, dt=1e-3)
    >>> loop.step(u, got)
    >>> hostkernels3d.step(u, kappa, f, want, 0.1, 1e-3)
    >>> bool((got == want).all())
    True
    >>> states = [u, np.zeros_like(u), np.zeros_like(u)]
    >>> loop.steps(states + [states[1]])          # three steps, two buffers in turn
    """

    __slots__ = ()

    def __init__(self, kappa, f, r, dt, wrap=(False, False, False), depths=None):
        dtype, dims, box, addresses = _fields([("kappa", kappa), ("f", f)], [],
                                              (1, None, 1, None, 1, None))
        suffix = _DTYPES[dtype]
        functions = tuple(_bare(f"host_heat3d_{name}_{suffix}", load=_load)
                          for name in ("step", "steps", "adjoint_wrapped", "wrap"))
        super().__init__(kappa, f, r, dt, wrap, depths,
                         functions=functions + (_bare(f"host_heat3d_adjoints_{suffix}",
                                                      ctypes.c_void_p, load=_load),),
                         addresses=addresses, dtype=dtype, interior=dims, box=box,
                         defaults=(SHALLOW_DEPTHS, DEEP_DEPTHS), single=True)
