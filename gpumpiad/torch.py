"""gpumpiad inside PyTorch's autograd: bridged functions and replicated parameters.

:func:`function` turns a gpumpiad-differentiable function into a callable on ``torch.Tensor``
whose backward is gpumpiad's pullback; :func:`replicate` declares torch parameters serial, so
that after ``loss.backward()`` their ``.grad`` is the same total on every rank. Data crosses by
DLPack in both directions, without copies, on the CPU and on CUDA.

Ordering: every rank runs the same program, so every rank builds the same torch graph, and
torch's engine runs a graph's nodes in one deterministic order (one thread per device, the
ready nodes taken by creation sequence), with zeros for an output whose gradient is zero. Each
bridged node therefore runs its pullback on every rank, in the same place among the others,
and gpumpiad's tape runs every communicating node of that pullback on every rank, also where
the local cotangent is zero; :func:`replicate`'s allreduce is issued once, at the end of the
backward pass, on every rank whose backward reaches the parameters. Every rank's loss must
depend on every bridged call and on the replicated parameters (evaluate the network on every
rank, even on an empty batch): a rank whose graph skips one would leave the others waiting,
which ``GPUMPIAD_TIMEOUT`` turns into an error and debug mode names.
"""
from __future__ import annotations

import functools
import weakref
import zlib

try:
    import torch
except ImportError as _exc:
    raise ImportError('gpumpiad.torch needs PyTorch, which is not installed: '
                      'pip install "gpumpiad[torch]"') from _exc

import numpy as np

from . import control, trace
from .autodiff import vjp
from .backend import array_module, is_device_array, to_numpy
from .comm import resolve, world
from .debug import CommunicationMismatch, debug_enabled
from .tensor import DISTRIBUTED, SERIAL, Tensor

__all__ = ["device", "function", "replicate", "Replicated"]

_LAYOUTS = (SERIAL, DISTRIBUTED)
# Parameters some :class:`Replicated` holds: a bridged serial argument computed from one would
# be allreduced twice (once by the bridge, once by the replication).
_replicated = weakref.WeakValueDictionary()


def _rank():
    return world().rank


def function(fn, layout, *, comm=None):
    """Make a gpumpiad-differentiable function callable on ``torch.Tensor`` inside torch's
    autograd, with gpumpiad's pullback as its backward.

    Parameters
    ----------
    fn : callable
        Takes gpumpiad Tensors (one per ``torch.Tensor`` argument) and other arguments as
        given, returns a gpumpiad Tensor of real floating dtype; collectives,
        :func:`gpumpiad.heat.solve` and :func:`gpumpiad.custom_op` may run inside.
    layout : {"serial", "distributed"} or tuple of them
        Per positional argument (one string: all of them): ``"serial"``, the same value on
        every rank, or ``"distributed"``, this rank's own piece. Entries for arguments that
        are not tensors are not read.
    comm : gpumpiad.Comm or mpi4py communicator, optional
        The communicator the layouts refer to (default: the world).

    Returns
    -------
    callable
        ``(*args) -> torch.Tensor``: ``fn``'s value, on the arguments' device. The tensors
        share memory with the arrays ``fn`` receives and returns (DLPack); on CUDA, ``fn`` runs
        on torch's current stream.

    Raises
    ------
    TypeError
        ``fn`` not callable, ``comm`` no communicator; at a call: a tensor on a device the
        backend does not compute on (a CUDA tensor with the NumPy backend, a CPU tensor with
        CuPy), or ``fn`` returning no Tensor of real floating dtype.
    ValueError
        ``layout`` not ``"serial"``, ``"distributed"`` or a tuple of them; at a call: a tuple
        with another length than the arguments, or a serial argument computed from a
        parameter that :func:`replicate` holds (its gradient would be summed over the ranks
        twice).

    Notes
    -----
    The gradient torch receives for a serial argument is the same total on every rank (the
    allreduce is gpumpiad's, once per pass, fused over the serial arguments); for a distributed
    argument it is this rank's piece. The cotangent torch hands back for a serial value is its
    global cotangent, the same on every rank (debug mode compares it across ranks), and for a
    distributed value this rank's piece. The backward may run more than once
    (``retain_graph=True``); the recorded operations are released with the torch graph.
    Arguments and the value are saved for backward, so modifying one in place before the
    backward pass is torch's usual error. See the module's notes for the order of the collectives.

    Examples
    --------
    >>> import torch, gpumpiad
    >>> import gpumpiad.torch as gt
    >>> total = gt.function(lambda x: gpumpiad.mpi_sum((x * x).sum()), "distributed")
    >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    >>> loss = total(x)
    >>> loss.backward()
    >>> x.grad.tolist()
    [2.0, 4.0]
    """
    if not callable(fn):
        raise TypeError(f"rank {_rank()}: gpumpiad.torch.function's fn must be callable, got "
                        f"{type(fn).__name__} {fn!r:.60}")
    layouts = _check_layout(layout)
    comm = resolve(comm)

    @functools.wraps(fn)
    def bridged(*args):
        spec = layouts * len(args) if len(layouts) == 1 and isinstance(layout, str) else layouts
        if len(spec) != len(args):
            raise ValueError(f"rank {comm.rank}: gpumpiad.torch.function({_name(fn)}): layout "
                             f"names {len(spec)} argument(s), the call passes {len(args)}: "
                             f"expected one layout per positional argument")
        for k, (a, lay) in enumerate(zip(args, spec)):
            if isinstance(a, torch.Tensor):
                _check_device(a, k, fn, comm)
                if lay == SERIAL and a.requires_grad and len(_replicated):
                    _check_not_replicated(a, k, fn, comm)
        return _Bridge.apply((fn, spec, comm, torch.is_grad_enabled()), *args)

    return bridged


