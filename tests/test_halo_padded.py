"""Tests for gpumpiad.halo.PaddedExchange, the in-place width-1 exchange with buffers made once:
ghosts equal to halo_exchange's for every split of the ranks into 1, 2 and 3 axes, Dirichlet
and periodic; repeated exchanges send what the array holds at each post; the adjoint direction
equals halo_exchange's reverse pass and passes the cross-rank dot-product test; messages of
other exchanges in flight are never taken for its own; the errors. And gpumpiad.halo.Persistent,
the blocking exchange with persistent requests of the host time loops: ghosts equal to
halo_exchange's over the same grids."""
import itertools
import time

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gm
from gpumpiad import halo
from gpumpiad.debug import CommunicationMismatch
from gpumpiad.heat import stencil3d

SHAPES = {1: (7,), 2: (7, 6), 3: (7, 6, 5)}
PERIODIC = {1: ((False,), (True,)),
            2: ((False, False), (True, True), (True, False)),
            3: ((False, False, False), (True, True, True), (False, True, True))}


def splits(size, d):
    """Every ``dims`` of ``d`` axes whose product is ``size``."""
    return [dims for dims in itertools.product(range(1, size + 1), repeat=d)
            if int(np.prod(dims)) == size]


def grids(size):
    """Every split of ``size`` ranks into 1, 2 and 3 axes, each Dirichlet, periodic and mixed,
    and one-cell-thick patches along a periodic axis."""
    for d in (1, 2, 3):
        for dims in splits(size, d):
            for periodic in PERIODIC[d]:
                yield SHAPES[d], dims, periodic
    yield (size, 3, 2), (size, 1, 1), (True, False, True)


def field(grid, seed):
    rng = np.random.default_rng(100 * seed + MPI.COMM_WORLD.rank)
    return rng.standard_normal(grid.padded_shape)


def reference(u, grid, adjoint=False):
    """The N-D exchange (``adjoint``: its reverse pass) of a copy of ``u``."""
    return halo._exchange_nd([u.copy()], grid, (1,) * grid.ndim, False, adjoint)[0]


