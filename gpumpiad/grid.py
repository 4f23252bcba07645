"""The patch decomposition of a global 1-, 2- or 3-D grid over a Cartesian communicator.

A :class:`Grid` splits ``NX``, ``NX x NY`` or ``NX x NY x NZ`` interior cells into one box-shaped
patch per rank, ``dims[a]`` patches along axis ``a`` (``x``/``i``, ``y``/``j``, ``z``/``k``).
Sizes need not divide: along each axis the first ``N % dims[a]`` patches get one extra cell.
Each rank stores its patch padded by one ghost cell on every side, ``(nx+2, ny+2, ...)``; a ghost
cell holds either a neighbour's boundary cell (filled by the halo exchange) or, on the physical
boundary, a Dirichlet value. Along a periodic axis there is no physical boundary: the patches on
its two edges are neighbours (with one patch along the axis, its own).

Sides are numbered ``2 * axis`` (towards smaller indices) and ``2 * axis + 1`` (towards larger
ones): in 2-D (north, south, west, east) = (-x, +x, -y, +y).

Coordinates: the domain is ``[0, 1]^d``, global cell ``(i, j, k)`` (1-based over the interior,
``1 <= i <= NX``) sits at ``(i * hx, j * hy, k * hz)`` with ``hx = 1/(NX+1)``, ... , so the ghost
cells of the physical boundary (``i = 0``, ``i = NX+1``, ...) lie on the boundary itself. Along a
periodic axis ``hx = 1/NX``: the cells cover the circle ``[0, 1)``, cell ``NX`` at ``1 = 0``.
"""
from __future__ import annotations

import math
import reprlib

import numpy as np
from mpi4py import MPI

from . import control
from .arguments import is_int
from .backend import asarray, to_numpy
from .comm import FreedOnExit, make_cart, resolve, world
from .debug import wait
from .tensor import Tensor

__all__ = ["Grid", "check_grid", "split_sizes"]

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3

_COUNT = {1: "one", 2: "two", 3: "three"}
_CELLS = {1: "(NX,)", 2: "(NX, NY)", 3: "(NX, NY, NZ)"}
_PATCHES = {1: "(N,)", 2: "(N, M)", 3: "(N, M, K)"}
_AXES = "xyz"


def split_sizes(n, parts):
    """Sizes of ``parts`` contiguous pieces of ``n`` cells, the first ``n % parts`` one larger.

    Examples
    --------
    >>> split_sizes(10, 3)
    [4, 3, 3]
    """
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


