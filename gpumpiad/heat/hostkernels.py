"""Host (CPU) build of ``kernels/heat.cu``, loaded through :mod:`ctypes`.

The CUDA source is compiled as C++ with ``-DGPUMPIAD_HOST`` (see
``kernels/host_cuda.h``), so the numerics are the per-cell functions of the
GPU kernels themselves. :func:`gpumpiad.kernelbuild.host_library` builds and
caches it (for this CPU when the compiler accepts ``-march=native``, portably
otherwise, with the same bits; ``CXX`` and ``GPUMPIAD_HOST_MARCH`` choose the
compiler and the build).

The public functions mirror :mod:`gpumpiad.heat.stencil` and accept NumPy
``float32``/``float64`` C-contiguous arrays.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from .. import kernelbuild
from ..arguments import is_int
from ..backend import _rank
from ..kernelbuild import CXXFLAGS, NATIVE_FLAGS
from .stencil import check_rect, grads

__all__ = [
    "available",
    "library_path",
    "build_info",
    "step",
    "adjoint",
    "pack",
    "unpack",
    "copy4",
    "BoundLoop",
    "Loop",
    "pad",
    "CXXFLAGS",
    "NATIVE_FLAGS",
]

_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}

#: Steps per sweep over the rows of :class:`Loop`'s forward and reverse loops, ``(forward,
#: reverse)``, for fields of at least ``DEEP_SWEEP_BYTES`` (padded) and for smaller ones. A
#: deeper sweep passes each field through memory once per more steps: it pays where the fields
#: outgrow the caches (1024² float64: a forward solve in 25 % and a gradient in 10 % less time)
#: and costs where they fit (512²: the forward 7 % slower; 128²: 5-17 %), measured in
#: ``bench/results/heat_kernels_cpu.md``.
DEEP_SWEEP_BYTES = 4 << 20
DEEP_DEPTHS = (8, 4)
SHALLOW_DEPTHS = (2, 2)
#: The most steps one sweep takes: a reverse sweep holds 5 rows per step in its ring, and
#: sweeps past 8 steps measured no faster.
MAX_DEPTH = 64

_lock = threading.Lock()
_lib = None
_lib_error: Exception | None = None
_built = {}


def _build() -> Path:
    """The cached library for this compiler, CPU and ``GPUMPIAD_HOST_MARCH``, built if need
    be; what it is, in ``_built``."""
    info = kernelbuild.host_library("heat.cu", includes=("host_cuda.h",))
    _built.update(info)
    return info["path"]


def build_info() -> dict:
    """How the loaded host library was built.

    Returns
    -------
    dict
        ``path``, ``march`` (``"native"`` or ``"portable"``), ``flags``, ``compiler``,
        ``version`` (the compiler's first line), ``cpu`` (what a native build is keyed by),
        ``refused`` (the compiler's complaint about a native build it fell back from, or None).

    Examples
    --------
    >>> from gpumpiad.heat import hostkernels
    >>> hostkernels.build_info()["march"] in ("native", "portable")
    True
    """
    _load()
    return dict(_built)


def _declare(lib) -> None:
    p = ctypes.c_void_p
    i = ctypes.c_int
    for suffix, real in (("float32", ctypes.c_float), ("float64", ctypes.c_double)):
        sigs = {
            "host_heat_step": [p, p, p, p, i, i, real, real, i, i, i, i],
            "host_heat_adjoint": [p, p, p, p, p, p, i, i, real, real, i, i, i, i, i],
            "host_heat_steps": [p, p, p, i, i, real, real, i, i, i, i],
            "host_heat_adjoint_wrapped": [p, p, p, p, p, p, i, i, real, real, i, i, i],
            "host_wrap": [p, i, i, i, i],
            "host_pad": [p, p, i, i, i, p],
            "host_halo_pack": [p, p, i, i, i, i],
            "host_halo_unpack": [p, p, i, i, i, i, i],
            "host_copy4": [p, p, p, p, ctypes.c_longlong],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = None
        fn = getattr(lib, f"host_heat_adjoints_{suffix}")
        fn.argtypes = [p, p, p, p, p, p, p, i, i, real, real, i, i, i, i, i]
        fn.restype = p


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
    if not a.flags.aligned:
        # The kernels' loops may step to a vector boundary assuming whole elements.
        raise ValueError(f"{name} must be aligned to its {a.dtype.itemsize}-byte elements")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return a


def _check_fields(inputs, outputs, ndim=2):
    """Check padded ``ndim``-D fields (name, array) pairs; return (dtype, nx, ny[, nz])."""
    first_name, first = inputs[0]
    _check_array(first_name, first)
    if first.ndim != ndim or min(first.shape) < 3:
        names = ("nx", "ny", "nz")[:ndim]
        raise ValueError(f"{first_name} must be {ndim}-D of shape "
                         f"({', '.join(n + '+2' for n in names)}) with {', '.join(names)} >= 1, "
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
    return (first.dtype, *(n - 2 for n in first.shape))


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


_bare_functions = {}


def _bare(name, restype=None, load=None):
    """Library function ``name`` without declared argtypes, for calls with ready ctypes values
    (no conversion per call): a handle of its own (``lib[name]``), so that the one
    :func:`_fn` declares keeps its argtypes; made once. ``load``: the library's loader
    (default this module's)."""
    fn = _bare_functions.get(name)
    if fn is None:
        fn = (load or _load)()[name]
        fn.restype = restype
        _bare_functions[name] = fn
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
            if not (flags.c_contiguous and flags.aligned) or \
                    (len(addresses) >= count and not flags.writeable):
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
        Output, overlapping no input.
    """
    _check_array("a", a)
    for name, x in (("b", b), ("c", c), ("d", d)):
        _check_array(name, x, a.dtype, writable=name == "d")
        if x.size != a.size:
            raise ValueError(f"{name} has {x.size} elements, expected {a.size}")
    for name, x in (("a", a), ("b", b), ("c", c)):
        if np.may_share_memory(d, x):
            raise ValueError(f"d must not overlap {name}")
    _fn("host_copy4", a.dtype)(a.ctypes.data, b.ctypes.data, c.ctypes.data, d.ctypes.data, a.size)


class Addresses:
    """Arrays' data addresses as ``c_void_p``, each made once per buffer (the buffer kept alive
    with it, so that the address stays valid); at most 16 (stored states pass once each, the
    ping-pong buffers stay)."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries = {}

    def __call__(self, a):
        entry = self._entries.get(id(a))
        if entry is None or entry[0] is not a:
            if len(self._entries) >= 16:
                self._entries.clear()
            entry = self._entries[id(a)] = (a, ctypes.c_void_p(_address(a, a.flags.writeable)))
        return entry[1]

    def forget(self, a):
        """Drop ``a``'s address (and the reference to ``a``)."""
        self._entries.pop(id(a), None)


class BoundLoop:
    """What the 2-D and 3-D host loops share: the kernels of one solve's time loops bound to
    its padded ``kappa`` and ``f`` (held on to: the kernels read them through their
    addresses), their arguments checked and converted once. Every state and cotangent buffer
    a loop is given afterwards must be a C-contiguous array of their shape and dtype that the
    solver owns (not checked again: the checks cost more than a small patch's step).

    ``functions``: the library's step, steps, wrapping adjoint, wrap and adjoints functions for
    the fields' dtype; ``addresses``: kappa's and f's; ``box``: the whole interior's bounds;
    ``defaults``: the depths of small and of large fields; ``single``: whether the reverse
    depth may be 1 (one step at a time) besides even.
    """

    __slots__ = ("_step", "_steps", "_adjoint", "_adjoints", "_wrap", "_fixed", "_dims",
                 "_scalars", "_wraps", "_pointer", "_kappa", "_whole", "_dtype", "_interior",
                 "_fields", "depths")

    def __init__(self, kappa, f, r, dt, wrap, depths, *, functions, addresses, dtype, interior,
                 box, defaults, single):
        if depths is None:
            depths = defaults[kappa.nbytes >= DEEP_SWEEP_BYTES]
        forward, reverse = depths
        if not (is_int(forward) and is_int(reverse) and 1 <= forward <= MAX_DEPTH and
                1 <= reverse <= MAX_DEPTH and (reverse % 2 == 0 or single and reverse == 1)):
            raise ValueError(f"rank {_rank()}: depths must be (forward 1 .. {MAX_DEPTH}, "
                             f"reverse {'1 or ' if single else ''}even 2 .. {MAX_DEPTH}), got "
                             f"{depths!r}")
        #: Steps per sweep over the rows (2-D) or planes (3-D), ``(forward, reverse)``.
        self.depths = (int(forward), int(reverse))
        self._step, self._steps, self._adjoint, self._wrap, self._adjoints = functions
        self._dtype, self._interior = dtype, tuple(interior)
        real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self._kappa = ctypes.c_void_p(addresses[0])
        self._fixed = (self._kappa, ctypes.c_void_p(addresses[1]))
        self._fields = (kappa, f)
        self._dims = tuple(ctypes.c_int(n) for n in interior)
        self._scalars = (real(r), real(dt))
        self._wraps = tuple(ctypes.c_int(int(bool(w))) for w in wrap)
        self._whole = tuple(ctypes.c_int(b) for b in box)
        self._pointer = Addresses()

    def step(self, u, u_new):
        """``u_new = step(u)`` on the whole interior (``u``'s ghosts already filled)."""
        self._step(self._pointer(u), *self._fixed, self._pointer(u_new), *self._dims,
                   *self._scalars, *self._whole)

    def steps(self, states):
        """``states[n + 1] = step(states[n])`` for every ``n`` in one call, the wrapped ghosts
        of each state filled before it is read (the last one's too). Consecutive states must
        be distinct buffers; a buffer that appears more than once ends holding its last
        state. Without ghosts wrapped along i the steps go ``depths[0]`` per sweep (2-D, two:
        the first of a pair in a ring of rows when a later state overwrites its buffer): the
        bits of single steps. A state may be given as its buffer's data address (an int)
        instead."""
        if not states:
            raise ValueError(f"rank {_rank()}: steps needs the first state, got no states")
        table = (ctypes.c_void_p * len(states))(*(a if type(a) is int else self._pointer(a)
                                                  for a in states))
        self._steps(table, *self._fixed, *self._dims, *self._scalars,
                    ctypes.c_int(len(states) - 1), *self._wraps, ctypes.c_int(self.depths[0]))

    def wrap(self, a):
        """Fill ``a``'s wrapped ghosts (no-op without any)."""
        self._wrap(self._pointer(a), *self._dims, *self._wraps)

    def adjoint(self, lam_next, u, lam, kappa_bar, f_bar):
        """The fused adjoint on the whole interior after filling ``lam_next``'s wrapped ghosts
        (its other ghosts already filled); ``u``, ``kappa_bar``, ``f_bar`` may be None as in
        the module's ``adjoint``."""
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

        ``states``: ``u^0 ... u^(n-1)`` (C-contiguous buffers of the loop's shape and dtype, or
        their data addresses as ints), or ``n``, the number of steps, when no state is read (no
        ``kappa_bar``). ``traj``: ``None`` or a C-contiguous array of the loop's dtype and shape
        ``(n + 1,)`` + the interior's, whose ``traj[k]`` is added to the interior of ``lam^k``
        after its step (k < n). No halo exchange: for a patch no other rank borders. Without
        ghosts wrapped along i the steps go ``depths[1]`` per sweep: the bits of single steps.

        Raises
        ------
        ValueError
            On a ``traj`` of another dtype, shape or layout.
        """
        if isinstance(states, int):
            steps, table = states, None
        else:
            steps = len(states)
            table = (ctypes.c_void_p * steps)(*(a if type(a) is int else
                                                 _address(a, a.flags.writeable) for a in states))
        mask = grads(None if table is None else lam, kappa_bar, f_bar)
        address = None
        if traj is not None:
            shape, dtype = (steps + 1,) + self._interior, self._dtype
            if (type(traj) is not np.ndarray or traj.dtype != dtype or traj.shape != shape or
                    not traj.flags.c_contiguous):
                raise ValueError(f"rank {_rank()}: traj must be a C-contiguous {dtype} "
                                 f"numpy.ndarray of shape {shape}, got {type(traj).__name__} "
                                 f"{getattr(traj, 'dtype', None)} {getattr(traj, 'shape', None)}")
            address = ctypes.c_void_p(traj.ctypes.data)
        if steps <= 0:
            return lam
        pointer = self._pointer
        first = pointer(lam)
        last = self._adjoints(first, pointer(spare), self._kappa, table,
                              None if kappa_bar is None else pointer(kappa_bar),
                              None if f_bar is None else pointer(f_bar), address, *self._dims,
                              *self._scalars, ctypes.c_int(steps), ctypes.c_int(mask),
                              *self._wraps, ctypes.c_int(self.depths[1]))
        return lam if last == first.value else spare

    def forget(self, a):
        """Drop ``a``'s cached address (the solver no longer hands ``a`` to the loop)."""
        self._pointer.forget(a)


class Loop(BoundLoop):
    """The host kernels of one 2-D solve's time loops, their arguments checked and converted
    once (:class:`BoundLoop`'s methods).

    ``wrap``: ``(along i, along j)``, whether the patch is its own neighbour along that axis
    (one patch along a periodic axis): those ghosts are then filled by the kernels, not MPI.
    ``depths``: steps per sweep over the rows, ``(forward, reverse)`` (the reverse one even);
    by default :data:`DEEP_DEPTHS` or :data:`SHALLOW_DEPTHS` by the fields' size. Every depth
    gives the same bits.

    Raises
    ------
    ValueError
        On wrong dtype, layout or shape of ``kappa`` or ``f``, or on depths that are not ints
        from 1 (forward) or even from 2 (reverse) to :data:`MAX_DEPTH`.

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat import hostkernels
    >>> kappa, f = np.ones((6, 5)), np.zeros((6, 5))
    >>> states = [np.random.default_rng(0).random((6, 5))] + [np.zeros((6, 5)) for _ in range(2)]
    >>> loop = hostkernels.Loop(kappa, f, r=0.2, dt=1e-3, wrap=(True, True))
    >>> loop.steps(states + [states[1]])        # three steps, two buffers in turn
    >>> bool((states[1][0, 1:-1] == states[1][-2, 1:-1]).all())   # wrapped ghosts filled
    True
    """

    __slots__ = ()

    def __init__(self, kappa, f, r, dt, wrap=(False, False), depths=None):
        dtype, nx, ny, addresses = _fields([("kappa", kappa), ("f", f)], [])
        suffix = _DTYPES[dtype]
        functions = tuple(_bare(f"{name}_{suffix}") for name in (
            "host_heat_step", "host_heat_steps", "host_heat_adjoint_wrapped", "host_wrap"))
        super().__init__(kappa, f, r, dt, wrap, depths,
                         functions=functions + (_bare(f"host_heat_adjoints_{suffix}",
                                                      ctypes.c_void_p),),
                         addresses=addresses, dtype=dtype, interior=(nx, ny),
                         box=(1, nx + 1, 1, ny + 1), defaults=(SHALLOW_DEPTHS, DEEP_DEPTHS),
                         single=False)


def pad(src, dst):
    """Copy ``src`` (``nx x ny`` or ``nx x ny x nz``, C-contiguous) into the interior of padded
    ``dst`` and return ``(min, max, count of NaN and Inf)`` of its values (min and max over
    the finite ones).

    One pass: the solver's padded copy of an argument and its check together.

    Raises
    ------
    ValueError
        On wrong dtype, layout or shapes.

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat import hostkernels
    >>> dst = np.zeros((4, 5))
    >>> hostkernels.pad(np.array([[1.0, np.inf, -2.0], [3.0, 0.5, np.nan]]), dst)
    (-2.0, 3.0, 2)
    """
    _check_array("dst", dst, writable=True)
    _check_array("src", src, dst.dtype)
    if dst.ndim not in (2, 3) or src.shape != tuple(n - 2 for n in dst.shape) or src.size == 0:
        raise ValueError(f"src of shape {src.shape} does not fill the interior of dst of "
                         f"shape {dst.shape}")
    if np.may_share_memory(src, dst):
        raise ValueError("src must not overlap dst")
    stats = np.empty(3)
    # A 3-D field: its planes, each into a padded plane of dst from dst[1] on.
    planes, first = (1, dst) if dst.ndim == 2 else (src.shape[0], dst[1])
    _fn("host_pad", dst.dtype)(_address(src, src.flags.writeable), _address(first, True),
                              planes, *src.shape[-2:], _address(stats, True))
    return float(stats[0]), float(stats[1]), int(stats[2])
