"""``value_and_grad`` and ``grad``: reverse mode over a function of arrays or Tensors."""
from __future__ import annotations

import functools
import math
import zlib

import numpy as np

from . import control
from .backend import (all_finite, array_module, asarray, get_array_module, is_device_array,
                      to_numpy)
from .comm import resolve
from .debug import CommunicationMismatch, debug_enabled
from .tape import Tape, nested_error, recording, shares_memory, traced_outside
from .tensor import DISTRIBUTED, SERIAL, Tensor, wrap
from .transport import kept_copy


class LossError(ValueError):
    """The function differentiated did not return a serial scalar Tensor."""


def _leaf(x, held=False):
    """The Tensor that stands for argument ``x`` on the tape; ``held``: a copy of an array the
    caller gave (a pullback reads it after the call returns)."""
    if isinstance(x, Tensor):
        return Tensor(x.data, x.layout, x.comm)
    if type(x) is np.ndarray and array_module() is np:
        # What wrap(x) makes of a NumPy array on the NumPy backend (its dtype was checked).
        return Tensor(kept_copy(x) if held else x, SERIAL, resolve(None))
    return wrap(x, copy=held)


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
        An argument named twice gets its gradient twice.

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
        real floating point (int, bool, complex); in the reverse pass, a complex cotangent for
        a real value (a complex intermediate value, or a ``custom_op``'s vjp).
    IndexError
        ``argnums`` out of range for the arguments given.
    ValueError
        Debug mode only: NaN or Inf in a differentiated argument (checked collectively before
        ``fn`` runs, raised on every rank).
    CommunicationMismatch
        Debug mode only: a serial argument differs between ranks.
    LossError
        ``fn`` did not return a finite, real, serial scalar Tensor (every rank alike). A
        non-finite loss's message names the differentiated arguments that hold NaN or Inf
        (and, for a distributed one, on which ranks).
    NotImplementedError
        Higher-order derivatives: ``fn`` calls ``grad``, ``value_and_grad`` or ``vjp`` on
        values this differentiation traces (its arguments or anything computed from them).

    Outside debug mode the arguments' values are read only when the loss is not finite, so
    the check costs nothing on the common path; an error that one rank alone raises inside
    ``fn`` ends the job through the abort hook (:mod:`gpumpiad.abort`).

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> f = lambda x: (x * x).sum()
    >>> value, g = gpumpiad.value_and_grad(f)(np.array([1.0, 2.0]))
    >>> float(value), g.tolist()
    (5.0, [2.0, 4.0])
    """
    multi, nums = _check_fn_argnums(fn, argnums, "value_and_grad")
    return _value_and_grad(fn, multi, nums, "value_and_grad")


def _value_and_grad(fn, multi, nums, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tape = Tape()
        try:
            out, leaves, unique = _trace(tape, fn, args, kwargs, nums, name)
            _check_loss(out, leaves, unique)
            grads = tape.backward(out, _ones_like(out.data))
        finally:
            tape.release()
        return _value(out, args), _gradients(grads, [args[j] for j in unique],
                                             _picks(nums, unique, len(args)), multi)

    return wrapper


def _ones_like(data):
    """The seed of a loss: ones of its shape and dtype (``fill`` costs less than ``ones_like``
    on every call)."""
    seed = get_array_module(data).empty_like(data)
    seed.fill(1)
    return seed


def vjp(fn, *args, argnums=0):
    """Evaluate ``fn(*args)`` and return its value with a function that pulls a cotangent of
    the value back to the arguments ``argnums`` (a vector-Jacobian product).

    Parameters
    ----------
    fn : callable
        Takes arrays or Tensors, returns a Tensor of real floating dtype, of any shape and
        layout.
    *args
        The arguments, as for :func:`value_and_grad`. Those differentiated that are arrays
        (not Tensors) are copied: the pullback gives the gradient at their values at the time
        of the call, whatever the caller writes into them later.
    argnums : int or tuple of int

    Returns
    -------
    value : array
        ``fn(*args)``'s data (a copy where it would share memory with an argument).
    pullback : callable
        ``pullback(cotangent) -> gradient`` (a tuple when ``argnums`` is a tuple). The cotangent
        is an array of real numbers with the value's shape; for a serial value it is the global
        cotangent, the same on every rank, for a distributed one this rank's piece. Every rank
        calls ``pullback`` together (it communicates), as often as wanted; the recorded
        operations are kept until the pullback is dropped. No gradient shares memory with the
        cotangent or with another gradient.

    Raises
    ------
    TypeError
        ``fn`` did not return a Tensor of real floating dtype; from the pullback: a cotangent
        that is not an array of real numbers (``None``, strings, complex).
    ValueError
        From the pullback: a cotangent whose shape is not the value's.
    CommunicationMismatch
        From the pullback, debug mode only: the cotangent of a serial value differs between
        ranks (a checksum allgather, raised on every rank naming the ranks). Outside debug
        mode this is not checked, as it would cost a collective per call: a cotangent that
        differs between ranks gives a wrong gradient.
    NotImplementedError
        Higher-order derivatives: ``vjp`` (or the pullback) used inside a function that
        ``grad``, ``value_and_grad`` or ``vjp`` differentiates, on values it traces.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> value, pullback = gpumpiad.vjp(lambda x: x * x, np.array([1.0, 2.0]))
    >>> pullback(np.array([1.0, 10.0])).tolist()
    [2.0, 40.0]
    """
    multi, nums = _check_fn_argnums(fn, argnums, "vjp")
    tape = Tape()
    tape.retain = True
    try:
        out, _, unique = _trace(tape, fn, args, {}, nums, "vjp")
        _check_value(out)
    except BaseException:
        tape.release()
        raise
    return _value(out, args), _Pullback(tape, out, [args[j] for j in unique],
                                        _picks(nums, unique, len(args)), multi)


def _value(out, args):
    """``out``'s data, copied where it shares memory with an argument (a function that returns
    an argument, or a view of one): the value is what ``fn`` returned at the time of the call,
    whatever the caller later writes into its arguments."""
    value = out.data
    for a in args:
        if shares_memory(value, a.data if isinstance(a, Tensor) else a):
            return value.copy()
    return value


class _Pullback:
    """``vjp``'s pullback: holds the tape, and releases it when dropped.

    A copy is the pullback itself: of two objects sharing one tape, the first dropped would
    release the other's.
    """

    __slots__ = ("tape", "out", "originals", "picks", "multi")

    def __init__(self, tape, out, originals, picks, multi):
        self.tape, self.out, self.originals = tape, out, originals
        self.picks, self.multi = picks, multi

    def __call__(self, cotangent):
        if self.tape.released:
            raise RuntimeError(f"rank {_rank()}: this pullback's recorded operations were "
                               "already released (a pullback releases them when it is dropped); "
                               "call gpumpiad.vjp again for a new pullback")
        if isinstance(cotangent, Tensor) and traced_outside(cotangent, self.tape):
            raise nested_error("the pullback's cotangent")
        out = self.out
        seed, problem = _cotangent(cotangent, out)
        if debug_enabled() and out.comm.size > 1:
            _debug_check_cotangent(out, seed, problem)
        elif problem is not None:
            raise problem
        return _gradients(self.tape.backward(out, seed), self.originals, self.picks, self.multi)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __del__(self):
        self.tape.release()


def _trace(tape, fn, args, kwargs, nums, name):
    """Run ``fn`` on ``tape`` with the arguments ``nums`` as leaves; return ``(out, args,
    unique)``: ``args`` with those arguments replaced by their leaves, ``unique`` their
    positions (non-negative, each once, in the order of ``nums``)."""
    unique = _check_args(args, nums)
    args = list(args)
    for j in unique:
        if isinstance(args[j], Tensor) and traced_outside(args[j], tape):
            raise nested_error(f"argument {j} of {name}")
        args[j] = tape.watch(_leaf(args[j], tape.retain), leaf=True)
    with recording(tape):
        out = fn(*args, **kwargs)
    if isinstance(out, Tensor) and out._tape is not tape:
        if traced_outside(out, tape):
            raise nested_error(f"the value returned by {name}'s fn")
        tape.watch(out)
    return out, args, unique


def _picks(nums, unique, nargs):
    """For each entry of ``nums``, the index of its leaf in ``unique``."""
    return [unique.index(i % nargs) for i in nums]


def _gradients(grads, originals, picks, multi):
    """The gradients in the order of ``argnums``; an argument named twice gets a copy the
    second time, so that no two returned arrays share memory."""
    out = []
    for n, k in enumerate(picks):
        g = _like_input(grads[k], originals[k])
        out.append(g.copy() if k in picks[:n] else g)
    return tuple(out) if multi else out[0]


def grad(fn, argnums=0):
    """Like :func:`value_and_grad` but returns only the gradient.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> float(gpumpiad.grad(lambda x: gpumpiad.sin(x).sum())(np.array(0.0)))
    1.0
    """
    multi, nums = _check_fn_argnums(fn, argnums, "grad")
    vg = _value_and_grad(fn, multi, nums, "grad")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return vg(*args, **kwargs)[1]

    return wrapper


def _rank():
    from .comm import world
    return world().rank


def _check_fn_argnums(fn, argnums, name):
    """``(multi, nums)`` for valid ``fn`` and ``argnums``; raises otherwise (same on every rank)."""
    if type(argnums) is int and callable(fn):
        return False, (argnums,)
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
    """The differentiated arguments: in range and real floating point. Returns their positions,
    non-negative and each once, in the order of ``nums``.

    Their values are not read here (a pass over every argument on every call): NaN or Inf in an
    argument shows up as a non-finite loss, and :func:`_check_loss` then names the arguments
    that hold them. Debug mode checks every argument's values up front, collectively: finite,
    and serial ones equal on every rank (checksum allgather).
    """
    n = len(args)
    unique = []
    for i in nums:
        if not -n <= i < n:
            raise IndexError(f"rank {_rank()}: argnums {i} is out of range for {n} "
                             f"argument(s); expected -{n} <= argnums < {n}")
        if i % n not in unique:
            unique.append(i % n)
    debug = debug_enabled()
    groups = {}
    for i in unique:
        x = args[i]
        data = x.data if isinstance(x, Tensor) else x
        if type(data) is np.ndarray:
            kind = data.dtype.kind
        else:
            kind = getattr(getattr(data, "dtype", None), "kind", None)
            if kind is None:
                kind = np.asarray(data).dtype.kind
        if kind != "f":
            what = getattr(data, "dtype", type(data).__name__)
            raise TypeError(f"rank {_rank()}: argument {i} (argnums) must be a real "
                            f"floating-point array or Tensor to differentiate, got {what}")
        if debug:
            comm = x.comm if isinstance(x, Tensor) else None
            distributed = isinstance(x, Tensor) and x.distributed
            groups.setdefault(id(comm), (comm, []))[1].append((i, data, distributed))
    for comm, entries in groups.values():
        _debug_check_args(comm, entries)
    return unique


def _debug_check_args(comm, entries):
    """Debug mode: one allgather per communicator of (checksum | non-finite flag) per argument."""
    from .comm import resolve
    comm = resolve(comm)
    table = control.allgather_ints(comm, "value_and_grad argument check", [
        (int(not all_finite(d)) if dist else
         zlib.crc32(np.ascontiguousarray(to_numpy(d)).tobytes()) & 0x7FFFFFFF)
        for _, d, dist in entries])
    for k, (i, data, dist) in enumerate(entries):
        column = table[:, k]
        if dist and column.any():
            raise ValueError(f"rank {comm.rank}: argument {i} (argnums, distributed) holds NaN "
                             f"or Inf on rank(s) {np.flatnonzero(column).tolist()}: expected "
                             "finite values (checked in debug mode)")
        if not dist and not all_finite(data):
            raise ValueError(f"rank {comm.rank}: argument {i} (argnums) holds NaN or Inf: "
                             "expected finite values")
        if not dist and np.any(column != column[0]):
            detail = _holders(column)
            raise CommunicationMismatch(
                f"rank {comm.rank}: argument {i} (argnums) is serial but differs across ranks "
                f"({detail}): expected the same value on every rank; pass "
                "gpumpiad.tensor(x, distributed=True) for a per-rank value")


def _check_value(out):
    """vjp's value: a Tensor of real floating dtype."""
    if not isinstance(out, Tensor):
        raise TypeError(f"rank {_rank()}: vjp's fn must return a gpumpiad Tensor, got "
                        f"{type(out).__name__}")
    if out.dtype.kind != "f":
        raise TypeError(f"rank {_rank()}: vjp's fn must return a Tensor of real floating "
                        f"dtype, got {out.dtype}")


