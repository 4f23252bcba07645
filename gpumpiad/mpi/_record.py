"""Shared plumbing of the communication primitives."""
from __future__ import annotations

import numpy as np

from .. import control
from ..arguments import as_int, is_int
from ..backend import get_array_module, is_device_array
from ..comm import resolve
from ..tape import active_tape
from ..tensor import Tensor, wrap

# User tags lie below REVERSE_TAG; reverse-mode point-to-point messages use tags above it.
REVERSE_TAG = 1 << 14


def as_tensor(x, comm):
    """``x`` as a Tensor (arrays and scalars become serial Tensors on ``comm``)."""
    return x if isinstance(x, Tensor) else wrap(x, comm=comm)


def passed_on(x, given):
    """The data of a result that passes input ``x`` on unchanged: ``x``'s own for a Tensor, a
    copy when the caller ``given`` an array, which it may write into after the call."""
    return x.data if isinstance(given, Tensor) else x.data.copy()


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
    """Validate a root/peer rank argument (an int or NumPy integer in ``[0, comm.size)``)."""
    return as_int(root, name, comm.rank, low=0, high=comm.size)


def check_rows(x, name, comm):
    """Row-block collectives need at least one axis."""
    if x.ndim == 0:
        raise ValueError(f"rank {comm.rank}: {name} needs an array with at least one axis "
                         f"(row blocks along axis 0), got a scalar")


def problem_of(*checks):
    """The message of the first ``ValueError``/``TypeError`` the ``checks`` (callables) raise,
    or None: a rank's own verdict on its arguments, to share before a collective."""
    try:
        for check in checks:
            check()
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def exchange_pieces(comm, name, mine, problem, root=None):
    """Every rank's ``mine`` (what a row-block collective tells the others about its piece),
    in one watched exchange that also carries each rank's ``problem`` with its own arguments
    (or None): a problem anywhere is a ValueError on every rank, saying which rank and why,
    instead of a rank failing alone while the others wait in the collective. ``root``: the
    root this rank names, which must be every rank's (ranks naming different roots would wait
    in the collective for ever)."""
    views = control.allgather(comm, (mine, problem, root), f"{name} (metadata)")
    problems = [p for _, p, _ in views if p is not None]
    if problems:
        if problem is not None and len(problems) == 1:
            raise ValueError(problem)
        raise ValueError(f"rank {comm.rank}: {name}'s arguments are wrong on "
                         f"{len(problems)} rank(s): " + "; ".join(problems))
    if any(r != root for _, _, r in views):
        named = ", ".join(f"rank {q}: {r}" for q, (_, _, r) in enumerate(views))
        raise ValueError(f"rank {comm.rank}: {name}'s root must be the same on every rank, "
                         f"got {named}")
    return [m for m, _, _ in views]


def split_rows(n, parts):
    """Row counts of an even split of ``n`` rows into ``parts`` blocks (first blocks larger)."""
    base, extra = divmod(n, parts)
    return [base + (1 if p < extra else 0) for p in range(parts)]


def row_counts(rows, n, comm, name):
    """``(rows, problem)``: rows per rank (default: an even split of ``n``) and a description
    of what is wrong with a user-given list, or ``None``."""
    if rows is None:
        return split_rows(n, comm.size), None
    try:
        given = list(rows)
    except TypeError:
        given = None
    if (given is None or len(given) != comm.size or not all(is_int(r) for r in given)
            or sum(given) != n or min(given, default=0) < 0):
        return rows, (f"{name} rows must be {comm.size} non-negative ints summing to {n} "
                      f"(axis 0 of x), got {rows!r}")
    return [int(r) for r in given], None


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
           "exchange_pieces", "is_device_array", "offsets", "passed_on", "pending_tensor", "piece",
           "problem_of", "record", "resolve", "row_counts", "split_rows", "zeros_like"]
