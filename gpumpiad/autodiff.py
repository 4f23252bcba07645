"""``value_and_grad`` and ``grad``: reverse mode over a function of arrays or Tensors."""
from __future__ import annotations

import functools

from .backend import get_array_module, is_device_array, to_numpy
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

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> f = lambda x: (x * x).sum()
    >>> value, g = gpumpiad.value_and_grad(f)(np.array([1.0, 2.0]))
    >>> float(value), g.tolist()
    (5.0, [2.0, 4.0])
    """
    multi = not isinstance(argnums, int)
    nums = tuple(argnums) if multi else (argnums,)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for i in nums:
            if not -len(args) <= i < len(args):
                raise IndexError(f"argnums {i} is out of range for {len(args)} argument(s)")
        tape = Tape()
        args = list(args)
        originals = [args[i] for i in nums]
        for i in nums:
            args[i] = tape.watch(_leaf(args[i]), leaf=True)
        with recording(tape):
            out = fn(*args, **kwargs)
        _check_loss(out)
        if out._tape is not tape:
            tape.watch(out)
        grads = tape.backward(out, get_array_module(out.data).ones_like(out.data))
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
    vg = value_and_grad(fn, argnums)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return vg(*args, **kwargs)[1]

    return wrapper


def _check_loss(out):
    from .comm import world
    rank = world().rank
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


__all__ = ["value_and_grad", "grad", "LossError"]