class Grid(FreedOnExit):
    """A global grid of 1, 2 or 3 axes split into one box-shaped patch per rank.

    Collective: every rank of ``comm`` must construct it with the same arguments.

    Parameters
    ----------
    shape : tuple of int
        Global number of interior cells per axis: ``(NX,)``, ``(NX, NY)`` or ``(NX, NY, NZ)``.
    comm : gpumpiad.Comm, optional
        The ranks to spread the grid over (default: the world).
    dims : tuple of int, optional
        Patches per axis, one entry per axis of ``shape``, whose product is ``comm.size``; zeros
        are filled in by ``MPI.Compute_dims`` (the default is all zeros).
    periodic : bool or tuple of bool, optional
        Periodic boundary conditions, for every axis or one per axis; default none (Dirichlet on
        every side).

    Attributes
    ----------
    shape, dims : tuple of int
        Cells and patches per axis.
    ndim : int
        The number of axes.
    periodic : tuple of bool
        Per axis.
    cart : gpumpiad.comm.CartComm
        The Cartesian communicator the halo exchange uses (same ranks, no reordering).
    coords : tuple of int
        This rank's patch index per axis; the rank is its row-major position in ``dims``.
    sizes : tuple of list of int
        Per axis, the cells of each patch along it.
    local_shape : tuple of int
        This rank's interior cells per axis.
    offset : tuple of int
        Global 0-based index of this patch's first interior cell.
    neighbours : tuple of int
        Ranks of the patches on the sides ``(-x, +x, -y, +y, -z, +z)`` (as many as ``2 * ndim``),
        ``MPI.PROC_NULL`` on the physical boundary. In 2-D these are (north, south, west, east):
        north is the smaller ``i``, west the smaller ``j``.
    h : tuple of float
        Cell spacing per axis, ``1/(N+1)``; ``1/N`` along a periodic axis.
    freed : bool
        Whether :meth:`free` released the communicator.

    Raises
    ------
    ValueError
        On every rank, when ``shape`` is not 1 to 3 positive ints, ``dims`` or ``periodic`` not
        one entry per axis, ``dims`` does not match the communicator or the grid has fewer cells
        than patches along an axis. Ints may be NumPy integers; floats and bools are refused,
        never truncated.

    Notes
    -----
    The patches tile the global grid exactly once; :meth:`scatter` and :meth:`gather` move a
    global field to the patches and back with one ``MPI_Scatterv`` / ``MPI_Gatherv`` of raw
    bytes, so any numeric dtype travels unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> import gpumpiad as gm
    >>> grid = gm.Grid((12, 10))
    >>> u = grid.local(np.arange(120.0).reshape(12, 10))   # this rank's patch
    >>> bool((grid.gather(u, root=None) == np.arange(120.0).reshape(12, 10)).all())
    True
    >>> cube = gm.Grid((6, 5, 4), periodic=(False, False, True))
    >>> field = np.arange(120.0).reshape(6, 5, 4)
    >>> bool((cube.gather(cube.scatter(field), root=None) == field).all())
    True
    >>> len(cube.neighbours), cube.padded_shape == tuple(n + 2 for n in cube.local_shape)
    (6, True)
    """

    def __init__(self, shape, comm=None, dims=None, periodic=False):
        comm = resolve(comm)
        self.comm = comm
        rank = world().rank
        self.shape = _check_shape(shape, rank)
        self.ndim = len(self.shape)
        self.dims = _check_dims(dims, self.shape, comm.size, rank)
        self.periodic = _check_periodic(periodic, self.ndim, rank)
        for axis, (cells, parts) in enumerate(zip(self.shape, self.dims)):
            if cells < parts:
                raise ValueError(
                    f"rank {rank}: a grid of {_by(self.shape)} cells cannot be split into "
                    f"{_by(self.dims)} patches: axis {axis} has {cells} cell(s) for {parts} "
                    f"patches (each patch needs at least one cell per axis)")
        self.cart = make_cart(comm, self.dims, self.periodic, f"grid shape {self.shape}")
        self.coords = self.cart.coords
        self.sizes = tuple(split_sizes(n, parts) for n, parts in zip(self.shape, self.dims))
        self.local_shape = self.patch_shape(self.coords)
        self.offset = self.patch_offset(self.coords)
        self.neighbours = tuple(side for axis in range(self.ndim)
                                for side in self.cart.shift(axis, 1))
        # Idle halo exchanges (buffers, events) that blocking exchanges over this grid reuse,
        # in lists by what they were made for (gpumpiad.halo); free() frees them.
        self._exchanges = {}
        self.h = tuple(1.0 / (n if wraps else n + 1)
                       for n, wraps in zip(self.shape, self.periodic))

    def free(self):
        """Release the grid's Cartesian communicator (collective); see :meth:`Comm.free`.
        ``with Grid(...) as grid:`` frees it at the end of the block. A freed grid still
        answers questions about its shape (:attr:`local_shape`, :meth:`local`, ...); what
        communicates over it (:meth:`gather`, :meth:`scatter`, :func:`gpumpiad.heat.solve`,
        :func:`gpumpiad.halo_exchange`, ...) raises ``ValueError`` saying it was freed."""
        for idle in list(self._exchanges.values()):
            for exchange in idle:
                exchange.free()
        self._exchanges.clear()
        self.cart.free()

    @property
    def freed(self):
        """Whether :meth:`free` released the grid's communicator."""
        return self.cart.mpi == MPI.COMM_NULL

    def __repr__(self):
        return (f"Grid(shape={self.shape}, dims={self.dims}, periodic={self.periodic}, "
                f"rank={self.cart.rank}, coords={self.coords}, local_shape={self.local_shape})")

    @property
    def rank(self):
        return self.cart.rank

    @property
    def padded_shape(self):
        """This rank's patch with its ghost cells: ``(nx + 2, ny + 2, ...)``."""
        return tuple(n + 2 for n in self.local_shape)

    @property
    def physical(self):
        """Per side, in the order of :attr:`neighbours`: whether it is the physical boundary."""
        return tuple(n == MPI.PROC_NULL for n in self.neighbours)

    def patch_shape(self, coords):
        """Interior cells per axis of the patch at ``coords``."""
        return tuple(sizes[c] for sizes, c in zip(self.sizes, coords))

    def patch_offset(self, coords):
        """Global 0-based index of the first interior cell of the patch at ``coords``."""
        return tuple(sum(sizes[:c]) for sizes, c in zip(self.sizes, coords))

    def slices(self, coords=None):
        """Slices of the global field covered by a patch (default: this rank's)."""
        coords = self.coords if coords is None else coords
        return tuple(slice(start, start + n) for start, n in
                     zip(self.patch_offset(coords), self.patch_shape(coords)))

    def coordinates(self, ghosts=False):
        """Cell coordinates of this patch, one 1-D NumPy array per axis (``(x, y)`` in 2-D).

        Parameters
        ----------
        ghosts : bool
            Include the ghost cells (``n + 2`` entries per axis).
        """
        g = 1 if ghosts else 0
        return tuple(np.arange(start + 1 - g, start + n + 1 + g) * h
                     for start, n, h in zip(self.offset, self.local_shape, self.h))

    def local(self, field):
        """This rank's patch of a global field of :attr:`shape` that every rank holds (no
        communication); a contiguous copy of the same array kind."""
        _check_global(field, self.shape, self.rank)
        return field[self.slices()].copy()

    def scatter(self, field, root=0):
        """Send each rank its patch of the root's global field of :attr:`shape`.

        Collective. ``field`` is read on ``root`` only (pass ``None`` elsewhere). Returns this
        rank's patch as an array of the process's backend. A field of the wrong shape raises
        ``ValueError`` on every rank.
        """
        check_grid(self, "Grid.scatter", None)
        root = self._root(root, "Grid.scatter")
        problem = dtype = None
        if self.cart.rank == root:
            field = to_numpy(field)
            problem = _global_problem(field, self.shape, self.rank)
            dtype = field.dtype.str
        problem, dtype = control.bcast(self.cart, (problem, dtype), root, "Grid.scatter")
        if problem is not None:
            raise ValueError(problem if self.cart.rank == root else
                             f"rank {self.rank}: Grid.scatter from rank {root}: {problem}")
        dtype = np.dtype(dtype)
        send = None
        if self.cart.rank == root:
            flat = np.empty(math.prod(self.shape), dtype)
            for where, piece in self._pieces(flat):
                piece[...] = field[where]
            send = [flat.view(np.uint8), self._byte_layout(dtype), MPI.BYTE]
        patch = np.empty(self.local_shape, dtype)
        with self.cart.exclusive("Grid.scatter") as mpi:
            wait(mpi.Iscatterv(send, patch.view(np.uint8).reshape(-1), root=root), self.cart,
                 "Grid.scatter")
        return asarray(patch)

    def gather(self, patch, root=0):
        """Assemble every rank's patch of :attr:`local_shape` into the global NumPy field.

        Collective. Returns the field on ``root`` and ``None`` elsewhere, or on every rank when
        ``root`` is ``None``. A patch of the wrong shape, or patches of different dtypes, raise
        ``ValueError`` on every rank.
        """
        check_grid(self, "Grid.gather", None)
        root = None if root is None else self._root(root, "Grid.gather")
        patch = to_numpy(patch.data if isinstance(patch, Tensor) else patch)
        problem = _number_problem(patch, "the patch", self.rank)
        if patch.shape != self.local_shape:
            problem = (f"rank {self.rank}'s patch has shape {patch.shape}, expected "
                       f"{self.local_shape}")
        reports = control.allgather(self.cart, (problem, patch.dtype.str), "Grid.gather")
        problems = [p for p, _ in reports if p is not None]
        if problems:
            raise ValueError(f"rank {self.rank}: Grid.gather: " + "; ".join(problems))
        if any(d != reports[0][1] for _, d in reports):
            raise ValueError(f"rank {self.rank}: Grid.gather: the patches' dtypes differ ("
                             + ", ".join(f"rank {r}: {np.dtype(d)}"
                                         for r, (_, d) in enumerate(reports)) + ")")
        mine = root is None or self.cart.rank == root
        flat = np.empty(math.prod(self.shape), patch.dtype) if mine else None
        send = np.ascontiguousarray(patch).view(np.uint8).reshape(-1)
        recv = [flat.view(np.uint8), self._byte_layout(patch.dtype), MPI.BYTE] if mine else None
        with self.cart.exclusive("Grid.gather") as mpi:
            request = (mpi.Iallgatherv(send, recv) if root is None
                       else mpi.Igatherv(send, recv, root=root))
            wait(request, self.cart, "Grid.gather")
        if not mine:
            return None
        out = np.empty(self.shape, patch.dtype)
        for where, piece in self._pieces(flat):
            out[where] = piece
        return out

    def _root(self, root, call):
        """``root`` as an int, or ``ValueError`` unless it is a rank of the grid (an int or
        NumPy integer, not a bool)."""
        if not is_int(root) or not 0 <= root < self.cart.size:
            raise ValueError(f"rank {self.rank}: {call}'s root must be a rank of the grid, an "
                             f"int in [0, {self.cart.size}), got {root!r}")
        return int(root)

    def _pieces(self, flat):
        """``(slices of the global field, view of flat)`` for every rank's patch, in rank
        order: ``flat`` holds the patches one after another."""
        start = 0
        for r in range(self.cart.size):
            coords = self.cart.mpi.Get_coords(r)
            shape = self.patch_shape(coords)
            count = math.prod(shape)
            yield self.slices(coords), flat[start:start + count].reshape(shape)
            start += count

    def _byte_layout(self, dtype):
        """Byte counts and displacements of the ranks' patches in a flat buffer."""
        counts = [math.prod(self.patch_shape(self.cart.mpi.Get_coords(r))) * dtype.itemsize
                  for r in range(self.cart.size)]
        return counts, [sum(counts[:r]) for r in range(len(counts))]