def device():
    """The torch device that matches gpumpiad's arrays on this rank: ``cuda:<the rank's GPU>``
    on the CuPy backend, else ``cpu``. Tensors given to a :func:`function` live there.

    Examples
    --------
    >>> import gpumpiad.torch as gt
    >>> gt.device().type in ("cpu", "cuda")
    True
    """
    if array_module() is np:
        return torch.device("cpu")
    import cupy
    return torch.device("cuda", cupy.cuda.runtime.getDevice())


def _name(fn):
    return getattr(fn, "__name__", type(fn).__name__)


def _check_layout(layout):
    if isinstance(layout, str):
        layout = (layout,)
    if (not isinstance(layout, (tuple, list)) or not layout
            or not all(isinstance(e, str) and e in _LAYOUTS for e in layout)):
        raise ValueError(f"rank {_rank()}: gpumpiad.torch.function's layout must be 'serial', "
                         f"'distributed' or a non-empty tuple of them (one per positional "
                         f"argument), got {layout!r}")
    return tuple(layout)


def _check_device(t, k, fn, comm):
    on_cuda = t.device.type == "cuda"
    on_device_backend = array_module() is not np
    if t.device.type not in ("cpu", "cuda") or on_cuda != on_device_backend:
        backend = "CuPy (CUDA)" if on_device_backend else "NumPy (CPU)"
        expected = "a CUDA tensor" if on_device_backend else "a CPU tensor"
        raise TypeError(f"rank {comm.rank}: gpumpiad.torch.function({_name(fn)}): argument {k} "
                        f"is on device {t.device}, but gpumpiad's backend is {backend}: "
                        f"expected {expected} (GPUMPIAD_BACKEND chooses the backend)")


def _check_not_replicated(t, k, fn, comm):
    """Refuse a serial argument whose graph reaches a replicated parameter."""
    seen, stack = set(), [t.grad_fn]
    found = t.grad_fn is None and _replicated.get(id(t)) is t
    while stack and not found:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and _replicated.get(id(variable)) is variable:
            found = True
        stack.extend(n for n, _ in node.next_functions)
    if found:
        raise ValueError(f"rank {comm.rank}: gpumpiad.torch.function({_name(fn)}): argument {k} "
                         "is serial and computed from a parameter that gpumpiad.torch.replicate "
                         "holds: its gradient would be summed over the ranks twice (by the "
                         "bridge, whose serial gradients are totals, and by the replication); "
                         "expected a distributed argument (the network evaluated on this "
                         "rank's data), or parameters that are not replicated")


