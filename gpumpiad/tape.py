"""The reverse-mode tape: records nodes eagerly, walks them backwards, accumulates cotangents.

Serial/distributed convention (POEM 075): the cotangent of a *serial* value is the same total on
every rank of its communicator. A node marks, per input, whether that input sits in a *per-rank*
position (an op whose output is distributed, or a sum across ranks): what it sends to a serial
input there is only this rank's *share* of the total. Shares travel backwards through local
serial ops (their VJPs are linear and the same on every rank) until they reach a *sink* — a
collective node with serial outputs, recorded on every rank of its communicator — or a leaf.
At a sink the shares are allreduced once into the value's total; the shares of the serial
leaves are summed in one fused allreduce at the end of the pass.

Whether a sink or a leaf receives shares can depend on rank-dependent control flow, so the
ranks agree on it first: one small allreduce (MAX) of a bitmap over each communicator's sinks
and serial leaves at the start of the pass (once per recorded program: a vjp's repeated
pullbacks reuse it). Two cases need no bit, so that a program such as ``mpi_sum`` of a serial
argument makes no agreement round trip at all:

- the last recorded sink, when the pass starts from a serial value: a share is what a per-rank
  op sends to a serial input, and a per-rank op's distributed output reaches a serial value
  only through a later sink;
- the serial leaves of a communicator whose leaves hold at most ``FUSED_LEAF_BYTES`` together:
  their fused allreduce is issued on every pass, on every rank, with zeros for the leaves
  without shares, which costs less than a round trip to agree on it.

A larger serial leaf that receives no share on any rank (a purely local function of it) needs
no allreduce at all. Every rank then visits the nodes in the exact reverse of their recording
order and runs every communicating node even when its cotangent is structurally zero, so all
ranks issue the same reverse communications in the same order.
"""
from __future__ import annotations

import threading

import numpy as np
from mpi4py import MPI

from . import trace
from .backend import get_array_module
from .transport import pooled, start_allreduce

_active = threading.local()
_NO_ORIGINS = frozenset()
DISTRIBUTED = "distributed"
# Up to this many bytes of a communicator's serial leaves, their shares are allreduced on every
# pass instead of agreeing first whether any rank has some.
FUSED_LEAF_BYTES = 1 << 20


class Node:
    """One recorded operation: ``vjp(output_cotangents) -> input cotangents``."""

    __slots__ = ("name", "vjp", "inputs", "outputs", "local", "communicates", "sink",
                 "takes_none")

    def __init__(self, name, vjp, inputs, outputs, local, communicates, sink, takes_none=False):
        # takes_none: the vjp takes None for an output cotangent that is structurally zero.
        self.takes_none = takes_none
        self.name = name
        self.vjp = vjp
        self.inputs = inputs
        self.outputs = outputs
        self.local = local
        self.communicates = communicates
        self.sink = sink


