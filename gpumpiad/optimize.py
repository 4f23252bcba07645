"""``minimize``: MPI-capable optimisation of a gpumpiad loss, by SciPy or by a distributed L-BFGS.

Two designs, picked by ``method``:

* any :func:`scipy.optimize.minimize` method (default ``"L-BFGS-B"``): the root (rank 0 of
  ``comm``) holds the parameters and runs SciPy; the other ranks wait for instructions
  ("evaluate at this x", "stop"). Every evaluation is collective: all ranks run the loss and its
  gradient at the x the root sent with the instruction.
* ``"dist-lbfgs"``: gpumpiad's own L-BFGS, run on every rank with the vectors kept split, for
  problems whose parameters do not fit on one rank.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import numbers
import operator
import os
import time
from collections.abc import Mapping

import numpy
import scipy.optimize
from mpi4py import MPI

from . import checkpoint as ckpt
from . import control
from .arguments import is_int
from .autodiff import value_and_grad
from .backend import all_finite, to_numpy
from .comm import resolve
from .debug import wait
from .tensor import Tensor, tensor

_EVAL, _STOP = 1, 0
_OLD_STYLE_CALLBACK = {"tnc", "cobyla", "cobyqa"}
_HESSIAN_METHODS = {"dogleg", "trust-ncg", "trust-exact", "trust-krylov"}
_BOUNDED_METHODS = {"nelder-mead", "powell", "l-bfgs-b", "tnc", "slsqp", "trust-constr",
                    "cobyla", "cobyqa"}
_FINAL = (0, 2)  # dist-lbfgs statuses a resumed run keeps: converged, line search failed
# Optim.jl's kind of stopping rule: an absolute bound on the gradient's infinity norm, and f no
# longer decreasing at all. SciPy's own L-BFGS-B defaults (gtol 1e-5; ftol 2.2e-9 relative to
# max(|f|, 1), so absolute when |f| < 1) stop a loss that is small near its minimum early,
# e.g. the seed problem at |θ - θ*| ~ 1e-7.
_STOPPING = {"gtol": 1e-10, "ftol": 0.0}
_DIST_LBFGS_DEFAULTS = {"maxiter": 15000, "maxcor": 10, **_STOPPING, "maxls": 20, "c1": 1e-4}
_INT_OPTIONS = {"maxiter": 0, "maxfun": 1, "maxfev": 1, "maxcor": 1, "maxls": 1}  # the minimum
_REAL_OPTIONS = {"gtol", "ftol", "xtol", "xatol", "fatol", "tol", "catol", "barrier_tol", "c1",
                 "c2", "initial_tr_radius", "final_tr_radius"}
_SCIPY_SOLVERS = {  # SciPy's implementation of each method, whose keywords are its options
    "nelder-mead": "_minimize_neldermead", "powell": "_minimize_powell", "cg": "_minimize_cg",
    "bfgs": "_minimize_bfgs", "newton-cg": "_minimize_newtoncg", "l-bfgs-b": "_minimize_lbfgsb",
    "tnc": "_minimize_tnc", "cobyla": "_minimize_cobyla", "cobyqa": "_minimize_cobyqa",
    "slsqp": "_minimize_slsqp", "trust-constr": "_minimize_trustregion_constr"}
_NOT_OPTIONS = {"fun", "x0", "args", "jac", "hess", "hessp", "bounds", "constraints",
                "callback"}


def minimize(fn, x0, method="L-BFGS-B", *, bounds=None, tol=None, options=None, callback=None,
             checkpoint=None, checkpoint_every=1, trace=True, comm=None):
    """Minimise the serial scalar loss ``fn(x)`` over ``x``, with every rank taking part.

    Collective: every rank of ``comm`` calls ``minimize`` with the same arguments.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> Tensor``: the loss, a serial scalar gpumpiad Tensor. ``x`` is a float64
        Tensor with ``x0``'s layout and (this rank's) shape. ``fn`` is differentiated with
        :func:`gpumpiad.value_and_grad` and is called collectively, so it may communicate.
    x0 : array_like or Tensor
        The start, real numbers, at least one in all. An array or serial Tensor: the
        parameters are serial (the root's ``x0`` is used). A distributed Tensor
        (``gpumpiad.tensor(piece, distributed=True)``): each rank holds its own piece (sizes
        may differ); the global vector is the pieces, flattened, in rank order.
    method : str
        A :func:`scipy.optimize.minimize` method that needs no Hessian (the gradient-based
        ones use the gradient), or ``"dist-lbfgs"`` (see Notes).
    bounds : sequence of (low, high) pairs or scipy.optimize.Bounds, optional
        One pair per entry of the global vector (``None`` for no bound), or a ``Bounds``
        whose ``lb`` and ``ub`` are scalars or of the global size; only for the methods
        SciPy bounds (``"L-BFGS-B"``, ``"TNC"``, ``"SLSQP"``, ``"Powell"``,
        ``"Nelder-Mead"``, ``"trust-constr"``, ``"COBYLA"``, ``"COBYQA"``).
    tol : float, optional
        Passed to SciPy; for ``"dist-lbfgs"`` it sets ``gtol`` and ``ftol``.
    options : dict, optional
        The method's options, for the global vector; a name the method does not know is an
        error. Counts (``maxiter``, ``maxfun``, ``maxcor``, ``maxls``, ...) take any int or
        NumPy integer; tolerances any finite real >= 0. Without ``tol``, ``"L-BFGS-B"``
        defaults to ``gtol`` 1e-10 (on the gradient's infinity norm) and ``ftol`` 0 (stop
        when f no longer decreases), like Optim.jl's L-BFGS, instead of SciPy's 1e-5 and
        2.2e-9, which stop early on losses much smaller than 1; the other SciPy methods keep
        SciPy's defaults. ``"dist-lbfgs"`` takes ``maxiter`` (15000), ``maxcor`` (10),
        ``gtol`` (1e-10, on the gradient's infinity norm), ``ftol`` (0, on the reduction of
        f relative to ``max(|f|, 1)``), ``maxls`` (20) and ``c1`` (1e-4, in (0, 1)).
    callback : callable, optional
        SciPy methods: runs on the root only (it must not communicate); raising
        ``StopIteration`` ends the run as in SciPy. ``"dist-lbfgs"``: runs on every rank with
        ``OptimizeResult(x=this rank's piece, fun, jac, nit)`` and must decide alike on every
        rank.
    checkpoint : str or os.PathLike, optional
        A file (written by the root, atomically, see :mod:`gpumpiad.checkpoint`) that holds
        the run's state every ``checkpoint_every`` iterations and at the end. If it exists
        when ``minimize`` starts, the run resumes from it and ends with the same result as an
        uninterrupted run. A checkpoint of another problem (method, size, ``x0``, or the
        loss and gradient at ``x0``) or a damaged file raises
        :class:`gpumpiad.checkpoint.CheckpointError` on every rank.
    checkpoint_every : int
        Iterations between checkpoints, >= 1.
    trace : bool
        Print, on the root, one line per iteration: iteration, function value, gradient
        infinity norm, seconds since the start (flushed at once).
    comm : gpumpiad.Comm, optional
        Default: ``x0``'s communicator when it is a Tensor, else the world.

    Returns
    -------
    scipy.optimize.OptimizeResult
        The same on every rank, except the per-rank fields. Serial ``x0``: ``x`` has ``x0``'s
        shape. Distributed ``x0``: ``x`` (and ``jac``) is the global flat vector and
        ``x_local`` (``jac_local``) this rank's piece in ``x0``'s local shape; with
        ``"dist-lbfgs"`` no rank holds the global vector, so ``x`` and ``x_local`` are both
        this rank's piece and ``jac`` is this rank's piece of the gradient.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or value, on every rank alike, naming the rank that
        holds it, the argument, what it must be and what it is. The arguments are checked,
        and compared across ranks where every rank uses them (``method``, the layout of
        ``x0``, whether there is a checkpoint; for ``"dist-lbfgs"`` also the options and
        ``checkpoint_every``), in one exchange before any other communication.
    gpumpiad.checkpoint.CheckpointError
        See ``checkpoint``.

    Notes
    -----
    *Root-held parameters.* SciPy sees the global vector on the root. Serial ``x0``: the
    root broadcasts x and uses its own gradient (serial, the same on every rank). Distributed
    ``x0``: the root scatters x into the pieces (``Scatterv``) and gathers the gradient pieces
    (``Gatherv``); the root needs memory for the global vector, the other ranks only for
    their pieces.

    *Checkpoints of SciPy runs* hold the log of every evaluation ``(x, f, g)``: SciPy's
    internal state is not accessible, but SciPy is deterministic, so a resumed run restarts
    SciPy from ``x0`` and answers each requested evaluation from the log while the requested
    x equals the logged one bit for bit (the root decides this alone; workers are only
    called for new evaluations). The log grows by ``n`` numbers per evaluation. The trace and
    the callback see the replayed iterations again.

    *Which problem a checkpoint belongs to.* Every checkpoint records the loss and the
    gradient at ``x0``. A run with a checkpoint file evaluates them first (a fresh run
    hands them to the optimiser, which starts there; a resumed run spends this one
    evaluation) and refuses a checkpoint whose values differ by more than ``sqrt(eps)`` of
    the loss's precision, relative (the gradient in the infinity norm): tight enough to
    tell problems apart, loose enough for the rounding of a resume on another number of
    ranks.

    *dist-lbfgs* is not SciPy's L-BFGS-B: it is a plain L-BFGS (two-loop recursion, memory
    ``maxcor``, initial Hessian ``s'y / y'y``) with a backtracking Armijo line search
    (safeguarded quadratic interpolation; first step ``min(1, 1/|g|_2)``), no bounds. Vectors
    stay split like ``x0``; each dot product is an allreduce of a scalar, so its iterates equal
    those of the same algorithm on the gathered vectors up to rounding (the tests hold them to
    1e-10), not bit for bit across rank counts. Its checkpoint holds its state directly
    (x, f, g and the memory pairs), gathered to the root while saving, so the root then needs
    memory for ``2 maxcor + 3`` global vectors; it resumes on any number of ranks.

    A loss that raises on every rank alike (e.g. a :class:`gpumpiad.LossError`) raises on every
    rank; one that fails on some ranks only inside a collective leaves the others waiting,
    as any MPI program would.

    Examples
    --------
    Find θ with ``sum over ranks r of θ**r = 2``, one term per rank; the default stopping
    rule reaches the root to the last digits.

    >>> import numpy as np, gpumpiad
    >>> from gpumpiad.optimize import minimize
    >>> def loss(theta):
    ...     terms = gpumpiad.mpi_bcast(theta) ** gpumpiad.mpi_rank()
    ...     return (gpumpiad.mpi_sum(terms).sum() - 2.0) ** 2
    >>> res = minimize(loss, np.ones(1), trace=False)
    >>> bool(res.success)
    True
    """
    comm = resolve(x0.comm if comm is None and isinstance(x0, Tensor) else comm)
    try:
        args = _Arguments(fn, method, bounds, tol, options, callback, checkpoint,
                          checkpoint_every, trace, comm.rank)
        error = None
    except (TypeError, ValueError) as exc:
        args, error = None, exc
    problem = _Problem(fn, x0, comm, args, error)
    try:
        if args.name == "dist-lbfgs":
            return _DistLBFGS(problem, args.options, callback, checkpoint, args.every,
                              trace).run()
        return _RootScipy(problem, method, bounds, tol, args.options, callback, checkpoint,
                          args.every, trace).run()
    finally:
        problem.ctl.free()


def _scipy_methods():
    try:
        from scipy.optimize._minimize import MINIMIZE_METHODS
        return list(MINIMIZE_METHODS)
    except ImportError:  # private in SciPy; fall back to the documented list
        return ["nelder-mead", "powell", "cg", "bfgs", "newton-cg", "l-bfgs-b", "tnc",
                "cobyla", "cobyqa", "slsqp", "trust-constr", "dogleg", "trust-ncg",
                "trust-exact", "trust-krylov"]


def _scipy_options(name):
    """The options SciPy's method ``name`` takes, with their defaults, or ``None`` when SciPy
    does not tell."""
    try:
        from scipy.optimize import _minimize
        solver = getattr(_minimize, _SCIPY_SOLVERS[name])
        params = inspect.signature(solver).parameters.values()
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return None  # private in SciPy: without it SciPy itself warns of unknown options
    return {p.name: p.default for p in sorted(params, key=lambda p: p.name)
            if p.name not in _NOT_OPTIONS and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _as_int(value, what, rank, low):
    """``value`` (an int or NumPy integer, not a bool) as an ``int`` >= ``low``."""
    if not is_int(value):
        raise TypeError(f"rank {rank}: minimize's {what} must be an int >= {low}, got "
                        f"{value!r} ({type(value).__name__})")
    value = operator.index(value)
    if value < low:
        raise ValueError(f"rank {rank}: minimize's {what} must be an int >= {low}, got {value}")
    return value


def _as_real(value, what, rank):
    """``value`` (a real number, not a bool) as a finite ``float`` >= 0."""
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"rank {rank}: minimize's {what} must be a real number >= 0, got "
                        f"{value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"rank {rank}: minimize's {what} must be a finite real number >= 0, "
                         f"got {value!r}")
    return value


class _Arguments:
    """``minimize``'s arguments, checked on this rank alone (no communication); raises
    TypeError or ValueError naming the rank, the argument, the expectation and the value."""

    def __init__(self, fn, method, bounds, tol, options, callback, path, every, trace, rank):
        self.rank = rank
        if not callable(fn):
            raise TypeError(f"rank {rank}: minimize's fn must be callable, got {fn!r} "
                            f"({type(fn).__name__})")
        if not isinstance(method, str):
            raise TypeError(f"rank {rank}: minimize's method must be a str, got {method!r} "
                            f"({type(method).__name__})")
        self.method, self.name = method, method.lower()
        if self.name != "dist-lbfgs" and self.name not in _scipy_methods():
            raise ValueError(f"rank {rank}: unknown method {method!r}; expected 'dist-lbfgs' "
                             f"or one of scipy.optimize.minimize's: "
                             f"{', '.join(_scipy_methods())}")
        if self.name in _HESSIAN_METHODS:
            raise ValueError(f"rank {rank}: method {method!r} needs the Hessian, which "
                             "minimize does not compute; expected a method that needs at most "
                             "the gradient, e.g. 'L-BFGS-B', 'BFGS', 'CG', 'trust-constr' or "
                             "'dist-lbfgs'")
        self.tol = None if tol is None else _as_real(tol, "tol", rank)
        if callback is not None and not callable(callback):
            raise TypeError(f"rank {rank}: minimize's callback must be callable or None, got "
                            f"{callback!r} ({type(callback).__name__})")
        if not isinstance(trace, (bool, numpy.bool_)):
            raise TypeError(f"rank {rank}: minimize's trace must be a bool, got {trace!r} "
                            f"({type(trace).__name__})")
        if path is not None and not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"rank {rank}: minimize's checkpoint must be a str or os.PathLike "
                            f"(a file name) or None, got {path!r} ({type(path).__name__})")
        if path is not None and not os.fspath(path):
            raise ValueError(f"rank {rank}: minimize's checkpoint must be a file name or None, "
                             f"got {path!r}")
        self.checkpointed = path is not None
        self.every = _as_int(every, "checkpoint_every", rank, 1)
        self.options = self._options(options)
        self.bounds = self._bounds(bounds)

    def agreed(self):
        """What every rank must pass alike, by name."""
        out = {"method": self.name, "checkpoint (given or not)": self.checkpointed}
        if self.name == "dist-lbfgs":  # every rank runs the iteration, not only the root
            out.update(options=self.options, checkpoint_every=self.every)
        return out

    def _options(self, options):
        rank, name = self.rank, self.name
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(f"rank {rank}: minimize's options must be a dict or None, got "
                            f"{options!r} ({type(options).__name__})")
        for key in options:
            if not isinstance(key, str):
                raise TypeError(f"rank {rank}: minimize's options must have str keys (option "
                                f"names), got {key!r} ({type(key).__name__})")
        if name == "dist-lbfgs":
            known, opts = dict(_DIST_LBFGS_DEFAULTS), dict(_DIST_LBFGS_DEFAULTS)
            if self.tol is not None:
                opts["gtol"] = opts["ftol"] = self.tol
        else:
            known = _scipy_options(name)
            opts = dict(_STOPPING) if name == "l-bfgs-b" and self.tol is None else {}
        for key, value in options.items():
            if known is not None and key not in known:
                raise ValueError(f"rank {rank}: unknown option {key!r} for method "
                                 f"{self.method!r}; expected one of {sorted(known)}")
            if value is None and known is not None and known[key] is None:
                pass  # SciPy's own default, e.g. BFGS's maxiter
            elif key in _INT_OPTIONS:
                value = _as_int(value, f"options[{key!r}]", rank, _INT_OPTIONS[key])
            elif key in _REAL_OPTIONS:
                value = _as_real(value, f"options[{key!r}]", rank)
            opts[key] = value
        if name == "dist-lbfgs" and not 0 < opts["c1"] < 1:
            raise ValueError(f"rank {rank}: minimize's options['c1'] must be in (0, 1), got "
                             f"{opts['c1']!r}")
        return opts

    def _bounds(self, bounds):
        """``None``, or ``(what, sizes, scalar allowed)`` for the check against the size."""
        rank = self.rank
        if bounds is None:
            return None
        if self.name == "dist-lbfgs":
            raise ValueError(f"rank {rank}: method 'dist-lbfgs' does not support bounds; "
                             "use method='L-BFGS-B'")
        if self.name not in _BOUNDED_METHODS:
            raise ValueError(f"rank {rank}: method {self.method!r} does not support bounds "
                             "(SciPy would ignore them); expected bounds=None or one of the "
                             f"methods {sorted(_BOUNDED_METHODS)}")
        if isinstance(bounds, scipy.optimize.Bounds):
            ends = []
            for end in ("lb", "ub"):
                try:
                    value = numpy.asarray(getattr(bounds, end), dtype=numpy.float64)
                except (TypeError, ValueError):
                    raise TypeError(f"rank {rank}: minimize's bounds.{end} must be real "
                                    f"numbers, got {getattr(bounds, end)!r}") from None
                if value.ndim > 1 or numpy.isnan(value).any():
                    raise ValueError(f"rank {rank}: minimize's bounds.{end} must be a scalar "
                                     f"or a vector without NaN, got {value!r}")
                ends.append(value)
            lb, ub = ends
            if lb.size == ub.size or 1 in (lb.size, ub.size):
                low = numpy.flatnonzero(numpy.broadcast_to(lb > ub, max(lb.shape, ub.shape)))
                if low.size:
                    raise ValueError(f"rank {rank}: minimize's bounds must have lb <= ub, got "
                                     f"lb > ub at index {int(low[0])}")
            return ("bounds.lb and bounds.ub", (lb.size, ub.size), True)
        try:
            pairs = list(bounds)
        except TypeError:
            raise TypeError(f"rank {rank}: minimize's bounds must be a sequence of (low, high) "
                            f"pairs or a scipy.optimize.Bounds, got {bounds!r} "
                            f"({type(bounds).__name__})") from None
        for i, pair in enumerate(pairs):
            try:
                low, high = pair
            except (TypeError, ValueError):
                raise TypeError(f"rank {rank}: minimize's bounds[{i}] must be a (low, high) "
                                f"pair, got {pair!r}") from None
            for end in (low, high):
                if end is not None and (isinstance(end, (bool, numpy.bool_))
                                        or not isinstance(end, numbers.Real)):
                    raise TypeError(f"rank {rank}: minimize's bounds[{i}] must hold real "
                                    f"numbers or None, got {pair!r}")
                if end is not None and math.isnan(end):
                    raise ValueError(f"rank {rank}: minimize's bounds[{i}] must not be NaN, "
                                     f"got {pair!r}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"rank {rank}: minimize's bounds[{i}] must have low <= high, "
                                 f"got {pair!r}")
        return ("bounds", (len(pairs),), False)


def _local_x0(x0, rank):
    """This rank's ``x0`` as a float64 array and whether it is distributed; TypeError if not
    real numbers."""
    try:
        raw = numpy.asarray(to_numpy(x0.data if isinstance(x0, Tensor) else x0))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"rank {rank}: minimize's x0 must be an array of real numbers, got "
                        f"{type(x0).__name__} ({exc})") from None
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"rank {rank}: minimize's x0 must be real numbers (int or float), "
                        f"got dtype {raw.dtype}")
    return numpy.array(raw, dtype=numpy.float64), isinstance(x0, Tensor) and x0.distributed


def _agree(comm, x0, args, error):
    """The one exchange of ``minimize``'s argument check: every rank's problems, what must be
    alike, and the layout of x0. Raises on every rank alike; returns ``(distributed, x0 of
    this rank, sizes per rank)``."""
    rank = comm.rank
    local, distributed, finite = None, None, True
    if error is None:
        try:
            local, distributed = _local_x0(x0, rank)
            finite = all_finite(local)
        except TypeError as exc:
            error = exc
    report = {"error": None if error is None else (type(error).__name__, str(error)),
              "agreed": None if args is None else args.agreed(),
              "distributed": distributed,
              "size": None if local is None else local.size, "finite": finite,
              "bounds": None if args is None else args.bounds,
              "x0": local if rank == 0 and not distributed else None}
    reports = control.allgather(comm, report, "minimize's argument check")
    if error is not None:
        raise error
    for r in reports:  # this rank's arguments are fine: raise the first rank's error
        if r["error"] is not None:
            kind, message = r["error"]
            raise (TypeError if kind == "TypeError" else ValueError)(message)
    views = {"x0 (distributed or not)": [r["distributed"] for r in reports]}
    for key in reports[0]["agreed"]:
        views[key] = [r["agreed"][key] for r in reports]
    for key, values in views.items():
        if any(v != values[0] for v in values):
            raise ValueError(f"rank {rank}: minimize's {key} is not the same on every rank: "
                             + ", ".join(f"rank {q}: {v!r}" for q, v in enumerate(values))
                             + "; expected the same arguments on every rank")
    if distributed:
        sizes = [r["size"] for r in reports]
        bad = [q for q, r in enumerate(reports) if not r["finite"]]
        if bad:
            raise ValueError(f"rank {rank}: minimize's x0 (distributed) holds NaN or Inf on "
                             f"rank(s) {bad}: expected finite values")
    else:
        local = reports[0]["x0"]  # the root's x0 is the start
        sizes = [local.size]
        if not reports[0]["finite"]:
            raise ValueError(f"rank {rank}: minimize's x0 holds NaN or Inf (the root's x0 is "
                             f"used): expected finite values")
    n = sum(sizes)
    if n == 0:
        raise ValueError(f"rank {rank}: minimize's x0 must hold at least one number, got "
                         f"{'pieces of size ' + str(sizes) if distributed else 'an empty x0'}")
    bad = [(q, r["bounds"]) for q, r in enumerate(reports) if r["bounds"] is not None
           and any(c != n and not (r["bounds"][2] and c == 1) for c in r["bounds"][1])]
    if bad:
        what, counts, scalar = bad[0][1]
        where = f" on rank(s) {[q for q, _ in bad]}" if comm.size > 1 else ""
        raise ValueError(f"rank {rank}: minimize's {what} must have one entry per parameter"
                         f"{' (or a scalar)' if scalar else ''}: {n}, the global size of x0; "
                         f"got {' and '.join(map(str, counts))}{where}")
    return distributed, local, sizes


class _Problem:
    """The loss, the parameters' layout, and a private communicator for the optimiser's
    own messages (so they cannot match anything ``fn`` sends)."""

    def __init__(self, fn, x0, comm, args, error):
        self.distributed, local, sizes = _agree(comm, x0, args, error)
        self.fn = value_and_grad(fn)
        self.comm = comm
        self.ctl = comm.dup()  # freed by minimize when it ends
        self.root = 0
        self.is_root = comm.rank == self.root
        self.shape = local.shape
        self.x0_local = local.ravel()
        self.counts = numpy.array(sizes, dtype=numpy.int64)
        self.displs = numpy.concatenate([[0], numpy.cumsum(self.counts)[:-1]])
        self.n = int(self.counts.sum())
        self.rank_slice = (slice(int(self.displs[comm.rank]),
                                 int(self.displs[comm.rank] + self.counts[comm.rank]))
                           if self.distributed else slice(None))
        self.dtypes = ()  # of the last evaluation's loss and gradient

    def evaluate(self, x_local):
        """Collective: the loss and this rank's gradient (flat float64) at this rank's x."""
        xt = tensor(x_local.reshape(self.shape), distributed=self.distributed, comm=self.comm)
        value, g = self.fn(xt)
        value, g = numpy.asarray(to_numpy(value)), to_numpy(g)
        self.dtypes = (value.dtype, g.dtype)
        return float(value), g.astype(numpy.float64).ravel()

    def gather(self, local):
        """The global vector on the root (``None`` elsewhere); serial: the root's own copy."""
        if not self.distributed:
            return local if self.is_root else None
        out = numpy.empty(self.n) if self.is_root else None
        recv = [out, (self.counts, self.displs), MPI.DOUBLE] if self.is_root else None
        wait(self.ctl.mpi.Igatherv(numpy.ascontiguousarray(local), recv, root=self.root),
             None, "minimize's gather")
        return out

    def scatter(self, full):
        """This rank's piece of the root's global vector ``full``."""
        if not self.distributed:
            buf = full if self.is_root else numpy.empty(self.n)
            wait(self.ctl.mpi.Ibcast(buf, root=self.root), None, "minimize's broadcast")
            return buf
        out = numpy.empty(int(self.counts[self.comm.rank]))
        send = [full, (self.counts, self.displs), MPI.DOUBLE] if self.is_root else None
        wait(self.ctl.mpi.Iscatterv(send, out, root=self.root), None, "minimize's scatter")
        return out

    def fingerprint(self):
        """A hash of the global x0, valid on the root (collective)."""
        full = self.gather(self.x0_local)
        return hashlib.sha256(full.tobytes()).hexdigest() if self.is_root else None

    def shaped_local(self, flat):
        return flat.reshape(self.shape)


class _Trace:
    """The root's iteration log on stdout."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.header = False

    def line(self, it, f, gnorm):
        if not self.enabled:
            return
        if not self.header:
            print(f"{'Iter':>6} {'Function value':>16} {'Gradient norm':>16} {'Time (s)':>10}",
                  flush=True)
            self.header = True
        print(f"{it:6d} {f:16.6e} {gnorm:16.6e} {time.perf_counter() - self.start:10.3f}",
              flush=True)

    def note(self, text):
        if self.enabled:
            print(text, flush=True)


def _load_matching(path, problem, kind, method, fingerprint, start):
    """Root: the checkpoint at ``path``, checked against this problem and its loss and
    gradient at x0, ``start``."""
    state = ckpt.load(path)
    expected = {"kind": kind, "method": method, "n": problem.n, "x0_sha256": fingerprint}
    for key, want in expected.items():
        if state.get(key) != want:
            raise ckpt.CheckpointError(
                f"{path}: written for another problem: {key} is {state.get(key)!r}, this run "
                f"has {want!r} (delete the file to start afresh)")
    if not isinstance(state.get("f0"), float) or not isinstance(state.get("g0"), numpy.ndarray):
        raise ckpt.CheckpointError(
            f"{path}: holds no loss and gradient at x0 to tell its problem by (written by an "
            "older gpumpiad); delete the file to start afresh")
    _check_start(path, state["f0"], state["g0"], start, problem.dtypes)
    return state


def _check_start(path, f_saved, g_saved, start, dtypes):
    """Root: a CheckpointError unless the loss and gradient at x0 match the checkpoint's."""
    f, g = start
    # The same code on the same ranks reproduces them bit for bit, but a resume on another
    # number of ranks (or a GPU reduction) adds in another order, which moves the last bits
    # by about eps times the number of terms: sqrt(eps) of the loss's precision (1.5e-8 in
    # float64, 3.5e-4 in float32) stays far above that and far below what another loss, data
    # set or setting changes at x0.
    rtol = max((float(numpy.sqrt(numpy.finfo(d).eps)) for d in dtypes
                if numpy.issubdtype(d, numpy.floating)), default=float(numpy.sqrt(
                    numpy.finfo(numpy.float64).eps)))
    names = " and ".join(sorted({str(d) for d in dtypes}))
    tolerance = f"relative tolerance {rtol:.1e}, sqrt(eps) of {names}"
    if not _close(f_saved, f, rtol):
        raise ckpt.CheckpointError(
            f"{path}: written for another problem: the loss at x0 is {f_saved!r} in the "
            f"checkpoint, {f!r} in this run ({tolerance}); delete the file to start afresh")
    g_saved = numpy.asarray(g_saved, dtype=numpy.float64).ravel()
    if g_saved.shape != g.shape or not _close(g_saved, g, rtol):
        i = int(numpy.argmax(numpy.abs(g_saved - g))) if g_saved.shape == g.shape else 0
        raise ckpt.CheckpointError(
            f"{path}: written for another problem: the gradient at x0 differs, largest at "
            f"index {i}: {float(g_saved[i])!r} in the checkpoint, {float(g[i])!r} in this run "
            f"(infinity norms {_inf_norm(g_saved):.6e} and {_inf_norm(g):.6e}; {tolerance}, "
            "in the infinity norm); delete the file to start afresh")


def _close(a, b, rtol):
    """Whether ``a`` and ``b`` are equal bit for bit, or finite and within ``rtol`` of each
    other relative to the larger infinity norm."""
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    if a.tobytes() == b.tobytes():
        return True
    if not (numpy.isfinite(a).all() and numpy.isfinite(b).all()):
        return False
    return float(numpy.max(numpy.abs(a - b))) <= rtol * max(_inf_norm(a), _inf_norm(b))


def _collective(problem, fn):
    """Run ``fn()`` on the root; every rank returns its value or raises its error."""
    result = None
    if problem.is_root:
        try:
            result = ("ok", fn())
        except ckpt.CheckpointError as exc:
            result = ("error", str(exc))
        except Exception as exc:  # raised here, but the workers must not wait for the root
            result = ("failed", f"{type(exc).__name__}: {exc}")
            failure = exc
    status, value = control.bcast(problem.ctl, result, problem.root, "minimize's checkpoint")
    if status == "error":
        raise ckpt.CheckpointError(value if value.startswith("rank ")
                                   else f"rank {problem.root}: {value}")
    if status == "failed":
        if problem.is_root:
            raise failure
        raise RuntimeError(f"rank {problem.comm.rank}: minimize's checkpoint failed on rank "
                           f"{problem.root}: {value}")
    return value


class _RootScipy:
    """SciPy on the root, workers evaluating on request."""

    def __init__(self, problem, method, bounds, tol, options, callback, path, every, trace):
        self.p = problem
        self.method = method
        self.name = method.lower()
        self.bounds, self.tol, self.options = bounds, tol, options
        self.user_callback = callback
        self.path, self.every = path, every
        self.trace = _Trace(trace and problem.is_root)
        self.log_x, self.log_f, self.log_g = [], [], []
        self.replay = None
        self.replay_pos = 0
        self.seen = {}
        self.nit = 0
        self.fingerprint = None
        self.x0_full = None
        self.start = None  # the root's (f, g) at x0, recorded in the checkpoint
        self.first = None  # the evaluation at x0 made before SciPy started, until used

    def run(self):
        p = self.p
        self.x0_full = p.gather(p.x0_local)
        if self.path is not None:
            f0, g0 = p.evaluate(p.x0_local)
            g0 = p.gather(g0)
            if p.is_root:
                self.fingerprint = hashlib.sha256(self.x0_full.tobytes()).hexdigest()
                self.start = (f0, g0)
                self.first = (self.x0_full.tobytes(), f0, g0)
            _collective(p, self._resume)
        if p.is_root:
            error, outcome = self._drive()
        else:
            error, outcome = self._serve(), None
        status, value = control.bcast(p.ctl, outcome, p.root, "minimize's result")
        if status == "error":
            if error is not None:
                raise error
            raise RuntimeError(f"rank {p.comm.rank}: minimize failed on rank 0: {value}")
        res = value
        if p.distributed:
            res.x_local = p.shaped_local(res.x[p.rank_slice].copy())
            res.jac_local = p.shaped_local(numpy.asarray(res.jac)[p.rank_slice].copy())
        else:
            res.x = res.x.reshape(p.shape)
        return res

    def _resume(self):
        if not ckpt.exists(self.path):
            return None
        self.replay = _load_matching(self.path, self.p, "gpumpiad.optimize.scipy", self.name,
                                     self.fingerprint, self.start)
        self.start = (self.replay["f0"], self.replay["g0"])
        self.trace.note(f"resuming from {self.path}: replaying {len(self.replay['fs'])} "
                        "logged evaluations")
        return None

    def _drive(self):
        """Root: run SciPy; return ``(exception or None, (status, value) to broadcast)``."""
        error, res = None, None
        try:
            res = scipy.optimize.minimize(
                self._fun, self.x0_full, method=self.method, jac=True, bounds=self.bounds,
                tol=self.tol, options=self.options, callback=self._callback_for_scipy())
        except BaseException as exc:
            error = exc
        finally:
            _instruction(self.p, _STOP)
        if self.path is not None and self.log_f:
            try:
                self._save(finished=error is None)
            except ckpt.CheckpointError as exc:
                error = error or exc
        if error is not None:
            return error, ("error", f"{type(error).__name__}: {error}")
        return None, ("ok", res)

    def _serve(self):
        """Worker loop: evaluate where the root says until it says stop."""
        p, error = self.p, None
        while _instruction(p) == _EVAL:
            x = p.scatter(None)
            try:
                _, g = p.evaluate(x)
            except Exception as exc:  # the root fails alike; it will say stop
                error = exc
                continue
            if p.distributed:
                p.gather(g)
        return error

    def _fun(self, x):
        x = numpy.array(x, dtype=numpy.float64)
        if self.replay is not None:
            i = self.replay_pos
            if i < len(self.replay["fs"]) and self.replay["xs"][i].tobytes() == x.tobytes():
                self.replay_pos += 1
                return self._logged(x, float(self.replay["fs"][i]), self.replay["gs"][i].copy())
            self.replay = None
            self.trace.note(f"replay ended after {i} evaluations; evaluating afresh")
        if self.first is not None:
            key, f, g = self.first
            self.first = None
            if key == x.tobytes():
                return self._logged(x, f, g.copy())
        p = self.p
        _instruction(p, _EVAL)
        f, g = p.evaluate(p.scatter(x))
        if p.distributed:
            g = p.gather(g)
        return self._logged(x, f, g)

    def _logged(self, x, f, g):
        self.log_x.append(x)
        self.log_f.append(f)
        self.log_g.append(g)
        self.seen[x.tobytes()] = (f, g)
        if len(self.log_f) == 1:
            self.trace.line(0, f, _inf_norm(g))
        return f, g.copy()

    def _callback_for_scipy(self):
        if self.name in _OLD_STYLE_CALLBACK:
            def old_style(xk):
                self._iteration(numpy.asarray(xk, dtype=numpy.float64), None)
            return old_style

        def new_style(intermediate_result):
            self._iteration(numpy.asarray(intermediate_result.x, dtype=numpy.float64),
                            intermediate_result)
        return new_style

    def _iteration(self, xk, res):
        self.nit += 1
        f, g = self.seen.get(xk.tobytes(), (None, None))
        if f is None:
            f = float(getattr(res, "fun", numpy.nan))
        self.trace.line(self.nit, f, numpy.nan if g is None else _inf_norm(g))
        if self.path is not None and self.nit % self.every == 0:
            self._save(finished=False)
        cb = self.user_callback
        if cb is None:
            return
        if _new_style(cb) and res is not None:
            if g is not None and "jac" not in res:
                res["jac"] = numpy.copy(g)
            cb(intermediate_result=res)
        elif self.name == "trust-constr" and res is not None:
            cb(numpy.copy(xk), res)
        else:
            cb(numpy.copy(xk))

    def _save(self, finished):
        ckpt.save(self.path, {
            "kind": "gpumpiad.optimize.scipy", "method": self.name, "n": self.p.n,
            "x0_sha256": self.fingerprint, "f0": self.start[0], "g0": self.start[1],
            "nit": self.nit, "finished": finished,
            "xs": numpy.array(self.log_x).reshape(len(self.log_x), self.p.n),
            "fs": numpy.array(self.log_f, dtype=numpy.float64),
            "gs": numpy.array(self.log_g).reshape(len(self.log_g), self.p.n),
        })


def _instruction(p, command=None):
    """Root: send ``command``; workers: wait for and return the root's command.

    Workers wait by polling with short sleeps instead of MPI's busy wait, so that idle workers
    leave the CPU to the root (and to other ranks on oversubscribed nodes) while SciPy runs.
    """
    buf = numpy.array([-1 if command is None else command], dtype=numpy.int64)
    wait(p.ctl.mpi.Ibcast(buf, root=p.root), None, "minimize: the root's next instruction",
         idle=not p.is_root)
    return int(buf[0])


def _new_style(cb):
    try:
        return set(inspect.signature(cb).parameters) == {"intermediate_result"}
    except (TypeError, ValueError):
        return False


def _inf_norm(g):
    return float(numpy.max(numpy.abs(g))) if g.size else 0.0


class _DistLBFGS:
    """L-BFGS with split vectors; every rank runs it, dot products are allreduces."""

    def __init__(self, problem, opts, callback, path, every, trace):
        self.p = problem
        self.o = opts
        self.callback = callback
        self.path, self.every = path, every
        self.trace = _Trace(trace and problem.is_root)
        self.fingerprint = None
        self.start = None  # the root's (f, g) at x0, recorded in the checkpoint
        self.nfev = 0

    def dot(self, a, b):
        local = float(numpy.dot(a, b))
        return (control.allreduce(self.p.ctl, local, MPI.SUM, "minimize's dot product")
                if self.p.distributed else local)

    def inf_norm(self, g):
        local = _inf_norm(g)
        return (control.allreduce(self.p.ctl, local, MPI.MAX, "minimize's gradient norm")
                if self.p.distributed else local)

    def evaluate(self, x):
        self.nfev += 1
        return self.p.evaluate(x)

    def run(self):
        p, o = self.p, self.o
        x = p.x0_local.copy()
        f, g = self.evaluate(x)
        state = None
        if self.path is not None:
            self.fingerprint = p.fingerprint()
            self.start = (f, p.gather(g))
            state = self._resume()
        if state is None:
            S, Y, SY, k = [], [], [], 0
            self.trace.line(0, f, self.inf_norm(g))
            status, message = None, ""
        else:
            x, f, g, S, Y, SY, k, status, message = state
            if status not in _FINAL:  # stopped by maxiter or the callback: go on
                status, message = None, ""
        while status is None:
            if self.inf_norm(g) <= o["gtol"]:
                status, message = 0, "CONVERGENCE: NORM OF GRADIENT <= GTOL"
                break
            if k >= o["maxiter"]:
                status, message = 1, "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"
                break
            d = self._direction(g, S, Y, SY)
            dg = self.dot(d, g)
            if not dg < 0:  # rounding made the direction uphill: restart from steepest descent
                S, Y, SY = [], [], []
                d = -g
                dg = self.dot(d, g)
            alpha = 1.0 if S else min(1.0, 1.0 / numpy.sqrt(self.dot(g, g)))
            step = self._line_search(x, f, d, dg, alpha)
            if step is None:
                status, message = 2, "ABNORMAL: LINE SEARCH FAILED"
                break
            alpha, x_new, f_new, g_new = step
            s, y = x_new - x, g_new - g
            sy = self.dot(s, y)
            if sy > 1e-10 * self.dot(y, y):  # keep H positive definite
                S.append(s), Y.append(y), SY.append(sy)
                if len(S) > o["maxcor"]:
                    del S[0], Y[0], SY[0]
            f_old = f
            x, f, g = x_new, f_new, g_new
            k += 1
            self.trace.line(k, f, self.inf_norm(g))
            if self.callback is not None:
                try:
                    self.callback(scipy.optimize.OptimizeResult(
                        x=p.shaped_local(x.copy()), fun=f, jac=p.shaped_local(g.copy()), nit=k))
                except StopIteration:
                    status, message = 99, "`callback` raised `StopIteration`."
            if status is None and (f_old - f) <= o["ftol"] * max(abs(f_old), abs(f), 1.0):
                status, message = 0, "CONVERGENCE: RELATIVE REDUCTION OF F <= FTOL"
            # Saved after the stopping tests, so a resumed run never repeats or skips one.
            if status is None and self.path is not None and k % self.every == 0:
                self._save(x, f, g, S, Y, SY, k, None, "")
        if self.path is not None:
            self._save(x, f, g, S, Y, SY, k, status, message)
        x_local = p.shaped_local(x)
        return scipy.optimize.OptimizeResult(
            x=x_local, x_local=x_local, fun=f, jac=p.shaped_local(g), nit=k, nfev=self.nfev,
            njev=self.nfev, status=status, success=status == 0, message=message)

    def _direction(self, g, S, Y, SY):
        """``-H g`` by the two-loop recursion."""
        q = g.copy()
        alphas = []
        for s, y, sy in zip(reversed(S), reversed(Y), reversed(SY)):
            a = self.dot(s, q) / sy
            alphas.append(a)
            q -= a * y
        if S:
            q *= SY[-1] / self.dot(Y[-1], Y[-1])
        for (s, y, sy), a in zip(zip(S, Y, SY), reversed(alphas)):
            b = self.dot(y, q) / sy
            q += (a - b) * s
        return -q

    def _line_search(self, x, f, d, dg, alpha):
        """Backtracking until Armijo holds; ``None`` after ``maxls`` tries."""
        for _ in range(self.o["maxls"]):
            x_new = x + alpha * d
            f_new, g_new = self.evaluate(x_new)
            if numpy.isfinite(f_new) and f_new <= f + self.o["c1"] * alpha * dg:
                return alpha, x_new, f_new, g_new
            if numpy.isfinite(f_new):
                # minimiser of the quadratic through f, dg and f_new, kept in [0.1, 0.5] alpha
                trial = -dg * alpha * alpha / (2.0 * (f_new - f - dg * alpha))
                alpha = min(max(trial, 0.1 * alpha), 0.5 * alpha)
            else:
                alpha *= 0.1
        return None

    def _save(self, x, f, g, S, Y, SY, k, status, message):
        p = self.p
        x_full, g_full = p.gather(x), p.gather(g)
        S_full = [p.gather(s) for s in S]
        Y_full = [p.gather(y) for y in Y]
        payload = {}
        if p.is_root:
            payload = {
                "kind": "gpumpiad.optimize.dist-lbfgs", "method": "dist-lbfgs", "n": p.n,
                "x0_sha256": self.fingerprint, "f0": self.start[0], "g0": self.start[1],
                "k": k, "nfev": self.nfev, "f": f,
                "sy": [float(v) for v in SY], "x": x_full, "g": g_full, "status": status,
                "message": message,
                "S": numpy.array(S_full).reshape(len(S), p.n),
                "Y": numpy.array(Y_full).reshape(len(Y), p.n)}
        ckpt.save(self.path, payload, comm=p.comm, root=p.root)

    def _resume(self):
        p = self.p
        loaded = {}

        def load():
            if not ckpt.exists(self.path):
                return None
            state = _load_matching(self.path, p, "gpumpiad.optimize.dist-lbfgs",
                                   "dist-lbfgs", self.fingerprint, self.start)
            self.start = (state["f0"], state["g0"])
            self.trace.note(f"resuming from {self.path} at iteration {state['k']}")
            loaded.update(state)
            return {key: state[key] for key in ("k", "nfev", "f", "sy", "status", "message")}

        meta = _collective(p, load)
        if meta is None:
            return None
        # Only the root holds the loaded vectors; each rank receives its pieces.
        x = p.scatter(loaded.get("x")).copy()
        g = p.scatter(loaded.get("g")).copy()
        S = [p.scatter(loaded["S"][i].copy() if p.is_root else None).copy()
             for i in range(len(meta["sy"]))]
        Y = [p.scatter(loaded["Y"][i].copy() if p.is_root else None).copy()
             for i in range(len(meta["sy"]))]
        self.nfev = meta["nfev"]
        return (x, meta["f"], g, S, Y, list(meta["sy"]), meta["k"], meta["status"],
                meta["message"])


__all__ = ["minimize"]
