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
import time

import numpy
import scipy.optimize
from mpi4py import MPI

from . import checkpoint as ckpt
from . import control
from .autodiff import value_and_grad
from .backend import all_finite, to_numpy
from .comm import resolve
from .debug import wait
from .tensor import Tensor, tensor

_EVAL, _STOP = 1, 0
_OLD_STYLE_CALLBACK = {"tnc", "cobyla", "cobyqa"}
_FINAL = (0, 2)  # dist-lbfgs statuses a resumed run keeps: converged, line search failed
_DIST_LBFGS_DEFAULTS = {"maxiter": 15000, "maxcor": 10, "gtol": 1e-5,
                        "ftol": 2.220446049250313e-09, "maxls": 20, "c1": 1e-4}


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
        The start. An array or serial Tensor: the parameters are serial (the root's ``x0`` is
        used). A distributed Tensor (``gpumpiad.tensor(piece, distributed=True)``): each rank
        holds its own piece (sizes may differ); the global vector is the pieces, flattened,
        in rank order.
    method : str
        A :func:`scipy.optimize.minimize` method (its gradient-based methods use the gradient;
        Hessian-based ones are not supported), or ``"dist-lbfgs"`` (see Notes).
    bounds, tol, options, callback
        Passed to SciPy on the root. ``bounds`` and ``options`` refer to the global vector.
        The callback runs on the root only (it must not communicate); raising
        ``StopIteration`` ends the run as in SciPy. For ``"dist-lbfgs"``: ``tol`` sets
        ``gtol`` and ``ftol``; ``options`` may set ``maxiter`` (15000), ``maxcor`` (10),
        ``gtol`` (1e-5, on the gradient's infinity norm), ``ftol`` (2.2e-9, on the relative
        reduction of f), ``maxls`` (20), ``c1`` (1e-4); ``bounds`` are refused; the callback
        runs on every rank with ``OptimizeResult(x=this rank's piece, fun, jac, nit)`` and
        must decide alike on every rank.
    checkpoint : str or os.PathLike, optional
        A file (written by the root, atomically, see :mod:`gpumpiad.checkpoint`) that holds
        the run's state every ``checkpoint_every`` iterations and at the end. If it exists
        when ``minimize`` starts, the run resumes from it and ends with the same result as an
        uninterrupted run. A checkpoint of another problem (method, size or ``x0``) or a
        damaged file raises :class:`gpumpiad.checkpoint.CheckpointError`.
    checkpoint_every : int
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

    *dist-lbfgs* is not SciPy's L-BFGS-B: it is a plain L-BFGS (two-loop recursion, memory
    ``maxcor``, initial Hessian ``s'y / y'y``) with a backtracking Armijo line search
    (safeguarded quadratic interpolation; first step ``min(1, 1/|g|_2)``), no bounds. Vectors
    stay split like ``x0``; each dot product is an allreduce of a scalar, so its iterates equal
    those of the same algorithm on the gathered vectors up to rounding (the tests hold them to
    1e-10), not bit for bit across rank counts. Its checkpoint holds its state directly
    (x, f, g and the memory pairs), gathered to the root while saving, so the root then needs
    memory for ``2 maxcor + 2`` global vectors; it resumes on any number of ranks.

    A loss that raises on every rank alike (e.g. a :class:`gpumpiad.LossError`) raises on every
    rank; one that fails on some ranks only inside a collective leaves the others waiting,
    as any MPI program would.

    Examples
    --------
    Find θ with ``sum over ranks r of θ**r = 2``, one term per rank.

    >>> import numpy as np, gpumpiad
    >>> from gpumpiad.optimize import minimize
    >>> def loss(theta):
    ...     terms = gpumpiad.mpi_bcast(theta) ** gpumpiad.mpi_rank()
    ...     return (gpumpiad.mpi_sum(terms).sum() - 2.0) ** 2
    >>> res = minimize(loss, np.ones(1), tol=1e-14, trace=False)
    >>> bool(res.success)
    True
    """
    comm = resolve(x0.comm if comm is None and isinstance(x0, Tensor) else comm)
    if not callable(fn):
        raise TypeError(f"rank {comm.rank}: fn must be callable, got {type(fn).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"rank {comm.rank}: method must be a str, got {type(method).__name__}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"rank {comm.rank}: checkpoint_every must be an int >= 1, "
                         f"got {checkpoint_every!r}")
    name = method.lower()
    if name != "dist-lbfgs" and name not in _scipy_methods():
        raise ValueError(f"rank {comm.rank}: unknown method {method!r}; expected 'dist-lbfgs' "
                         f"or one of scipy.optimize.minimize's: {', '.join(_scipy_methods())}")
    if name == "dist-lbfgs" and bounds is not None:
        raise ValueError(f"rank {comm.rank}: method 'dist-lbfgs' does not support bounds; "
                         "use method='L-BFGS-B'")
    problem = _Problem(fn, x0, comm)
    try:
        if name == "dist-lbfgs":
            opts = _dist_lbfgs_options(tol, options, comm.rank)
            return _DistLBFGS(problem, opts, callback, checkpoint, checkpoint_every,
                              trace).run()
        return _RootScipy(problem, method, bounds, tol, options, callback, checkpoint,
                          checkpoint_every, trace).run()
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


def _dist_lbfgs_options(tol, options, rank):
    opts = dict(_DIST_LBFGS_DEFAULTS)
    if tol is not None:
        opts["gtol"] = opts["ftol"] = float(tol)
    for key, value in (options or {}).items():
        if key not in opts:
            raise ValueError(f"rank {rank}: unknown option {key!r} for method 'dist-lbfgs'; "
                             f"expected one of {sorted(opts)}")
        opts[key] = value
    return opts


class _Problem:
    """The loss, the parameters' layout, and a private communicator for the optimiser's
    own messages (so they cannot match anything ``fn`` sends)."""

    def __init__(self, fn, x0, comm):
        self.fn = value_and_grad(fn)
        self.comm = comm
        raw = numpy.asarray(to_numpy(x0.data if isinstance(x0, Tensor) else x0))
        if raw.dtype.kind not in "biuf":
            # x0's dtype is given alike on every rank, so every rank raises here together.
            raise TypeError(f"rank {comm.rank}: minimize's x0 must be real numbers (int or "
                            f"float), got dtype {raw.dtype}")
        self.ctl = comm.dup()  # freed by minimize when it ends
        self.root = 0
        self.is_root = comm.rank == self.root
        self.distributed = isinstance(x0, Tensor) and x0.distributed
        local = numpy.array(raw, dtype=numpy.float64)
        if not self.distributed:
            local = control.bcast(self.ctl, local, self.root, "minimize's x0")
            if not all_finite(local):
                self.ctl.free()
                raise ValueError(f"rank {comm.rank}: minimize's x0 holds NaN or Inf (the "
                                 f"root's x0 is used): expected finite values")
        self.shape = local.shape
        self.x0_local = local.ravel()
        if self.distributed:
            table = control.allgather(
                self.ctl, (self.x0_local.size, all_finite(self.x0_local)),
                "minimize's x0")
            bad = [r for r, (_, finite) in enumerate(table) if not finite]
            if bad:
                self.ctl.free()
                raise ValueError(f"rank {comm.rank}: minimize's x0 (distributed) holds NaN or "
                                 f"Inf on rank(s) {bad}: expected finite values")
            self.counts = numpy.array([n for n, _ in table], dtype=numpy.int64)
        else:
            self.counts = numpy.array([self.x0_local.size])
        self.displs = numpy.concatenate([[0], numpy.cumsum(self.counts)[:-1]])
        self.n = int(self.counts.sum())
        self.rank_slice = (slice(int(self.displs[comm.rank]),
                                 int(self.displs[comm.rank] + self.counts[comm.rank]))
                           if self.distributed else slice(None))

    def evaluate(self, x_local):
        """Collective: the loss and this rank's gradient (flat float64) at this rank's x."""
        xt = tensor(x_local.reshape(self.shape), distributed=self.distributed, comm=self.comm)
        value, g = self.fn(xt)
        return float(to_numpy(value)), to_numpy(g).astype(numpy.float64).ravel()

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


def _load_matching(path, problem, kind, method, fingerprint):
    """Root: the checkpoint at ``path`` if there is one, checked against this problem."""
    state = ckpt.load(path)
    expected = {"kind": kind, "method": method, "n": problem.n, "x0_sha256": fingerprint}
    for key, want in expected.items():
        if state.get(key) != want:
            raise ckpt.CheckpointError(
                f"{path}: written for another problem: {key} is {state.get(key)!r}, this run "
                f"has {want!r} (delete the file to start afresh)")
    return state


def _collective(problem, fn):
    """Run ``fn()`` on the root; every rank returns its value or raises its error."""
    result = None
    if problem.is_root:
        try:
            result = ("ok", fn())
        except ckpt.CheckpointError as exc:
            result = ("error", str(exc))
    status, value = control.bcast(problem.ctl, result, problem.root, "minimize's checkpoint")
    if status == "error":
        raise ckpt.CheckpointError(value if problem.is_root or value.startswith("rank ")
                                   else f"rank 0: {value}")
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

    def run(self):
        p = self.p
        self.x0_full = p.gather(p.x0_local)
        if self.path is not None:
            if p.is_root:
                self.fingerprint = hashlib.sha256(self.x0_full.tobytes()).hexdigest()
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
                                     self.fingerprint)
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
            "x0_sha256": self.fingerprint, "nit": self.nit, "finished": finished,
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
        if self.path is not None:
            self.fingerprint = p.fingerprint()
        state = self._resume() if self.path is not None else None
        if state is None:
            x = p.x0_local.copy()
            f, g = self.evaluate(x)
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
                "x0_sha256": self.fingerprint, "k": k, "nfev": self.nfev, "f": f,
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
                                   "dist-lbfgs", self.fingerprint)
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
