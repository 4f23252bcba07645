"""Local (per-rank, communication-free) differentiable primitives.

A primitive wraps a forward function on raw arrays; its vector-Jacobian products are registered
right after it with :meth:`Primitive.defvjp`, one per argument, each ``vjp(g, ans, *args, **kw)``
returning the cotangent of that argument. Layout rule: the output is distributed when any input
is a distributed Tensor or a rank-dependent number (:class:`gpumpiad.comm.RankInt`,
:class:`~gpumpiad.comm.RankFloat`), else serial.
"""
from __future__ import annotations

from numpy import ndarray

from .backend import is_device_array, operand
from .comm import RANK_DEPENDENT, world
from .tape import active_tape, nested_error, shares_memory, traced_outside
from .tensor import DISTRIBUTED, SERIAL, Tensor
from .transport import kept_copy


class Primitive:
    """A differentiable function of arrays. See :func:`primitive`."""

    def __init__(self, forward, name=None, reads_args=True):
        self.forward = forward
        self.name = name or forward.__name__
        self.reads_args = reads_args
        self.vjps = None
        self.vjp_all = None
        self.__doc__ = forward.__doc__
        self.__name__ = self.name

    def defvjp(self, *vjps):
        """Register one VJP per positional argument (``None``: not differentiable)."""
        self.vjps = vjps
        return self

    def defvjp_all(self, vjp):
        """Register one VJP for all arguments: ``vjp(g, ans, *args, **kw) -> list``."""
        self.vjp_all = vjp
        return self

    def __call__(self, *args, **kwargs):
        # Hot path (every local op of every program): one pass over the arguments.
        raws = []
        serial_comm = any_comm = None
        distributed = False
        tape = active_tape()
        first = traced = given = None
        only = 0
        for k, a in enumerate(args):
            t = type(a)
            if t is Tensor:
                raws.append(a.data)
                if any_comm is None:
                    any_comm = a.comm
                if a.layout == DISTRIBUTED:
                    distributed = True
                elif serial_comm is None:
                    serial_comm = a.comm
                elif serial_comm is not a.comm:
                    raise NotImplementedError(
                        f"{self.name}: combining serial values of different communicators is "
                        "not supported; bring them to one communicator with mpi_bcast first")
                if tape is not None:
                    if a._tape is tape:
                        if first is None:
                            first, only = a, k
                        else:
                            if traced is None:
                                traced = [None] * len(args)
                                traced[only] = first
                            traced[k] = a
                    elif a._tape is not None and traced_outside(a, tape):
                        raise nested_error(f"argument {k} of {self.name}")
            elif t is float or t is int:
                raws.append(a)
            elif t is ndarray:
                raws.append(operand(a))
                given = [a] if given is None else given + [a]
            elif isinstance(a, RANK_DEPENDENT):
                # Array libraries other than NumPy refuse int/float subclasses as scalars.
                raws.append(int(a) if isinstance(a, int) else float(a))
                distributed = True
            else:
                raws.append(a)
                if is_device_array(a):
                    given = [a] if given is None else given + [a]
        try:
            ans = self.forward(*raws, **kwargs)
        except (ValueError, TypeError, IndexError) as exc:
            named = _on_this_rank(exc, self.name)
            if named is exc:
                raise
            raise named from exc
        if given is not None and getattr(ans, "base", None) is not None:
            # A view of an array the caller gave, which it may write into after the call.
            ans = unshared(ans, given)
        out = Tensor(ans, DISTRIBUTED if distributed else SERIAL, serial_comm or any_comm)
        if first is not None:
            if given is not None and self.reads_args:
                held(raws, given)
            vjps = self.vjps or ()
            if (traced is None and self.vjp_all is None and only < len(vjps)
                    and vjps[only] is not None):
                # One traced, differentiable argument (most ops): its vjp alone is recorded.
                tape.record_one(self.name, vjps[only], ans, raws, kwargs, first, only, out,
                                distributed)
            else:
                if traced is None:
                    traced = [None] * len(args)
                    traced[only] = first
                tape.record_local(self.name, self._make_vjp(ans, raws, kwargs, traced), traced,
                                  out, distributed)
        return out

    def _make_vjp(self, ans, raws, kwargs, traced):
        """``vjp(gs)``: the list of the cotangents of the ``traced`` arguments (None for the
        others and for arguments without a VJP)."""
        if self.vjp_all is not None:
            return lambda gs: self.vjp_all(gs[0], ans, *raws, **kwargs)
        vjps = self.vjps or ()
        n = len(raws)
        # Only the arguments that are traced on this tape get a cotangent computed.
        wanted = [i for i in range(min(n, len(vjps)))
                  if traced[i] is not None and vjps[i] is not None]

        def vjp(gs):
            out = [None] * n
            for i in wanted:
                out[i] = vjps[i](gs[0], ans, *raws, **kwargs)
            return out
        return vjp


def held(raws, given):
    """Replace in the list ``raws`` the arrays the caller gave by copies: a recorded VJP reads
    them when the reverse pass runs, by which time the caller may have written into them."""
    for a in given:
        for k, r in enumerate(raws):
            if r is a:
                raws[k] = kept_copy(r)


def unshared(ans, arrays):
    """``ans``, copied where it shares memory with one of ``arrays``."""
    return ans.copy() if any(shares_memory(ans, a) for a in arrays) else ans


def _on_this_rank(exc, name):
    """``exc`` with the rank and the op in front of its message: the array library's errors
    name neither, and a job's ranks share one output. Messages that name a rank already, and
    exceptions of other classes than the plain built-in ones (their constructors may take other
    arguments), pass unchanged."""
    if type(exc) not in (ValueError, TypeError, IndexError) or len(exc.args) != 1:
        return exc
    message = str(exc.args[0])
    if message.startswith("rank "):
        return exc
    if not message.startswith(f"{name}:"):
        message = f"{name}: {message}"
    return type(exc)(f"rank {world().rank}: {message}")


def primitive(forward=None, *, name=None, reads_args=True):
    """Make ``forward`` (a function of raw arrays) a differentiable :class:`Primitive`.

    When the op is recorded, an array the caller passed as it is (not as a Tensor) is copied
    for the VJPs to read in the reverse pass, so that the gradient is that of the values at the
    time of the call; ``reads_args=False`` says the VJPs read no argument's values (only
    shapes), and skips the copy.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> from gpumpiad.primitive import primitive
    >>> cube = primitive(lambda x: x ** 3, name="cube")
    >>> _ = cube.defvjp(lambda g, ans, x: g * 3 * x ** 2)
    >>> float(gpumpiad.grad(lambda x: cube(x).sum())(np.array(2.0)))
    12.0
    """
    if forward is None:
        return lambda f: Primitive(f, name, reads_args)
    return Primitive(forward, name, reads_args)


def unbroadcast(g, shape):
    """Sum ``g`` over the axes that broadcasting added or stretched to reach ``g.shape``
    (``shape`` a tuple)."""
    if g.shape == shape:
        return g
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def shape_of(x):
    """Shape of an array or Python scalar."""
    return getattr(x, "shape", ())