class Tape:
    """An ordered record of the nodes run while it is active (see :class:`recording`)."""

    def __init__(self):
        self.nodes = []
        self.nslots = 0
        self.leaves = []
        self.sinks = []
        self.origins = []
        self.marked = set()
        # Outputs of eager nodes (slot -> index of the first node that reads them, or None).
        self.awaited = {}
        self.eager = []
        # True when backward may run more than once (a vjp's pullback): ops whose reverse rule
        # consumes what the forward kept (the heat solver's states) must keep it then.
        self.retain = False
        self.agreed = None
        self.released = False

    def watch(self, tensor, leaf=False, origins=_NO_ORIGINS):
        """Give ``tensor`` a cotangent slot on this tape."""
        tensor._tape = self
        tensor._slot = self.nslots
        self.nslots += 1
        if leaf:
            if _shared_by_ranks(tensor):
                # A serial leaf is its own origin, numbered below the sinks (-1, -2, ...).
                origins = frozenset((-1 - len(self.leaves),))
            self.leaves.append(tensor)
        self.origins.append(origins)
        return tensor

    def record(self, name, vjp, inputs, outputs, local=None, communicates=False,
               collective=False, eager=False, takes_none=False):
        """Record a node. ``inputs`` holds Tensors or ``None`` for arguments that need no cotangent.

        ``local[i]`` is True when input ``i`` sits in a per-rank position; ``communicates`` makes
        the backward pass run the node on every rank even with no cotangent arriving;
        ``collective`` says every rank of the outputs' communicator records this node (all
        communication primitives and custom ops), so its serial outputs can be sinks;
        ``eager`` lets the reverse pass run the node as soon as its outputs' cotangents are
        complete (for a receive, whose reverse rule only sends); ``takes_none`` passes ``None``
        instead of an array of zeros for an output no cotangent reached (a send's unused
        result), so that the vjp can skip the arithmetic.
        """
        traced = []
        for t in inputs:
            if t is not None and t._tape is not self:
                if traced_outside(t, self):
                    raise nested_error(f"an input of {name}")
                t = None
            traced.append(t)
        inputs = traced
        if local is None:
            local = [False] * len(inputs)
        origins = None
        awaited = self.awaited
        for t, loc in zip(inputs, local):
            if t is None:
                continue
            if awaited and awaited.get(t._slot, 0) is None:
                awaited[t._slot] = len(self.nodes)
            if t.layout == DISTRIBUTED:
                continue
            mine = self.origins[t._slot]
            if loc:
                self.marked.update(mine)
            elif origins is None or origins is mine:
                origins = mine
            else:
                origins = origins | mine
        sink = -1
        if collective and [out for out in outputs if out.layout != DISTRIBUTED]:
            sink = len(self.sinks)
            origins = frozenset((sink,))
        node = Node(name, vjp, inputs, outputs, local, communicates, sink, takes_none)
        if sink >= 0:
            self.sinks.append(node)
        for out in outputs:
            self.watch(out, origins=_NO_ORIGINS if (origins is None or out.layout == DISTRIBUTED)
                       else origins)
        if eager:
            self.eager.append(len(self.nodes))
            for out in outputs:
                awaited[out._slot] = None
        self.nodes.append(node)

    def record_local(self, name, vjp, inputs, out, distributed):
        """:meth:`record` for a local op with one output whose ``vjp(gs)`` returns a list."""
        origins = _NO_ORIGINS
        awaited = self.awaited
        for t in inputs:
            if t is None:
                continue
            if awaited and awaited.get(t._slot, 0) is None:
                awaited[t._slot] = len(self.nodes)
            if t.layout == DISTRIBUTED:
                continue
            mine = self.origins[t._slot]
            if not mine:
                continue
            if distributed:
                self.marked.update(mine)
            elif mine is not origins:
                origins = mine if not origins else origins | mine
        out._tape = self
        out._slot = self.nslots
        self.nslots += 1
        self.origins.append(_NO_ORIGINS if distributed else origins)
        self.nodes.append(Node(name, vjp, inputs, (out,), _flags(distributed, len(inputs)),
                               False, -1))

    def record_one(self, name, fn, ans, raws, kwargs, inp, k, out, distributed):
        """Record a local op with one traced input ``inp`` (argument ``k``) and one output: the
        hot path of every program. The reverse step calls ``fn(g, ans, *raws, **kwargs)`` for
        the cotangent of ``inp``; the node is a plain tuple (no closure, no object)."""
        slot = inp._slot
        awaited = self.awaited
        if awaited and awaited.get(slot, 0) is None:
            awaited[slot] = len(self.nodes)
        serial = inp.layout != DISTRIBUTED
        origins = _NO_ORIGINS
        if serial:
            origins = self.origins[slot]
            if distributed and origins:
                self.marked.update(origins)
        out._tape = self
        out._slot = self.nslots
        self.nslots += 1
        self.origins.append(_NO_ORIGINS if distributed else origins)
        # What a total of the output sends goes to the input's shares when the op is per-rank.
        self.nodes.append((fn, ans, raws, kwargs or None, inp, k, out, serial and distributed,
                           serial, name))

    def backward(self, loss, seed):
        """Return the cotangents of :attr:`leaves` for ``loss`` seeded with ``seed``."""
        if self.released:
            raise RuntimeError(f"rank {_rank()}: the recorded operations were already released; "
                               "record them again")
        total = [None] * self.nslots
        share = [None] * self.nslots
        deferred = {}
        total[loss._slot] = seed
        # The agreement depends only on what was recorded: a repeated pass reuses it.
        agreed = self.agreed
        if agreed is None:
            agreed = self._agree_on_shares(loss.layout != DISTRIBUTED)
            if self.retain:
                self.agreed = agreed
        nodes = self.nodes
        # An eager node (a receive, whose reverse rule only sends) runs as soon as its outputs'
        # cotangents are complete, i.e. right after their first consumer is visited, so that
        # a peer waiting for that cotangent never waits on this rank's reverse order.
        triggers = {}
        n = len(nodes)
        done = ()
        if self.eager:
            for e in self.eager:
                ready = min((_or(self.awaited.get(o._slot), n) for o in nodes[e].outputs),
                            default=n)
                triggers.setdefault(ready, []).append(e)
            for e in triggers.pop(n, ()):
                self._visit(nodes[e], total, share, deferred, agreed)
            done = set(self.eager)
        for i in range(n - 1, -1, -1):
            node = nodes[i]
            if type(node) is tuple:
                # A local op with one traced input (the overwhelming majority of nodes).
                fn, ans, raws, kwargs, inp, k, out, total_to_share, serial, name = node
                slot = out._slot
                if deferred and slot in deferred:
                    _resolve(out, deferred, total, share)
                g = total[slot]
                if g is not None:
                    g = fn(g, ans, *raws, **kwargs) if kwargs else fn(g, ans, *raws)
                    _add_raw(inp._slot, raws[k], g, share if total_to_share else total, name)
                g = share[slot]
                if g is not None:
                    g = fn(g, ans, *raws, **kwargs) if kwargs else fn(g, ans, *raws)
                    _add_raw(inp._slot, raws[k], g, share if serial else total, name)
            elif node.sink < 0 and not node.communicates and len(node.outputs) == 1:
                # A local op of several traced inputs: its vjp returns a list.
                out = node.outputs[0]
                slot = out._slot
                if deferred and slot in deferred:
                    _resolve(out, deferred, total, share)
                if total[slot] is not None:
                    _accumulate(node, node.vjp((total[slot],)), total, share, False, deferred)
                if share[slot] is not None:
                    _accumulate(node, node.vjp((share[slot],)), total, share, True, deferred)
            elif i not in done:
                self._visit(node, total, share, deferred, agreed)
            if triggers and i in triggers:
                for e in triggers[i]:
                    self._visit(nodes[e], total, share, deferred, agreed)
        if deferred:
            for leaf in self.leaves:
                if leaf._slot in deferred:
                    _resolve(leaf, deferred, total, share)
        _finalize_leaves(self.leaves, total, share, agreed)
        return _handed_out([total[leaf._slot] if total[leaf._slot] is not None
                            else _zeros_like(leaf) for leaf in self.leaves],
                           [seed] + [leaf.data for leaf in self.leaves])

    def release(self):
        """Drop the recorded nodes: tensors, closures and the tape form reference cycles, so
        without this their (possibly large) buffers would wait for the cyclic collector."""
        self.nodes = []
        self.leaves = []
        self.sinks = []
        self.origins = []
        self.awaited = {}
        self.eager = []
        self.released = True

    def _visit(self, node, total, share, deferred, agreed):
        """The general reverse step of one node; a communicating one (a collective, a custom
        op, point-to-point) is an :data:`~gpumpiad.trace.ADJOINT` span named by its op."""
        if (node.communicates or node.sink >= 0) and trace.active():
            with trace.span(_adjoint_name(node.name), trace.ADJOINT):
                self._step(node, total, share, deferred, agreed)
        else:
            self._step(node, total, share, deferred, agreed)

    def _step(self, node, total, share, deferred, agreed):
        outs = node.outputs
        if deferred:
            for out in outs:
                if out._slot in deferred:
                    _resolve(out, deferred, total, share)
        if node.sink in agreed:
            for out in outs:
                if out.layout != DISTRIBUTED:
                    _finalize(out, total, share)
        elif node.sink >= 0 and _some([share[o._slot] for o in outs]):
            raise RuntimeError(f"internal error: {node.name} received a share that no rank "
                               "announced; its cotangent would be incomplete")
        gt = [total[o._slot] for o in outs]
        if node.communicates or _some(gt):
            if not node.takes_none:
                gt = [_zeros_like(o) if g is None else g for g, o in zip(gt, outs)]
            gins = node.vjp(gt)
            _accumulate(node, gins, total, share, False, deferred)
        gs = [share[o._slot] for o in outs]
        if _some(gs):
            # A local serial op: shares map linearly onto its (serial) inputs' shares.
            gins = node.vjp([_zeros_like(o) if g is None else g for g, o in zip(gs, outs)])
            _accumulate(node, gins, total, share, True, deferred)

    def _agree_on_shares(self, serial_seed):
        """Which sinks (index k) and serial leaves (origin -1 - k) receive shares on some rank:
        one small allreduce (MAX) of a bitmap per communicator, issued by every rank, for those
        the module's docstring does not exempt (``serial_seed``: the pass starts from a serial
        value). An exempt leaf counts as agreed: its fused allreduce happens on every rank."""
        by_comm = {}
        last = len(self.sinks) - 1 if serial_seed else len(self.sinks)
        for k, node in enumerate(self.sinks[:last]):
            comm = node.outputs[0].comm
            by_comm.setdefault(id(comm), (comm, []))[1].append(k)
        agreed = set()
        leaves = {}
        for k, leaf in enumerate(self.leaves):
            if _shared_by_ranks(leaf):
                leaves.setdefault(id(leaf.comm), (leaf.comm, []))[1].append(k)
        for comm, ks in leaves.values():
            nbytes = sum([self.leaves[k].data.nbytes for k in ks])
            if nbytes <= FUSED_LEAF_BYTES:
                agreed.update([-1 - k for k in ks])
            else:
                by_comm.setdefault(id(comm), (comm, []))[1].extend(-1 - k for k in ks)
        pending = []
        marked = self.marked
        for comm, origins in by_comm.values():
            if comm.size == 1:
                agreed.update(k for k in origins if k in marked)
                continue
            bits = np.array([k in marked for k in origins], dtype=np.uint8)
            call = "agreement on reverse-mode allreduces"
            pending.append((origins, comm.issue(
                call, lambda c=comm, b=bits: start_allreduce(c.mpi, b, MPI.MAX, call),
                array=bits)))
        for origins, p in pending:
            bits = p.wait().tolist()
            agreed.update(k for k, b in zip(origins, bits) if b)
        return agreed


