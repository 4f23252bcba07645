"""Communicators made by gpumpiad (split, dup, cart, heat.Grid) are released by free()/with.

MPI allots each process a limited number of communicators (2048 context ids with MPICH):
without freeing, a program that builds a Grid per iteration fails after about 2000.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad.heat import Grid

MANY = 2500  # more than MPICH's 2048 communicators per process


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_freed_communicators_can_be_made_without_end():
    rank, size = gp.mpi_rank(), gp.mpi_size()
    for _ in range(MANY):
        with Grid((8, 6)) as grid:
            pass
    parallel_assert(grid.cart.mpi == MPI.COMM_NULL, "the grid's communicator was not freed")
    for _ in range(MANY):
        with gp.Comm().split(rank % 2) as half:
            pass
    parallel_assert(half.mpi == MPI.COMM_NULL)
    # Still usable afterwards: a collective on a fresh communicator and on the world.
    with gp.Comm().dup() as comm:
        total = gp.mpi_sum(gp.tensor([1.0], distributed=True), comm=comm).item()
    parallel_assert(total == size)
    world = gp.Comm()
    world.free()  # not gpumpiad's to free: left alone
    parallel_assert(world.mpi == MPI.COMM_WORLD and gp.mpi_sum(np.ones(1)).item() == size)


@pytest.mark.parallel(nprocs=[1, 2])
def test_running_out_of_communicators_says_what_to_do():
    made = []
    try:
        with pytest.raises(RuntimeError) as info:
            for _ in range(MANY):
                made.append(gp.Comm().dup())
    finally:
        for comm in made:
            comm.free()
    message = str(info.value)
    parallel_assert(message.startswith(f"rank {gp.mpi_rank()}: Comm.dup could not create a "
                                       "communicator") and ".free()" in message
                    and "with" in message, message)
    with Grid((4, 4)) as grid:  # the freed ones are available again
        parallel_assert(grid.cart.size == gp.mpi_size())



@pytest.mark.parallel(nprocs=[2, 3])
def test_ranks_that_make_different_communicators_get_an_error_naming_each():
    """MPI leaves Create_cart with differing dims undefined, and a grid of differing shapes
    would split the field inconsistently: every rank raises, naming what each rank passed."""
    rank = gp.mpi_rank()
    with pytest.raises(ValueError) as info:
        Grid((12, 10 + (rank == 1)))
    message = str(info.value)
    parallel_assert(message.startswith(f"rank {rank}: ranks create communicators differently")
                    and "rank 0: Comm.cart with dims" in message
                    and "grid shape (12, 10)" in message and "grid shape (12, 11)" in message,
                    message)
    with pytest.raises(ValueError) as info:
        gp.Comm().dup() if rank == 1 else gp.Comm().cart()
    message = str(info.value)
    parallel_assert("rank 0: Comm.cart with dims" in message and "rank 1: Comm.dup" in message,
                    message)
    with Grid((6, 6)) as grid:  # nothing was left half made: the next one works
        parallel_assert(grid.cart.size == gp.mpi_size())
