"""Tests for gpumpiad.heat.solve and gpumpiad.heat.Grid.

* the decomposed solve equals the one-rank solve and a plain NumPy loop, for every N x M split
  of an unevenly divided grid, with Dirichlet and with periodic boundaries;
* the linearised step and the linear multi-step map pass cross-rank dot-product tests;
* gradients with respect to u0, kappa and f pass a Taylor test and check_grad (a serial kappa
  included), and checkpointed gradients equal stored-state ones;
* differentiating some of (u0, kappa, f) gives the full gradient's components, keeping the states
  only for kappa's; a vjp's pullback through the solver runs repeatedly;
* the overlapped time loop (the GPU's) gives the sequential loop's bits; the kept state buffers
  respect their limit; a host reverse pass that makes its states again by segments (on its own
  patch, or exchanging halos) gives the bits of every state kept, and the solver segments only
  states that outgrow the caches, with one length on every rank;
* Grid.gather/scatter round-trip every split, root and dtype;
* unstable dt, mismatched patches, ranks disagreeing on the time loop, too-small grids and bad
  gather/scatter arguments raise on every rank;
* several solves in one loss on patches one row or one cell thick keep their results (the NumPy
  loop's value, check_grad);
* a non-finite boundary, a negative kappa and a bad scalar on any rank raise on every rank;
  Grid takes NumPy integers and refuses floats and bools; a grid that is no Grid, or a freed
  one, is named as such.
"""
import math
import os
from functools import lru_cache

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad.backend import to_numpy
from gpumpiad.heat import Grid, hostkernels, load_state, recompute_steps, save_state, solve, solver
from gpumpiad.heat.grid import split_sizes
from gpumpiad.heat.solver import _cost, _spine

NX, NY, STEPS = 13, 11, 20
H = 1.0 / (NX + 1)
DT = 0.1 * H * H


