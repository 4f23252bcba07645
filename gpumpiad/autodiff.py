"""``value_and_grad`` and ``grad``: reverse mode over a function of arrays or Tensors."""
from __future__ import annotations

import functools
import math
import zlib

import numpy as np

from .backend import get_array_module, is_device_array, to_numpy
from .debug import CommunicationMismatch, debug_enabled
from .tape import Tape, recording
from .tensor import Tensor, tensor


class LossError(ValueError):
    """The function differentiated did not return a serial scalar Tensor."""


def _leaf(x):
    if isinstance(x, Tensor):
        return Tensor(x.data, x.layout, x.comm)
    return tensor(x)


def _like_input(g, x):
    """The gradient as an array of the argument's kind (NumPy for NumPy data and scalars)."""
    if isinstance(x, Tensor) or is_device_array(x):
        return g
    return to_numpy(g)


def value_and_grad(fn, argnums=0):
    """Return a function that evaluates ``fn`` and its gradient with respect to ``argnums``.

    Parameters
    ----------
    fn : callable
        Takes arrays or Tensors, returns a scalar serial Tensor (the global objective).
    argnums : int or tuple of int
        Which positional arguments to differentiate. Arrays and scalars become serial leaves;
        a Tensor keeps its layout (``gpumpiad.tensor(x, distributed=True)`` for a per-rank one).

    Returns
    -------
    callable
        ``(*args) -> (value, gradient)``; the gradient is an array of the input's kind (a tuple
        when ``argnums`` is a tuple). A serial argument's gradient is the same total on every
        rank; a distributed one's is this rank's piece.

    Raises
    ------
    TypeError
        ``fn`` not callable, ``argnums`` not ints, or a differentiated argument that is not
        real floating point (int, bool, complex).
    IndexError
        ``argnums`` out of range for the arguments given.
    ValueError
        NaN or Inf in a serial differentiated argument (every rank alike); in debug mode also
        in a distributed one (checked collectively, raised on every rank).
    CommunicationMismatch
        Debug mode only: a serial argument differs between ranks.
    LossError
        ``fn`` did not return a finite, real, serial scalar Tensor (every rank alike).

    Without debug mode a distributed argument's values are not checked; an error that one
    rank alone raises inside ``fn`` ends the job through the abort hook (:mod:`gpumpiad.abort`).

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> f = lambda x: (x * x).sum()
    >>> value, g = gpumpiad.value_and_grad(f)(np.array([1.0, 2.0]))
    >>> float(value), g.tolist()
    (5.0, [2.0, 4.0])
    """
    multi, nums = _check_fn_argnums(fn, argnums, "value_and_grad")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _check_args(args, nums)
        tape = Tape()
        args = list(args)
        originals = [args[i] for i in nums]
        for i in nums:
            args[i] = tape.watch(_leaf(args[i]), leaf=True)
        try:
            with recording(tape):
                out = fn(*args, **kwargs)
            _check_loss(out)
            if out._tape is not tape:
                tape.watch(out)
            grads = tape.backward(out, get_array_module(out.data).ones_like(out.data))
        finally:
            tape.release()
        grads = [_like_input(g, x) for g, x in zip(grads, originals)]
        return out.data, (tuple(grads) if multi else grads[0])

    return wrapper


def grad(fn, argnums=0):
    """Like :func:`value_and_grad` but returns only the gradient.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> float(gpumpiad.grad(lambda x: gpumpiad.sin(x).sum())(np.array(0.0)))
    1.0
    """
    _check_fn_argnums(fn, argnums, "grad")
    vg = value_and_grad(fn, argnums)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return vg(*args, **kwargs)[1]

    return wrapper


def _rank():
    from .comm import world
    return world().rank