def check_grid(grid, call, argument="grid", ndim=None):
    """Raise unless ``grid`` is a :class:`Grid` that has not been freed (and, when ``ndim`` is
    given, has that many axes); ``call`` and ``argument`` (None: the grid is ``call``'s own)
    name the caller and its parameter."""
    if not isinstance(grid, Grid):
        raise TypeError(f"rank {world().rank}: {call}'s {argument} must be a gpumpiad.heat.Grid "
                        f"(made by Grid(shape, comm=None, dims=None)), got "
                        f"{type(grid).__name__} {reprlib.repr(grid)}")
    subject = f"{call}'s {argument}" if argument else f"{call}: the grid"
    if grid.freed:
        raise ValueError(f"rank {world().rank}: {subject} was freed (Grid.free() or the end of "
                         f"its with block), so it has no communicator left: expected a grid in "
                         f"use; make a new Grid({grid.shape}, dims={grid.dims})")
    if ndim is not None and grid.ndim != ndim:
        raise ValueError(f"rank {world().rank}: {subject} must have {ndim} axes, got a "
                         f"{grid.ndim}-D grid of shape {grid.shape}")
    return grid


def _by(values):
    return "x".join(str(v) for v in values)


def _ints(value, count=None):
    """``value`` as a tuple of ints (of ``count`` entries if given), or None."""
    try:
        values = tuple(value)
    except TypeError:
        return None
    if count is not None and len(values) != count:
        return None
    return values if all(is_int(v) for v in values) else None