def splits(size):
    return [(n, size // n) for n in range(1, size + 1) if size % n == 0]


def boundary(x, y):
    return 1.0 + x - 2.0 * y * y


def global_problem(seed=0, nx=NX, ny=NY):
    rng = np.random.default_rng(seed)
    return rng.random((nx, ny)), 0.5 + rng.random((nx, ny)), rng.random((nx, ny))


def numpy_reference(u0, kappa, f, dt, h, steps):
    nx, ny = u0.shape
    x = np.arange(nx + 2) / (nx + 1)
    y = np.arange(ny + 2) / (ny + 1)
    p = boundary(x[:, None], y[None, :])
    p[1:-1, 1:-1] = u0
    for _ in range(steps):
        lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * p[1:-1, 1:-1]
        p[1:-1, 1:-1] = p[1:-1, 1:-1] + dt / h**2 * kappa * lap + dt * f
    return p[1:-1, 1:-1]


def dist(a):
    return gpumpiad.tensor(a, distributed=True)


def kept_states(monkeypatch):
    """A list to which every reverse pass of a solve appends how many states it holds."""
    kept, vjp = [], solver._Heat.vjp

    def counting_vjp(self, *a):
        kept.append(len(self.states))
        return vjp(self, *a)

    monkeypatch.setattr(solver._Heat, "vjp", counting_vjp)
    return kept


def global_dot(a, b):
    return MPI.COMM_WORLD.allreduce(float(np.vdot(to_numpy(a), to_numpy(b))))


# --------------------------------------------------------------------------------------------
# serial
# --------------------------------------------------------------------------------------------

def test_split_sizes_gives_extra_cells_to_the_first_patches():
    assert split_sizes(13, 4) == [4, 3, 3, 3]
    assert split_sizes(11, 1) == [11]


def test_revolve_cost_is_the_binomial_optimum():
    @lru_cache(maxsize=None)
    def best(t, c):
        if t <= 1:
            return 0
        if c == 1:
            return t * (t - 1) // 2
        return min(m + best(t - m, c - 1) + best(m, c) for m in range(1, t))

    for t in range(1, 40):
        for c in range(1, 8):
            assert _cost(t, c) == best(t, c), (t, c)
    assert _spine(10, 1) == [0]
    assert recompute_steps(100, None) == 0
    assert recompute_steps(20, 20) == 0


# --------------------------------------------------------------------------------------------
# forward: decomposed solve == one-rank solve == NumPy loop
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_decomposed_solve_matches_single_rank_and_numpy():
    u0, kappa, f = global_problem()
    expected = numpy_reference(u0, kappa, f, DT, H, STEPS)
    alone = solve(u0, kappa, f, DT, H, STEPS, boundary=boundary).numpy()
    parallel_assert(np.allclose(alone, expected, rtol=0, atol=1e-13 * np.abs(expected).max()))
    for dims in splits(MPI.COMM_WORLD.size):
        grid = Grid((NX, NY), dims=dims)
        u, traj = solve(grid.local(u0), grid.local(kappa), grid.scatter(f), DT, H, STEPS,
                        grid=grid, boundary=boundary, trajectory=True)
        whole = to_numpy(grid.gather(u, root=None))
        err = np.abs(whole - alone).max() / np.abs(alone).max()
        parallel_assert(err <= 1e-13, f"dims {dims}: relative difference {err:.2e}")
        parallel_assert(traj.shape == (STEPS + 1,) + grid.local_shape and
                        np.array_equal(traj.numpy()[0], grid.local(u0)) and
                        np.array_equal(traj.numpy()[-1], u.numpy()))
        root = grid.gather(u, root=0)
        parallel_assert((root is None) == (MPI.COMM_WORLD.rank != 0))


def periodic_reference(u0, kappa, f, dt, h, steps, periodic):
    """The NumPy loop with wrap-around ghosts along the periodic axes, ``boundary`` values on
    the others (at the cell spacing of that axis)."""
    nx, ny = u0.shape
    x = np.arange(nx + 2) / (nx if periodic[0] else nx + 1)
    y = np.arange(ny + 2) / (ny if periodic[1] else ny + 1)
    p = boundary(x[:, None], y[None, :])
    p[1:-1, 1:-1] = u0
    for _ in range(steps):
        if periodic[0]:
            p[0, 1:-1], p[-1, 1:-1] = p[-2, 1:-1], p[1, 1:-1]
        if periodic[1]:
            p[1:-1, 0], p[1:-1, -1] = p[1:-1, -2], p[1:-1, 1]
        lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * p[1:-1, 1:-1]
        p[1:-1, 1:-1] = p[1:-1, 1:-1] + dt / h**2 * kappa * lap + dt * f
    return p[1:-1, 1:-1]


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_periodic_solve_matches_numpy_for_every_split():
    u0, kappa, f = global_problem(6)
    for periodic in ((True, True), (True, False), (False, True)):
        expected = periodic_reference(u0, kappa, f, DT, H, STEPS, periodic)
        for dims in splits(MPI.COMM_WORLD.size):
            with Grid((NX, NY), dims=dims, periodic=periodic) as grid:
                parallel_assert(grid.periodic == periodic and grid.h == tuple(
                    1.0 / (n if p else n + 1) for n, p in zip((NX, NY), periodic)))
                u = solve(grid.local(u0), grid.local(kappa), grid.local(f), DT, H, STEPS,
                          grid=grid, boundary=boundary)
                whole = grid.gather(u, root=None)
            err = np.abs(whole - expected).max() / np.abs(expected).max()
            parallel_assert(err <= 1e-13, f"periodic {periodic}, dims {dims}: relative "
                                          f"difference {err:.2e} from the NumPy loop")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_overlapped_time_loop_gives_the_same_bits(monkeypatch):
    """The time loop that updates the cells away from exchanged ghosts while the halos travel
    (the one asynchronous kernels run: CUDA) gives the same forward and gradient, bit for bit,
    as the one that exchanges and then sweeps, for every split, with physical and periodic
    sides, and with patches one cell thick."""
    comm = MPI.COMM_WORLD
    cases = [((NX, NY), periodic) for periodic in ((False, False), (True, False), (True, True))]
    cases.append(((comm.size, comm.size), (False, True)))
    for shape, periodic in cases:
        for dims in splits(comm.size):
            with Grid(shape, dims=dims, periodic=periodic) as grid:
                args = [dist(grid.local(a)) for a in global_problem(9, *shape)]
                same = overlap_keeps_the_bits(monkeypatch, grid, args, DT, 6, boundary, 3)
                parallel_assert(same, f"shape {shape}, dims {dims}, periodic {periodic}: the "
                                      "overlapped loop differs")


def overlap_keeps_the_bits(monkeypatch, grid, args, dt, steps, boundary, checkpoints):
    """Whether a weighted objective of a solve and its gradients have the same bits with the
    interior overlapped (kernels marked asynchronous) as with exchange-then-sweep."""
    from gpumpiad.heat.kernels import kernels_for
    kernels = kernels_for(args[0].data, ndim=grid.ndim)
    w = np.random.default_rng(grid.rank).standard_normal(grid.local_shape)

    def objective(*a):
        out = solve(*a, dt, H, steps, grid=grid, boundary=boundary, checkpoints=checkpoints)
        return gpumpiad.mpi_sum((out * out * w).sum())

    results = []
    for overlap in (False, True):
        monkeypatch.setattr(kernels, "ASYNCHRONOUS", overlap, raising=False)
        value, grads = gpumpiad.value_and_grad(objective, argnums=(0, 1, 2))(*args)
        results.append([to_numpy(value)] + [to_numpy(g) for g in grads])
    return all(np.array_equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("shape", [(4, 3), (1, 5), (2, 1), (4, 3, 5), (1, 2, 1), (3, 1, 2)])
def test_inner_box_and_ring_cover_every_cell_once(shape):
    """The overlapped sweep's boxes: together every interior cell exactly once (the adjoint
    accumulates), and the inner box reads no ghost that a neighbour fills."""
    import itertools
    for exchanged in itertools.product((False, True), repeat=2 * len(shape)):
        inner, ring = solver._inner_and_ring(shape, exchanged)
        count = np.zeros([n + 2 for n in shape], int)
        for box in [inner] + ring:
            count[tuple(slice(a, b) for a, b in zip(box[::2], box[1::2]))] += 1
        assert (count[(slice(1, -1),) * len(shape)] == 1).all(), (shape, exchanged)
        assert count.sum() == np.prod(shape), (shape, exchanged)
        for axis, (a, b) in enumerate(zip(inner[::2], inner[1::2])):
            if a < b and all(p < q for p, q in zip(inner[::2], inner[1::2])):
                assert not (exchanged[2 * axis] and a == 1), (shape, exchanged, inner)
                assert not (exchanged[2 * axis + 1] and b == shape[axis] + 1), \
                    (shape, exchanged, inner)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_overlapped_3d_time_loop_gives_the_same_bits(monkeypatch):
    """The 3-D time loop with the interior overlapped gives the bits of exchange-then-sweep,
    for every split, physical and periodic sides, one-cell-thick patches."""
    import itertools
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(5)
    cases = [((5, 4, 3), (False, False, False)), ((5, 4, 3), (True, False, True)),
             ((comm.size, 2, comm.size), (False, True, False))]
    for shape, periodic in cases:
        fields = [rng.random(shape) + 0.5 for _ in range(3)]
        for dims in [d for d in itertools.product(range(1, comm.size + 1), repeat=3)
                     if np.prod(d) == comm.size and all(p <= n for p, n in zip(d, shape))]:
            with Grid(shape, dims=dims, periodic=periodic) as grid:
                args = [dist(grid.local(a)) for a in fields]
                same = overlap_keeps_the_bits(monkeypatch, grid, args, 0.1 * H * H, 5, 0.5, 2)
                parallel_assert(same, f"shape {shape}, dims {dims}, periodic {periodic}: the "
                                      "overlapped 3-D loop differs")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_periodic_gradients_pass_check_grad():
    comm = MPI.COMM_WORLD
    for periodic in ((True, True), (False, True)):
        with Grid((7, 6), dims=(comm.size, 1), periodic=periodic) as grid:
            u0, kappa, f = (grid.local(a) for a in global_problem(8, 7, 6))

            def objective(u_, k_, s_):
                out = solve(u_, k_, s_, DT, H, 5, grid=grid, checkpoints=2)
                return gpumpiad.mpi_sum((out * out).sum())

            report = gpumpiad.check_grad(objective, dist(u0), dist(kappa), dist(f),
                                         max_elements=4)
            parallel_assert(report["checked"] > 0)


# --------------------------------------------------------------------------------------------
# adjoint: dot-product tests across ranks
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_dot_product_linearised_step_and_linear_solve():
    comm = MPI.COMM_WORLD
    u0, kappa, f = global_problem(1)
    for dims in splits(comm.size):
        grid = Grid((NX, NY), dims=dims)
        u, k, s = grid.local(u0), grid.local(kappa), grid.local(f)
        rng = np.random.default_rng(7 + comm.rank)
        du, dk, df, y = (rng.standard_normal(grid.local_shape) for _ in range(4))
        dk *= 0.2      # solve() checks stability on dk too
        zero = np.zeros(grid.local_shape)

        # One step, linearised at (u, kappa, f): A(du, dk, df) = du + r k L(du) + r dk L(u) + dt df;
        # r dk L(u) as the difference of two solves with the non-negative parts of dk.
        up, down = (solve(u, part, zero, DT, H, 1, grid=grid, boundary=boundary).numpy()
                    for part in (np.maximum(dk, 0), np.maximum(-dk, 0)))
        a = solve(du, k, df, DT, H, 1, grid=grid).numpy() + up - down

        def step_objective(u_, k_, s_):
            out = solve(u_, k_, s_, DT, H, 1, grid=grid, boundary=boundary)
            return gpumpiad.mpi_sum((out * y).sum())

        gu, gk, gs = gpumpiad.grad(step_objective, argnums=(0, 1, 2))(dist(u), dist(k), dist(s))
        lhs, rhs = global_dot(a, y), global_dot(du, gu) + global_dot(dk, gk) + global_dot(df, gs)
        parallel_assert(abs(lhs - rhs) <= 1e-12 * abs(lhs), f"dims {dims}: {lhs} vs {rhs}")

        # STEPS steps with zero source and boundary: linear in u0.
        sx = solve(du, k, zero, DT, H, STEPS, grid=grid).numpy()
        sty = gpumpiad.grad(lambda v: gpumpiad.mpi_sum(
            (solve(v, k, zero, DT, H, STEPS, grid=grid) * y).sum()))(dist(du))
        lhs, rhs = global_dot(sx, y), global_dot(du, sty)
        parallel_assert(abs(lhs - rhs) <= 1e-12 * abs(lhs), f"dims {dims}: {lhs} vs {rhs}")


# --------------------------------------------------------------------------------------------
# gradients: Taylor test, check_grad, checkpointing
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_taylor_and_checkpointed_gradients():
    comm = MPI.COMM_WORLD
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(2))
    w = np.random.default_rng(3 + comm.rank).standard_normal(grid.local_shape)

    def objective(u_, k_, s_, checkpoints=None):
        out = solve(u_, k_, s_, DT, H, STEPS, grid=grid, boundary=boundary,
                    checkpoints=checkpoints)
        return gpumpiad.mpi_sum((out * out * w).sum())

    args = (u0, kappa, f)
    j0, grads = gpumpiad.value_and_grad(objective, argnums=(0, 1, 2))(*map(dist, args))
    j0 = float(j0)
    rng = np.random.default_rng(11 + comm.rank)
    for i, name in enumerate(("u0", "kappa", "f")):
        direction = rng.standard_normal(grid.local_shape) * (0.2 if name == "kappa" else 1.0)
        slope = global_dot(grads[i], direction)
        residuals = []
        for eps in 1e-2 * 0.5 ** np.arange(4):
            moved = list(args)
            moved[i] = args[i] + eps * direction
            residuals.append(abs(float(objective(*moved).data) - j0 - eps * slope))
        rates = np.log2(np.array(residuals[:-1]) / np.array(residuals[1:]))
        parallel_assert(np.all(np.abs(rates - 2) <= 0.1),
                        f"{name}: Taylor remainders {residuals}, rates {rates}")

    for checkpoints in (1, 3, 7, STEPS + 5):
        _, again = gpumpiad.value_and_grad(
            lambda *a: objective(*a, checkpoints=checkpoints), argnums=(0, 1, 2))(
                *map(dist, args))
        for g, h in zip(grads, again):
            parallel_assert(float(abs(g - h).max()) <= 1e-12 * float(abs(g).max()),
                            f"checkpoints={checkpoints}: gradients differ from stored states")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradient_of_some_arguments_computes_only_theirs(monkeypatch):
    """Differentiating a subset of (u0, kappa, f) gives the same components as differentiating
    all three, and only kappa's cotangent keeps the states u^n for the reverse pass."""
    comm = MPI.COMM_WORLD
    grid = Grid((NX, NY))
    args = [dist(grid.local(a)) for a in global_problem(6)]
    w = np.random.default_rng(7 + comm.rank).standard_normal(grid.local_shape)
    kept = kept_states(monkeypatch)
    for checkpoints in (None, 3):
        def objective(*a):
            out = solve(*a, DT, H, STEPS, grid=grid, boundary=boundary, checkpoints=checkpoints)
            return gpumpiad.mpi_sum((out * out * w).sum())

        full = gpumpiad.grad(objective, argnums=(0, 1, 2))(*args)
        for nums in ((0,), (1,), (2,), (0, 2), (1, 2)):
            kept.clear()
            some = gpumpiad.grad(objective, argnums=nums)(*args)
            for i, g in zip(nums, some):
                err = float(abs(to_numpy(g) - to_numpy(full[i])).max())
                parallel_assert(err <= 1e-12 * float(abs(to_numpy(full[i])).max()),
                                f"argnums {nums}, checkpoints {checkpoints}: argument {i} "
                                f"differs from the full gradient by {err:.2e}")
            stored = STEPS if checkpoints is None else checkpoints
            parallel_assert(kept == [stored if 1 in nums else 0],
                            f"argnums {nums}, checkpoints {checkpoints}: states kept {kept}")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_rank_whose_kappa_is_not_traced_joins_the_reverse_pass():
    """Only rank 0 differentiates its kappa: the others' solves have no traced argument, yet
    their reverse passes run (the adjoint's halo exchanges need every rank) and rank 0's
    gradient is its piece of the full one."""
    comm = MPI.COMM_WORLD
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(10))
    w = np.random.default_rng(11 + comm.rank).standard_normal(grid.local_shape)

    def objective(k, rank_zero_only):
        if rank_zero_only and comm.rank != 0:
            k = k.data.copy()  # a plain array of the backend: not traced on this rank
        out = solve(u0, k, f, DT, H, STEPS, grid=grid, checkpoints=3)
        return gpumpiad.mpi_sum((out * out * w).sum())

    full = gpumpiad.grad(lambda k: objective(k, False))(dist(kappa))
    mine = gpumpiad.grad(lambda k: objective(k, True))(dist(kappa))
    want = full if comm.rank == 0 else np.zeros_like(full)
    err = float(abs(mine - want).max())
    parallel_assert(err <= 1e-12 * float(abs(full).max()), f"differs by {err:.2e}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_vjp_pulls_back_through_solve_repeatedly():
    """A vjp's pullback may run several times: the solver keeps its states for it."""
    comm = MPI.COMM_WORLD
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(8))
    rng = np.random.default_rng(9 + comm.rank)
    cotangents = [rng.standard_normal(grid.local_shape) for _ in range(2)]
    for checkpoints in (None, 3):
        def run(k):
            return solve(u0, k, f, DT, H, STEPS, grid=grid, checkpoints=checkpoints)

        _, pullback = gpumpiad.vjp(run, dist(kappa))
        for c in cotangents + cotangents:
            got = pullback(c)
            want = gpumpiad.grad(lambda k: gpumpiad.mpi_sum((run(k) * c).sum()))(dist(kappa))
            err = float(abs(got - want).max())
            parallel_assert(err <= 1e-12 * float(abs(want).max()),
                            f"checkpoints {checkpoints}: pullback differs by {err:.2e}")


def test_segment_length_keeps_every_state_that_the_caches_hold(monkeypatch):
    """States that fit in eight L2 caches are all kept; more are made again by segments that
    fill about two; none where two states do not fit in that."""
    monkeypatch.setattr(solver, "_l2_cache", lambda: 1 << 20)
    assert solver._segment_length(8 << 10, 1024) == 0
    assert solver._segment_length(8 << 10, 1025) == 256
    assert solver._segment_length(600 << 10, 100) == 3
    assert solver._segment_length(2 << 20, 100) == 0
    monkeypatch.undo()
    cache = solver._l2_cache()
    assert isinstance(cache, int) and cache >= 32 << 10


def test_available_memory_is_read_from_the_host_and_the_device():
    """What the checkpointing policy asks: the host's available memory, and on the CuPy
    backend the device's free memory and its pool's cached blocks."""
    host = solver._available_memory(False)
    assert isinstance(host, int) and 0 < host <= os.sysconf("SC_PHYS_PAGES") * \
        os.sysconf("SC_PAGE_SIZE")
    if gpumpiad.backend_name() == "cupy":
        import cupy
        device = solver._available_memory(True)
        assert device >= cupy.cuda.runtime.memGetInfo()[0] > 0


@pytest.mark.parallel(nprocs=[2])
def test_ranks_that_share_a_memory_divide_it():
    """The ranks of one host name the same memory, and each may keep its share of the states
    that memory holds; ranks of different memories keep what their own holds."""
    names = MPI.COMM_WORLD.allgather(solver._memory_name(False, None))
    parallel_assert(len(set(names)) == 1, f"one host, memory names {names}")
    w = solver._WORKING_FIELDS

    def report(capacity, where):
        return dict(capacity=capacity, where=where)

    parallel_assert(solver._states_that_fit([report(30, 1), report(30, 1)]) == [11, 11])
    parallel_assert(solver._states_that_fit([report(30, 1), report(30, 2)]) == [30, 30])
    parallel_assert(solver._states_that_fit([report(-1, 1), report(w, 1)]) ==
                    [1 << 62, 0])


@pytest.mark.parallel(nprocs=[1, 2, 3])
@pytest.mark.parametrize("ndim", [2, 3])
def test_states_that_outgrow_memory_are_checkpointed_on_every_rank(monkeypatch, ndim):
    """Where a gradient's states would fill more than half the memory some rank has left,
    every rank stores as many as the tightest one holds (binomial checkpointing): the same
    bits as every state kept, and no rank waits on another's halos. The ranks share this
    host's memory; rank 0's share holds the fewest states."""
    comm = MPI.COMM_WORLD
    shape = (7, 6, 5)[:ndim]
    grid = Grid(shape, dims=(comm.size,) + (1,) * (ndim - 1))
    rng = np.random.default_rng(50)
    u0, kappa, f = (grid.local(rng.random(shape) + 0.5) for _ in range(3))
    h, steps = 0.1, 12
    dt = 0.1 * h * h
    state = math.prod(n + 2 for n in grid.local_shape) * 8

    def gradient():
        return to_numpy(gpumpiad.grad(lambda k: gpumpiad.mpi_sum(gpumpiad.sum(
            solve(u0, k, f, dt, h, steps, grid=grid, boundary=0.5) ** 2)))(dist(kappa)))

    kept = kept_states(monkeypatch)
    want = gradient()
    parallel_assert(kept == [steps], f"unlimited memory: states kept {kept}")
    monkeypatch.setattr(solver, "_MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(solver, "_available_memory", lambda device: 2 * comm.size * (
        solver._WORKING_FIELDS + 4 + comm.rank) * state)
    kept.clear()
    got = gradient()
    parallel_assert(kept == [4], f"room for 4 states on rank 0: states kept {kept}")
    parallel_assert(np.array_equal(got, want), "checkpointed gradient differs in its bits")
    monkeypatch.setattr(solver, "_available_memory", lambda device: None)
    kept.clear()
    parallel_assert(np.array_equal(gradient(), want) and kept == [steps],
                    f"memory unknown: states kept {kept}")


@pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")
@pytest.mark.skipif(gpumpiad.backend_name() == "cupy", reason="host kernels take NumPy arrays")
@pytest.mark.parallel(nprocs=[1, 2])
def test_states_made_again_by_segments_give_the_kept_states_bits(monkeypatch):
    """A host reverse pass that keeps only each segment's first state and makes the others
    again gives the bits of every state kept: Dirichlet and periodic ghosts, a trajectory, kappa
    alone or with the others, segments that do and do not divide the steps, a pullback run
    twice. Each rank solves on its own patch: the reverse loop's one-call path."""
    comm = MPI.COMM_WORLD
    steps = 11
    rng = np.random.default_rng(40 + comm.rank)
    u0, kappa, f = global_problem(12 + comm.rank)
    w = rng.standard_normal((steps + 1, NX, NY))
    kept, policy = kept_states(monkeypatch), solver._segment_length
    for periodic in ((False, False), (True, False), (True, True)):
        grid = Grid((NX, NY), comm=gpumpiad.Comm(MPI.COMM_SELF), periodic=periodic)
        for trajectory in (False, True):
            def objective(*a):
                out = solve(*a, DT, H, steps, grid=grid, boundary=boundary,
                            trajectory=trajectory, backend="host")
                u = out[1] * w if trajectory else out * out * w[0]
                return gpumpiad.mpi_sum(gpumpiad.sum(u))

            for nums in ((1,), (0, 1, 2)):
                results = {}
                for segment in (0, 2, 4, 11):
                    monkeypatch.setattr(solver, "_segment_length", lambda b, s, k=segment: k)
                    kept.clear()
                    value, grads = gpumpiad.value_and_grad(objective, argnums=nums)(
                        *map(dist, (u0, kappa, f)))
                    results[segment] = [to_numpy(value)] + [to_numpy(g) for g in grads]
                    want = steps if segment == 0 else -(-steps // segment)
                    parallel_assert(kept == [want], f"segment {segment}: states kept {kept}")
                for segment, got in results.items():
                    same = all(np.array_equal(a, b) for a, b in zip(got, results[0]))
                    parallel_assert(same, f"periodic {periodic}, trajectory {trajectory}, "
                                          f"argnums {nums}, segment {segment}: bits differ "
                                          f"from every state kept")
    monkeypatch.setattr(solver, "_segment_length", policy)

    # The policy itself, on an L2 cache made small: a segment of 4 steps, the same bits.
    grid = Grid((NX, NY), comm=gpumpiad.Comm(MPI.COMM_SELF))
    cotangents = [rng.standard_normal((NX, NY)) for _ in range(2)]
    pulled = []
    for cache in (None, 3200):
        if cache is not None:
            monkeypatch.setattr(solver, "_l2_cache", lambda c=cache: c)
        assert solver._segment_length((NX + 2) * (NY + 2) * 8, 30) == (
            0 if cache is None else 4)
        _, pullback = gpumpiad.vjp(lambda k: solve(u0, k, f, DT, H, 30, grid=grid,
                                                   backend="host"), dist(kappa))
        kept.clear()
        pulled.append([to_numpy(pullback(c)) for c in cotangents + cotangents])
        parallel_assert(kept == [30 if cache is None else 8] * 4, f"states kept {kept}")
    parallel_assert(all(np.array_equal(a, b) for a, b in zip(*pulled)) and
                    all(np.array_equal(a, b) for a, b in zip(pulled[1][:2], pulled[1][2:])),
                    "a pullback run twice through segments differs from kept states")


@pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")
@pytest.mark.skipif(gpumpiad.backend_name() == "cupy", reason="host kernels take NumPy arrays")
@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_segments_on_a_decomposed_grid_give_the_kept_states_bits(monkeypatch):
    """On patches that exchange halos, states made again by segments (halos exchanged while
    they are made) give the bits of every state kept, for every split, Dirichlet and periodic;
    the ranks take the shortest segment any of them picks, and none when one keeps all."""
    comm = MPI.COMM_WORLD
    steps = 9
    u0, kappa, f = global_problem(21)
    kept = kept_states(monkeypatch)
    for periodic in ((False, False), (True, True)):
        for dims in splits(comm.size):
            with Grid((NX, NY), dims=dims, periodic=periodic) as grid:
                w = np.random.default_rng(22 + comm.rank).standard_normal(grid.local_shape)
                args = [dist(grid.local(a)) for a in (u0, kappa, f)]

                def objective(*a):
                    out = solve(*a, DT, H, steps, grid=grid, boundary=boundary, backend="host")
                    return gpumpiad.mpi_sum((out * out * w).sum())

                results = {}
                for picks in ((0,), (2,), (5,), (3, 2, 4, 6), (4, 0, 3, 3)):
                    pick = picks[comm.rank % len(picks)]
                    monkeypatch.setattr(solver, "_segment_length", lambda b, s, k=pick: k)
                    agreed = min(picks[q % len(picks)] for q in range(comm.size))
                    kept.clear()
                    value, grads = gpumpiad.value_and_grad(objective, argnums=(0, 1, 2))(*args)
                    results[picks] = [to_numpy(value)] + [to_numpy(g) for g in grads]
                    want = steps if agreed == 0 else -(-steps // agreed)
                    parallel_assert(kept == [want], f"dims {dims}, picks {picks}: states kept "
                                                    f"{kept}, expected {want}")
                for picks, got in results.items():
                    same = all(np.array_equal(a, b) for a, b in zip(got, results[(0,)]))
                    parallel_assert(same, f"periodic {periodic}, dims {dims}, picks {picks}: "
                                          f"bits differ from every state kept")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_check_grad_with_serial_kappa_and_trajectory():
    comm = MPI.COMM_WORLD
    grid = Grid((12, 10), dims=(comm.size, 1))      # equal patches: a serial kappa fits all
    u0, _, f = (grid.local(a) for a in global_problem(4, 12, 10))
    kappa = 0.5 + np.random.default_rng(5).random(grid.local_shape)     # same on every rank
    h = 1.0 / 13
    dt = 0.1 * h * h

    def objective(u_, k_, s_):
        out, traj = solve(u_, k_, s_, dt, h, 6, grid=grid, trajectory=True, checkpoints=2)
        return gpumpiad.mpi_sum((out * out).sum() + (traj * traj).sum() * 0.1)

    report = gpumpiad.check_grad(objective, dist(u0), gpumpiad.tensor(kappa), dist(f),
                                 max_elements=3)
    parallel_assert(report["checked"] > 0)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_errors_unstable_dt_and_mismatched_patch():
    comm = MPI.COMM_WORLD
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem())
    kappa_max = comm.allreduce(float(kappa.max()), op=MPI.MAX)
    limit = H * H / (4 * kappa_max)
    with pytest.raises(ValueError, match=rf"rank {comm.rank}: dt = .* exceeds the stability "
                                         r"limit h\*\*2 / \(4 max kappa\)"):
        solve(u0, kappa, f, 1.01 * limit, H, 1, grid=grid)
    solve(u0, kappa, f, limit, H, 1, grid=grid)
    last = comm.size - 1
    bad = f[:-1] if comm.rank == last else f
    with pytest.raises(ValueError, match=rf"rank {last}: f must be this rank's patch of shape"):
        solve(u0, kappa, bad, DT, H, 1, grid=grid)
    with pytest.raises(ValueError, match="kappa has dtype float32"):
        solve(u0, kappa.astype(np.float32), f, DT, H, 1, grid=grid)
    if comm.size > 1:  # ranks marching different time loops: named, not a hang
        steps = 3 if comm.rank == last else 2
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: solve's steps differs "
                                             rf"between ranks: rank 0: 2, .*rank {last}: 3"):
            solve(u0, kappa, f, DT, H, steps, grid=grid)
        # Patches of different dtypes: their halos would not fill each other's buffers.
        dtype = np.float32 if comm.rank == last else np.float64
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: solve's dtype differs "
                                             rf"between ranks: rank 0: 'float64', .*rank "
                                             rf"{last}: 'float32'"):
            solve(*(a.astype(dtype) for a in (u0, kappa, f)), DT, H, 2, grid=grid)


