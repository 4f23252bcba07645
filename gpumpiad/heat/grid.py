"""The patch decomposition of a global 2-D grid over a Cartesian communicator.

A :class:`Grid` splits ``NX x NY`` interior cells into ``N x M`` rectangular patches, one per rank
(``N`` along the first axis ``x``/``i``, ``M`` along the second axis ``y``/``j``). Sizes need not
divide: the first ``NX % N`` patch rows get one extra cell (likewise for columns). Each rank
stores its patch padded by one ghost cell on every side, ``(nx+2, ny+2)``; a ghost cell holds
either a neighbour's boundary cell (filled by :func:`gpumpiad.halo.exchange`) or, on the
physical boundary, a Dirichlet value. Along a periodic axis there is no physical boundary: the
patches on its two edges are neighbours (with one patch along the axis, its own).

Coordinates: the domain is ``[0, 1]^2``, global cell ``(i, j)`` (1-based over the interior,
``1 <= i <= NX``) sits at ``(i * hx, j * hy)`` with ``hx = 1/(NX+1)``, ``hy = 1/(NY+1)``, so the
ghost cells of the physical boundary (``i = 0``, ``i = NX+1``, ...) lie on the boundary itself.
Along a periodic axis ``hx = 1/NX``: the cells cover the circle ``[0, 1)``, cell ``NX`` at
``1 = 0``.
"""
from __future__ import annotations

import reprlib

import numpy as np
from mpi4py import MPI

from .. import control
from ..arguments import is_int
from ..backend import asarray, to_numpy
from ..comm import FreedOnExit, make_cart, resolve, world
from ..debug import wait
from ..tensor import Tensor

__all__ = ["Grid", "split_sizes"]

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3


def split_sizes(n, parts):
    """Sizes of ``parts`` contiguous pieces of ``n`` cells, the first ``n % parts`` one larger.

    Examples
    --------
    >>> split_sizes(10, 3)
    [4, 3, 3]
    """
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