def _cotangent(cotangent, out):
    """``(seed, problem)``: the pullback's cotangent as an array of ``out``'s kind, dtype and
    shape, or the exception that says why it cannot be one (raised by the caller, which in
    debug mode first tells the other ranks)."""
    given = cotangent.data if isinstance(cotangent, Tensor) else cotangent
    data = out.data
    if (type(given) is np.ndarray and type(data) is np.ndarray and given.dtype == data.dtype
            and given.shape == data.shape):
        return given, None  # already what the checks below would make of it
    expected = (f"expected an array of real numbers of the value's shape {out.shape} (the "
                "cotangent of the value)")
    if given is None:
        return None, TypeError(f"rank {_rank()}: the pullback's cotangent is None: {expected}")
    try:
        seed = asarray(given)
    except (TypeError, ValueError) as exc:
        return None, TypeError(f"rank {_rank()}: the pullback's cotangent is not an array of "
                               f"numbers ({type(given).__name__}: {exc}): {expected}")
    if seed.dtype.kind not in "biuf":
        return None, TypeError(f"rank {_rank()}: the pullback's cotangent has dtype "
                               f"{seed.dtype} ({type(given).__name__} {given!r:.40}): {expected}")
    if seed.shape != out.shape:
        return None, ValueError(f"rank {_rank()}: the pullback's cotangent must have the "
                                f"value's shape {out.shape}, got {seed.shape}")
    return seed.astype(out.dtype, copy=False), None