def _check_shape(shape, rank):
    try:
        d = len(shape)
    except TypeError:
        d = 0
    if d not in _CELLS:
        raise ValueError(f"rank {rank}: grid shape must be 1, 2 or 3 ints (NX,), (NX, NY) or "
                         f"(NX, NY, NZ), got {shape!r}")
    values = _ints(shape, d)
    if values is None:
        what = {1: "one int", 2: "a pair of ints", 3: "three ints"}[d]
        raise ValueError(f"rank {rank}: grid shape must be {what} {_CELLS[d]}, got {shape!r}")
    values = tuple(int(s) for s in values)
    if min(values) < 1:
        plural = "s" if d > 1 else ""
        raise ValueError(f"rank {rank}: grid shape must be {_COUNT[d]} positive int{plural} "
                         f"{_CELLS[d]}, got {values}")
    return values


def _check_dims(dims, shape, size, rank):
    d = len(shape)
    values = (0,) * d if dims is None else _ints(dims, d)
    if values is None or min(values) < 0:
        plural = "s" if d > 1 else ""
        try:
            given = len(dims)
        except TypeError:
            given = None
        why = (f" ({given} entries for the {d}-D grid shape {shape})"
               if given is not None and given != d else "")
        raise ValueError(f"rank {rank}: dims must be {_COUNT[d]} non-negative int{plural} "
                         f"{_PATCHES[d]}, got {dims!r}{why}")
    values = [int(v) for v in values]
    fixed = math.prod(v for v in values if v > 0)
    if size % fixed or (0 not in values and fixed != size):
        raise ValueError(f"rank {rank}: dims {_by(values)} do not fit a communicator of "
                         f"{size} rank(s)")
    return tuple(MPI.Compute_dims(size, values))


def _check_periodic(periodic, d, rank):
    values = (periodic,) * d if isinstance(periodic, (bool, np.bool_)) else periodic
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if len(values) != d or not all(isinstance(p, (bool, np.bool_)) for p in values):
        what = {1: "one bool", 2: "a pair of bools", 3: "three bools"}[d]
        along = ", ".join(f"along {a}" for a in _AXES[:d])
        raise ValueError(f"rank {rank}: periodic must be a bool or {what} ({along}), "
                         f"got {periodic!r}")
    return tuple(bool(p) for p in values)


def _global_problem(field, shape, rank):
    if tuple(getattr(field, "shape", ())) != shape:
        return (f"rank {rank}: expected a global field of shape {shape}, got "
                f"{tuple(getattr(field, 'shape', ()))}")
    return _number_problem(field, "the field", rank)


def _number_problem(a, what, rank):
    """A complaint about an array that cannot travel as raw bytes (objects, records), or None."""
    if a.dtype.kind not in "biufc":
        return f"rank {rank}: {what} must hold numbers (bool, int, float, complex), got {a.dtype}"
    return None


def _check_global(field, shape, rank):
    problem = _global_problem(field, shape, rank)
    if problem is not None:
        raise ValueError(problem)