class Grid(FreedOnExit):
    """A global ``NX x NY`` grid split into one rectangular patch per rank.

    Collective: every rank of ``comm`` must construct it with the same arguments.

    Parameters
    ----------
    shape : tuple of int
        Global number of interior cells ``(NX, NY)``.
    comm : gpumpiad.Comm, optional
        The ranks to spread the grid over (default: the world).
    dims : tuple of int, optional
        Patches per axis ``(N, M)`` with ``N * M == comm.size``; zeros are filled in by
        ``MPI.Compute_dims`` (the default is ``(0, 0)``).
    periodic : bool or pair of bool, optional
        Periodic boundary conditions, for both axes or per axis ``(along x, along y)``; default
        none (Dirichlet on all four sides).

    Attributes
    ----------
    shape, dims : tuple of int
        ``(NX, NY)`` and ``(N, M)``.
    periodic : tuple of bool
        Per axis.
    cart : gpumpiad.comm.CartComm
        The Cartesian communicator the halo exchange uses (same ranks, no reordering).
    coords : tuple of int
        This rank's patch ``(I, J)``; rank ``= I * M + J``.
    local_shape : tuple of int
        ``(nx, ny)``, this rank's interior cells.
    offset : tuple of int
        Global 0-based index of this patch's first interior cell.
    neighbours : tuple of int
        Ranks of the (north, south, west, east) patches, ``MPI.PROC_NULL`` on the physical
        boundary. North is the smaller ``i``, west the smaller ``j``.
    h : tuple of float
        Cell spacing ``(1/(NX+1), 1/(NY+1))``; ``1/NX`` along a periodic axis.
    freed : bool
        Whether :meth:`free` released the communicator.

    Raises
    ------
    ValueError
        On every rank, when ``dims`` does not match the communicator or the grid has fewer cells
        than patches along an axis; when ``shape`` or ``dims`` holds anything but ints (NumPy
        integers included; floats and bools are refused, never truncated).

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat import Grid
    >>> grid = Grid((12, 10))
    >>> u = grid.local(np.arange(120.0).reshape(12, 10))   # this rank's patch
    >>> bool((grid.gather(u, root=None) == np.arange(120.0).reshape(12, 10)).all())
    True
    """

    def __init__(self, shape, comm=None, dims=None, periodic=False):
        comm = resolve(comm)
        self.comm = comm
        rank = world().rank
        self.shape = _check_shape(shape, rank)
        self.dims = _check_dims(dims, comm.size, rank)
        self.periodic = _check_periodic(periodic, rank)
        for axis, (cells, parts) in enumerate(zip(self.shape, self.dims)):
            if cells < parts:
                raise ValueError(
                    f"rank {rank}: a grid of {self.shape[0]}x{self.shape[1]} cells cannot be "
                    f"split into {self.dims[0]}x{self.dims[1]} patches: axis {axis} has {cells} "
                    f"cell(s) for {parts} patches (each patch needs at least one cell per axis)")
        self.cart = make_cart(comm, self.dims, self.periodic, f"grid shape {self.shape}")
        self.coords = self.cart.coords
        self.row_sizes = split_sizes(self.shape[0], self.dims[0])
        self.col_sizes = split_sizes(self.shape[1], self.dims[1])
        self.local_shape = self.patch_shape(self.coords)
        self.offset = self.patch_offset(self.coords)
        north, south = self.cart.shift(0, 1)
        west, east = self.cart.shift(1, 1)
        self.neighbours = (north, south, west, east)
        self.h = tuple(1.0 / (n if wraps else n + 1)
                       for n, wraps in zip(self.shape, self.periodic))

    def free(self):
        """Release the grid's Cartesian communicator (collective); see :meth:`Comm.free`.
        ``with Grid(...) as grid:`` frees it at the end of the block. A freed grid still
        answers questions about its shape (:attr:`local_shape`, :meth:`local`, ...); what
        communicates over it (:meth:`gather`, :meth:`scatter`, :func:`gpumpiad.heat.solve`,
        :func:`gpumpiad.halo_exchange`, ...) raises ``ValueError`` saying it was freed."""
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
        """``(nx + 2, ny + 2)``."""
        return (self.local_shape[0] + 2, self.local_shape[1] + 2)

    @property
    def physical(self):
        """Per side (north, south, west, east): whether it is the physical boundary."""
        return tuple(n == MPI.PROC_NULL for n in self.neighbours)

    def patch_shape(self, coords):
        """``(nx, ny)`` of the patch at ``coords``."""
        return (self.row_sizes[coords[0]], self.col_sizes[coords[1]])

    def patch_offset(self, coords):
        """Global 0-based index of the first interior cell of the patch at ``coords``."""
        return (sum(self.row_sizes[:coords[0]]), sum(self.col_sizes[:coords[1]]))

    def slices(self, coords=None):
        """Slices of the global ``(NX, NY)`` array covered by a patch (default: this rank's)."""
        coords = self.coords if coords is None else coords
        (i0, j0), (nx, ny) = self.patch_offset(coords), self.patch_shape(coords)
        return (slice(i0, i0 + nx), slice(j0, j0 + ny))

    def coordinates(self, ghosts=False):
        """Cell coordinates ``(x, y)`` of this patch as 1-D NumPy arrays.

        Parameters
        ----------
        ghosts : bool
            Include the ghost ring (``nx + 2`` and ``ny + 2`` entries).
        """
        g = 1 if ghosts else 0
        (i0, j0), (nx, ny) = self.offset, self.local_shape
        x = (np.arange(i0 + 1 - g, i0 + nx + 1 + g)) * self.h[0]
        y = (np.arange(j0 + 1 - g, j0 + ny + 1 + g)) * self.h[1]
        return x, y

    def local(self, field):
        """This rank's patch of a global ``(NX, NY)`` field that every rank holds (no
        communication); a contiguous copy of the same array kind."""
        _check_global(field, self.shape, self.rank)
        return field[self.slices()].copy()

    def scatter(self, field, root=0):
        """Send each rank its patch of the root's global ``(NX, NY)`` field.

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
            flat = np.empty(self.shape[0] * self.shape[1], dtype)
            for where, piece in self._pieces(flat):
                piece[...] = field[where]
            send = [flat.view(np.uint8), self._byte_layout(dtype), MPI.BYTE]
        patch = np.empty(self.local_shape, dtype)
        with self.cart.exclusive("Grid.scatter") as mpi:
            wait(mpi.Iscatterv(send, patch.view(np.uint8).reshape(-1), root=root), self.cart,
                 "Grid.scatter")
        return asarray(patch)

    def gather(self, patch, root=0):
        """Assemble every rank's ``(nx, ny)`` patch into the global ``(NX, NY)`` NumPy field.

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
        flat = np.empty(self.shape[0] * self.shape[1], patch.dtype) if mine else None
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
            nx, ny = self.patch_shape(coords)
            yield self.slices(coords), flat[start:start + nx * ny].reshape(nx, ny)
            start += nx * ny

    def _byte_layout(self, dtype):
        """Byte counts and displacements of the ranks' patches in a flat buffer."""
        counts = [nx * ny * dtype.itemsize for nx, ny in
                  (self.patch_shape(self.cart.mpi.Get_coords(r)) for r in range(self.cart.size))]
        return counts, [sum(counts[:r]) for r in range(len(counts))]


