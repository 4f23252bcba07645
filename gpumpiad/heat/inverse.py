"""The inverse heat problem: recover a diffusivity field κ from observed temperatures, in 2-D
(κ(x, y)) or 3-D (κ(x, y, z)).

A smooth true κ drives the forward solver from a known initial state and source; the states at
``snapshots`` evenly spaced times (optionally with noise) are the observations. κ is then
recovered from a constant guess by the distributed optimiser, minimising

    J(κ) = ½ Σ_k ‖u_k(κ) − d_k‖² / ‖d‖²  +  α Σ_edges (κ_a − κ_b)²

over every rank's patch of κ, with the optional smoothness term summed over all cell edges
along every axis (across patch boundaries through a differentiable halo exchange).

The cells are squares (cubes) of width ``h = 1 / (N + 1)``, ``N`` the largest grid size, so a
grid of equal sizes covers the unit square (cube) and one of unequal sizes the box
``[0, (NX+1) h] × [0, (NY+1) h] (× [0, (NZ+1) h])``. The true κ, the initial state and the
source are given on the unit square (cube) and stretched over the box: they are evaluated at
the grid's coordinates, cell ``i`` of ``NX`` at ``i / (NX + 1)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from mpi4py import MPI

import gpumpiad as gm

from .. import control
from ..comm import world
from ..halo import halo_exchange
from ..optimize import minimize
from ..primitive import primitive
from .grid import Grid
from .solver import solve


@dataclass
class Settings:
    """What the job solves; every field has a default that runs in seconds on a laptop CPU.

    ``n`` is the grid: an int for a square (or, with three ``dims``, a cube) of that many cells
    per side, or 2 or 3 sizes ``(NX, NY)`` / ``(NX, NY, NZ)``; the number of axes is that of the
    grid. ``dims`` gives the patches per axis, one entry per axis (default: MPI's choice for
    that many axes). ``time`` is the simulated physical time, the same for every ``n``.
    ``steps=None`` takes the fewest steps, a multiple of ``snapshots``, that keep the explicit
    scheme stable at the largest κ the optimiser may try (``kappa_bounds[1]``), with a 5 %
    margin.

    Examples
    --------
    >>> from gpumpiad.heat.inverse import Settings
    >>> Settings().grid_shape(), Settings(n=16, dims=(2, 2, 1)).grid_shape()
    ((32, 32), (16, 16, 16))
    >>> Settings(n=(32, 32, 16)).grid_shape()
    (32, 32, 16)
    """

    n: int | tuple = 32
    time: float = 0.02
    steps: int | None = None
    snapshots: int = 4
    dims: tuple | None = None
    dtype: str = "float64"
    noise: float = 0.0
    regularization: float = 1e-6
    maxiter: int = 30
    kappa_guess: float = 1.0
    kappa_bounds: tuple = (0.2, 2.5)
    checkpoints: int | None = None
    seed: int = 0

    def grid_shape(self, rank=None):
        """The global grid ``(NX, NY)`` or ``(NX, NY, NZ)`` that ``n`` and ``dims`` describe.

        Raises ``ValueError`` (naming ``rank``, default this process's world rank) when ``n`` is
        not a positive int or 2 or 3 of them, or ``dims`` has another number of entries than
        the grid has axes.
        """
        rank = world().rank if rank is None else rank
        n, dims = self.n, self.dims
        if dims is not None:
            try:
                given = len(dims)
            except TypeError:
                raise ValueError(f"rank {rank}: dims must be None or 2 or 3 ints (patches per "
                                 f"axis), got {dims!r}") from None
        if _is_size(n):
            if dims is not None and given not in (2, 3):
                raise ValueError(f"rank {rank}: dims must have 2 or 3 entries (patches per "
                                 f"axis), got {dims!r}")
            return (int(n),) * (2 if dims is None else given)
        if not (isinstance(n, (tuple, list)) and len(n) in (2, 3)
                and all(_is_size(v) for v in n)):
            raise ValueError(f"rank {rank}: n must be a positive int or 2 or 3 positive ints "
                             f"(NX, NY) or (NX, NY, NZ), got {n!r}")
        shape = tuple(int(v) for v in n)
        if dims is not None and given != len(shape):
            raise ValueError(f"rank {rank}: dims {tuple(dims)} has {given} entries for the "
                             f"{len(shape)}-D grid n = {shape}: expected {len(shape)}, one per "
                             "axis")
        return shape


def _is_size(value):
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def cell_width(shape):
    """The width of the square (cubic) cells of a grid of ``shape``: ``1 / (N + 1)``, ``N`` the
    largest size, so that the longest axis spans [0, 1]."""
    return 1.0 / (max(shape) + 1)


def true_kappa(x, y, z=None):
    """A smooth diffusivity in [0.6, 1.6] on the unit square (or cube, given ``z``): a raised
    bump and a shallower dip.

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat.inverse import true_kappa
    >>> x = np.linspace(0, 1, 41)
    >>> k = true_kappa(*np.meshgrid(x, x, x, indexing="ij"))
    >>> bool(0.6 <= k.min() < 0.7 and 1.5 < k.max() <= 1.6)
    True
    """
    if z is None:
        return (1.0 + 0.6 * np.exp(-((x - 0.35) ** 2 + (y - 0.62) ** 2) / 0.03)
                - 0.4 * np.exp(-((x - 0.68) ** 2 + (y - 0.3) ** 2) / 0.02))
    return (1.0 + 0.6 * np.exp(-((x - 0.35) ** 2 + (y - 0.62) ** 2 + (z - 0.45) ** 2) / 0.03)
            - 0.4 * np.exp(-((x - 0.68) ** 2 + (y - 0.3) ** 2 + (z - 0.55) ** 2) / 0.02))


def initial_state(x, y, z=None):
    """A smooth initial temperature that vanishes on the boundary of the unit square (cube)."""
    if z is None:
        return np.sin(np.pi * x) * np.sin(np.pi * y) * (1 + 0.5 * np.cos(3 * np.pi * x * y))
    return (np.sin(np.pi * x) * np.sin(np.pi * y) * np.sin(np.pi * z)
            * (1 + 0.5 * np.cos(3 * np.pi * x * y * z)))


def source(x, y, z=None):
    """Heat sources spread over the domain, so that Δu stays away from zero everywhere."""
    if z is None:
        bumps = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5))
        return sum(20.0 * np.exp(-((x - a) ** 2 + (y - b) ** 2) / 0.01) for a, b in bumps)
    bumps = [(a, b, c) for a in (0.25, 0.75) for b in (0.25, 0.75) for c in (0.25, 0.75)]
    return sum(20.0 * np.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / 0.01)
               for a, b, c in bumps + [(0.5, 0.5, 0.5)])


def stable_steps(settings: Settings, h: float, rank: int = 0) -> int:
    """The number of time steps for ``settings`` on cells of width ``h``.

    The explicit scheme on ``d`` axes is stable while ``dt <= h² / (2 d κ_max)``
    (``h² / (4 κ_max)`` in 2-D, ``h² / (6 κ_max)`` in 3-D). ``settings.steps=None`` gives the
    fewest steps, a multiple of ``snapshots``, with ``dt`` at most 95 % of that bound; given
    steps are checked against it.

    Examples
    --------
    >>> from gpumpiad.heat.inverse import Settings, stable_steps
    >>> stable_steps(Settings(n=32), 1 / 33), stable_steps(Settings(n=16), 1 / 17)
    (232, 64)
    >>> stable_steps(Settings(n=(32, 32, 16)), 1 / 33)
    344
    """
    s = settings
    d = len(s.grid_shape(rank))
    if not (isinstance(s.snapshots, int) and s.snapshots >= 1):
        raise ValueError(f"rank {rank}: snapshots must be an int >= 1, got {s.snapshots!r}")
    if not (isinstance(s.time, (int, float)) and math.isfinite(s.time) and s.time > 0):
        raise ValueError(f"rank {rank}: time must be a positive number, got {s.time!r}")
    limit = h ** 2 / (2 * d * s.kappa_bounds[1])
    if s.steps is None:
        return s.snapshots * math.ceil(s.time / (s.snapshots * 0.95 * limit))
    if not isinstance(s.steps, int) or s.steps < 1 or s.steps % s.snapshots:
        raise ValueError(f"rank {rank}: steps ({s.steps}) must be a positive multiple of "
                         f"snapshots ({s.snapshots})")
    if s.time / s.steps > limit:
        fewest = s.snapshots * math.ceil(s.time / (s.snapshots * limit))
        raise ValueError(f"rank {rank}: steps ({s.steps}) give dt = {s.time / s.steps:.4g} "
                         f"for time {s.time:g}, above the stability limit h²/({2 * d} κ_max) = "
                         f"{limit:.4g} (h = {h:.4g}, κ_max = {s.kappa_bounds[1]:g}): expected "
                         f"at least {fewest} steps")
    return s.steps


def _astype(x, dtype):
    return x.astype(dtype, copy=False)


# The optimiser works in float64; the solver needs κ in the fields' dtype.
_to_dtype = primitive(_astype, name="astype")
_to_dtype.defvjp(lambda g, ans, x, dtype: g.astype(x.dtype, copy=False))


class Problem:
    """The observations and the objective on this rank's patch."""

    def __init__(self, settings: Settings, comm=None):
        self.settings = settings
        shape = settings.grid_shape()
        self.grid = Grid(shape, comm=comm, dims=settings.dims)
        dtype = np.dtype(settings.dtype)
        mesh = np.meshgrid(*self.grid.coordinates(), indexing="ij")
        self.h = cell_width(shape)
        self.kappa_true = gm.backend.asarray(true_kappa(*mesh), dtype)
        self.u0 = gm.backend.asarray(initial_state(*mesh), dtype)
        self.f = gm.backend.asarray(source(*mesh), dtype)
        self.steps = stable_steps(settings, self.h, self.grid.rank)
        self.dt = settings.time / self.steps
        self.segment = self.steps // settings.snapshots
        clean = [s.data for s in self.states(self.kappa_true)]
        rng = np.random.default_rng(settings.seed + 7919 * self.grid.rank)
        scale = max(float(gm.backend.to_numpy(abs(d)).max()) for d in clean)
        self.observed = [d + gm.backend.asarray(settings.noise * scale
                                                 * rng.standard_normal(d.shape), dtype)
                         for d in clean]
        norm = sum(float((d * d).sum()) for d in self.observed)
        self.norm = control.allreduce(self.grid.cart, norm, MPI.SUM, "heat-inverse data norm")

    def states(self, kappa):
        """The states at the observation times for diffusivity ``kappa`` (this patch)."""
        u, out = self.u0, []
        if kappa.dtype != self.u0.dtype:
            kappa = _to_dtype(kappa, dtype=self.u0.dtype)
        for _ in range(self.settings.snapshots):
            u = solve(u, kappa, self.f, self.dt, self.h, self.segment, grid=self.grid,
                      checkpoints=self.settings.checkpoints)
            out.append(u)
        return out

    def loss(self, kappa):
        """The objective J(κ): data misfit plus smoothness (a serial scalar Tensor on the
        grid's communicator)."""
        misfit = 0.0
        for u, d in zip(self.states(kappa), self.observed):
            misfit = misfit + ((u - d) ** 2).sum()
        total = gm.mpi_sum(misfit, comm=self.grid.cart) * (0.5 / self.norm)
        if self.settings.regularization > 0:
            total = total + self.settings.regularization * gm.mpi_sum(
                self.roughness(kappa), comm=self.grid.cart)
        return total

    def roughness(self, kappa):
        """This patch's share of the smoothness term; see :func:`roughness`."""
        return roughness(kappa, self.grid)

    def assemble(self, flat):
        """The global field of the grid's shape from the optimiser's flat vector (patches in
        rank order)."""
        mpi = self.grid.cart.mpi
        out = np.empty(self.grid.shape)
        offset = 0
        for r in range(mpi.size):
            coords = mpi.Get_coords(r)
            shape = self.grid.patch_shape(coords)
            size = math.prod(shape)
            out[self.grid.slices(coords)] = np.asarray(flat[offset:offset + size]).reshape(shape)
            offset += size
        return out


def roughness(kappa, grid):
    """Σ (κ_a − κ_b)² over this patch's cell edges along every axis and its edges to the
    patches before it (a distributed scalar Tensor).

    Summed over the ranks (``gpumpiad.mpi_sum``), every edge between two cells of the grid
    counts once, and none crosses the physical boundary: the patch is padded with copies of
    its own boundary cells, whose differences vanish, and the ghosts facing a neighbour are
    filled by :func:`gpumpiad.halo_exchange`, through which the gradient flows back.

    Examples
    --------
    >>> import numpy as np, gpumpiad as gm
    >>> from gpumpiad.heat.inverse import roughness
    >>> grid = gm.Grid((4, 3, 2))
    >>> ramp = np.arange(24.0).reshape(4, 3, 2)[grid.slices()]  # steps 6, 2 and 1 per axis
    >>> kappa = gm.tensor(ramp, distributed=True)
    >>> float(gm.mpi_sum(roughness(kappa, grid)))  # 18 edges of 36, 16 of 4, 12 of 1
    724.0
    """
    padded = kappa
    d = grid.ndim
    for axis in range(d):
        before = (slice(None),) * axis
        padded = gm.concatenate([padded[before + (slice(None, 1),)], padded,
                                 padded[before + (slice(-1, None),)]], axis=axis)
    padded = halo_exchange(padded, grid)
    inner = (slice(1, -1),) * d
    centre = padded[inner]
    total = None
    for axis in range(d):
        previous = padded[inner[:axis] + (slice(None, -2),) + inner[axis + 1:]]
        term = ((centre - previous) ** 2).sum()
        total = term if total is None else total + term
    return total


def recover(problem: Problem, progress=print, checkpoint=None):
    """Recover κ from the constant guess; return ``(result, history)`` (history on the root).

    Collective. ``progress`` receives one line per iteration on the root, from iteration 0
    (the guess). ``history`` holds, per iteration from 0, the loss, the relative κ error
    ``‖κ − κ_true‖ / ‖κ_true‖`` and the seconds since the start. ``checkpoint`` is the
    optimiser's restart file (see :func:`gpumpiad.optimize.minimize`): written every
    iteration, and resumed from when it exists; the resumed iterations are replayed into
    ``progress`` and ``history``.
    """
    s = problem.settings
    kappa0 = gm.tensor(np.full(problem.grid.local_shape, s.kappa_guess), distributed=True,
                       comm=problem.grid.cart)
    n_global = math.prod(problem.grid.shape)
    true_global = problem.grid.gather(problem.kappa_true)
    is_root = problem.grid.cart.rank == 0
    history = {"loss": [], "kappa_error": [], "seconds": []}
    start = time.perf_counter()

    def record(kappa, loss, gnorm):
        error = float(np.linalg.norm(kappa - true_global) / np.linalg.norm(true_global))
        seconds = time.perf_counter() - start
        history["loss"].append(float(loss))
        history["kappa_error"].append(error)
        history["seconds"].append(seconds)
        grad = f"{gnorm:10.3e}" if gnorm is not None else f"{'-':>10}"
        progress(f"{len(history['loss']) - 1:5d}  loss {loss:12.5e}  |grad| {grad}  "
                 f"κ error {100 * error:7.3f}%  {seconds:8.2f} s")

    # Iteration 0 (the guess): a forward evaluation only, as no gradient is asked for.
    loss0 = float(problem.loss(kappa0))
    if is_root:
        record(problem.assemble(np.full(n_global, s.kappa_guess)), loss0, None)

    def callback(intermediate_result):
        jac = intermediate_result.get("jac")
        record(problem.assemble(intermediate_result.x), float(intermediate_result.fun),
               None if jac is None else float(np.abs(jac).max()))

    result = minimize(problem.loss, kappa0, method="L-BFGS-B",
                      bounds=[s.kappa_bounds] * n_global,
                      options={"maxiter": s.maxiter, "ftol": 1e-14, "gtol": 1e-12},
                      callback=callback if is_root else None, trace=False,
                      checkpoint=checkpoint, comm=problem.grid.cart)
    return result, history


_CONVERGED = {"REL_REDUCTION_OF_F": "the loss stopped decreasing (relative change below ftol)",
              "PROJECTED GRADIENT": "the projected gradient is below gtol"}


def outcome(result):
    """``(converged, text)``: whether the optimiser converged, in words for the console.

    Examples
    --------
    >>> from scipy.optimize import OptimizeResult
    >>> from gpumpiad.heat.inverse import outcome
    >>> outcome(OptimizeResult(status=1, nit=30,
    ...                        message="STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"))
    (False, 'not converged: stopped at the iteration limit (30 iterations)')
    """
    message = str(result.message)
    if result.status == 0:
        reason = next((text for key, text in _CONVERGED.items() if key in message),
                      message.lower())
        return True, f"converged after {result.nit} iterations: {reason}"
    if "ITERATIONS REACHED LIMIT" in message:
        return False, f"not converged: stopped at the iteration limit ({result.nit} iterations)"
    return False, f"not converged: stopped after {result.nit} iterations: {message}"