def _stream(t):
    """On CUDA, CuPy's view of torch's current stream, so gpumpiad's kernels queue after the
    work that produced ``t`` and before the work torch queues next; nothing on the CPU."""
    if t.device.type != "cuda":
        return _NoStream
    import cupy
    stream = torch.cuda.current_stream(t.device)
    device = cupy.cuda.Device(t.device.index)
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        # The CUDA stream protocol (CuPy 14 deprecates ExternalStream for it).
        with device:
            return _CudaStream(device, cupy.cuda.Stream.from_external(stream))
    return _CudaStream(device, cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index))


class _NoStreamType:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NoStream = _NoStreamType()


class _CudaStream:
    __slots__ = ("device", "stream")

    def __init__(self, device, stream):
        self.device, self.stream = device, stream

    def __enter__(self):
        self.device.__enter__()
        self.stream.__enter__()

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.device.__exit__(*exc)
        return False


def _to_array(t):
    """The array viewing ``t``'s memory (no copy)."""
    if t.device.type == "cuda":
        import cupy
        return cupy.from_dlpack(t.detach())
    return np.from_dlpack(t.detach())


def _to_torch(a):
    """The torch tensor viewing array ``a``'s memory; a copy only for a read-only array or one
    with repeated elements (a broadcast view), which torch would let the caller write."""
    if not hasattr(a, "__dlpack__"):
        a = np.asarray(a)  # a NumPy scalar: a 0-d array of its own
    writeable = is_device_array(a) or a.flags.writeable
    if not writeable or 0 in a.strides and a.size > 1:
        a = a.copy()
    return torch.from_dlpack(a)


class _Bridge(torch.autograd.Function):
    """One call of a bridged function: forward through :func:`gpumpiad.vjp`, backward through
    its pullback."""

    @staticmethod
    def forward(ctx, spec, *args):
        fn, layouts, comm, grad_enabled = spec
        nums = tuple(k for k, a in enumerate(args)
                     if grad_enabled and isinstance(a, torch.Tensor) and a.requires_grad)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        with _stream(first) if first is not None else _NoStream:
            with trace.span("torch.bridge.in", trace.STAGING):
                given = [Tensor(_to_array(a), lay, comm) if isinstance(a, torch.Tensor) else a
                         for a, lay in zip(args, layouts)]
            if nums:
                value, pullback = vjp(fn, *given, argnums=nums)
                ctx.pullback = pullback
            else:
                value = _plain(fn, given, comm)
            with trace.span("torch.bridge.out", trace.STAGING):
                for a in given:
                    if isinstance(a, Tensor) and _shares(value, a.data):
                        value = value.copy()
                        break
                out = _to_torch(value)
        ctx.nums = nums
        ctx.nargs = len(args)
        # Saved, the arguments and the value are checked by torch for writes in place before
        # the backward: the pullback reads them (the value as an op's result, e.g. exp's).
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)], out)
        return out

    @staticmethod
    def backward(ctx, g):
        _ = ctx.saved_tensors  # torch's check that nothing saved was modified in place
        grads = [None] * (1 + ctx.nargs)
        if not ctx.nums:
            return tuple(grads)
        with _stream(g):
            with trace.span("torch.bridge.in", trace.STAGING):
                seed = _to_array(g)
            got = ctx.pullback(seed)
            got = got if isinstance(got, tuple) else (got,)
            with trace.span("torch.bridge.out", trace.STAGING):
                for k, a in zip(ctx.nums, got):
                    grads[1 + k] = _to_torch(a)
        return tuple(grads)


def _plain(fn, given, comm):
    """``fn``'s value when no argument needs a gradient (nothing recorded)."""
    out = fn(*given)
    if not isinstance(out, Tensor):
        raise TypeError(f"rank {comm.rank}: gpumpiad.torch.function({_name(fn)}): fn must return "
                        f"a gpumpiad Tensor, got {type(out).__name__}")
    return out.data


def _shares(a, b):
    return (is_device_array(a) == is_device_array(b)
            and (np.may_share_memory(a, b) if not is_device_array(a)
                 else array_module().may_share_memory(a, b)))


