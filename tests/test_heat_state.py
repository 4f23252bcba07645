"""Solver checkpoints: atomic save, load on another decomposition, damaged files refused."""
import os

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad.checkpoint import CheckpointError
from gpumpiad.heat import Grid, load_state, save_state


def _shared_folder(tmp_path):
    return MPI.COMM_WORLD.bcast(str(tmp_path), root=0)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_round_trip_on_another_decomposition(tmp_path):
    path = os.path.join(_shared_folder(tmp_path), "state.ckpt")
    shape = (11, 7)
    field = np.arange(77.0).reshape(shape) ** 1.5
    size = MPI.COMM_WORLD.size
    writer = Grid(shape)
    save_state(path, writer.local(field), writer, step=42, metadata={"dt": 0.25})
    reader = Grid(shape, dims=(1, size))
    patch, step, meta = load_state(path, reader)
    parallel_assert(step == 42 and meta == {"dt": 0.25})
    parallel_assert(np.array_equal(gp.backend.to_numpy(patch), reader.local(field)),
                    "the patch read back differs from the field written")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_3d_round_trip_on_another_decomposition(tmp_path):
    path = os.path.join(_shared_folder(tmp_path), "state3d.ckpt")
    shape = (5, 4, 6)
    field = np.random.default_rng(3).random(shape)
    size = MPI.COMM_WORLD.size
    writer = gp.Grid(shape, dims=(size, 1, 1) if size < 5 else None)
    save_state(path, writer.local(field), writer, step=5)
    reader = gp.Grid(shape, dims=(1, 1, size) if size <= 6 else None)
    patch, step, _ = load_state(path, reader)
    parallel_assert(step == 5 and np.array_equal(gp.backend.to_numpy(patch),
                                                 reader.local(field)),
                    "the 3-D patch read back differs from the field written")


@pytest.mark.parallel(nprocs=[1, 3])
def test_damaged_or_mismatched_state_is_refused_on_every_rank(tmp_path):
    folder = _shared_folder(tmp_path)
    path = os.path.join(folder, "state.ckpt")
    grid = Grid((6, 5))
    save_state(path, np.ones(grid.local_shape), grid, step=1)
    messages = []
    with pytest.raises(CheckpointError) as mismatch:
        load_state(path, Grid((5, 6)))
    messages.append(str(mismatch.value))
    if MPI.COMM_WORLD.rank == 0:
        data = open(path, "rb").read()
        with open(path, "wb") as out:
            out.write(data[: len(data) // 2])
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(CheckpointError) as truncated:
        load_state(path, grid)
    messages.append(str(truncated.value))
    rank = f"rank {MPI.COMM_WORLD.rank}"
    parallel_assert(rank in messages[0] and "(6, 5) field, the grid is (5, 6)" in messages[0],
                    messages[0])
    # The root reads the file: every rank reports the root's finding.
    parallel_assert("rank 0" in messages[1] and "truncated" in messages[1].lower(), messages[1])
