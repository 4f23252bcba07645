"""Shared plumbing of the communication primitives."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, is_device_array
from ..comm import resolve
from ..tape import active_tape
from ..tensor import Tensor, tensor

# User tags lie below REVERSE_TAG; reverse-mode point-to-point messages use tags above it.
REVERSE_TAG = 1 << 14


def as_tensor(x, comm):
    """``x`` as a Tensor (arrays and scalars become serial Tensors on ``comm``)."""
    return x if isinstance(x, Tensor) else tensor(x, comm=comm)


def pending_tensor(pending, layout, comm):
    """A Tensor whose data arrives when ``pending`` completes (waited for on first read)."""
    return Tensor(None, layout, comm, pending=pending)


def record(name, vjp, inputs, outputs, local=None, communicates=True, eager=False,
           takes_none=False):
    """Record a communication node whenever a tape is active, traced inputs or not.

    A collective's output must be traced on every rank alike, or ranks would disagree about the
    reverse communications; so unlike local ops, communication is recorded unconditionally.
    """
    tape = active_tape()
    if tape is not None:
        tape.record(name, vjp, inputs, outputs, local=local, communicates=communicates,
                    collective=True, eager=eager, takes_none=takes_none)


def check_root(root, comm, name):
    """Validate a root/peer rank argument."""
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < comm.size:
        raise ValueError(f"rank {comm.rank}: {name} must be an int in [0, {comm.size}), "
                         f"got {root!r}")
    return int(root)


def check_rows(x, name, comm):
    """Row-block collectives need at least one axis."""
    if x.ndim == 0:
        raise ValueError(f"rank {comm.rank}: {name} needs an array with at least one axis "
                         f"(row blocks along axis 0), got a scalar")


def split_rows(n, parts):
    """Row counts of an even split of ``n`` rows into ``parts`` blocks (first blocks larger)."""
    base, extra = divmod(n, parts)
    return [base + (1 if p < extra else 0) for p in range(parts)]


def row_counts(rows, n, comm, name):
    """``(rows, problem)``: rows per rank (default: an even split of ``n``) and a description
    of what is wrong with a user-given list, or ``None``."""
    rows = split_rows(n, comm.size) if rows is None else list(rows)
    if len(rows) != comm.size or sum(rows) != n or min(rows, default=0) < 0:
        return rows, (f"{name} rows must be {comm.size} non-negative counts summing to {n}, "
                      f"got {rows}")
    return rows, None


def piece(data):
    """What a row-block collective tells the other ranks about this rank's piece: its rows,
    trailing shape and dtype."""
    return data.shape[0], tuple(data.shape[1:]), data.dtype.str


def agreed_rows(pieces, comm, name):
    """The row counts of ``pieces`` (:func:`piece` of every rank, in rank order), once their
    trailing shapes and dtypes agree; otherwise a ValueError naming each rank's, raised on
    every rank that holds them (MPI would move mismatched bytes without a word)."""
    if any(p[1:] != pieces[0][1:] for p in pieces):
        described = ", ".join(f"rank {q}: {trailing} {np.dtype(dtype).name}"
                              for q, (_, trailing, dtype) in enumerate(pieces))
        raise ValueError(f"rank {comm.rank}: {name}'s pieces must have the same trailing shape "
                         f"and dtype on every rank, got {described}")
    return [p[0] for p in pieces]


def offsets(rows):
    out = [0]
    for r in rows:
        out.append(out[-1] + r)
    return out


def zeros_like(array):
    """Zeros shaped like ``array``: ``zeros`` rather than ``zeros_like``, because NumPy then
    takes zeroed pages from the system instead of writing every element."""
    return get_array_module(array).zeros(array.shape, array.dtype)


__all__ = ["REVERSE_TAG", "agreed_rows", "as_tensor", "check_root", "check_rows",
           "is_device_array", "offsets", "pending_tensor", "piece", "record", "resolve",
           "row_counts", "split_rows", "zeros_like"]