_ADJOINT_NAMES = {}


def _adjoint_name(name):
    """``adjoint.<op>``: built once per op, so that a span's name is one constant string."""
    span_name = _ADJOINT_NAMES.get(name)
    if span_name is None:
        span_name = _ADJOINT_NAMES[name] = f"adjoint.{name}"
    return span_name


def _some(items):
    """Whether any of ``items`` is not None (by identity: arrays compare elementwise)."""
    for item in items:
        if item is not None:
            return True
    return False


_FLAGS = {}


def _flags(value, n):
    key = (value, n)
    flags = _FLAGS.get(key)
    if flags is None:
        flags = _FLAGS[key] = (value,) * n
    return flags


class Deferred:
    """A cotangent contribution that arrives later, e.g. from a reverse-mode receive.

    A reverse rule returns it instead of waiting, so that ranks never block on each other in
    the middle of the reverse pass: the tape waits only when the value's cotangent is needed
    (just before its producer is visited, or at the end for a leaf).
    """

    __slots__ = ("pending", "plus")

    def __init__(self, pending, plus=None):
        self.pending = pending
        self.plus = plus

    def resolve(self):
        g = self.pending.wait()
        if self.plus is None:
            return g
        g += self.plus  # g is a fresh receive buffer: no new array of its size
        return g


