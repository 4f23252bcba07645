"""Solver checkpoints: a decomposed field saved to one atomic, verified file and read back on
any decomposition."""
from __future__ import annotations

import numpy as np

from .. import checkpoint
from ..backend import asarray
from ..tensor import Tensor
from .grid import check_grid

KIND = "gpumpiad.heat.state"


def save_state(path, u, grid, step=0, metadata=None):
    """Save the field ``u`` (this rank's patch) at time step ``step`` to ``path``.

    Collective over ``grid``: the patches are gathered to rank 0, which writes one file
    atomically (temporary file, fsync, rename) with a format version and a SHA-256 checksum
    (:mod:`gpumpiad.checkpoint`). Every rank raises alike if the write fails.

    Parameters
    ----------
    path : str or os.PathLike
    u : Tensor or array, shape ``grid.local_shape``
    grid : Grid
        Of 1, 2 or 3 axes.
    step : int
        The time step ``u`` belongs to, returned by :func:`load_state` (a Python or NumPy
        integer).
    metadata : dict, optional
        JSON-able values stored alongside (e.g. dt, h).

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from gpumpiad.heat import Grid, save_state, load_state
    >>> grid = Grid((6, 5))
    >>> path = os.path.join(tempfile.mkdtemp(), "u.ckpt")
    >>> save_state(path, np.ones(grid.local_shape), grid, step=7)
    >>> u, step, meta = load_state(path, grid)
    >>> step, u.shape == grid.local_shape
    (7, True)
    """
    check_grid(grid, "save_state")
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"rank {_rank()}: save_state's step must be an int, got {step!r} "
                         f"({type(step).__name__})")
    data = u.data if isinstance(u, Tensor) else u
    field = grid.gather(data, root=0)
    payload = {"kind": KIND, "shape": list(grid.shape), "step": int(step),
               "metadata": dict(metadata or {}), "field": field}
    checkpoint.save(path, payload, comm=grid.cart, root=0)


def load_state(path, grid):
    """Read a state written by :func:`save_state`; return ``(patch, step, metadata)``.

    Collective over ``grid``, which may split the domain differently from the writer's: rank
    0 reads and checks the file (a truncated, corrupt, foreign or mismatched file raises
    :class:`gpumpiad.checkpoint.CheckpointError` on every rank, nothing loaded half-way) and
    scatters the patches.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from gpumpiad.heat import Grid, save_state, load_state
    >>> field = np.arange(30.0).reshape(6, 5)
    >>> grid = Grid((6, 5))
    >>> path = os.path.join(tempfile.mkdtemp(), "u.ckpt")
    >>> save_state(path, grid.local(field), grid, step=3)
    >>> u, step, meta = load_state(path, grid)
    >>> step, bool((grid.gather(u, root=None) == field).all())
    (3, True)
    """
    check_grid(grid, "load_state")
    payload = checkpoint.load(path, comm=grid.cart, root=0)
    if payload.get("kind") != KIND:
        raise checkpoint.CheckpointError(
            f"rank {grid.rank}: {path}: not a solver state (kind {payload.get('kind')!r})")
    if tuple(payload["shape"]) != tuple(grid.shape):
        raise checkpoint.CheckpointError(
            f"rank {grid.rank}: {path}: holds a {tuple(payload['shape'])} field, the grid is "
            f"{tuple(grid.shape)}")
    field = payload["field"] if grid.rank == 0 else None
    patch = grid.scatter(np.asarray(field) if field is not None else None, root=0)
    return asarray(patch), int(payload["step"]), payload["metadata"]


def _rank():
    from ..comm import world
    return world().rank
