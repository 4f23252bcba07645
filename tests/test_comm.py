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
from gpumpiad.backend import to_numpy
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


def _two_messages(x, comm):
    """Rank 0's a = x and b = x * x reach rank 1, whose loss is 10 a + b: dloss/dx = 10 + 2x.
    The two cotangents travel back in the order rank 1 completes them; only the message
    numbering kept on the communicator's one Comm tells them apart."""
    r = gp.mpi_rank(comm)
    if r == 0:
        gp.mpi_send(x * 1.0, dest=1, comm=comm)
        gp.mpi_send(x * x, dest=1, comm=comm)
        return gp.mpi_sum(x * 0.0, comm=comm)
    a = gp.mpi_recv(x, source=0, comm=comm)
    b = gp.mpi_recv(x, source=0, comm=comm)
    later = b * 1.0  # a's cotangent is complete first, so it is sent back first
    return gp.mpi_sum(gp.sum(a * 10.0 + later), comm=comm)


@pytest.mark.parallel(nprocs=[2, 3])
def test_an_mpi4py_communicator_is_one_comm_at_every_call():
    """Passing mpi4py's communicator as comm= at every call gives the same Comm each time: the
    reverse-mode numbering of messages holds, and world-serial values are on its communicator."""
    r = gp.mpi_rank()
    x = gp.tensor(np.array([3.0]), distributed=True)
    grads = []
    with gp.Comm().split(0 if r < 2 else 1) as pair:
        for comm in (MPI.COMM_WORLD, pair.mpi):
            if r < 2:
                grads.append(gp.value_and_grad(_two_messages)(x, comm)[1])
            else:
                gp.value_and_grad(lambda t: gp.mpi_sum(t * 0.0, comm=comm))(x)
    parallel_assert(r != 0 or all(np.array_equal(to_numpy(g), [16.0]) for g in grads),
                    f"gradients {grads}, expected [16.] for the world and for a split")
    value, grad = gp.value_and_grad(
        lambda t: gp.sum(gp.mpi_sum(t * t, comm=MPI.COMM_WORLD)))(np.array([3.0]))
    P = gp.mpi_size()
    parallel_assert(value == 9.0 * P and np.array_equal(to_numpy(grad), [6.0 * P]),
                    f"{value} {grad}")
    parallel_assert(gp.Comm(MPI.COMM_WORLD) is gp.Comm() and gp.Comm(MPI.COMM_WORLD).size == P)


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_numpy_integers_are_ints():
    """Ranks, roots, tags and colours computed with NumPy are accepted like Python ints."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    last, tag = np.int64(P - 1), np.int32(5)
    b = gp.mpi_bcast(np.full(2, float(r)), root=last).numpy()
    gp.mpi_send(np.full(2, float(r)), dest=np.int64((r + 1) % P), tag=tag)
    got = gp.mpi_recv(np.zeros(2), source=np.int16((r - 1) % P), tag=tag).numpy()
    g = gp.mpi_gather(np.ones((1, 2)), root=np.uint8(0)).numpy()
    s = gp.mpi_scatter(np.ones((P, 2)) if r == 0 else None, root=np.int64(0),
                       rows=np.ones(P, dtype=np.int64)).numpy()
    with gp.Comm().split(np.int64(r % 2), key=np.int64(-r)) as half:
        size = half.size
    with gp.Comm().cart(dims=np.array([P, 1])) as cart:
        dims = cart.dims
    parallel_assert(np.array_equal(b, [P - 1.0] * 2) and np.array_equal(got, [(r - 1) % P] * 2)
                    and g.shape == ((P if r == 0 else 0), 2) and s.shape == (1, 2)
                    and size == len(range(r % 2, P, 2)) and dims == (P, 1))