class Wrapping:
    """Kernels whose ``wrap`` fills the ghosts along the flagged axes by slicing, and counts
    its calls."""

    def __init__(self):
        self.calls = []

    def wrap(self, a, *flags):
        self.calls.append(flags)
        for ghost, boundary in stencil3d.wrap_faces(a.shape, flags):
            a[ghost] = a[boundary]


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
@pytest.mark.parametrize("wrapping", [False, True], ids=["copies", "wrap"])
def test_ghosts_equal_halo_exchange_and_follow_the_data_of_each_post(wrapping):
    """Also with kernels whose ``wrap`` fills the ghosts facing the rank itself: called once
    per post exactly where an axis has one periodic patch."""
    for shape, dims, periodic in grids(MPI.COMM_WORLD.size):
        label = f"shape {shape}, dims {dims}, periodic {periodic}"
        with gm.Grid(shape, dims=dims, periodic=periodic) as grid:
            kernels = Wrapping() if wrapping else None
            ex = halo.PaddedExchange(grid, grid.padded_shape, np.float64, kernels=kernels)
            for step in range(3):
                u = field(grid, step)
                expected = gm.halo_exchange(gm.tensor(u, distributed=True), grid).numpy()
                ex.post(u)
                # What travels is what u held at the post.
                u[tuple(slice(1, -1) for _ in shape)] += 1.0
                expected[tuple(slice(1, -1) for _ in shape)] += 1.0
                ex.finish(u, verify=step == 1)
                parallel_assert(np.array_equal(u, expected),
                                f"{label}, exchange {step}: {int((u != expected).sum())} cells "
                                "differ from halo_exchange's")
            ex.free()
            if wrapping:
                own = tuple(d == 1 and p for d, p in zip(dims, periodic))
                parallel_assert(kernels.calls == ([own] * 3 if any(own) else []),
                                f"{label}: wrap calls {kernels.calls}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_persistent_exchange_ghosts_equal_halo_exchange():
    for shape, dims, periodic in grids(MPI.COMM_WORLD.size):
        label = f"shape {shape}, dims {dims}, periodic {periodic}"
        with gm.Grid(shape, dims=dims, periodic=periodic) as grid, \
                halo.Persistent(grid, np.float64) as ex:
            for step in range(3):
                u = field(grid, step)
                expected = gm.halo_exchange(gm.tensor(u, distributed=True), grid).numpy()
                parallel_assert(ex.exchange(u) is u and np.array_equal(u, expected),
                                f"{label}, exchange {step}: {int((u != expected).sum())} cells "
                                "differ from halo_exchange's")


def dot_test(grid, ex, label):
    comm = MPI.COMM_WORLD
    x, y = field(grid, 7), field(grid, 8)
    ex_x = x.copy()
    ex.post(ex_x)
    ex.finish(ex_x)
    et_y = y.copy()
    ex.post(et_y, adjoint=True)
    ex.finish(et_y, adjoint=True, verify=True)
    lhs = comm.allreduce(float(np.vdot(ex_x, y)))
    rhs = comm.allreduce(float(np.vdot(x, et_y)))
    parallel_assert(abs(lhs - rhs) <= 1e-13 * max(abs(lhs), abs(rhs), 1e-300),
                    f"{label}: <Ex, y> = {lhs!r}, <x, E'y> = {rhs!r}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_adjoint_equals_the_reverse_pass_and_passes_the_dot_product_test():
    for shape, dims, periodic in grids(MPI.COMM_WORLD.size):
        label = f"shape {shape}, dims {dims}, periodic {periodic}"
        with gm.Grid(shape, dims=dims, periodic=periodic) as grid, \
                halo.PaddedExchange(grid, grid.padded_shape, np.float64) as ex:
            for step in range(2):
                g = field(grid, 3 + step)
                expected = reference(g, grid, adjoint=True)
                ex.post(g, adjoint=True)
                ex.finish(g, adjoint=True)
                parallel_assert(np.array_equal(g, expected),
                                f"{label}, adjoint {step}: {int((g != expected).sum())} cells "
                                "differ from the N-D exchange's adjoint")
            dot_test(grid, ex, label)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_other_exchanges_in_flight_keep_their_messages():
    """A halo_exchange and a 2-D exchange, with messages of the same sizes on the same grids,
    run on odd ranks before the post and on even ranks between post and finish: each
    exchange gets its own messages."""
    rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    with gm.Grid((6, 5, 4), dims=(size, 1, 1), periodic=True) as grid, \
            gm.Grid((6, 5), dims=(size, 1), periodic=True) as flat:
        ex = halo.PaddedExchange(grid, grid.padded_shape, np.float64)
        flat_ex = halo.PaddedExchange(flat, flat.padded_shape, np.float64)
        u, w = field(grid, 1), field(grid, 2)
        a, b = field(flat, 3), field(flat, 4)
        expected_u, expected_w = reference(u, grid), reference(w, grid)
        expected_a, expected_b = reference(a, flat), reference(b, flat)
        others = {}

        def other_exchanges():
            others["w"] = gm.halo_exchange(w, grid)
            others["b"] = halo.start(b, flat).wait()

        if rank % 2:
            other_exchanges()
        ex.post(u)
        flat_ex.post(a)
        if rank % 2 == 0:
            other_exchanges()
        flat_ex.finish(a)
        ex.finish(u)
        for name, got, expected in (("PaddedExchange 3-D", u, expected_u),
                                    ("halo_exchange", others["w"], expected_w),
                                    ("PaddedExchange 2-D", a, expected_a),
                                    ("2-D start", others["b"], expected_b)):
            parallel_assert(np.array_equal(got, expected), f"{name}: wrong ghosts")
        ex.free()
        flat_ex.free()


@pytest.mark.parallel(nprocs=[1, 2])
def test_errors_name_rank_argument_expected_and_actual():
    rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    grid = gm.Grid((6, 5, 4), dims=(size, 1, 1), periodic=(True, False, False))
    padded = grid.padded_shape
    with pytest.raises(ValueError, match=rf"rank {rank}: PaddedExchange's shape must be the "
                                         rf"grid's padded shape \({padded[0]}, 7, 6\) .*got "
                                         rf"\({grid.local_shape[0]}, 5, 4\)"):
        halo.PaddedExchange(grid, grid.local_shape, np.float64)
    with pytest.raises(TypeError, match=rf"rank {rank}: PaddedExchange's device must be a bool"):
        halo.PaddedExchange(grid, padded, np.float64, device="no")
    with pytest.raises(TypeError, match=rf"rank {rank}: PaddedExchange's dtype must be a NumPy "
                                        r"dtype, got 'float65'"):
        halo.PaddedExchange(grid, padded, "float65")
    ex = halo.PaddedExchange(grid, padded, np.float64)
    u = np.zeros(padded)
    with pytest.raises(ValueError, match=rf"rank {rank}: PaddedExchange.post expects a host "
                                         rf"array of shape \({padded[0]}, 7, 6\) and dtype "
                                         r"float64 .*got a host array of shape .* and dtype "
                                         r"float32"):
        ex.post(u.astype(np.float32))
    with pytest.raises(RuntimeError, match=rf"rank {rank}: PaddedExchange.finish called with "
                                           r"no exchange posted"):
        ex.finish(u)
    ex.post(u)
    with pytest.raises(RuntimeError, match=rf"rank {rank}: PaddedExchange.post called while an "
                                           r"exchange is posted"):
        ex.post(u)
    with pytest.raises(ValueError, match=rf"rank {rank}: PaddedExchange.finish's adjoint is "
                                         r"True, but the exchange was posted with adjoint=False"):
        ex.finish(u, adjoint=True)
    ex.finish(u)
    # Ranks whose arrays differ in dtype: verified, every rank raises, none hangs.
    if size == 2:
        dtype = np.float64 if rank == 0 else np.float32
        odd = halo.PaddedExchange(grid, padded, dtype)
        with pytest.raises((CommunicationMismatch, RuntimeError), match=rf"rank {rank}: halo "
                                                                        r"exchange"):
            v = np.zeros(padded, dtype)
            odd.post(v)
            odd.finish(v, verify=True)
        odd.free()
    grid.free()
    with pytest.raises(ValueError, match=rf"rank {rank}: PaddedExchange.post: the grid was "
                                         r"freed"):
        ex.post(u)
    with pytest.raises(ValueError, match=rf"rank {rank}: PaddedExchange's grid was freed"):
        halo.PaddedExchange(grid, padded, np.float64)
    ex.free()
    ex.free()


@pytest.mark.parallel(nprocs=[2])
def test_a_stuck_finish_times_out_and_the_exchange_serves_again(monkeypatch):
    """Rank 1 posts late: rank 0's finish ends in the watchdog's CommunicationTimeout; its
    messages, left to MPI, complete when rank 1 exchanges, and the next exchange (new buffers
    and requests) fills the ghosts right on both ranks."""
    from gpumpiad import debug
    rank = MPI.COMM_WORLD.rank
    with gm.Grid((8, 3), dims=(2, 1), periodic=True) as grid:
        ex = halo.PaddedExchange(grid, grid.padded_shape, np.float64)
        u = field(grid, 1)
        monkeypatch.setitem(debug._settings, "timeout", 0.3)
        message = "no timeout"
        if rank == 0:
            ex.post(u)
            try:
                ex.finish(u)
            except gm.CommunicationTimeout as exc:
                message = str(exc)
        else:
            time.sleep(1.0)
            ex.post(u)
            ex.finish(u)
        monkeypatch.setitem(debug._settings, "timeout", 60.0)
        MPI.COMM_WORLD.Barrier()
        v = field(grid, 2)
        expected = reference(v, grid)
        ex.post(v)
        ex.finish(v, verify=True)
        ex.free()
    parallel_assert(rank == 1 or (message.startswith("rank 0: halo exchange")
                                  and "0.3 s" in message), message)
    parallel_assert(np.array_equal(v, expected), "the exchange after the timeout is wrong")
