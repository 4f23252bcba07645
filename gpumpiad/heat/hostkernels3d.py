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

import numpy as np

from .. import kernelbuild
from ..arguments import is_int
from ..backend import _rank
from .hostkernels import (_DTYPES, DEEP_SWEEP_BYTES, Addresses, _address, _adjoints, _bare,
                          _check_fields)
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


class Loop:
    """The 3-D host kernels of one solve's time loops, bound to its padded ``kappa`` and ``f``
    (held on to) with their arguments checked and converted once: the 3-D counterpart of
    :class:`gpumpiad.heat.hostkernels.Loop`, with its methods and their bits.

    Every state and cotangent buffer the loop is given must be a C-contiguous array of
    ``kappa``'s shape and dtype that the solver owns: they are not checked again (the checks
    cost as much as the step of a 24³ patch). ``wrap``: ``(along i, along j, along k)``,
    whether the patch is its own neighbour along that axis (one patch along a periodic axis):
    those ghosts are then filled by the kernels, not MPI. ``depths``: steps per sweep over the
    planes where no ghost is wrapped along i, ``(forward, reverse)`` (the reverse one 1 or
    even); by default :data:`DEEP_DEPTHS` or :data:`SHALLOW_DEPTHS` by the fields' size.

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

    __slots__ = ("_step", "_steps", "_adjoint", "_adjoints", "_wrap", "_fields", "_kappa",
                 "_f", "_dims", "_scalars", "_box", "_wraps", "_pointer", "_dtype", "_interior",
                 "depths")

    def __init__(self, kappa, f, r, dt, wrap=(False, False, False), depths=None):
        dtype, dims, box, (ka, fa) = _fields([("kappa", kappa), ("f", f)], [],
                                             (1, None, 1, None, 1, None))
        if depths is None:
            depths = DEEP_DEPTHS if kappa.nbytes >= DEEP_SWEEP_BYTES else SHALLOW_DEPTHS
        forward, reverse = depths
        if not (is_int(forward) and is_int(reverse) and 1 <= forward <= MAX_DEPTH and
                1 <= reverse <= MAX_DEPTH and (reverse == 1 or reverse % 2 == 0)):
            raise ValueError(f"rank {_rank()}: depths must be (forward 1 .. {MAX_DEPTH}, reverse "
                             f"1 or even 2 .. {MAX_DEPTH}), got {depths!r}")
        #: Steps per sweep over the planes without ghosts wrapped along i, ``(forward,
        #: reverse)``.
        self.depths = (int(forward), int(reverse))
        suffix = _DTYPES[dtype]
        names = ("step", "steps", "adjoint_wrapped", "wrap")
        self._step, self._steps, self._adjoint, self._wrap = (
            _bare(f"host_heat3d_{name}_{suffix}", load=_load) for name in names)
        self._adjoints = _bare(f"host_heat3d_adjoints_{suffix}", ctypes.c_void_p, load=_load)
        real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self._fields = (kappa, f)
        self._dtype, self._interior = dtype, dims
        self._kappa, self._f = ctypes.c_void_p(ka), ctypes.c_void_p(fa)
        self._dims = tuple(ctypes.c_int(n) for n in dims)
        self._scalars = (real(r), real(dt))
        self._box = tuple(ctypes.c_int(b) for b in box)    # the whole interior
        self._wraps = tuple(ctypes.c_int(int(bool(w))) for w in wrap)
        self._pointer = Addresses()

    def step(self, u, u_new):
        """``u_new = step(u)`` on the whole interior (``u``'s ghosts already filled)."""
        self._step(self._pointer(u), self._kappa, self._f, self._pointer(u_new), *self._dims,
                   *self._scalars, *self._box)

    def steps(self, states):
        """``states[n + 1] = step(states[n])`` for every ``n`` in one call, the wrapped ghosts
        of each state filled before it is read (the last one's too). Consecutive states must
        be distinct buffers; a buffer that appears more than once ends holding its last state.
        Without ghosts wrapped along i the steps go ``depths[0]`` per sweep over the planes:
        the bits of single steps. A state may be given as its buffer's data address (an int)."""
        if not states:
            raise ValueError(f"rank {_rank()}: steps needs the first state, got no states")
        table = (ctypes.c_void_p * len(states))(*(a if type(a) is int else self._pointer(a)
                                                  for a in states))
        self._steps(table, self._kappa, self._f, *self._dims, *self._scalars,
                    ctypes.c_int(len(states) - 1), *self._wraps, ctypes.c_int(self.depths[0]))

    def wrap(self, a):
        """Fill ``a``'s wrapped ghosts (no-op without any)."""
        self._wrap(self._pointer(a), *self._dims, *self._wraps)

    def adjoint(self, lam_next, u, lam, kappa_bar, f_bar):
        """The fused adjoint on the whole interior after filling ``lam_next``'s wrapped ghosts
        (its other ghosts already filled); ``u``, ``kappa_bar``, ``f_bar`` may be None as in
        :func:`adjoint`."""
        mask = grads(u, kappa_bar, f_bar)
        pointer = self._pointer
        self._adjoint(pointer(lam_next), self._kappa, None if u is None else pointer(u),
                      pointer(lam), None if kappa_bar is None else pointer(kappa_bar),
                      None if f_bar is None else pointer(f_bar), *self._dims, *self._scalars,
                      ctypes.c_int(mask), *self._wraps)

    def adjoints(self, lam, spare, states, kappa_bar, f_bar, traj=None):
        """``len(states)`` adjoint steps in one call, as :meth:`adjoint` once per step from the
        last state to the first with ``lam`` and ``spare`` in turn (``lam`` holds the first
        ``lam_next``); returns the one of the two that holds the last ``lam`` (the other one's
        contents are not kept).

        ``states``: ``u^0 ... u^(n-1)`` (buffers of the loop's shape and dtype, or their data
        addresses as ints), or ``n``, the number of steps, when no state is read (no
        ``kappa_bar``). ``traj``: ``None`` or a C-contiguous array of the loop's dtype and shape
        ``(n + 1, nx, ny, nz)`` whose ``traj[k]`` is added to the interior of ``lam^k`` after
        its step (k < n). No halo exchange: for a patch no other rank borders. Without ghosts
        wrapped along i the steps go ``depths[1]`` per sweep over the planes: the bits of
        single steps.

        Raises
        ------
        ValueError
            On a ``traj`` of another dtype, shape or layout.
        """
        return _adjoints(self, lam, spare, states, kappa_bar, f_bar, traj)

    def forget(self, a):
        """Drop ``a``'s cached address (the solver no longer hands ``a`` to the loop)."""
        self._pointer.forget(a)