@pytest.mark.parallel(nprocs=[2, 4])
def test_errors_grid_smaller_than_decomposition():
    comm = MPI.COMM_WORLD
    with pytest.raises(ValueError, match=rf"rank {comm.rank}: a grid of 1x5 cells cannot be split "
                                         rf"into 2x{comm.size // 2} patches: axis 0 has 1 cell"):
        Grid((1, 5), dims=(2, comm.size // 2))
    with pytest.raises(ValueError, match=r"dims 3x1 do not fit a communicator"):
        Grid((8, 8), dims=(3, 1))


@pytest.mark.parallel(nprocs=[1, 2])
def test_buffer_cache_keeps_at_most_its_limit_and_releases_on_zero():
    """A gradient's freed states are kept up to the limit and reused by the next solve; a
    smaller limit trims the kept buffers at once, 0 releases them all; gradients are the same."""
    grid = Grid((NX, NY))
    args = [dist(grid.local(a)) for a in global_problem(8)]

    def objective(k):
        out = solve(args[0], k, args[2], DT, H, STEPS, grid=grid, boundary=boundary)
        return gpumpiad.mpi_sum((out * out).sum())

    state_bytes = np.zeros(grid.padded_shape).nbytes
    previous = solver.set_buffer_cache(0)
    try:
        parallel_assert(solver._free_bytes["n"] == 0, "set_buffer_cache(0) kept buffers")
        g_none = to_numpy(gpumpiad.grad(objective)(args[1]))
        parallel_assert(solver._free_bytes["n"] == 0, "a gradient kept buffers above limit 0")
        solver.set_buffer_cache(5 * state_bytes)
        g_five = to_numpy(gpumpiad.grad(objective)(args[1]))
        kept = solver._free_bytes["n"]
        parallel_assert(kept == 5 * state_bytes, f"kept {kept} bytes, limit {5 * state_bytes}")
        g_again = to_numpy(gpumpiad.grad(objective)(args[1]))  # reuses the five
        parallel_assert(solver.set_buffer_cache(2 * state_bytes) == 5 * state_bytes)
        parallel_assert(solver._free_bytes["n"] <= 2 * state_bytes,
                        f"trimming to 2 buffers left {solver._free_bytes['n']} bytes")
        parallel_assert(np.array_equal(g_none, g_five) and np.array_equal(g_five, g_again),
                        "the kept buffers changed the gradient")
        for bad in (-1, 1.5, True, "1"):
            with pytest.raises(ValueError, match="set_buffer_cache needs a number of bytes"):
                solver.set_buffer_cache(bad)
    finally:
        solver.set_buffer_cache(previous)


def test_huge_finite_values_are_not_taken_for_nan_or_inf():
    """The finiteness check sums each argument first; a sum that overflows must not make huge
    but finite values an error."""
    u0, kappa, f = global_problem(3)
    for dtype, huge in ((np.float64, 1e307), (np.float32, 1e37)):
        out = solve((u0 * huge).astype(dtype), kappa.astype(dtype), f.astype(dtype), DT, H, 0)
        assert np.array_equal(to_numpy(out), (u0 * huge).astype(dtype))


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_kept_buffers_take_the_next_solves_ghost_ring():
    """States kept from one solve hold its ghost ring; a later solve of the same patch shape
    with another constant boundary, or with other sides physical, gets its own ring: results
    equal those of solves that keep no buffers."""
    u0, kappa, f = global_problem(9)
    runs = [(1.0, False), (2.0, False), (2.0, (True, False)), (2.0, False), (2.0, False)]

    def run(value, periodic):
        with Grid((NX, NY), periodic=periodic) as grid:
            args = [dist(grid.local(a)) for a in (u0, kappa, f)]

            def objective(k):
                out = solve(args[0], k, args[2], DT, H, STEPS, grid=grid, boundary=value)
                return gpumpiad.mpi_sum((out * out).sum())

            g = to_numpy(gpumpiad.grad(objective)(args[1]))
            return g, to_numpy(solve(*args, DT, H, STEPS, grid=grid, boundary=value))

    previous = solver.set_buffer_cache(0)
    try:
        fresh = [run(*r) for r in runs]
        solver.set_buffer_cache(1 << 30)
        kept = [run(*r) for r in runs]
    finally:
        solver.set_buffer_cache(previous)
    for r, (g_fresh, u_fresh), (g_kept, u_kept) in zip(runs, fresh, kept):
        parallel_assert(np.array_equal(g_fresh, g_kept) and np.array_equal(u_fresh, u_kept),
                        f"boundary {r[0]}, periodic {r[1]}: kept buffers changed the result")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_grid_gather_and_scatter_round_trip_every_split_and_dtype():
    comm = MPI.COMM_WORLD
    for dims in splits(comm.size):
        with Grid((NX, NY), dims=dims) as grid:
            base = np.arange(NX * NY).reshape(NX, NY)
            for field in (base.astype(np.float32), base.astype(np.int64), base * 1j):
                dtype = field.dtype
                for root in (0, comm.size - 1, None):
                    got = grid.gather(grid.local(field), root=root)
                    if root is None or comm.rank == root:
                        parallel_assert(got.dtype == field.dtype and np.array_equal(got, field),
                                        f"dims {dims}, {dtype}, root {root}")
                    else:
                        parallel_assert(got is None)
                    if root is not None:
                        patch = to_numpy(grid.scatter(field if comm.rank == root else None,
                                                      root=root))
                        parallel_assert(patch.dtype == field.dtype
                                        and np.array_equal(patch, grid.local(field)),
                                        f"scatter: dims {dims}, {dtype}, root {root}")


@pytest.mark.parallel(nprocs=[2, 3])
def test_grid_gather_and_scatter_errors_reach_every_rank():
    """A wrong patch, differing dtypes or a wrong field on the root raise on every rank,
    naming the rank at fault, instead of leaving the others waiting."""
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    with Grid((NX, NY)) as grid:
        good = np.zeros(grid.local_shape)
        with pytest.raises(ValueError, match=rf"Grid.gather: rank {last}'s patch has shape"):
            grid.gather(np.zeros((2, 2)) if comm.rank == last else good)
        with pytest.raises(ValueError, match=r"the patches' dtypes differ \(rank 0: float64"):
            grid.gather(good.astype(np.float32) if comm.rank == last else good)
        with pytest.raises(ValueError, match="the patch must hold numbers"):
            grid.gather(good.astype(object))
        with pytest.raises(ValueError, match=r"expected a global field of shape \(13, 11\)"):
            grid.scatter(np.zeros((3, 3)) if comm.rank == 0 else None)
        parallel_assert(np.array_equal(to_numpy(grid.gather(good + 1, root=None)),
                                       np.ones((NX, NY))))
        field = np.arange(NX * NY, dtype=float).reshape(NX, NY)
        scattered = grid.scatter(field, root=np.int64(0))
        gathered = grid.gather(good + 1, root=np.int32(last))
        parallel_assert(np.array_equal(to_numpy(scattered), grid.local(field)) and
                        (gathered is None) == (comm.rank != last))
        for bad in (True, 0.0, -1, comm.size, "0"):
            for call in (lambda: grid.gather(good, root=bad), lambda: grid.scatter(field, bad)):
                with pytest.raises(ValueError, match=rf"rank {comm.rank}: Grid.(gather|scatter)'s "
                                                     rf"root must be a rank of the grid, an int "
                                                     rf"in \[0, {comm.size}\), got"):
                    call()


# --------------------------------------------------------------------------------------------
# results of one-row patches; argument checks
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_several_solves_in_one_loss_on_one_row_patches_pass_check_grad():
    """Patches one row (or one cell) thick: a loss that chains two solves and adds a third
    keeps every solve's result (none is a view of a state buffer the next solve reuses), so
    its value is the plain NumPy loop's and its gradients match finite differences."""
    comm = MPI.COMM_WORLD
    for ny in (5, 1):
        with Grid((comm.size, ny), dims=(comm.size, 1)) as grid:
            parallel_assert(grid.local_shape == (1, ny))
            u0, kappa, f = global_problem(12, comm.size, ny)
            h = min(grid.h)
            dt = 0.1 * h * h

            def objective(u_, k_, s_):
                a = solve(u_, k_, s_, dt, h, 4, grid=grid, boundary=boundary)
                b = solve(a, k_, 2 * s_, dt, h, 3, grid=grid, checkpoints=2)
                c = solve(2 * u_, k_, s_, dt, h, 4, grid=grid)
                return gpumpiad.mpi_sum((a * b + c * c).sum())

            args = [grid.local(x) for x in (u0, kappa, f)]
            value = float(objective(*args).data)
            want = _serial_several_solves(u0, kappa, f, dt, h, comm.size, ny)
            parallel_assert(abs(value - want) <= 1e-12 * abs(want),
                            f"patches 1x{ny}: loss {value!r}, the NumPy loop gives {want!r}")
            report = gpumpiad.check_grad(objective, *map(dist, args), max_elements=3)
            parallel_assert(report["checked"] > 0)


def _serial_several_solves(u0, kappa, f, dt, h, nx, ny):
    """:func:`test_several_solves_in_one_loss_on_one_row_patches_pass_check_grad`'s loss with
    NumPy on the whole grid (its cell size ``h`` at both axes, its boundaries)."""
    x, y = np.arange(nx + 2) / (nx + 1), np.arange(ny + 2) / (ny + 1)

    def march(u, ring, source, steps):
        p = ring.copy()
        p[1:-1, 1:-1] = u
        for _ in range(steps):
            lap = p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * p[1:-1, 1:-1]
            p[1:-1, 1:-1] = p[1:-1, 1:-1] + dt / h**2 * kappa * lap + dt * source
        return p[1:-1, 1:-1]

    zero = np.zeros((nx + 2, ny + 2))
    a = march(u0, boundary(x[:, None], y[None, :]), f, 4)
    b = march(a, zero, 2 * f, 3)
    c = march(2 * u0, zero, f, 4)
    return float((a * b + c * c).sum())


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_non_finite_boundary_is_an_error_on_every_rank():
    """A NaN or Inf boundary number, a boundary function returning one on some rank's physical
    boundary, or a boundary array holding one in its used ring: an error on every rank naming
    the argument and the rank, instead of an all-NaN field. Values never read (a corner, the
    array's interior, a periodic side) are no error."""
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    grid = Grid((NX, NY), dims=(comm.size, 1))
    u0, kappa, f = (grid.local(a) for a in global_problem(13))
    for value in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: boundary must be a finite "
                                             rf"number, got {value!r}"):
            solve(u0, kappa, f, DT, H, 2, grid=grid, boundary=value)

    def nan_on_the_south(x, y):
        return np.where(x >= 1.0, np.nan, 1.0 + 0 * y)

    with pytest.raises(ValueError, match=rf"rank {last}: boundary function g\(x, y\) returned "
                                         r"NaN or Inf in the ghost cells of this rank's physical "
                                         r"boundary \(side\(s\) south"):
        solve(u0, kappa, f, DT, H, 2, grid=grid, boundary=nan_on_the_south)
    ring = np.ones(grid.padded_shape)
    if comm.rank == 0:
        ring[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"rank 0: boundary array holds NaN or Inf .*side\(s\) "
                                         r"west"):
        solve(u0, kappa, f, DT, H, 2, grid=grid, boundary=ring)
    # Unread values: the corners, the interior, the ring along a periodic axis.
    ring = np.ones(grid.padded_shape)
    ring[[0, 0, -1, -1], [0, -1, 0, -1]] = np.nan
    ring[1:-1, 1:-1] = np.inf
    want = solve(u0, kappa, f, DT, H, 3, grid=grid, boundary=1.0).numpy()
    got = solve(u0, kappa, f, DT, H, 3, grid=grid, boundary=ring).numpy()
    parallel_assert(np.array_equal(got, want), "unread boundary values changed the result")
    with Grid((NX, NY), dims=(comm.size, 1), periodic=True) as wrapped:
        u = solve(*(wrapped.local(a) for a in global_problem(13)), DT, H, 3, grid=wrapped,
                  boundary=np.full(wrapped.padded_shape, np.nan))
        parallel_assert(bool(np.isfinite(u.numpy()).all()))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_negative_kappa_is_an_error_on_every_rank_and_zero_kappa_is_not():
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(14))
    bad = kappa.copy()
    if comm.rank == last:
        bad[0, 0] = -1e-3
    with pytest.raises(ValueError, match=rf"rank {comm.rank}: kappa holds negative values on "
                                         rf"rank\(s\) \[{last}\] \(min kappa = -0.001 on rank "
                                         rf"{last}\): expected kappa >= 0"):
        solve(u0, bad, f, DT, H, 2, grid=grid)
    with pytest.raises(ValueError, match=rf"rank {comm.rank}: kappa holds negative values on "
                                         rf"rank\(s\) \[0"):
        solve(u0, -kappa if comm.rank == 0 else kappa, f, DT, H, 2, grid=grid)
    # Zero diffusivity: each cell gains dt * f per step.
    u = solve(u0, np.zeros_like(kappa), f, DT, H, 4, grid=grid)
    parallel_assert(np.allclose(u.numpy(), u0 + 4 * DT * f, rtol=1e-14, atol=0))


