"""The inverse heat problem: recover a diffusivity field κ(x, y) from observed temperatures.

A smooth true κ drives the forward solver from a known initial state and source; the states at
``snapshots`` evenly spaced times (optionally with noise) are the observations. κ is then
recovered from a constant guess by the distributed optimiser, minimising

    J(κ) = ½ Σ_k ‖u_k(κ) − d_k‖² / ‖d‖²  +  α Σ_edges (κ_a − κ_b)²

over every rank's patch of κ, with the optional smoothness term summed over all cell edges
(across patch boundaries through a differentiable halo exchange).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

import gpumpiad as gm

from .. import control
from ..halo import halo_exchange
from ..optimize import minimize
from .grid import Grid
from .solver import solve


@dataclass
class Settings:
    """What the job solves; every field has a default that runs in seconds on a laptop CPU."""

    n: int = 32
    steps: int = 240
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


def true_kappa(x, y):
    """A smooth diffusivity in [0.6, 1.6]: a raised bump and a shallower dip."""
    return (1.0 + 0.6 * np.exp(-((x - 0.35) ** 2 + (y - 0.62) ** 2) / 0.03)
            - 0.4 * np.exp(-((x - 0.68) ** 2 + (y - 0.3) ** 2) / 0.02))


def initial_state(x, y):
    """A smooth initial temperature that vanishes on the boundary."""
    return np.sin(np.pi * x) * np.sin(np.pi * y) * (1 + 0.5 * np.cos(3 * np.pi * x * y))


def source(x, y):
    """Heat sources spread over the domain, so that Δu stays away from zero everywhere."""
    bumps = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5))
    return sum(20.0 * np.exp(-((x - a) ** 2 + (y - b) ** 2) / 0.01) for a, b in bumps)


class Problem:
    """The observations and the objective on this rank's patch."""

    def __init__(self, settings: Settings, comm=None):
        self.settings = settings
        self.grid = Grid((settings.n, settings.n), comm=comm, dims=settings.dims)
        dtype = np.dtype(settings.dtype)
        x, y = self.grid.coordinates()
        X, Y = np.meshgrid(x, y, indexing="ij")
        self.h = self.grid.h[0]
        self.kappa_true = gm.backend.asarray(true_kappa(X, Y), dtype)
        self.u0 = gm.backend.asarray(initial_state(X, Y), dtype)
        self.f = gm.backend.asarray(source(X, Y), dtype)
        self.dt = 0.95 * self.h ** 2 / (4 * settings.kappa_bounds[1])
        if settings.snapshots < 1 or settings.steps % settings.snapshots:
            raise ValueError(f"rank {self.grid.rank}: steps ({settings.steps}) must be a "
                             f"positive multiple of snapshots ({settings.snapshots})")
        self.segment = settings.steps // settings.snapshots
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
        for _ in range(self.settings.snapshots):
            u = solve(u, kappa, self.f, self.dt, self.h, self.segment, grid=self.grid,
                      checkpoints=self.settings.checkpoints)
            out.append(u)
        return out

    def loss(self, kappa):
        """The objective J(κ): data misfit plus smoothness (a serial scalar Tensor)."""
        misfit = 0.0
        for u, d in zip(self.states(kappa), self.observed):
            misfit = misfit + ((u - d) ** 2).sum()
        total = gm.mpi_sum(misfit) * (0.5 / self.norm)
        if self.settings.regularization > 0:
            total = total + self.settings.regularization * gm.mpi_sum(
                self.roughness(kappa))
        return total

    def roughness(self, kappa):
        """Σ (κ_a − κ_b)² over this patch's cell edges and its edges to the patches before it
        (each edge between patches counted once; none across the physical boundary)."""
        rows = gm.concatenate([kappa[:1], kappa, kappa[-1:]], axis=0)
        padded = gm.concatenate([rows[:, :1], rows, rows[:, -1:]], axis=1)
        padded = halo_exchange(padded, self.grid)
        down = padded[1:-1, 1:-1] - padded[:-2, 1:-1]
        right = padded[1:-1, 1:-1] - padded[1:-1, :-2]
        return (down ** 2).sum() + (right ** 2).sum()

    def assemble(self, flat):
        """The global (n, n) field from the optimiser's flat vector (patches in rank order)."""
        mpi = self.grid.cart.mpi
        out = np.empty(self.grid.shape)
        offset = 0
        for r in range(mpi.size):
            coords = mpi.Get_coords(r)
            shape = self.grid.patch_shape(coords)
            size = shape[0] * shape[1]
            out[self.grid.slices(coords)] = np.asarray(flat[offset:offset + size]).reshape(shape)
            offset += size
        return out


def recover(problem: Problem, progress=print):
    """Recover κ from the constant guess; return ``(result, history)`` (history on the root).

    ``progress`` receives one line per iteration on the root.
    """
    s = problem.settings
    kappa0 = gm.tensor(np.full(problem.grid.local_shape, s.kappa_guess), distributed=True)
    n_global = problem.grid.shape[0] * problem.grid.shape[1]
    true_global = problem.grid.gather(problem.kappa_true)
    is_root = problem.grid.cart.rank == 0
    history = {"loss": [], "kappa_error": [], "seconds": []}
    start = [time.perf_counter()]

    def callback(intermediate_result):
        kappa = problem.assemble(intermediate_result.x)
        error = float(np.linalg.norm(kappa - true_global) / np.linalg.norm(true_global))
        now = time.perf_counter()
        history["loss"].append(float(intermediate_result.fun))
        history["kappa_error"].append(error)
        history["seconds"].append(now - start[0])
        gnorm = float(np.abs(intermediate_result.jac).max()) if "jac" in intermediate_result \
            else float("nan")
        progress(f"{len(history['loss']):5d}  loss {intermediate_result.fun:12.5e}  "
                 f"|grad| {gnorm:10.3e}  κ error {100 * error:7.3f}%  "
                 f"{now - start[0]:8.2f} s")

    result = minimize(problem.loss, kappa0, method="L-BFGS-B",
                      bounds=[s.kappa_bounds] * n_global,
                      options={"maxiter": s.maxiter, "ftol": 1e-14, "gtol": 1e-12},
                      callback=callback if is_root else None, trace=False,
                      comm=problem.grid.cart)
    return result, history
