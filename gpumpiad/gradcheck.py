"""``check_grad``: reverse mode against central finite differences of the global objective."""
from __future__ import annotations

import numpy as np

from . import control
from .autodiff import value_and_grad
from .backend import asarray, to_numpy
from .comm import world
from .tensor import Tensor, wrap


class GradientCheckError(AssertionError):
    """Reverse-mode gradients disagree with finite differences or across ranks."""


def _defaults(dtype):
    if np.dtype(dtype) == np.float32:
        return 3e-3, 2e-2, 2e-3
    return 1e-6, 1e-5, 1e-7


def _with(args, i, data):
    args = list(args)
    old = args[i]
    # fn sees a Tensor, as under value_and_grad (a raw CuPy array would refuse RankInt).
    args[i] = Tensor(asarray(data), old.layout, old.comm) if isinstance(old, Tensor) else \
        wrap(data)
    return args


def _evaluate(fn, args):
    out = fn(*args)
    return float(to_numpy(out.data if isinstance(out, Tensor) else out).reshape(-1)[0])


def check_grad(fn, *args, argnums=None, eps=None, rtol=None, atol=None, max_elements=16,
               seed=0):
    """Check reverse-mode gradients of ``fn`` against finite differences, on every rank.

    A serial argument is perturbed on all ranks at once; a distributed argument one element on
    one rank at a time, every rank evaluating the global objective. It also checks that the
    gradient of every serial argument is the same on every rank (POEM 075's convention).
    Collective: every rank must call it with the same ``fn`` and arguments of the same layout.

    Parameters
    ----------
    fn : callable
        Returns the serial scalar objective.
    *args : arrays or Tensors
    argnums : int or tuple of int, optional
        Arguments to check (default: all floating-point arguments).
    eps, rtol, atol : float, optional
        Step (relative to ``max(1, |x|)``) and tolerances; defaults depend on the dtype.
        An element passes when ``|ad - fd| <= atol * max(1, |f|) + rtol * max(|ad|, |fd|)``.
    max_elements : int
        At most this many elements per argument and rank are perturbed (chosen at random with
        ``seed``, the same choice on every rank).

    Returns
    -------
    dict
        ``max_error`` (largest ``|ad - fd|``), ``max_rank_disagreement`` and ``checked``.

    Raises
    ------
    GradientCheckError
        On every rank, naming the argument, element, rank(s) and the two values.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> report = gpumpiad.check_grad(lambda x: gpumpiad.mpi_sum((x ** 3).sum()), np.ones(3))
    >>> report["checked"]
    3
    """
    comm = world()
    _check_options(fn, eps, rtol, atol, max_elements, comm.rank)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args)
                        if np.issubdtype(np.asarray(to_numpy(a.data) if isinstance(a, Tensor)
                                                    else a).dtype, np.floating))
    elif isinstance(argnums, int):
        argnums = (argnums,)
    if not argnums:
        raise ValueError(f"rank {comm.rank}: check_grad found no floating-point argument")
    args = [a if isinstance(a, Tensor) or i not in argnums else asarray(a)
            for i, a in enumerate(args)]
    f0, grads = value_and_grad(fn, argnums=tuple(argnums))(*args)
    f0 = float(to_numpy(f0).reshape(-1)[0])
    failures = []
    report = {"max_error": 0.0, "max_rank_disagreement": 0.0, "checked": 0}
    for k, i in enumerate(argnums):
        arg = args[i]
        distributed = isinstance(arg, Tensor) and arg.distributed
        data = to_numpy(arg.data if isinstance(arg, Tensor) else arg)
        g = np.asarray(to_numpy(grads[k]), dtype=np.float64).reshape(-1)
        h0, rt, at = _defaults(data.dtype)
        h0, rt, at = eps or h0, rtol or rt, atol or at
        if not distributed:
            _check_agreement(comm, i, g, report, failures)
        sizes = (control.allgather(comm, data.size, "check_grad") if distributed
                 else [data.size] * comm.size)
        owners = range(comm.size) if distributed else [None]
        for owner in owners:
            n = sizes[owner if owner is not None else 0]
            rng = np.random.default_rng(seed + 7919 * (owner or 0) + 104729 * k)
            picks = np.arange(n) if n <= max_elements else np.sort(
                rng.choice(n, max_elements, replace=False))
            for e in picks:
                mine = owner is None or owner == comm.rank
                step = h0 * max(1.0, abs(float(data.reshape(-1)[e]))) if mine else 0.0
                if owner is not None:
                    step = control.bcast(comm, step, owner, "check_grad")
                values = []
                for sign in (1, -1):
                    pert = data.copy()
                    if mine:
                        pert.reshape(-1)[e] += sign * step
                    values.append(_evaluate(fn, _with(args, i, pert)))
                fd = (values[0] - values[1]) / (2 * step)
                report["checked"] += 1 if mine else 0
                if not mine:
                    continue
                ad = float(g[e])
                err = abs(ad - fd)
                report["max_error"] = max(report["max_error"], err)
                if err > at * max(1.0, abs(f0)) + rt * max(abs(ad), abs(fd)):
                    where = f"on rank {comm.rank}" if distributed else "(serial)"
                    failures.append(
                        f"argument {i}, element {np.unravel_index(e, data.shape)} {where}: "
                        f"reverse mode gives {ad!r}, finite differences give {fd!r} "
                        f"(difference {err:.3e})")
    everyone = [f for fs in control.allgather(comm, failures, "check_grad") for f in fs]
    if everyone:
        unique = list(dict.fromkeys(everyone))
        raise GradientCheckError(
            f"check_grad failed on {comm.size} rank(s), seen from rank {comm.rank}:\n  "
            + "\n  ".join(unique))
    return report


