"""User-defined differentiable operations with their own vector-Jacobian product."""
from __future__ import annotations

import numpy as np

from .backend import asarray, is_device_array, operand
from .primitive import held, unshared
from .tape import active_tape
from .tensor import DISTRIBUTED, SERIAL, Tensor


def _rank():
    from .comm import world
    return world().rank


class CustomOp:
    """A user operation on raw arrays with a user VJP. See :func:`custom_op`."""

    def __init__(self, forward, vjp=None, name=None, layout=None, reads_args=True):
        if not callable(forward):
            raise TypeError(f"rank {_rank()}: custom_op's forward must be callable, got "
                            f"{type(forward).__name__}")
        if vjp is not None and not callable(vjp):
            raise TypeError(f"rank {_rank()}: custom_op's vjp must be callable or None, got "
                            f"{type(vjp).__name__}")
        if (not (layout and all(e in (SERIAL, DISTRIBUTED) for e in layout))
                if isinstance(layout, tuple) else layout not in (None, SERIAL, DISTRIBUTED)):
            raise ValueError(f"rank {_rank()}: custom_op layout must be 'serial', "
                             f"'distributed', a non-empty tuple of them or None, got {layout!r}")
        self.forward = forward
        self.vjp = vjp
        self.name = name or getattr(forward, "__name__", "custom_op")
        self.layout = layout
        self.reads_args = reads_args
        self.__doc__ = forward.__doc__

    def defvjp(self, vjp):
        """Register ``vjp(g, ans, *args, **kwargs) -> cotangent or tuple of cotangents``."""
        if not callable(vjp):
            raise TypeError(f"rank {_rank()}: custom_op {self.name!r}: vjp must be callable, "
                            f"got {type(vjp).__name__}")
        self.vjp = vjp
        return vjp

    def __call__(self, *args, **kwargs):
        if self.vjp is None:
            raise NotImplementedError(f"rank {_rank()}: custom_op {self.name!r} has no vjp; "
                                      f"register one with "
                                      f"@{self.name}.defvjp")
        tensors = [a for a in args if isinstance(a, Tensor)]
        comm = tensors[0].comm if tensors else None
        raws = [a.data if isinstance(a, Tensor) else operand(a) for a in args]
        ans = self.forward(*raws, **kwargs)
        multi = isinstance(ans, tuple)
        answers = tuple(self._output(a, k, multi) for k, a in enumerate(ans if multi else (ans,)))
        given = [a for a in args if type(a) is np.ndarray or is_device_array(a)]
        if given:
            # An output that is (a view of) an array the caller gave would change with it.
            answers = tuple(unshared(a, given) for a in answers)
        ans = answers if multi else answers[0]
        layouts = self._layouts(len(answers), any(t.distributed for t in tensors))
        outs = [Tensor(a, lay, comm) for a, lay in zip(answers, layouts)]
        tape = active_tape()
        if tape is not None:
            any_distributed_out = DISTRIBUTED in layouts
            name, user_vjp = self.name, self.vjp
            if given and self.reads_args and any(t._tape is tape for t in tensors):
                held(raws, given)

            def vjp(gs):
                res = user_vjp(tuple(gs) if multi else gs[0], ans, *raws, **kwargs)
                res = res if isinstance(res, (tuple, list)) else (res,)
                if len(res) != len(args):
                    raise ValueError(f"rank {_rank()}: vjp of custom_op {name!r} returned "
                                     f"{len(res)} cotangent(s) for {len(args)} argument(s); "
                                     "expected one per argument")
                return [_cotangent(name, k, c, a) if isinstance(a, Tensor) else None
                        for k, (c, a) in enumerate(zip(res, args))]

            tape.record(self.name, vjp, [a if isinstance(a, Tensor) else None for a in args],
                        outs, local=[any_distributed_out] * len(args), communicates=True,
                        collective=True)
        return tuple(outs) if multi else outs[0]

    def _output(self, a, k, multi):
        """Output ``k`` of the forward as an array of this process's backend (a forward written
        with NumPy alone, or returning a scalar, still yields one)."""
        where = f" as output {k}" if multi else ""
        if isinstance(a, (bool, int, float, complex, np.generic)):
            a = asarray(a)
        elif not (hasattr(a, "shape") and hasattr(a, "dtype")) or isinstance(a, Tensor):
            raise TypeError(f"rank {_rank()}: forward of custom_op {self.name!r} returned "
                            f"{type(a).__name__}{where}; expected an array (a tuple of arrays "
                            "for several outputs)")
        if a.dtype.kind not in "biufc":
            raise TypeError(f"rank {_rank()}: forward of custom_op {self.name!r} returned an "
                            f"array of dtype {a.dtype}{where}; expected numbers")
        return operand(a)

    def _layouts(self, n, any_distributed):
        if isinstance(self.layout, tuple):
            if len(self.layout) != n:
                raise ValueError(f"rank {_rank()}: custom_op {self.name!r}: layout names "
                                 f"{len(self.layout)} outputs, forward returned {n}")
            return self.layout
        default = self.layout or (DISTRIBUTED if any_distributed else SERIAL)
        return (default,) * n