def _resolve(t, deferred, total, share):
    for item, to_share in deferred.pop(t._slot):
        g = item.resolve()
        _add(t, g, share if to_share else total, None)


def _add(inp, g, buf, name):
    """Add the cotangent ``g`` that op ``name`` (``None``: a deferred contribution) sends to
    ``inp`` into ``buf``."""
    _add_raw(inp._slot, inp.data, g, buf, name)


def _add_raw(slot, data, g, buf, name):
    """:func:`_add` for the value in ``slot`` whose array is ``data``."""
    if g.shape != data.shape or g.dtype != data.dtype:
        g = _checked(g, data, name)
    prev = buf[slot]
    buf[slot] = g if prev is None else _sum(prev, g)


_pooled_add = pooled(np.add)


def _sum(a, b):
    """``a + b``, a large NumPy sum into the results' pool (a cotangent summed on every call)."""
    return _pooled_add(a, b) if type(a) is np.ndarray and type(b) is np.ndarray else a + b


def _checked(g, data, name):
    """``g`` cast to ``data``'s dtype, once its shape is checked and the cast loses nothing."""
    if g.shape != data.shape:
        raise RuntimeError(f"internal error: {_contribution(name)} has shape {g.shape} for a "
                           f"value of shape {data.shape}")
    if g.dtype != data.dtype:
        if g.dtype.kind == "c" and data.dtype.kind != "c":
            # Casting would drop the imaginary part: a silently wrong gradient.
            raise TypeError(f"rank {_rank()}: {_contribution(name)} returned a complex "
                            f"cotangent ({g.dtype}) for a real value ({data.dtype}): expected a "
                            "real cotangent; differentiating through complex intermediate "
                            "values is not supported")
        g = g.astype(data.dtype)
    return g