@pytest.mark.parallel(nprocs=[2, 3])
def test_time_loops_that_differ_between_ranks_are_an_error_on_every_rank():
    """Sound arguments on every rank, but one rank's steps, checkpoints, dt or dtype differs:
    every rank names the setting and each rank's value (no hang in the halo exchange)."""
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(16))
    for name, mine, theirs in (("steps", 3, 4), ("checkpoints", None, 2), ("dt", DT, DT / 2),
                               ("dtype", "float64", "float32")):
        values = dict(steps=3, checkpoints=None, dt=DT, dtype="float64")
        values[name] = theirs if comm.rank == last else mine
        args = [a.astype(values["dtype"]) for a in (u0, kappa, f)]
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: solve's {name} differs "
                                             rf"between ranks: rank 0: {mine!r}.* rank {last}: "
                                             rf"{theirs!r}"):
            solve(*args, values["dt"], H, values["steps"], grid=grid,
                  checkpoints=values["checkpoints"])
    u = solve(u0, kappa, f, DT, H, 3, grid=grid)
    parallel_assert(np.isfinite(u.numpy()).all())


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_grid_takes_numpy_integers_and_refuses_floats_and_bools():
    comm = MPI.COMM_WORLD
    size = comm.size
    with Grid((np.int64(NX), np.int32(NY)), dims=(np.int64(size), np.int64(1))) as grid, \
            Grid((NX, NY), dims=(size, 1)) as plain:
        parallel_assert(grid.dims == plain.dims and grid.shape == plain.shape and
                        type(grid.shape[0]) is int and grid.local_shape == plain.local_shape)
    with Grid((NX, NY), dims=np.array([size, 0])) as grid:
        parallel_assert(grid.dims == (size, 1))
    for dims in ((size + 0.5, 1), (float(size), 1), (True, size), (size, np.bool_(True))):
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: dims must be two "
                                             rf"non-negative ints \(N, M\), got"):
            Grid((NX, NY), dims=dims)
    for shape in ((8.0, 8), (8, 2.5), (True, 8)):
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: grid shape must be a pair of "
                                             rf"ints \(NX, NY\), got"):
            Grid(shape)


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_solve_scalars_take_numpy_integers_and_any_rank_s_bad_one_reaches_all():
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(15))
    want = solve(u0, kappa, f, DT, H, 5, grid=grid, checkpoints=2).numpy()
    got = solve(u0, kappa, f, np.float32(DT), np.float64(H), np.int64(5), grid=grid,
                checkpoints=np.int32(2)).numpy()
    parallel_assert(np.allclose(got, want, rtol=1e-6, atol=0))
    for name, bad, words in (("steps", 5.0, "steps must be a non-negative int, got 5.0"),
                             ("steps", True, "steps must be a non-negative int, got True"),
                             ("checkpoints", 2.5, "checkpoints must be None or an int >= 1"),
                             ("dt", -DT, "dt must be a positive number")):
        values = dict(dt=DT, steps=5, checkpoints=None)
        if comm.rank == last:
            values[name] = bad
        with pytest.raises(ValueError, match=rf"rank {last}: {words}"):
            solve(u0, kappa, f, values["dt"], H, values["steps"], grid=grid,
                  checkpoints=values["checkpoints"])