def _cotangent(name, k, c, arg):
    """The cotangent ``c`` a custom op's vjp returned for Tensor argument ``k``, as an array of
    this process's backend, checked against the argument."""
    if c is None:
        return None
    expected = f"expected an array of real numbers of its shape {tuple(arg.shape)}, or None"
    try:
        # Checked before it moves to the backend, whose conversion refuses strings in words
        # of its own.
        g = c if is_device_array(c) else np.asarray(c)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"rank {_rank()}: vjp of custom_op {name!r} returned a "
                        f"{type(c).__name__} for argument {k} ({exc}); {expected}") from None
    if g.dtype.kind not in "biuf" and not (g.dtype.kind == "c" and arg.dtype.kind == "c"):
        what = "complex" if g.dtype.kind == "c" else "non-numeric"
        raise TypeError(f"rank {_rank()}: vjp of custom_op {name!r} returned a {what} cotangent "
                        f"(dtype {g.dtype}) for argument {k}, which has dtype {arg.dtype}; "
                        f"{expected}")
    if tuple(g.shape) != tuple(arg.shape):
        raise ValueError(f"rank {_rank()}: vjp of custom_op {name!r} returned a cotangent of "
                         f"shape {tuple(g.shape)} for argument {k}, expected its shape "
                         f"{tuple(arg.shape)}")
    return asarray(g)


def custom_op(forward=None, vjp=None, *, name=None, layout=None, reads_args=True):
    """Register a differentiable operation with a hand-written vector-Jacobian product.

    Parameters
    ----------
    forward : callable
        ``forward(*arrays, **kwargs) -> array or tuple of arrays`` on raw NumPy/CuPy arrays. It
        may call MPI itself (every rank runs it).
    vjp : callable, optional
        ``vjp(g, ans, *arrays, **kwargs) -> cotangent or tuple of cotangents`` (one per
        argument, ``None`` for arguments without one); ``g`` and ``ans`` are tuples when the
        forward returns a tuple. Can be given later with ``@op.defvjp``.
    name : str, optional
    layout : {"serial", "distributed"} or tuple of them, optional
        Layout of each output; default: distributed if any input is, else serial.
    reads_args : bool, optional
        True (default): when a Tensor argument is differentiated, the vjp receives copies of
        the arrays the caller passed as they are (not as Tensors), made at the time of the
        call, so that the caller may overwrite its arrays before the reverse pass. False: the
        vjp reads no argument's values (only shapes, or copies of its own), and none is made.

    Notes
    -----
    Convention: the cotangent of a serial value is the same total on every rank. When an output
    is distributed, the vjp returns each rank's own share for serial inputs and gpumpiad adds
    the allreduce. When all outputs are serial, the vjp itself must return the total for serial
    inputs (allreduce inside the vjp if the forward did distributed work);
    :func:`gpumpiad.check_grad` reports ranks that disagree. The vjp runs on every rank in
    every backward pass, with zeros when no cotangent reaches the outputs, so it may
    communicate. A custom op with serial outputs must be called on every rank of their
    communicator (like a collective): the reverse pass may allreduce at it.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> @gpumpiad.custom_op
    ... def square(x):
    ...     return x * x
    >>> @square.defvjp
    ... def _(g, ans, x):
    ...     return 2 * x * g
    >>> float(gpumpiad.grad(lambda x: square(x).sum())(np.array(3.0)))
    6.0
    """
    if forward is None:
        return lambda f: CustomOp(f, vjp, name, layout, reads_args)
    return CustomOp(forward, vjp, name, layout, reads_args)