def _debug_check_cotangent(out, seed, problem):
    """Debug mode: one allgather over the value's communicator of (checksum of a serial value's
    cotangent | -1 for an invalid cotangent), so every rank raises together."""
    comm = out.comm
    serial = not out.distributed
    code = -1
    if problem is None:
        # + 0.0 makes -0.0 and 0.0 one value.
        code = (zlib.crc32(np.ascontiguousarray(to_numpy(seed) + 0.0).tobytes()) & 0x7FFFFFFF
                if serial else 0)
    column = control.allgather_ints(comm, "pullback cotangent check", [code])[:, 0]
    if problem is not None:
        raise problem
    bad = np.flatnonzero(column == -1).tolist()
    if bad:
        raise ValueError(f"rank {comm.rank}: the pullback's cotangent is not valid on rank(s) "
                         f"{bad} (their errors say why): expected an array of real numbers of "
                         f"the value's shape {out.shape} on every rank (checked in debug mode)")
    if serial and np.any(column != column[0]):
        detail = _holders(column)
        raise CommunicationMismatch(
            f"rank {comm.rank}: the pullback's cotangent differs across ranks ({detail}), but "
            "the value is serial: expected its global cotangent, the same on every rank "
            "(checked in debug mode)")


def _check_loss(out, args, nums):
    if not isinstance(out, Tensor):
        raise LossError(f"rank {_rank()}: the function must return a gpumpiad Tensor (the "
                        f"loss), got {type(out).__name__}")
    data = out.data
    if data.size != 1:
        raise LossError(f"rank {_rank()}: the loss must be a scalar, got shape {data.shape}; "
                        "reduce it with .sum() or .mean()")
    if out.layout == DISTRIBUTED:
        raise LossError(f"rank {_rank()}: the loss is distributed (each rank holds its own "
                        "value); reduce it to one serial value with gpumpiad.mpi_sum(loss)")
    if data.dtype.kind == "c":
        raise LossError(f"rank {_rank()}: the loss must be real, got dtype {data.dtype}")
    value = float(to_numpy(data).reshape(-1)[0])
    if not math.isfinite(value):
        raise LossError(f"rank {_rank()}: the loss is {value!r}: expected a finite value "
                        "(the loss is serial, so every rank sees the same)"
                        + "".join(f"; {cause}" for cause in _nonfinite_args(args, nums, out.comm)))