def _check_options(fn, eps, rtol, atol, max_elements, rank):
    """Arguments given alike on every rank: every rank raises together."""
    if not callable(fn):
        raise TypeError(f"rank {rank}: check_grad's fn must be callable, got "
                        f"{type(fn).__name__}")
    for name, value in (("eps", eps), ("rtol", rtol), ("atol", atol)):
        if value is not None and not (isinstance(value, (int, float, np.floating))
                                      and np.isfinite(value) and value > 0):
            raise ValueError(f"rank {rank}: check_grad's {name} must be a positive finite "
                             f"number or None, got {value!r}")
    if isinstance(max_elements, bool) or not isinstance(max_elements, (int, np.integer)) \
            or max_elements < 1:
        raise ValueError(f"rank {rank}: check_grad's max_elements must be an int >= 1, got "
                         f"{max_elements!r}")


def _check_agreement(comm, i, g, report, failures):
    """The gradient of a serial argument must be the same total on every rank."""
    if comm.size == 1:
        return
    reference = control.bcast(comm, g, 0, "check_grad")
    diff = np.abs(g - reference) if g.shape == reference.shape else np.full(1, np.inf)
    worst = float(diff.max()) if diff.size else 0.0
    table = control.allgather(comm, (worst, int(diff.argmax()) if diff.size else 0),
                              "check_grad")
    rank = int(np.argmax([w for w, _ in table]))
    worst, element = table[rank]
    report["max_rank_disagreement"] = max(report["max_rank_disagreement"], worst)
    scale = max(1.0, float(np.abs(reference).max()) if reference.size else 1.0)
    if worst > 1e-10 * scale and comm.rank == rank:
        failures.append(
            f"argument {i} is serial but its gradient differs across ranks: element {element} "
            f"is {g[element]!r} on rank {rank} and {reference[element]!r} on rank 0 "
            f"(largest disagreement {worst:.3e}). A serial value's cotangent must be the same "
            "total on every rank: a custom_op whose outputs are serial must return the "
            "allreduced cotangent for its serial inputs, not this rank's share (POEM 075)")