def _or(value, default):
    return default if value is None else value


def _contribution(name):
    return "a deferred contribution" if name is None else f"the vjp of {name!r}"


def _accumulate(node, gins, total, share, all_shares, deferred):
    for inp, g, loc in zip(node.inputs, gins, node.local):
        if inp is None or g is None:
            continue
        to_share = (all_shares or loc) and inp.layout != DISTRIBUTED
        if type(g) is Deferred:
            deferred.setdefault(inp._slot, []).append((g, to_share))
        else:
            _add(inp, g, share if to_share else total, node.name)


def _shared_by_ranks(t):
    """A serial value of a communicator of several ranks: its cotangent may arrive as per-rank
    shares that an allreduce sums."""
    return t.layout != DISTRIBUTED and t.comm.size > 1


def _zeros_like(t):
    return get_array_module(t.data).zeros(t.shape, t.dtype)


def _handed_out(grads, kept):
    """The gradients, each one the caller may modify alone: a reverse rule may pass a cotangent
    straight through (an identity, an addition, a reshape, a sum over ranks of a distributed
    value), so one array can reach several leaves or be the caller's seed itself, and another
    may be a read-only broadcast view. Such a gradient, or one that shares memory with an
    array of ``kept`` (the seed, the leaves' values), is copied; no other is."""
    held = {}
    for a in kept:
        held.setdefault(id(owner(a)), []).append(a)
    out = []
    for g in grads:
        same = held.get(id(owner(g)))
        flags = getattr(g, "flags", None)
        if ((flags is not None and not getattr(flags, "writeable", True))
                or (same and any(_overlap(g, h) for h in same))):
            g = g.copy()
            same = None
        if same is None:
            same = held[id(owner(g))] = []
        same.append(g)
        out.append(g)
    return out


