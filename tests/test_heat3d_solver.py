"""Acceptance tests of gpumpiad.heat.solve on 3-D grids, against NumPy on the whole grid.

* values equal the 7-point NumPy loop on the global padded grid (constant, function and array
  boundaries; periodic along some axes; every factoring of the ranks into three axes, uneven
  patches; the trajectory too), and a one-rank solve without a grid;
* gradients with respect to u0, kappa and f equal the global reference adjoint loop and central
  finite differences of the global objective (check_grad included, a serial kappa too);
* the gathered result and gradients do not depend on the decomposition (nor on having a grid);
* a Taylor test of kappa's gradient shows second-order remainders;
* checkpointed gradients (and the trajectory's cotangents) equal those of stored states;
* an unstable dt (the 3-D limit h**2 / (6 max kappa)), a 2-D u0, a NaN boundary and mixed
  dtypes raise on every rank;
* the "numpy" and "host" kernels agree.
"""
import re

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad.backend import to_numpy
from gpumpiad.heat import hostkernels, hostkernels3d, solve, stencil3d
from gpumpiad.heat.kernels import kernels_for

SHAPE = (7, 6, 5)
H = 1.0 / (SHAPE[0] + 1)
DT = 0.1 * H * H
STEPS = 4
PERIODICS = ((False, False, False), (True, False, True), (False, True, False))


def _host_kernels_missing():
    try:
        kernels_for(np.zeros((3, 3, 3)), "host", ndim=3)
    except Exception as exc:  # noqa: BLE001 - any failure means: no 3-D host build here
        return f"no 3-D host build of the heat kernels here ({type(exc).__name__}: {exc})"
    return None


HOST_MISSING = _host_kernels_missing()


@pytest.fixture(autouse=True)
def bounded_waits():
    """A rank left waiting on the others raises CommunicationTimeout instead of hanging."""
    gpumpiad.set_timeout(120)
    yield
    gpumpiad.set_timeout(None)


