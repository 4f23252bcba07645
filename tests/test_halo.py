"""Tests for gpumpiad.halo: ghost filling against the global field for every N x M split, and
the cross-rank dot-product test of the exchange against its adjoint (raw and through the tape),
with Dirichlet and with periodic boundaries."""
import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad.backend import to_numpy
from gpumpiad import halo
from gpumpiad.halo import halo_exchange
from gpumpiad.heat import Grid, hostkernels, stencil
from gpumpiad.heat.kernels import kernels_for

NX, NY = 13, 11
PERIODIC = ((False, False), (True, True), (False, True))


def splits(size):
    return [(n, size // n) for n in range(1, size + 1) if size % n == 0]


def kernel_choices():
    return ("numpy", "host") if hostkernels.available() else ("numpy",)


def wrap(field, periodic):
    """A global padded field whose ghosts along the periodic axes hold the wrapped-around
    interior (what the exchange must deliver there)."""
    field = field.copy()
    if periodic[0]:
        field[0, 1:-1], field[-1, 1:-1] = field[-2, 1:-1], field[1, 1:-1]
    if periodic[1]:
        field[1:-1, 0], field[1:-1, -1] = field[1:-1, -2], field[1:-1, 1]
    return field


def padded_patch(grid, field):
    """This rank's (nx+2, ny+2) window of a global padded (NX+2, NY+2) field."""
    (i0, j0), (nx, ny) = grid.offset, grid.local_shape
    return field[i0:i0 + nx + 2, j0:j0 + ny + 2].copy()


def ghost_views(a):
    return (a[0, 1:-1], a[-1, 1:-1], a[1:-1, 0], a[1:-1, -1])


def no_corners(a):
    mask = np.ones(a.shape, bool)
    mask[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    return a[mask]


def test_kernels_for_dispatch(monkeypatch):
    a = np.zeros((4, 4))
    assert kernels_for(a, "numpy") is stencil
    monkeypatch.setenv("GPUMPIAD_HEAT_KERNELS", "numpy")
    assert kernels_for(a) is stencil
    if hostkernels.available():
        monkeypatch.setenv("GPUMPIAD_HEAT_KERNELS", "host")
        assert kernels_for(a) is hostkernels
    with pytest.raises(ValueError, match="backend: heat kernels must be one of"):
        kernels_for(a, "fortran")
    monkeypatch.setenv("GPUMPIAD_HEAT_KERNELS", "fortran")
    with pytest.raises(ValueError, match="GPUMPIAD_HEAT_KERNELS: heat kernels must be one of"):
        kernels_for(a)
    with pytest.raises(ValueError, match="cannot run on a NumPy array"):
        kernels_for(a, "cuda")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_exchange_fills_ghosts_from_neighbours():
    size = MPI.COMM_WORLD.size
    random = np.random.default_rng(0).standard_normal((NX + 2, NY + 2))
    for dims, periodic in [(d, p) for d in splits(size) for p in PERIODIC]:
        grid = Grid((NX, NY), dims=dims, periodic=periodic)
        expected = padded_patch(grid, wrap(random, periodic))
        for kernels in kernel_choices():
            a = expected.copy()
            for side, ghost in enumerate(ghost_views(a)):
                if not grid.physical[side]:
                    ghost[...] = np.nan
            pending = halo.start(a, grid, kernels=kernels_for(a, kernels))
            interior_before = a[1:-1, 1:-1].copy()
            pending.wait()
            parallel_assert(np.array_equal(no_corners(a), no_corners(expected)),
                            f"dims {dims}, periodic {periodic}, kernels {kernels}: ghosts "
                            "differ from the global field")
            parallel_assert(np.array_equal(a[1:-1, 1:-1], interior_before))
        out = halo_exchange(gpumpiad.tensor(a, distributed=True), grid)
        parallel_assert(out.distributed and np.array_equal(no_corners(out.numpy()),
                                                           no_corners(expected)))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_exchange_dot_product_and_tape_adjoint():
    comm = MPI.COMM_WORLD
    for dims, periodic in [(d, p) for d in splits(comm.size) for p in PERIODIC]:
        grid = Grid((NX, NY), dims=dims, periodic=periodic)
        rng = np.random.default_rng(100 + comm.rank)
        x = rng.standard_normal(grid.padded_shape)
        y = rng.standard_normal(grid.padded_shape)
        for kernels in kernel_choices():
            k = kernels_for(x, kernels)
            ex = halo.exchange(x.copy(), grid, k)
            ety = halo.exchange_adjoint(y.copy(), grid, k)
            lhs = comm.allreduce(float(np.vdot(ex, y)))
            rhs = comm.allreduce(float(np.vdot(x, ety)))
            parallel_assert(abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0),
                            f"dims {dims}, periodic {periodic}, kernels {kernels}: <Ex, y> = "
                            f"{lhs}, <x, E'y> = {rhs}")

        def objective(u):
            return gpumpiad.mpi_sum((halo_exchange(u, grid) * y).sum())

        g = gpumpiad.grad(objective)(gpumpiad.tensor(x, distributed=True))
        parallel_assert(np.array_equal(to_numpy(g), halo.exchange_adjoint(y.copy(), grid)),
                        f"dims {dims}: the tape's adjoint differs from exchange_adjoint")


@pytest.mark.parallel(nprocs=[2])
def test_halo_exchange_rejects_unpadded_input():
    grid = Grid((NX, NY))
    with pytest.raises(ValueError, match=r"rank \d: halo_exchange expects u of padded shape"):
        halo_exchange(np.zeros(grid.local_shape), grid)


@pytest.mark.parallel(nprocs=[2])
def test_exchange_between_patches_of_different_dtypes_raises_on_both_ranks():
    """A float64 patch next to a float32 one: the shorter message would leave half the ghost
    buffer unwritten, the longer is truncated by MPI; each rank names what it got (11 cells a
    row: 44 bytes, which MPICH refuses with an internal assertion when received as float64)."""
    grid = Grid((NX, NY), dims=(2, 1))
    rank = grid.cart.rank
    u = np.ones(grid.padded_shape, np.float64 if rank == 0 else np.float32)
    if rank == 0:
        with pytest.raises(gpumpiad.CommunicationMismatch,
                           match=r"rank 0: halo exchange from rank 1 \(tag \d\) got a message of "
                                 r"44 bytes, expected 88 \(shape \(11,\), float64\)"):
            halo.exchange(u, grid)
    else:
        with pytest.raises(RuntimeError, match=r"rank 1: halo exchange failed in MPI: .*trunc"):
            halo.exchange(u, grid)
    MPI.COMM_WORLD.Barrier()
    grid.free()


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_exchanges_over_a_freed_grid_say_it_was_freed():
    """After Grid.free() (or its with block), every exchange names the grid as freed, on every
    rank, whether or not the rank has a neighbour to send to."""
    rank = MPI.COMM_WORLD.rank
    for dims, periodic in (((MPI.COMM_WORLD.size, 1), False), ((1, MPI.COMM_WORLD.size), True)):
        with Grid((NX, NY), dims=dims, periodic=periodic) as grid:
            u = np.ones(grid.padded_shape)
        calls = (("halo_exchange's grid", lambda: halo_exchange(u, grid)),
                 ("halo_exchange's grid", lambda: halo_exchange(gpumpiad.tensor(
                     u, distributed=True), grid)),
                 ("halo exchange's grid", lambda: halo.exchange(u.copy(), grid)),
                 ("halo exchange's grid", lambda: halo.exchange_adjoint(u.copy(), grid)))
        for words, call in calls:
            with pytest.raises(ValueError, match=rf"rank {rank}: {words} was freed \(Grid.free"
                                                 r"\(\) or the end of its with block\)"):
                call()
        parallel_assert(grid.freed)


@pytest.mark.parallel(nprocs=[2])
def test_an_exchange_dropped_before_its_wait_keeps_its_buffers_until_mpi_is_done():
    """An error between start and wait drops the exchange with its messages in flight: its
    receive buffer must not be freed (and its memory handed to a new array) while MPI may still
    write it; it is released once the messages have arrived."""
    import gc
    import time
    import weakref
    grid = Grid((NX, NY), dims=(2, 1))
    rank = grid.cart.rank
    u = np.full(grid.padded_shape, float(rank + 1))
    pending = halo.start(u, grid)
    if rank == 0:
        held = weakref.ref(pending._received[0][1])
        del pending
        gc.collect()
        parallel_assert(held() is not None, "the dropped exchange's receive buffer was freed")
    else:
        pending.wait()
        parallel_assert(True)
    halo.exchange(u, grid)
    if rank == 0:
        deadline = time.monotonic() + 10
        while held() is not None and time.monotonic() < deadline:
            halo._release_finished()
            gc.collect()
        parallel_assert(held() is None, "the buffer was kept after its message arrived")
    else:
        parallel_assert(True)
    grid.free()