def owner(a):
    """The array that owns ``a``'s memory (``a`` itself unless it is a view)."""
    while getattr(a, "base", None) is not None:
        a = a.base
    return a


def shares_memory(a, b):
    """Whether arrays ``a`` and ``b`` may share elements; only arrays of one :func:`owner` can."""
    return a is b or (owner(a) is owner(b) and _overlap(a, b))


def _overlap(a, b):
    """:func:`shares_memory` for arrays of one owner."""
    return a is b or bool(get_array_module(a).may_share_memory(a, b))


def _finalize(t, total, share):
    """Add the allreduce of ``t``'s per-rank shares to its total (every rank calls this)."""
    mine = share[t._slot]
    share[t._slot] = None
    summed = t.comm.allreduce_sum(_zeros_like(t) if mine is None else mine)
    prev = total[t._slot]
    total[t._slot] = summed if prev is None else _sum(prev, summed)


def _finalize_leaves(leaves, total, share, agreed):
    """One fused allreduce, per communicator, of the per-rank shares of the serial leaves that
    receive shares on some rank (``agreed``: the ranks decided together, so rank-dependent
    control flow cannot make them disagree on whether the allreduce happens)."""
    by_comm = {}
    for k, leaf in enumerate(leaves):
        if _shared_by_ranks(leaf):
            if -1 - k in agreed:
                by_comm.setdefault(id(leaf.comm), []).append(leaf)
            elif share[leaf._slot] is not None:
                raise RuntimeError(f"internal error: serial leaf {k} received a share that no "
                                   "rank announced; its gradient would be incomplete")
        elif share[leaf._slot] is not None:
            g = share[leaf._slot]
            total[leaf._slot] = g if total[leaf._slot] is None else _sum(total[leaf._slot], g)
    for group in by_comm.values():
        if len(group) == 1:
            _finalize(group[0], total, share)
            continue
        xp = get_array_module(group[0].data)
        dtype = xp.result_type(*[leaf.dtype for leaf in group])
        flat = xp.zeros(sum(leaf.size for leaf in group), dtype)
        offset = 0
        for leaf in group:
            if share[leaf._slot] is not None:
                flat[offset:offset + leaf.size] = share[leaf._slot].reshape(-1)
            offset += leaf.size
        summed = group[0].comm.allreduce_sum(flat)
        offset = 0
        for leaf in group:
            part = summed[offset:offset + leaf.size].reshape(leaf.shape).astype(leaf.dtype,
                                                                             copy=False)
            offset += leaf.size
            prev = total[leaf._slot]
            total[leaf._slot] = part if prev is None else _sum(prev, part)


def _rank():
    from .comm import world
    return world().rank


def traced_outside(t, tape):
    """Whether Tensor ``t`` is traced by a tape other than ``tape`` that is recording on this
    thread: an enclosing differentiation, whose derivative an inner one would drop."""
    owner = t._tape
    if owner is None or owner is tape:
        return False
    return any(s is owner for s in getattr(_active, "stack", ()))


def nested_error(what):
    """The error for a value traced by an enclosing differentiation reaching an inner one."""
    return NotImplementedError(
        f"rank {_rank()}: higher-order derivatives are not supported: {what} is traced by an "
        "enclosing grad, value_and_grad or vjp, and a grad, value_and_grad or vjp called "
        "inside the function it differentiates would drop its derivative; take the inner "
        "derivative outside that function")


def active_tape():
    """The tape recording on this thread, or ``None``."""
    try:
        stack = _active.stack
    except AttributeError:
        return None
    return stack[-1] if stack else None


class recording:
    """Context manager that makes ``tape`` the active tape of this thread."""

    def __init__(self, tape):
        self.tape = tape

    def __enter__(self):
        if not hasattr(_active, "stack"):
            _active.stack = []
        _active.stack.append(self.tape)
        return self.tape

    def __exit__(self, *exc):
        _active.stack.pop()
        return False