def check_grid(grid, call, argument="grid"):
    """Raise unless ``grid`` is a :class:`Grid` that has not been freed; ``call`` and
    ``argument`` (None: the grid is ``call``'s own) name the caller and its parameter."""
    if not isinstance(grid, Grid):
        raise TypeError(f"rank {world().rank}: {call}'s {argument} must be a gpumpiad.heat.Grid "
                        f"(made by Grid(shape, comm=None, dims=None)), got "
                        f"{type(grid).__name__} {reprlib.repr(grid)}")
    if grid.freed:
        subject = f"{call}'s {argument}" if argument else f"{call}: the grid"
        raise ValueError(f"rank {world().rank}: {subject} was freed (Grid.free() or the end of "
                         f"its with block), so it has no communicator left: expected a grid in "
                         f"use; make a new Grid({grid.shape}, dims={grid.dims})")
    return grid



def _pair(value):
    try:
        pair = tuple(value)
    except TypeError:
        return None
    return pair if len(pair) == 2 and all(is_int(v) for v in pair) else None


def _check_shape(shape, rank):
    pair = _pair(shape)
    if pair is None:
        raise ValueError(f"rank {rank}: grid shape must be a pair of ints (NX, NY), "
                         f"got {shape!r}")
    shape = tuple(int(s) for s in pair)
    if min(shape) < 1:
        raise ValueError(f"rank {rank}: grid shape must be two positive ints (NX, NY), "
                         f"got {shape}")
    return shape


def _check_dims(dims, size, rank):
    pair = (0, 0) if dims is None else _pair(dims)
    if pair is None or min(pair) < 0:
        raise ValueError(f"rank {rank}: dims must be two non-negative ints (N, M), "
                         f"got {dims!r}")
    dims = [int(d) for d in pair]
    fixed = int(np.prod([d for d in dims if d > 0]))
    if size % fixed or (0 not in dims and fixed != size):
        raise ValueError(f"rank {rank}: dims {dims[0]}x{dims[1]} do not fit a communicator of "
                         f"{size} rank(s)")
    return tuple(MPI.Compute_dims(size, dims))


def _check_periodic(periodic, rank):
    pair = (periodic, periodic) if isinstance(periodic, (bool, np.bool_)) else periodic
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(p, (bool, np.bool_)) for p in pair):
        raise ValueError(f"rank {rank}: periodic must be a bool or a pair of bools "
                         f"(along x, along y), got {periodic!r}")
    return tuple(bool(p) for p in pair)


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
