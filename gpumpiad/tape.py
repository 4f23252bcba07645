"""The reverse-mode tape: records nodes eagerly, walks them backwards, accumulates cotangents.

Serial/distributed convention (POEM 075): the cotangent of a *serial* value is the same total on
every rank of its communicator. A node marks, per input, whether that input sits in a *per-rank*
position (an op whose output is distributed, or a sum across ranks). What such a node sends to a
serial input is only this rank's share, so it goes to a ``local`` buffer; the tape adds the
allreduce of that buffer to the value's total once, just before the value's own producer is
visited. The shares of all serial leaves are summed in one fused allreduce at the end of the pass.
Every rank visits the nodes in the exact reverse of their recording order and runs every
communicating node even when its local cotangent is structurally zero, so all ranks issue the
same reverse communications in the same order.
"""
from __future__ import annotations

import threading

_active = threading.local()


class Node:
    """One recorded operation: ``vjp(output_cotangents) -> input cotangents``."""

    __slots__ = ("name", "vjp", "inputs", "outputs", "local", "communicates")

    def __init__(self, name, vjp, inputs, outputs, local, communicates):
        self.name = name
        self.vjp = vjp
        self.inputs = inputs
        self.outputs = outputs
        self.local = local
        self.communicates = communicates


class Tape:
    """An ordered record of the nodes run while it is active (see :func:`recording`)."""

    def __init__(self):
        self.nodes = []
        self.nslots = 0
        self.needs_allreduce = set()
        self.leaves = []

    def watch(self, tensor, leaf=False):
        """Give ``tensor`` a cotangent slot on this tape."""
        tensor._tape = self
        tensor._slot = self.nslots
        self.nslots += 1
        if leaf:
            self.leaves.append(tensor)
        return tensor

    def record(self, name, vjp, inputs, outputs, local=None, communicates=False):
        """Record a node. ``inputs`` holds Tensors or ``None`` for arguments that need no cotangent.

        ``local[i]`` is True when input ``i`` sits in a per-rank position; ``communicates`` makes
        the backward pass run the node on every rank even with no cotangent arriving.
        """
        inputs = [t if (t is not None and t._tape is self) else None for t in inputs]
        if local is None:
            local = [False] * len(inputs)
        for t, loc in zip(inputs, local):
            if loc and t is not None and not t.distributed:
                self.needs_allreduce.add(t._slot)
        for out in outputs:
            self.watch(out)
        self.nodes.append(Node(name, vjp, inputs, outputs, local, communicates))

    def backward(self, loss, seed):
        """Return the cotangents of :attr:`leaves` for ``loss`` seeded with ``seed``."""
        total = [None] * self.nslots
        local = [None] * self.nslots
        total[loss._slot] = seed
        for node in reversed(self.nodes):
            for out in node.outputs:
                if out._slot in self.needs_allreduce:
                    _finalize(out, total, local)
            gouts = [total[out._slot] for out in node.outputs]
            if not node.communicates and all(g is None for g in gouts):
                continue
            gouts = [_zeros_like(out) if g is None else g for g, out in zip(gouts, node.outputs)]
            gins = node.vjp(gouts)
            for inp, g, loc in zip(node.inputs, gins, node.local):
                if inp is None or g is None:
                    continue
                if g.shape != inp.shape:
                    raise RuntimeError(
                        f"internal error: vjp of {node.name!r} returned shape {g.shape} "
                        f"for an input of shape {inp.shape}")
                if g.dtype != inp.dtype:
                    g = g.astype(inp.dtype)
                buf = local if (loc and not inp.distributed) else total
                prev = buf[inp._slot]
                buf[inp._slot] = g if prev is None else prev + g
        _finalize_leaves(self.leaves, total, local)
        return [total[leaf._slot] if total[leaf._slot] is not None else _zeros_like(leaf)
                for leaf in self.leaves]


def _zeros_like(t):
    from .backend import get_array_module
    return get_array_module(t.data).zeros(t.shape, t.dtype)


def _finalize(t, total, local):
    """Add the allreduce of ``t``'s per-rank shares to its total (every rank calls this)."""
    share = local[t._slot]
    local[t._slot] = None
    summed = t.comm.allreduce_sum(_zeros_like(t) if share is None else share)
    prev = total[t._slot]
    total[t._slot] = summed if prev is None else prev + summed


def _finalize_leaves(leaves, total, local):
    """One fused allreduce, per communicator, of the per-rank shares of every serial leaf.

    Serial leaves are always included, whatever this rank recorded, so that rank-dependent
    control flow cannot make ranks disagree on whether the allreduce happens.
    """
    by_comm = {}
    for leaf in leaves:
        if not leaf.distributed and leaf.comm.size > 1:
            by_comm.setdefault(id(leaf.comm), []).append(leaf)
        elif local[leaf._slot] is not None:
            g = local[leaf._slot]
            total[leaf._slot] = g if total[leaf._slot] is None else total[leaf._slot] + g
    for group in by_comm.values():
        from .backend import get_array_module
        xp = get_array_module(group[0].data)
        dtype = xp.result_type(*[leaf.dtype for leaf in group])
        flat = xp.concatenate([
            (local[leaf._slot] if local[leaf._slot] is not None else _zeros_like(leaf))
            .astype(dtype, copy=False).ravel() for leaf in group])
        summed = group[0].comm.allreduce_sum(flat)
        offset = 0
        for leaf in group:
            part = summed[offset:offset + leaf.size].reshape(leaf.shape).astype(leaf.dtype,
                                                                             copy=False)
            offset += leaf.size
            prev = total[leaf._slot]
            total[leaf._slot] = part if prev is None else prev + part


def active_tape():
    """The tape recording on this thread, or ``None``."""
    stack = getattr(_active, "stack", None)
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