@pytest.mark.parallel(nprocs=[1, 2])
def test_solve_names_a_grid_that_is_not_a_grid_or_was_freed(tmp_path):
    comm = MPI.COMM_WORLD
    grid = Grid((NX, NY))
    u0, kappa, f = (grid.local(a) for a in global_problem(16))
    with pytest.raises(TypeError, match=rf"rank {comm.rank}: solve's grid must be a "
                                        r"gpumpiad.heat.Grid .*got tuple \(2, 2\)"):
        solve(u0, kappa, f, DT, H, 2, grid=(2, 2))
    grid.free()
    freed = rf"rank {comm.rank}: (solve's grid|Grid.gather: the grid|Grid.scatter: the grid) " \
            r"was freed \(Grid.free\(\) or the end of its with block\)"
    with pytest.raises(ValueError, match=freed):
        solve(u0, kappa, f, DT, H, 2, grid=grid)
    with pytest.raises(ValueError, match=freed):
        grid.gather(u0)
    with pytest.raises(ValueError, match=freed):
        grid.scatter(np.zeros((NX, NY)))
    for call, run in (("save_state", lambda: save_state(str(tmp_path / "u"), u0, grid)),
                      ("load_state", lambda: load_state(str(tmp_path / "u"), grid))):
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: {call}'s grid was freed"):
            run()
    parallel_assert(grid.freed and grid.local_shape == u0.shape)
    with Grid((NX, NY)) as grid:
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: save_state's step must be an "
                                             r"int, got 2.5 \(float\)"):
            save_state(str(tmp_path / "u"), u0, grid, step=2.5)