def _nonfinite_args(args, nums, comm):
    """Which differentiated arguments hold NaN or Inf, for the error of a non-finite loss.

    Every rank of the loss's communicator gets here together (the loss is serial), so the
    distributed arguments on that communicator are checked with one allgather of flags.
    """
    causes, shared = [], []
    for i in nums:
        x = args[i]
        data = x.data if isinstance(x, Tensor) else x
        if not (isinstance(x, Tensor) and x.distributed):
            if not all_finite(data):
                causes.append(f"argument {i} (argnums) holds NaN or Inf")
        elif x.comm.mpi == comm.mpi:
            shared.append((i, not all_finite(data)))
    if shared:
        table = control.allgather_ints(comm, "non-finite argument check",
                                       [bad for _, bad in shared])
        for k, (i, _) in enumerate(shared):
            ranks = np.flatnonzero(table[:, k]).tolist()
            if ranks:
                causes.append(f"argument {i} (argnums, distributed) holds NaN or Inf on "
                              f"rank(s) {ranks}")
    return causes


def _holders(checksums):
    """Which ranks hold which value, from one checksum per rank: for a mismatch's message."""
    groups = {}
    for rank, checksum in enumerate(checksums):
        groups.setdefault(int(checksum), []).append(rank)
    return "; ".join(f"rank(s) {ranks} hold one value" for ranks in groups.values())


__all__ = ["value_and_grad", "grad", "vjp", "LossError"]