def replicate(module_or_params, *, comm=None):
    """Declare torch parameters serial: after ``loss.backward()`` each one's ``.grad`` is the
    same total over the ranks on every rank.

    Parameters
    ----------
    module_or_params : torch.nn.Module or iterable of torch.Tensor
        The parameters (a module's ``parameters()``, in its order); those with
        ``requires_grad`` take part. Every rank passes the same parameters, in the same order,
        with the same values.
    comm : gpumpiad.Comm or mpi4py communicator, optional
        The ranks that hold the copies (default: the world).

    Returns
    -------
    Replicated
        Holds the hooks; :meth:`Replicated.remove` takes them away.

    Raises
    ------
    TypeError
        Not a module or an iterable of tensors.
    ValueError
        No parameter requires a gradient.
    CommunicationMismatch
        Debug mode only, on every rank: the parameters' number, shapes, dtypes or values
        differ across ranks (checked here and after every backward pass).

    Notes
    -----
    Each rank's backward pass contributes this rank's share of every parameter's gradient
    (the network evaluated on this rank's data). The shares are flattened into one buffer, in
    parameter order, and summed by one allreduce at the end of the pass, issued on every rank
    whose pass reaches the parameters, also where a rank's share is zero or missing (a
    parameter this rank's pass did not reach counts as zero). Where the pass accumulated into
    a parameter's ``.grad`` on any rank, ``.grad`` becomes, on every rank, the previous
    ``.grad`` (if any) plus that total, the same bits everywhere, so any ``torch.optim``
    optimiser keeps the copies identical without further communication. Only ``.grad`` is
    changed: ``torch.autograd.grad`` returns this rank's share. A parameter that feeds a
    serial argument of a :func:`function` gets its total from the bridge already and must not
    be replicated (the bridge refuses it).

    Examples
    --------
    >>> import torch, gpumpiad
    >>> import gpumpiad.torch as gt
    >>> net = torch.nn.Linear(2, 1).double()
    >>> replicated = gt.replicate(net)
    >>> x = torch.full((3, 2), float(gpumpiad.mpi_rank() + 1), dtype=torch.float64)
    >>> net(x).sum().backward()
    >>> net.bias.grad.tolist() == [3.0 * gpumpiad.mpi_size()]
    True
    >>> replicated.remove()
    """
    comm = resolve(comm)
    if isinstance(module_or_params, torch.nn.Module):
        named = list(module_or_params.named_parameters())
    else:
        try:
            params = list(module_or_params)
        except TypeError:
            raise TypeError(f"rank {comm.rank}: replicate needs a torch.nn.Module or an iterable "
                            f"of torch tensors, got {type(module_or_params).__name__}") from None
        bad = [k for k, p in enumerate(params) if not isinstance(p, torch.Tensor)]
        if bad:
            raise TypeError(f"rank {comm.rank}: replicate's parameter {bad[0]} is a "
                            f"{type(params[bad[0]]).__name__}: expected torch tensors")
        named = [(f"parameter {k}", p) for k, p in enumerate(params)]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError(f"rank {comm.rank}: replicate found no parameter that requires a "
                         "gradient: expected at least one")
    return Replicated(named, comm)