@pytest.mark.parametrize("steps", [7, 8])
def test_kept_states_outlive_the_forward_pass(steps):
    """A one-rank gradient keeps its states (u^0's buffer apart, the others in one block) until
    its pullback runs: memory freed in between and taken by NaN-filled arrays would show in
    kappa's cotangent. Compared with checkpointing every step, which stores each state in its
    own buffer: the same bits."""
    n, h = 300, 1.0 / 301
    u0, kappa, f = global_problem(12, n, n)
    dt = 0.1 * h * h
    cotangent = np.random.default_rng(4).standard_normal((n, n))

    def run(k, checkpoints=None):
        return solve(u0, k, f, dt, h, steps, checkpoints=checkpoints)

    _, pullback = gpumpiad.vjp(run, kappa)
    clutter = [np.full((n + 2, n + 2), np.nan) for _ in range(8)]
    got = to_numpy(pullback(cotangent))
    del clutter
    want = to_numpy(gpumpiad.vjp(lambda k: run(k, steps), kappa)[1](cotangent))
    assert np.isfinite(got).all() and np.array_equal(got, want)


def test_large_outputs_held_by_the_caller_keep_their_values():
    """A solve's large outputs come from a pool of buffers that nothing refers to any more:
    outputs (and views of them) the caller still holds are never handed out again, dropped
    ones are."""
    n, h = 200, 1.0 / 201
    u0, kappa, f = global_problem(13, n, n)
    dt = 0.1 * h * h
    held = [to_numpy(solve(u0 * (k + 1), kappa, f, dt, h, 3)) for k in range(6)]
    view = to_numpy(solve(u0 * 7, kappa, f, dt, h, 3))[::2]
    copies = [a.copy() for a in held] + [view.copy()]
    for k in range(6):
        solve(u0 * (k + 9), kappa, f, dt, h, 3)      # outputs dropped at once
    assert len({id(a) for a in held}) == 6
    assert all(np.array_equal(a, c) for a, c in zip(held + [view], copies))
    del held, view
    address = to_numpy(solve(u0, kappa, f, dt, h, 3)).__array_interface__["data"][0]
    again = to_numpy(solve(u0, kappa, f, dt, h, 3))
    assert again.__array_interface__["data"][0] == address      # the dropped one's memory