def factorings(size):
    return [(a, b, size // (a * b)) for a in range(1, size + 1) for b in range(1, size + 1)
            if size % (a * b) == 0]


def problem(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return rng.random(shape), 0.5 + rng.random(shape), rng.random(shape)


def g(x, y, z):
    return 1.0 + x - 2.0 * y * y + 0.5 * z


def spacing(shape, periodic):
    return tuple(1.0 / (n if p else n + 1) for n, p in zip(shape, periodic))


def global_ring(boundary, shape, periodic):
    """The global padded array whose ghost cells hold the Dirichlet values of ``boundary``."""
    padded = tuple(n + 2 for n in shape)
    if callable(boundary):
        x, y, z = (np.arange(n + 2) * h for n, h in zip(shape, spacing(shape, periodic)))
        return np.broadcast_to(boundary(x[:, None, None], y[None, :, None], z[None, None, :]),
                               padded).astype(float)
    if np.ndim(boundary) == 0:
        return np.full(padded, float(boundary))
    return np.array(boundary, dtype=float)


def rank_boundary(grid, boundary):
    """What a rank passes as ``boundary``: an array becomes its padded window of the global
    padded array."""
    if callable(boundary) or np.ndim(boundary) == 0:
        return boundary
    return boundary[tuple(slice(o, o + n + 2) for o, n in zip(grid.offset, grid.local_shape))
                    ].copy()


def pad(u, ring, periodic):
    """``u`` inside ``ring``'s ghosts, the ghosts of periodic axes wrapped around."""
    p = ring.copy()
    p[stencil3d.interior] = u
    wrapped = np.pad(u, [(1, 1) if wraps else (0, 0) for wraps in periodic], mode="wrap")
    p[tuple(slice(None) if wraps else slice(1, -1) for wraps in periodic)] = wrapped
    return p


def reference(u0, kappa, f, dt, h, steps, ring, periodic):
    """The global forward loop: final state, padded states u^0 .. u^{steps-1}, trajectory."""
    zero = np.zeros_like(ring)
    r = dt / h**2
    k, s = pad(kappa, zero, periodic), pad(f, zero, periodic)
    p = pad(u0, ring, periodic)
    states, traj = [], [u0.copy()]
    for _ in range(steps):
        states.append(p)
        new = np.zeros_like(p)
        stencil3d.step(p, k, s, new, r, dt)
        traj.append(new[stencil3d.interior].copy())
        p = pad(new[stencil3d.interior], ring, periodic)
    return traj[-1], states, np.array(traj)


def reference_adjoint(states, kappa, dt, h, w, periodic, w_traj=None):
    """The global reverse loop (stencil3d.adjoint) for the cotangent ``w`` of the final state
    and ``w_traj`` of the trajectory: the cotangents of (u0, kappa, f)."""
    zero = np.zeros_like(states[0])
    r = dt / h**2
    k = pad(kappa, zero, periodic)
    lam = w + (0 if w_traj is None else w_traj[-1])
    kappa_bar, f_bar = np.zeros_like(zero), np.zeros_like(zero)
    for n in reversed(range(len(states))):
        out = np.zeros_like(zero)
        stencil3d.adjoint(pad(lam, zero, periodic), k, states[n], out, kappa_bar, f_bar, r, dt)
        lam = out[stencil3d.interior] + (0 if w_traj is None else w_traj[n])
    return lam, kappa_bar[stencil3d.interior], f_bar[stencil3d.interior]


def dist(a):
    return gpumpiad.tensor(a, distributed=True)


def global_dot(a, b):
    return MPI.COMM_WORLD.allreduce(float(np.vdot(to_numpy(a), to_numpy(b))))


def relative(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def objective_for(grid, w, steps=STEPS, boundary=g, **options):
    def objective(u_, k_, s_):
        out = solve(u_, k_, s_, DT, H, steps, grid=grid, boundary=boundary, **options)
        return gpumpiad.mpi_sum((out * w).sum())
    return objective


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_values_match_the_global_reference_for_every_factoring_and_boundary():
    comm = MPI.COMM_WORLD
    u0, kappa, f = problem(0)
    table = np.random.default_rng(1).standard_normal(tuple(n + 2 for n in SHAPE))
    failures = []
    for periodic in PERIODICS:
        for name, boundary in (("constant", 0.7), ("function", g), ("array", table)):
            ring = global_ring(boundary, SHAPE, periodic)
            want, _, want_traj = reference(u0, kappa, f, DT, H, STEPS, ring, periodic)
            for dims in factorings(comm.size):
                with gpumpiad.Grid(SHAPE, dims=dims, periodic=periodic) as grid:
                    u, traj = solve(grid.local(u0), grid.local(kappa), grid.scatter(f), DT, H,
                                    STEPS, grid=grid, boundary=rank_boundary(grid, boundary),
                                    trajectory=True)
                    whole = grid.gather(u, root=None)
                    window = (slice(None),) + grid.slices()
                    traj = to_numpy(traj)
                    if traj.shape != (STEPS + 1,) + grid.local_shape:
                        failures.append(f"{name}, periodic {periodic}, dims {dims}: trajectory "
                                        f"shape {traj.shape}")
                        continue
                    err = max(relative(whole, want), relative(traj, want_traj[window]))
                    if err > 1e-12:
                        failures.append(f"{name} boundary, periodic {periodic}, dims {dims}: "
                                        f"relative difference {err:.2e} from the NumPy loop")
    # No grid: each rank solves the whole domain alone.
    want, _, _ = reference(u0, kappa, f, DT, H, STEPS, global_ring(g, SHAPE, PERIODICS[0]),
                           PERIODICS[0])
    alone = to_numpy(solve(u0, kappa, f, DT, H, STEPS, boundary=g))
    if relative(alone, want) > 1e-12:
        failures.append(f"grid=None: relative difference {relative(alone, want):.2e}")
    parallel_assert(not failures, "\n".join(failures))


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradients_match_the_global_adjoint_and_do_not_depend_on_the_decomposition():
    """The cotangents of (u0, kappa, f) for J = sum(w * u) equal the global reference adjoint
    for every factoring; the gathered result and cotangents are the same on every factoring
    (and, on one rank with Dirichlet sides, without a grid)."""
    comm = MPI.COMM_WORLD
    u0, kappa, f = problem(2)
    w = np.random.default_rng(3).standard_normal(SHAPE)
    table = np.random.default_rng(9).standard_normal(tuple(n + 2 for n in SHAPE))
    failures = []
    for periodic, boundary in (((False, False, False), table), ((True, False, True), g)):
        out, states, _ = reference(u0, kappa, f, DT, H, STEPS,
                                   global_ring(boundary, SHAPE, periodic), periodic)
        want = [out, *reference_adjoint(states, kappa, DT, H, w, periodic)]
        runs = {}
        alone = comm.size == 1 and not any(periodic)
        for dims in factorings(comm.size) + ([None] if alone else []):
            if dims is None:        # no grid: one rank, the whole domain
                u, pullback = gpumpiad.vjp(
                    lambda *a: solve(*a, DT, H, STEPS, boundary=boundary),
                    *map(dist, (u0, kappa, f)), argnums=(0, 1, 2))
                runs[dims] = [to_numpy(x) for x in (u, *pullback(w))]
                continue
            with gpumpiad.Grid(SHAPE, dims=dims, periodic=periodic) as grid:
                local = rank_boundary(grid, boundary)
                u, pullback = gpumpiad.vjp(
                    lambda *a: solve(*a, DT, H, STEPS, grid=grid, boundary=local),
                    *(dist(grid.local(a)) for a in (u0, kappa, f)), argnums=(0, 1, 2))
                runs[dims] = [grid.gather(x, root=None) for x in (u, *pullback(grid.local(w)))]
        first = next(iter(runs))
        for dims, got in runs.items():
            for name, a, b, c in zip(("u", "u0_bar", "kappa_bar", "f_bar"), got, want,
                                     runs[first]):
                if relative(a, b) > 1e-12:
                    failures.append(f"periodic {periodic}, dims {dims}: {name} differs from "
                                    f"the reference by {relative(a, b):.2e}")
                if relative(a, c) > 1e-13:
                    failures.append(f"periodic {periodic}: {name} on dims {dims} differs from "
                                    f"dims {first} by {relative(a, c):.2e}")
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradients_match_finite_differences_of_the_global_objective():
    """Central differences along random distributed directions, and check_grad's element-wise
    ones, on an uneven decomposition with a periodic axis; and with a serial kappa."""
    comm = MPI.COMM_WORLD
    periodic = (False, True, False)
    dims = factorings(comm.size)[-1]
    with gpumpiad.Grid(SHAPE, dims=dims, periodic=periodic) as grid:
        args = [grid.local(a) for a in problem(4)]
        rng = np.random.default_rng(5 + comm.rank)
        w = rng.standard_normal(grid.local_shape)
        objective = objective_for(grid, w)
        _, grads = gpumpiad.value_and_grad(objective, argnums=(0, 1, 2))(*map(dist, args))
        failures = []
        for i, name in enumerate(("u0", "kappa", "f")):
            for _ in range(3):
                d = rng.standard_normal(grid.local_shape) * (0.2 if name == "kappa" else 1.0)
                eps = 1e-4
                values = []
                for sign in (1, -1):
                    moved = list(args)
                    moved[i] = args[i] + sign * eps * d
                    values.append(float(objective(*moved).data))
                fd = (values[0] - values[1]) / (2 * eps)
                ad = global_dot(grads[i], d)
                if abs(fd - ad) > 1e-8 * max(abs(ad), 1.0):
                    failures.append(f"{name}: reverse mode {ad!r}, finite differences {fd!r}")
        parallel_assert(not failures, "\n".join(failures))
        report = gpumpiad.check_grad(objective, *map(dist, args), max_elements=2)
        parallel_assert(report["checked"] > 0)
    _serial_kappa_gradient_is_the_total_over_ranks()


def _serial_kappa_gradient_is_the_total_over_ranks():
    """Every rank solves the whole domain alone (no grid) with its own u0, f and weights and
    the same, serial kappa: kappa's gradient is the sum of the ranks' reference adjoints, the
    same on every rank; check_grad agrees."""
    comm = MPI.COMM_WORLD
    shape = (4, 3, 5)
    _, kappa, _ = problem(6, shape)
    periodic = (False,) * 3
    ring = global_ring(g, shape, periodic)

    def rank_problem(q):
        u0, _, f = problem(100 + q, shape)
        return u0, f, np.random.default_rng(200 + q).standard_normal(shape)

    u0, f, w = rank_problem(comm.rank)

    def objective(u_, k_, s_):
        out = solve(u_, k_, s_, DT, H, STEPS, boundary=g)
        return gpumpiad.mpi_sum((out * w).sum())

    grads = gpumpiad.grad(objective, argnums=(0, 1, 2))(dist(u0), gpumpiad.tensor(kappa),
                                                       dist(f))
    want_kappa = np.zeros(shape)
    for q in range(comm.size):
        uq, fq, wq = rank_problem(q)
        _, states, _ = reference(uq, kappa, fq, DT, H, STEPS, ring, periodic)
        bars = reference_adjoint(states, kappa, DT, H, wq, periodic)
        want_kappa += bars[1]
        if q == comm.rank:
            mine = bars
    errors = [relative(to_numpy(grads[0]), mine[0]), relative(to_numpy(grads[1]), want_kappa),
              relative(to_numpy(grads[2]), mine[2])]
    parallel_assert(max(errors) <= 1e-12, f"(u0, kappa, f) relative errors {errors}")
    report = gpumpiad.check_grad(objective, dist(u0), gpumpiad.tensor(kappa), dist(f),
                                 max_elements=2)
    parallel_assert(report["checked"] > 0)


# --------------------------------------------------------------------------------------------
# Taylor test, checkpointing
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_taylor_remainder_of_kappa_decays_at_second_order():
    comm = MPI.COMM_WORLD
    with gpumpiad.Grid(SHAPE) as grid:
        u0, kappa, f = (grid.local(a) for a in problem(10))
        rng = np.random.default_rng(11 + comm.rank)
        w = rng.standard_normal(grid.local_shape)
        objective = objective_for(grid, w, steps=6)
        j0, g_kappa = gpumpiad.value_and_grad(objective, argnums=1)(u0, dist(kappa), f)
        j0 = float(j0)
        delta = 0.1 * rng.standard_normal(grid.local_shape)
        slope = global_dot(g_kappa, delta)
        residuals = []
        for eps in 0.2 * 0.5 ** np.arange(5):
            value = float(objective(u0, kappa + eps * delta, f).data)
            residuals.append(abs(value - j0 - eps * slope))
    rates = np.log2(np.array(residuals[:-1]) / np.array(residuals[1:]))
    parallel_assert(bool(np.all(np.abs(rates - 2) <= 0.1)),
                    f"Taylor remainders {residuals}, rates {rates}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_checkpointed_gradients_and_trajectory_cotangents_equal_stored_states():
    comm = MPI.COMM_WORLD
    steps = 6
    periodic = (True, False, False)
    u0, kappa, f = problem(12)
    rng = np.random.default_rng(13)
    w = rng.standard_normal(SHAPE)
    v = rng.standard_normal((steps + 1,) + SHAPE)
    _, states, _ = reference(u0, kappa, f, DT, H, steps, global_ring(g, SHAPE, periodic),
                             periodic)
    want = reference_adjoint(states, kappa, DT, H, w, periodic, w_traj=v)
    failures = []
    for dims in factorings(comm.size)[::2]:
        with gpumpiad.Grid(SHAPE, dims=dims, periodic=periodic) as grid:
            args = [dist(grid.local(a)) for a in (u0, kappa, f)]
            w_local = grid.local(w)
            v_local = v[(slice(None),) + grid.slices()].copy()

            def objective(u_, k_, s_, checkpoints=None, trajectory=False):
                out = solve(u_, k_, s_, DT, H, steps, grid=grid, boundary=g,
                            checkpoints=checkpoints, trajectory=trajectory)
                if not trajectory:
                    return gpumpiad.mpi_sum((out * w_local).sum())
                out, traj = out
                return gpumpiad.mpi_sum((out * w_local).sum() + (traj * v_local).sum())

            for trajectory in (False, True):
                stored = [to_numpy(x) for x in gpumpiad.grad(
                    lambda *a: objective(*a, trajectory=trajectory), argnums=(0, 1, 2))(*args)]
                if trajectory:
                    whole = [grid.gather(x, root=None) for x in stored]
                    for name, a, b in zip(("u0", "kappa", "f"), whole, want):
                        if relative(a, b) > 1e-12:
                            failures.append(f"dims {dims}: with the trajectory, {name}'s "
                                            f"gradient differs from the reference adjoint by "
                                            f"{relative(a, b):.2e}")
                for k in (1, 2, 3):
                    again = gpumpiad.grad(
                        lambda *a: objective(*a, checkpoints=k, trajectory=trajectory),
                        argnums=(0, 1, 2))(*args)
                    for name, a, b in zip(("u0", "kappa", "f"), again, stored):
                        err = relative(to_numpy(a), b)
                        if err > 1e-13:
                            failures.append(f"dims {dims}, trajectory {trajectory}, "
                                            f"checkpoints {k}: {name}'s gradient differs from "
                                            f"the stored states' by {err:.2e}")
    parallel_assert(not failures, "\n".join(failures))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_bad_arguments_raise_on_every_rank():
    """Each check raises on every rank (a rank that went on would leave the others waiting:
    bounded_waits turns that into an error too)."""
    _unstable_dt_names_the_3d_limit()
    _a_2d_u0_on_a_3d_grid_is_a_shape_error()
    _nan_boundary_on_a_physical_side_is_an_error()
    _mixed_float32_and_float64_are_an_error()
    _nonfinite_and_negative_arguments_name_their_ranks()


def _unstable_dt_names_the_3d_limit():
    """The limit is h**2 / (6 max kappa) with the maximum over all ranks: a dt 1 % above it
    (still below the 2-D limit h**2 / (4 max kappa)) raises everywhere, 1 % below does not."""
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    with gpumpiad.Grid(SHAPE) as grid:
        u0, kappa, f = (grid.local(a) for a in problem(14))
        if comm.rank == last:
            kappa[0, 0, 0] = 3.0            # the global maximum, on one rank only
        limit = H * H / (6 * 3.0)
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: dt = .*exceeds the "
                                             r"(3-D )?stability limit") as caught:
            solve(u0, kappa, f, 1.01 * limit, H, 1, grid=grid)
        numbers = [float(s) for s in re.findall(r"\d+\.\d+(?:e[-+]?\d+)?", str(caught.value))]
        parallel_assert(any(abs(x - limit) <= 1e-12 * limit for x in numbers),
                        f"the message does not give the limit {limit!r}: {caught.value}")
        u = solve(u0, kappa, f, 0.99 * limit, H, 1, grid=grid)
        parallel_assert(u.shape == grid.local_shape)


def _a_2d_u0_on_a_3d_grid_is_a_shape_error():
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    with gpumpiad.Grid(SHAPE) as grid:
        u0, kappa, f = (grid.local(a) for a in problem(15))
        flat = u0[:, :, 0].copy()
        for bad_ranks in ([last], list(range(comm.size))):
            arg = flat if comm.rank in bad_ranks else u0
            with pytest.raises(ValueError, match=rf"rank {bad_ranks[0]}: u0 ") as caught:
                solve(arg, kappa, f, DT, H, 2, grid=grid)
            text = str(caught.value)
            expected = grid.patch_shape(grid.cart.mpi.Get_coords(bad_ranks[0]))
            parallel_assert(str(expected) in text and str(expected[:2]) in text,
                            f"the message does not name the expected shape {expected} and "
                            f"the actual one {expected[:2]}: {text}")


def _nonfinite_and_negative_arguments_name_their_ranks():
    """NaN in u0 on the first rank, Inf in f and a negative kappa on the last: found where
    solve pads the arguments (one pass with their statistics, host kernels) or by NumPy."""
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    with gpumpiad.Grid(SHAPE) as grid:
        u0, kappa, f = (grid.local(a) for a in problem(16))
        bad_u0, bad_kappa, bad_f = u0.copy(), kappa.copy(), f.copy()
        if comm.rank == 0:
            bad_u0[-1, -1, -1] = np.nan
        if comm.rank == last:
            bad_f[0, 1, 2], bad_kappa[1, 0, 0] = np.inf, -0.5
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: u0 holds NaN or Inf on "
                                             rf"rank\(s\) \[0\]; f holds NaN or Inf on "
                                             rf"rank\(s\) \[{last}\]: expected finite"):
            solve(bad_u0, kappa, bad_f, DT, H, 1, grid=grid)
        with pytest.raises(ValueError, match=rf"rank {comm.rank}: kappa holds negative values "
                                             rf"on rank\(s\) \[{last}\] \(min kappa = -0.5 "
                                             rf"on rank {last}\)"):
            solve(u0, bad_kappa, f, DT, H, 1, grid=grid)


def _nan_boundary_on_a_physical_side_is_an_error():
    """g returns NaN on the +z side (z = 1): the rank owning it is named on every rank. NaN on
    the -z side (z = 0) is no error when z is periodic: those values are never read."""
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    u0, kappa, f = problem(16)

    def nan_on_top(x, y, z):
        return np.where(z > 1.0 - 1e-9, np.nan, 1.0 + 0 * x + 0 * y)

    def nan_on_bottom(x, y, z):
        return np.where(z < 1e-9, np.nan, 1.0 + 0 * x + 0 * y)

    with gpumpiad.Grid(SHAPE, dims=(1, 1, comm.size)) as grid:
        args = [grid.local(a) for a in (u0, kappa, f)]
        with pytest.raises(ValueError, match=rf"rank {last}: boundary function g\(x, y, z\) "
                                             r"returned NaN or Inf"):
            solve(*args, DT, H, 2, grid=grid, boundary=nan_on_top)
    with gpumpiad.Grid(SHAPE, dims=(1, 1, comm.size), periodic=(False, False, True)) as grid:
        u = solve(*(grid.local(a) for a in (u0, kappa, f)), DT, H, 2, grid=grid,
                  boundary=nan_on_bottom)
        parallel_assert(bool(np.isfinite(to_numpy(u)).all()))


def _mixed_float32_and_float64_are_an_error():
    comm = MPI.COMM_WORLD
    last = comm.size - 1
    with gpumpiad.Grid(SHAPE) as grid:
        u0, kappa, f = (grid.local(a) for a in problem(17))
        with pytest.raises(ValueError, match=r"rank 0: kappa has dtype float32, expected "
                                             r"u0's float64"):
            solve(u0, kappa.astype(np.float32), f, DT, H, 2, grid=grid)
        if comm.size > 1:
            dtype = np.float32 if comm.rank == last else np.float64
            with pytest.raises(ValueError, match=rf"rank {comm.rank}: solve's dtype differs "
                                                 rf"between ranks: rank 0: 'float64', .*rank "
                                                 rf"{last}: 'float32'"):
                solve(*(a.astype(dtype) for a in (u0, kappa, f)), DT, H, 2, grid=grid)
        u32 = solve(*(a.astype(np.float32) for a in (u0, kappa, f)), DT, H, 2, grid=grid)
        parallel_assert(to_numpy(u32).dtype == np.float32)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(HOST_MISSING is not None, reason=str(HOST_MISSING))
@pytest.mark.skipif(gpumpiad.backend_name() == "cupy", reason="host kernels take NumPy arrays")
@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_host_kernels_agree_with_the_numpy_kernels(monkeypatch):
    """Values and gradients of the "host" kernels, and of the default choice (which is the
    host build when it builds), equal those of the "numpy" kernels; the host solves pad their
    arguments in the pass that checks them and bind the kernels to kappa and f once."""
    padded, bound = [], []
    pad, loop = hostkernels.pad, hostkernels3d.Loop
    monkeypatch.setattr(hostkernels, "pad", lambda src, dst: padded.append(src.ndim) or
                        pad(src, dst))
    monkeypatch.setattr(hostkernels3d, "Loop", lambda *args: bound.append(args) or loop(*args))
    comm = MPI.COMM_WORLD
    u0, kappa, f = problem(18)
    w = np.random.default_rng(19).standard_normal(SHAPE)
    failures = []
    for periodic in PERIODICS[:2]:
        for dims in factorings(comm.size)[:2]:
            with gpumpiad.Grid(SHAPE, dims=dims, periodic=periodic) as grid:
                args = [grid.local(a) for a in (u0, kappa, f)]
                results = {}
                for kernels in ("numpy", "host", None):
                    u = solve(*args, DT, H, STEPS, grid=grid, boundary=g, backend=kernels)
                    objective = objective_for(grid, grid.local(w), backend=kernels,
                                              checkpoints=2)
                    grads = gpumpiad.grad(objective, argnums=(0, 1, 2))(*map(dist, args))
                    results[kernels] = [grid.gather(x, root=None) for x in (u, *grads)]
                for backend in ("host", None):
                    for name, a, b in zip(("u", "u0_bar", "kappa_bar", "f_bar"),
                                          results[backend], results["numpy"]):
                        if relative(a, b) > 1e-12:
                            failures.append(f"backend {backend}, periodic {periodic}, dims "
                                            f"{dims}: {name} differs from numpy's by "
                                            f"{relative(a, b):.2e}")
    parallel_assert(not failures, "\n".join(failures))
    # Per grid, "host" and the default each solve twice (a solve, a gradient's): 4 x 3.
    grids = len(PERIODICS[:2]) * len(factorings(comm.size)[:2])
    parallel_assert(padded == [3] * 12 * grids,
                    f"the host solves padded {padded}, expected 3-D arguments {12 * grids} times")
    parallel_assert(len(bound) == 4 * grids,
                    f"the host solves bound their kernels {len(bound)} times, expected "
                    f"{4 * grids}")