class Replicated:
    """The hooks :func:`replicate` registers on a list of parameters."""

    def __init__(self, named, comm):
        self.names = [n for n, _ in named]
        self.parameters = [p for _, p in named]
        self.comm = comm
        self._shares = [None] * len(named)
        self._previous = [None] * len(named)
        self._accumulated = [False] * len(named)
        self._task = None
        self._handles = []
        for k, p in enumerate(self.parameters):
            self._handles.append(p.register_hook(functools.partial(self._arrived, k)))
            self._handles.append(p.register_post_accumulate_grad_hook(
                functools.partial(self._accumulated_into, k)))
            _replicated[id(p)] = p
        if debug_enabled():
            self.check_identical("gpumpiad.torch.replicate")

    def remove(self):
        """Take the hooks away: ``.grad`` is then this rank's own again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self.parameters:
            if _replicated.get(id(p)) is p:
                del _replicated[id(p)]

    def _arrived(self, k, g):
        # Once per backward pass; a pass that failed before its end never ran the callback,
        # so the next one is told apart by its graph task.
        task = torch._C._current_graph_task_id()
        if task != self._task:
            if self._task is not None:
                self._clear()
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)
        p = self.parameters[k]
        self._shares[k] = g
        self._previous[k] = None if p.grad is None else p.grad.detach().clone()
        return None

    def _clear(self):
        n = len(self.parameters)
        self._shares, self._previous, self._accumulated = [None] * n, [None] * n, [False] * n
        self._task = None

    def _accumulated_into(self, k, p):
        self._accumulated[k] = True

    def _reduce(self):
        """End of the backward pass: one allreduce of every share, with one flag per parameter
        saying whether the pass accumulated into its ``.grad``; where any rank's did, every
        rank sets ``.grad`` = previous ``.grad`` + total, so the copies stay alike."""
        shares, previous, accumulated = self._shares, self._previous, self._accumulated
        n = len(self.parameters)
        self._clear()
        first = self.parameters[0]
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.parameters])
        pieces = [(s.detach() if s is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                  for s, p in zip(shares, self.parameters)]
        pieces.append(torch.tensor(accumulated, dtype=dtype, device=first.device))
        flat = torch.cat(pieces)
        with _stream(first):
            with trace.span("torch.replicate.allreduce", trace.COMMUNICATION,
                            payload=flat.numel() * flat.element_size()):
                total = _to_torch(self.comm.allreduce_sum(_to_array(flat)))
        flags = total[-n:].tolist()
        offset = 0
        for k, p in enumerate(self.parameters):
            part = total[offset:offset + p.numel()].view(p.shape).to(p.dtype)
            offset += p.numel()
            if flags[k] > 0:
                # A parameter this rank's pass did not reach still holds its previous .grad.
                base = previous[k] if shares[k] is not None else p.grad
                with torch.no_grad():
                    p.grad = part if base is None else base + part
        if debug_enabled():
            self.check_identical("gpumpiad.torch.replicate after backward")

    def check_identical(self, call="gpumpiad.torch.replicate check"):
        """Collectively check that every rank holds the same parameters (number, shapes,
        dtypes and values, by checksum); raise :class:`~gpumpiad.CommunicationMismatch` on
        every rank naming the parameter and the ranks that differ. Debug mode runs it after
        every backward pass.

        Examples
        --------
        >>> import torch, gpumpiad.torch as gt
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> replicated = gt.replicate(torch.nn.Linear(2, 1))
        >>> replicated.check_identical()
        >>> replicated.remove()
        """
        counts = control.allgather_ints(self.comm, call, [len(self.parameters)])[:, 0]
        if np.any(counts != counts[0]):
            raise CommunicationMismatch(f"rank {self.comm.rank}: {call}: the ranks replicate "
                                        f"different numbers of parameters (per rank: "
                                        f"{counts.tolist()}): expected the same parameters on "
                                        "every rank")
        codes = []
        for p in self.parameters:
            data = to_numpy(_to_array(p.detach().contiguous()))
            codes.append(zlib.crc32(f"{tuple(p.shape)} {p.dtype}".encode()) & 0x7FFFFFFF)
            # + 0.0 makes -0.0 and 0.0 one value.
            codes.append(zlib.crc32(np.ascontiguousarray(data + 0.0).tobytes()) & 0x7FFFFFFF)
        table = control.allgather_ints(self.comm, call, codes)
        for column in range(len(codes)):
            if np.any(table[:, column] != table[0, column]):
                name = self.names[column // 2]
                what = "value" if column % 2 else "shape or dtype"
                groups = {}
                for r in range(self.comm.size):
                    groups.setdefault(int(table[r, column]), []).append(r)
                detail = "; ".join(f"rank(s) {ranks} hold one {what}" for ranks in groups.values())
                raise CommunicationMismatch(
                    f"rank {self.comm.rank}: {call}: replicated {name} differs across ranks "
                    f"({detail}): expected the same {what} on every rank (checked in debug "
                    "mode)")
