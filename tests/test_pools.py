"""No array a caller holds shares memory with a buffer the library reuses.

The library keeps buffers for reuse in several places: the heat solver's state buffers
(:func:`gpumpiad.heat.set_buffer_cache`), the transport's pool of host result buffers, the
pinned staging buffers of device transfers (taken here by NumPy arrays under
``GPUMPIAD_STAGE_HOST_ARRAYS=1``, with and without the CUDA-aware path) and the device pools.
Every test takes results first (solver values, trajectories, gradients with stored and
checkpointed states, vjp pullbacks, large reductions), then runs more solves and gradients of
other inputs that refill every pool, and checks that the results held did not change and share
no memory with a kept buffer, for patches of every shape: 1 x n, n x 1, 1 x 1 and larger.
"""
import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad import backend, transport
from gpumpiad.backend import to_numpy
from gpumpiad.heat import Grid, solve, solver

STEPS = 4
# Above the transport's pooling threshold (256 KiB of float64).
BIG = 1 << 16
PATHS = (("host", {}),
         ("staged", {"GPUMPIAD_STAGE_HOST_ARRAYS": "1", "GPUMPIAD_CUDA_AWARE": "0"}),
         ("direct", {"GPUMPIAD_STAGE_HOST_ARRAYS": "1", "GPUMPIAD_CUDA_AWARE": "1"}))