@pytest.mark.skipif(gpumpiad.backend_name() == "cupy", reason="host buffers")
def test_repeated_gradients_make_no_new_padded_buffers(monkeypatch):
    """Every padded buffer a one-rank gradient takes (u^0's among them) goes back to the kept
    buffers, so the next gradient of the same shape makes none."""
    u0, kappa, f = global_problem(14)

    def objective(k):
        return gpumpiad.mpi_sum((solve(u0, k, f, DT, H, STEPS) ** 2).sum())

    gradient = gpumpiad.grad(objective)
    gradient(kappa)
    made = []
    host_buffer = solver._host_buffer

    def counting(shape, dtype, count=None):
        made.append(tuple(shape))
        return host_buffer(shape, dtype, count)

    monkeypatch.setattr(solver, "_host_buffer", counting)
    want = to_numpy(gradient(kappa))
    padded = (NX + 2, NY + 2)
    assert padded not in made, f"{made.count(padded)} new padded buffer(s)"
    solver.set_buffer_cache(solver.set_buffer_cache(0))
    gradient(kappa)
    assert padded in made, "the count misses the buffers a gradient makes"
    monkeypatch.undo()
    assert np.array_equal(to_numpy(gradient(kappa)), want)


def test_large_host_buffers_start_at_staggered_offsets_and_go_back_to_the_cache():
    """Host buffers of 128 KiB and more (each of a block too) start on a cache line at offsets
    from a page boundary that differ between consecutive buffers; they own their memory for the
    buffer cache, which keeps them and hands them out again, while their views stay out."""
    shape = (130, 130)
    ones = [solver._host_buffer(shape, np.float64) for _ in range(3)]
    block = solver._host_buffer(shape, np.float64, 4)
    buffers = ones + list(block)
    offsets = [b.ctypes.data % 4096 for b in buffers]
    assert all(b.shape == shape and b.flags.c_contiguous for b in buffers)
    assert all(o % 64 == 0 for o in offsets) and len(set(offsets)) == len(offsets), offsets
    assert block.strides[0] >= block[0].nbytes
    for k, b in enumerate(block):
        b[...] = k
    assert [float(b.min()) for b in block] == [float(b.max()) for b in block] == [0, 1, 2, 3]
    small = solver._host_buffer((10, 10), np.float64)
    assert small.base is None and small.flags.c_contiguous
    previous = solver.set_buffer_cache(0)
    try:
        solver.set_buffer_cache(1 << 30)
        for a in (ones[0][1:-1], block[0]):
            solver._recycle(a, None)
        assert solver._free_bytes["n"] == 0, "a view went to the buffer cache"
        solver._recycle(ones[0], None)
        solver._recycle(block, None)
        assert solver._take(solver._kind(ones[0]))[0] is ones[0]
        assert solver._take(solver._kind(block))[0] is block
    finally:
        solver.set_buffer_cache(0)
        solver.set_buffer_cache(previous)


@pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")
@pytest.mark.skipif(gpumpiad.backend_name() == "cupy", reason="host kernels take NumPy arrays")
@pytest.mark.parametrize("segment", [0, 3])
def test_staggered_state_blocks_give_the_bits_of_plain_arrays(monkeypatch, segment):
    """A one-rank gradient whose kept states (segment 0) or states made again (segments of 3)
    lie in one block of staggered buffers, each state's ghost ring from a non-zero boundary,
    gives the bits of the same gradient over NumPy's arrays."""
    n, steps, h = 180, 7, 1.0 / 181
    u0, kappa, f = global_problem(15, n, n)
    dt = 0.1 * h * h
    monkeypatch.setattr(solver, "_segment_length", lambda nbytes, steps: segment)

    def gradient():
        solver.set_buffer_cache(solver.set_buffer_cache(0))
        _, pullback = gpumpiad.vjp(
            lambda k: solve(u0, k, f, dt, h, steps, boundary=0.75), kappa)
        return to_numpy(pullback(np.ones((n, n))))

    staggered = gradient()
    monkeypatch.setattr(solver, "_STAGGER_MIN_BYTES", 1 << 62)
    plain = gradient()
    assert np.isfinite(staggered).all() and np.array_equal(staggered, plain)
