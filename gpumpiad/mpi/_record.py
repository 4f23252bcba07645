"""Shared plumbing of the communication primitives."""
from __future__ import annotations

from ..comm import resolve
from ..tape import active_tape
from ..tensor import Tensor, tensor


def as_tensor(x, comm):
    """``x`` as a Tensor (arrays and scalars become serial Tensors on ``comm``)."""
    return x if isinstance(x, Tensor) else tensor(x, comm=comm)


def record(name, vjp, inputs, outputs, local=None, communicates=True):
    """Record a communication node whenever a tape is active, traced inputs or not.

    A collective's output must be traced on every rank alike, or ranks would disagree about the
    reverse communications; so unlike local ops, communication is recorded unconditionally.
    """
    tape = active_tape()
    if tape is not None:
        tape.record(name, vjp, inputs, outputs, local=local, communicates=communicates)


__all__ = ["as_tensor", "record", "resolve"]