def splits(size):
    return [(n, size // n) for n in range(1, size + 1) if size % n == 0]


def patch_layouts(size):
    """``(grid shape, dims, patch shape)`` with every rank's patch 1 x 5, 5 x 1, 1 x 1 and 3 x 4,
    for every split of ``size`` ranks."""
    for dims in splits(size):
        for patch in ((1, 5), (5, 1), (1, 1), (3, 4)):
            yield (dims[0] * patch[0], dims[1] * patch[1]), dims, patch


def dist(a):
    return gpumpiad.tensor(a, distributed=True)


def raw(x):
    """The array a result hands its holder (a Tensor's own data, not a copy)."""
    return x.data if isinstance(x, gpumpiad.Tensor) else x


def take_results(grid, seed, check=None):
    """Every kind of array a solve hands out, and a large reduction's result; ``check(name,
    array)`` is called on each as soon as it is taken."""
    rng = np.random.default_rng([seed, MPI.COMM_WORLD.rank])
    shape = grid.local_shape
    u0, f, w = rng.random(shape), rng.random(shape), rng.standard_normal(shape)
    kappa = 0.5 + rng.random(shape)
    h = min(grid.h)
    dt = 0.1 * h * h
    held = {}

    def keep(name, x):
        held[name] = raw(x)
        if check is not None:
            check(name, held[name])

    # The vjp first: its pullback keeps its states, and every solve after it takes buffers.
    _, pullback = gpumpiad.vjp(lambda k: solve(u0, k, f, dt, h, STEPS, grid=grid), dist(kappa))
    keep("pullback", pullback(w))
    keep("pullback again", pullback(2 * w))
    del pullback
    keep("value", solve(u0, kappa, f, dt, h, STEPS, grid=grid, boundary=1.0))
    end, trajectory = solve(u0, kappa, f, dt, h, STEPS, grid=grid, boundary=1.0,
                            trajectory=True)
    keep("end", end)
    keep("trajectory", trajectory)
    keep("no steps", solve(u0, kappa, f, dt, h, 0, grid=grid))
    for checkpoints in (None, 2):
        def loss(u_, k_, s_):
            out = solve(u_, k_, s_, dt, h, STEPS, grid=grid, boundary=1.0,
                        checkpoints=checkpoints)
            return gpumpiad.mpi_sum((out * out * w).sum())

        value, grads = gpumpiad.value_and_grad(loss, argnums=(0, 1, 2))(
            dist(u0), dist(kappa), dist(f))
        keep(f"loss, checkpoints {checkpoints}", value)
        for name, g in zip(("u0", "kappa", "f"), grads):
            keep(f"gradient of {name}, checkpoints {checkpoints}", g)
    keep("large sum", gpumpiad.mpi_sum(dist(np.full(BIG, float(seed)))))
    return held


def shares_memory(a, b):
    xp = backend.get_array_module(a)
    return xp is backend.get_array_module(b) and bool(xp.shares_memory(a, b))


def kept_buffers():
    """Every state buffer the solver keeps for a later solve."""
    return [kept[0] for bucket in solver._free.values() for kept in bucket]


def use_path(monkeypatch, env):
    monkeypatch.delenv("GPUMPIAD_STAGE_HOST_ARRAYS", raising=False)
    monkeypatch.delenv("GPUMPIAD_CUDA_AWARE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Both switches are read once: forget what was read.
    monkeypatch.setattr(backend, "_stage", {})
    monkeypatch.setattr(transport, "_aware", {})


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_results_survive_every_pool_refilled(monkeypatch):
    """Results taken first stay as they were, and share no memory with a kept state buffer,
    after later solves and gradients of other inputs have taken and returned every buffer,
    on the host, staged and direct communication paths."""
    # Real device arrays take the device pools as they are; NumPy arrays take every path.
    paths = PATHS[:1] if backend.device_backend() else PATHS
    previous = solver.set_buffer_cache(1 << 30)
    failures = []
    try:
        for path, env in paths:
            use_path(monkeypatch, env)
            for shape, dims, patch in patch_layouts(MPI.COMM_WORLD.size):
                if path != "host" and dims != (MPI.COMM_WORLD.size, 1):
                    continue   # the communication paths: every patch shape, one split
                with Grid(shape, dims=dims) as grid:
                    where = f"{path} path, grid {shape}, dims {dims}, patches {patch}"
                    if grid.local_shape != patch:
                        failures.append(f"{where}: got a patch of {grid.local_shape}")

                    def at_once(name, a, where=where):
                        if any(shares_memory(a, buf) for buf in kept_buffers()):
                            failures.append(f"{where}: {name} shares memory with a state "
                                            "buffer the solver keeps for reuse")

                    held = take_results(grid, seed=1, check=at_once)
                    before = {name: to_numpy(a).copy() for name, a in held.items()}
                    take_results(grid, seed=2)
                    kept = kept_buffers()
                    if not kept:
                        failures.append(f"{where}: the solver kept no buffer to reuse")
                    for name, a in held.items():
                        if not np.array_equal(to_numpy(a), before[name]):
                            failures.append(f"{where}: {name} changed after later solves")
                        if any(shares_memory(a, buf) for buf in kept):
                            failures.append(f"{where}: {name} shares memory with a state "
                                            "buffer the solver keeps for reuse")
    finally:
        solver.set_buffer_cache(previous)
    parallel_assert(not failures, "\n".join(failures[:20]))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_chained_solves_on_one_row_patches_keep_their_values():
    """A solve's result fed to the next solve, and two solves' results combined, give the
    values of solves that keep no buffers (the earlier results are not overwritten)."""
    size = MPI.COMM_WORLD.size
    rng = np.random.default_rng(4)
    u0, kappa, f = rng.random((size, 6)), 0.5 + rng.random((size, 6)), rng.random((size, 6))
    with Grid((size, 6), dims=(size, 1)) as grid:
        h = min(grid.h)
        dt = 0.1 * h * h
        args = [grid.local(a) for a in (u0, kappa, f)]

        def chain():
            first = solve(*args, dt, h, STEPS, grid=grid)
            second = solve(first, *args[1:], dt, h, STEPS, grid=grid)
            third = solve(2 * args[0], *args[1:], dt, h, STEPS, grid=grid)
            return [to_numpy(x.data).copy() for x in (first, second, third)], \
                [x.data for x in (first, second, third)]

        previous = solver.set_buffer_cache(0)
        try:
            fresh, _ = chain()
            solver.set_buffer_cache(1 << 30)
            chain()                                  # fill the kept buffers
            _, held = chain()
        finally:
            solver.set_buffer_cache(previous)
    same = all(np.array_equal(to_numpy(a), b) for a, b in zip(held, fresh))
    parallel_assert(same, "a chained solve's result differs from the one without kept buffers")


def in_pool(a):
    """Whether ``a``'s memory is a buffer of the transport's pool of host results."""
    return any(np.shares_memory(a, base) for base in transport._pool.get(a.nbytes, ()))


@pytest.mark.skipif(gpumpiad.backend_name() == "cupy",
                    reason="the pool of host results; CuPy's results come from its own pool")
def test_large_elementwise_results_come_from_the_pool_and_keep_their_values(monkeypatch):
    """A large elementwise result, forward or reverse, is a buffer of the transport's pool; a
    result held keeps its value while later ops take buffers, and values, dtypes and gradients
    are those of plain NumPy."""
    monkeypatch.setattr(transport, "_pool", {})   # buffers other tests' results still hold
    rng = np.random.default_rng(7)
    x, y = rng.random(BIG), rng.random(BIG)
    # Four buffers of a size are kept: t * t, its two cotangent products and their sum.
    value, grad = gpumpiad.value_and_grad(lambda t: gpumpiad.sum(t * t))(x)
    np.testing.assert_array_equal(grad, 2 * x)
    assert in_pool(grad)
    del grad

    held = (gpumpiad.tensor(x) * y).data
    assert in_pool(held)
    for _ in range(2 * transport._POOL_PER_SIZE):
        later = (gpumpiad.tensor(y) + x).data
        assert not np.shares_memory(later, held)
    np.testing.assert_array_equal(held, x * y)

    for ufunc, args in ((np.add, (x.astype(np.float32), 2)), (np.multiply, (x, 3)),
                        (np.true_divide, (np.arange(BIG), 2.0)), (np.less, (x, y)),
                        (np.maximum, (x, y[:1]))):
        got, want = transport.pooled(ufunc)(*args), ufunc(*args)
        assert got.dtype == want.dtype and got.shape == want.shape, ufunc
        np.testing.assert_array_equal(got, want)
    # Anything but NumPy arrays and Python numbers goes to the ufunc as it is.
    assert transport.pooled(np.add)(x, [1.0] * BIG).shape == (BIG,)


def test_the_host_pool_reuses_a_buffer_no_array_holds_and_never_one_a_view_holds(monkeypatch):
    """The pool tells free buffers by reference count, as this interpreter counts them: a
    buffer whose arrays are all gone comes back; one a view still holds never does."""
    monkeypatch.setattr(transport, "_pool", {})
    first = transport.host_empty((BIG,), np.float64)
    address = first.ctypes.data
    del first
    again = transport.host_empty((BIG,), np.float64)
    assert again.ctypes.data == address
    view = again[::2]
    view[:] = 1.0
    del again
    for _ in range(2 * transport._POOL_PER_SIZE):
        later = transport.host_empty((BIG,), np.float64)
        assert not np.shares_memory(later, view)
        later[:] = 2.0
    assert (view == 1.0).all()


@pytest.mark.skipif(gpumpiad.backend_name() == "cupy",
                    reason="the pool of host results; CuPy's results come from its own pool")
def test_the_copies_a_pullback_holds_keep_their_values(monkeypatch):
    """vjp's copy of a large argument and an op's copy of a large factor the caller gave (pool
    buffers) keep their values, the caller's arrays overwritten, while later gradients take
    and return every buffer of the pool."""
    monkeypatch.setattr(transport, "_pool", {})
    rng = np.random.default_rng(8)
    x, w, g = rng.random(BIG), rng.random(BIG), rng.random(BIG)
    expected = g * np.cos(x) * w
    _, pullback = gpumpiad.vjp(lambda t: gpumpiad.sin(t) * w, x)
    x[:], w[:] = 0.0, 0.0
    for k in range(2 * transport._POOL_PER_SIZE):
        gpumpiad.grad(lambda t: gpumpiad.sum(gpumpiad.sin(t) * t))(np.full(BIG, float(k)))
    np.testing.assert_allclose(pullback(g), expected, rtol=1e-15)