def _check_fn_argnums(fn, argnums, name):
    """``(multi, nums)`` for valid ``fn`` and ``argnums``; raises otherwise (same on every rank)."""
    if not callable(fn):
        raise TypeError(f"rank {_rank()}: {name}'s fn must be callable, got "
                        f"{type(fn).__name__} {fn!r:.60}")
    multi = not isinstance(argnums, (int, np.integer)) or isinstance(argnums, bool)
    nums = tuple(argnums) if multi and isinstance(argnums, (tuple, list)) else (argnums,)
    bad = [i for i in nums if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad or not nums:
        raise TypeError(f"rank {_rank()}: {name}'s argnums must be an int or a non-empty tuple "
                        f"of ints, got {argnums!r}")
    return multi, tuple(int(i) for i in nums)


def _check_args(args, nums):
    """The differentiated arguments: in range, real floating point, finite.

    Serial arguments are checked locally (the same outcome on every rank, their values being
    the same). Distributed ones are checked for NaN/Inf only in debug mode, collectively; in
    debug mode serial ones are also checked to be equal on every rank (checksum allgather).
    """
    rank = None
    for i in nums:
        if not -len(args) <= i < len(args):
            rank = _rank()
            raise IndexError(f"rank {rank}: argnums {i} is out of range for {len(args)} "
                             f"argument(s); expected -{len(args)} <= argnums < {len(args)}")
    debug = debug_enabled()
    groups = {}
    for i in nums:
        x = args[i]
        data = x.data if isinstance(x, Tensor) else x
        kind = getattr(getattr(data, "dtype", None), "kind", None)
        if kind is None:
            kind = np.asarray(data).dtype.kind
        if kind != "f":
            what = getattr(data, "dtype", type(data).__name__)
            raise TypeError(f"rank {_rank()}: argument {i} (argnums) must be a real "
                            f"floating-point array or Tensor to differentiate, got {what}")
        distributed = isinstance(x, Tensor) and x.distributed
        if not distributed and not bool(get_array_module(data).isfinite(data).all()):
            raise ValueError(f"rank {_rank()}: argument {i} (argnums) holds NaN or Inf: "
                             f"expected finite values")
        if debug:
            comm = x.comm if isinstance(x, Tensor) else None
            groups.setdefault(id(comm), (comm, []))[1].append((i, data, distributed))
    for comm, entries in groups.values():
        _debug_check_args(comm, entries)


def _debug_check_args(comm, entries):
    """Debug mode: one allgather per communicator of (checksum | non-finite flag) per argument."""
    from .comm import resolve
    comm = resolve(comm)
    mine = np.array([
        (int(not bool(get_array_module(d).isfinite(d).all())) if dist else
         zlib.crc32(np.ascontiguousarray(to_numpy(d)).tobytes()) & 0x7FFFFFFF)
        for _, d, dist in entries], dtype=np.int64)
    table = np.empty((comm.size, mine.size), dtype=np.int64)

    def start():
        return [comm.mpi.Iallgather(mine, table)], None

    comm.issue("value_and_grad argument check", start, collective=False).wait()
    for k, (i, _, dist) in enumerate(entries):
        column = table[:, k]
        if dist and column.any():
            raise ValueError(f"rank {comm.rank}: argument {i} (argnums, distributed) holds NaN "
                             f"or Inf on rank(s) {np.flatnonzero(column).tolist()}: expected "
                             "finite values (checked in debug mode)")
        if not dist and np.any(column != column[0]):
            groups = {}
            for r, c in enumerate(column):
                groups.setdefault(int(c), []).append(r)
            detail = "; ".join(f"rank(s) {ranks} hold one value" for ranks in groups.values())
            raise CommunicationMismatch(
                f"rank {comm.rank}: argument {i} (argnums) is serial but differs across ranks "
                f"({detail}): expected the same value on every rank; pass "
                "gpumpiad.tensor(x, distributed=True) for a per-rank value")


def _check_loss(out):
    rank = _rank()
    if not isinstance(out, Tensor):
        raise LossError(f"rank {rank}: the function must return a gpumpiad Tensor (the loss), "
                        f"got {type(out).__name__}")
    if out.size != 1:
        raise LossError(f"rank {rank}: the loss must be a scalar, got shape {out.shape}; "
                        "reduce it with .sum() or .mean()")
    if out.distributed:
        raise LossError(f"rank {rank}: the loss is distributed (each rank holds its own value); "
                        "reduce it to one serial value with gpumpiad.mpi_sum(loss)")
    if get_array_module(out.data).issubdtype(out.dtype, get_array_module(out.data).complexfloating):
        raise LossError(f"rank {rank}: the loss must be real, got dtype {out.dtype}")
    value = float(to_numpy(out.data).reshape(-1)[0])
    if not math.isfinite(value):
        raise LossError(f"rank {rank}: the loss is {value!r}: expected a finite value "
                        "(the loss is serial, so every rank sees the same)")


__all__ = ["value_and_grad", "grad", "LossError"]
