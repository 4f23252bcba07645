"""gpumpiad.Grid on 1, 2 and 3 axes: every split of the ranks, uneven sizes, periodic or not."""
import itertools
import math

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gm
import gpumpiad.heat
import gpumpiad.heat.grid
from gpumpiad.backend import to_numpy

SHAPES = {1: (7,), 2: (7, 5), 3: (5, 6, 7)}


def splits(size, d):
    """Every ``dims`` of ``d`` factors of ``size``, and all zeros (filled by MPI)."""
    found = [dims for dims in itertools.product(range(1, size + 1), repeat=d)
             if math.prod(dims) == size]
    return found + [(0,) * d]


def periodics(d):
    return [False, True] + ([(True,) + (False,) * (d - 1), (False,) * (d - 1) + (True,)]
                            if d > 1 else [])


def check_decomposition(grid, field):
    """Everything a rank can check about ``grid`` against the global ``field``; a list of
    failures (empty when all holds)."""
    comm = MPI.COMM_WORLD
    d, where = grid.ndim, f"shape {grid.shape}, dims {grid.dims}, periodic {grid.periodic}"
    bad = []
    patch = to_numpy(grid.scatter(field if comm.rank == 0 else None))
    if not np.array_equal(patch, field[grid.slices()]) or patch.shape != grid.local_shape:
        bad.append(f"{where}: scatter gave another patch")
    if not np.array_equal(grid.local(field), patch):
        bad.append(f"{where}: local differs from scatter")
    whole = to_numpy(grid.gather(patch, root=None))
    if whole.dtype != field.dtype or not np.array_equal(whole, field):
        bad.append(f"{where}: gather(scatter(field)) is not the field")
    on_root = grid.gather(patch, root=comm.size - 1)
    if (on_root is not None) != (comm.rank == comm.size - 1):
        bad.append(f"{where}: gather to the last rank returned on rank {comm.rank}")
    if grid.padded_shape != tuple(n + 2 for n in grid.local_shape):
        bad.append(f"{where}: padded_shape {grid.padded_shape}")

    everyone = comm.allgather((grid.coords, grid.slices(), grid.neighbours, grid.physical))
    cover = np.zeros(grid.shape, int)
    for coords, slices, _, _ in everyone:
        cover[slices] += 1
        if slices != grid.slices(coords):
            bad.append(f"{where}: rank's slices differ from slices({coords})")
    if not (cover == 1).all():
        bad.append(f"{where}: the patches cover cells {cover.min()}..{cover.max()} times")
    for r, (coords, _, neighbours, physical) in enumerate(everyone):
        if len(neighbours) != 2 * d or physical != tuple(n == MPI.PROC_NULL for n in neighbours):
            bad.append(f"{where}: rank {r}'s neighbours {neighbours}, physical {physical}")
            continue
        for axis in range(d):
            minus, plus = neighbours[2 * axis], neighbours[2 * axis + 1]
            edge = coords[axis] == grid.dims[axis] - 1
            if (plus == MPI.PROC_NULL) != (edge and not grid.periodic[axis]):
                bad.append(f"{where}: rank {r} +axis {axis} neighbour {plus}")
            if plus != MPI.PROC_NULL:
                there = everyone[plus][0]
                expected = list(coords)
                expected[axis] = (coords[axis] + 1) % grid.dims[axis]
                if list(there) != expected or everyone[plus][2][2 * axis] != r:
                    bad.append(f"{where}: rank {r}'s +axis {axis} neighbour {plus} at {there} "
                               f"has -axis {axis} neighbour {everyone[plus][2][2 * axis]}")
            if (minus == MPI.PROC_NULL) != (coords[axis] == 0 and not grid.periodic[axis]):
                bad.append(f"{where}: rank {r} -axis {axis} neighbour {minus}")

    for ghosts in (False, True):
        got = grid.coordinates(ghosts=ghosts)
        for axis, (n, wraps) in enumerate(zip(grid.shape, grid.periodic)):
            h = 1.0 / (n if wraps else n + 1)
            full = np.arange(0, n + 2) * h     # ghost, interior, ghost
            sl = grid.slices()[axis]
            want = full[sl.start:sl.stop + 2] if ghosts else full[sl.start + 1:sl.stop + 1]
            if len(got) != d or not np.array_equal(got[axis], want) or grid.h[axis] != h:
                bad.append(f"{where}: coordinates(ghosts={ghosts}) along axis {axis}")
    return bad


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_every_split_tiles_scatters_gathers_and_links_its_neighbours():
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(7)
    bad = []
    for d, shape in SHAPES.items():
        field = rng.standard_normal(shape)
        for dims in splits(comm.size, d):
            for periodic in periodics(d):
                with gm.Grid(shape, dims=dims, periodic=periodic) as grid:
                    if dims != (0,) * d and grid.dims != dims:
                        bad.append(f"dims {dims} became {grid.dims}")
                    bad += check_decomposition(grid, field)
    parallel_assert(not bad, "; ".join(bad[:5]))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_any_numeric_dtype_travels_unchanged_in_3d():
    comm = MPI.COMM_WORLD
    for dtype in (np.float32, np.int16, np.complex128, np.bool_):
        field = (np.arange(5 * 6 * 7) % 5).reshape(5, 6, 7).astype(dtype)
        with gm.Grid((5, 6, 7), dims=(1, comm.size, 1)) as grid:
            whole = grid.gather(grid.scatter(field), root=None)
        parallel_assert(whole.dtype == field.dtype and np.array_equal(whole, field), str(dtype))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_two_axes_keep_north_south_west_east():
    comm = MPI.COMM_WORLD
    with gm.heat.Grid((7, 5), dims=(0, 0), periodic=(True, False)) as grid:
        expected = grid.cart.shift(0, 1) + grid.cart.shift(1, 1)
        parallel_assert(grid.neighbours == expected and len(grid.physical) == 4
                        and grid.local_shape == (grid.sizes[0][grid.coords[0]],
                                                 grid.sizes[1][grid.coords[1]]))
        parallel_assert(grid.neighbours[gm.heat.grid.NORTH] == expected[0]
                        and grid.neighbours[gm.heat.grid.EAST] == expected[3])
    parallel_assert(gm.heat.Grid is gm.Grid and gm.heat.grid.Grid is gm.Grid
                    and comm.size > 0)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_bad_shape_dims_and_periodic_name_the_rank_the_argument_and_both_values():
    comm = MPI.COMM_WORLD
    me, size = comm.rank, comm.size
    cases = [
        (lambda: gm.Grid((0, 4, 4)),
         rf"rank {me}: grid shape must be three positive ints \(NX, NY, NZ\), got \(0, 4, 4\)"),
        (lambda: gm.Grid((4, 4, 4, 4)),
         rf"rank {me}: grid shape must be 1, 2 or 3 ints .*got \(4, 4, 4, 4\)"),
        (lambda: gm.Grid(8), rf"rank {me}: grid shape must be 1, 2 or 3 ints .*got 8"),
        (lambda: gm.Grid((4.0,)), rf"rank {me}: grid shape must be one int \(NX,\), got \(4.0,\)"),
        (lambda: gm.Grid((4, 4, True)),
         rf"rank {me}: grid shape must be three ints \(NX, NY, NZ\), got \(4, 4, True\)"),
        (lambda: gm.Grid((8, 8, 8), dims=(size, 1)),
         rf"rank {me}: dims must be three non-negative ints \(N, M, K\), got \({size}, 1\) "
         rf"\(2 entries for the 3-D grid shape \(8, 8, 8\)\)"),
        (lambda: gm.Grid((8,), dims=(-1,)),
         rf"rank {me}: dims must be one non-negative int \(N,\), got \(-1,\)"),
        (lambda: gm.Grid((8, 8, 8), dims=(1, 1, 0.5)),
         rf"rank {me}: dims must be three non-negative ints \(N, M, K\), got \(1, 1, 0.5\)"),
        (lambda: gm.Grid((8,), dims=(size + 1,)),
         rf"rank {me}: dims {size + 1} do not fit a communicator of {size} rank\(s\)"),
        (lambda: gm.Grid((8, 8, 8), dims=(size + 1, 0, 1)),
         rf"rank {me}: dims {size + 1}x0x1 do not fit a communicator of {size} rank\(s\)"),
        (lambda: gm.Grid((8, 8, 8), periodic=(True, False)),
         rf"rank {me}: periodic must be a bool or three bools \(along x, along y, along z\), "
         rf"got \(True, False\)"),
        (lambda: gm.Grid((8,), periodic="yes"),
         rf"rank {me}: periodic must be a bool or one bool \(along x\), got 'yes'"),
        (lambda: gm.Grid((8, 8), periodic=(1, 0)),
         rf"rank {me}: periodic must be a bool or a pair of bools \(along x, along y\), "
         rf"got \(1, 0\)"),
    ]
    if size > 1:
        cases.append((lambda: gm.Grid((8, 8, 1), dims=(1, 1, size)),
                      rf"rank {me}: a grid of 8x8x1 cells cannot be split into 1x1x{size} "
                      rf"patches: axis 2 has 1 cell\(s\) for {size} patches"))
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_scatter_gather_and_check_grid_name_a_field_of_the_wrong_shape_or_axes():
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    with gm.Grid((5, 6, 7)) as grid:
        with pytest.raises(ValueError, match=r"expected a global field of shape \(5, 6, 7\), "
                                             r"got \(5, 6\)"):
            grid.scatter(np.zeros((5, 6)) if comm.rank == 0 else None)
        patch = np.zeros(grid.local_shape if comm.rank != last else (1, 1))
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: Grid.gather: rank {last}'s "
                                             rf"patch has shape \(1, 1\), expected"):
            grid.gather(patch)
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: solve's grid must have 2 "
                                             rf"axes, got a 3-D grid of shape \(5, 6, 7\)"):
            gm.heat.grid.check_grid(grid, "solve", ndim=2)
        parallel_assert(gm.heat.grid.check_grid(grid, "solve", ndim=3) is grid)
