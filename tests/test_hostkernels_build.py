"""The host build of kernels/heat.cu: flags for the machine with a portable fallback, the host
loops the solver runs (many steps per call, persistent halo requests)."""
import ctypes
import gc
import stat
import weakref

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad import halo, kernelbuild
from gpumpiad.backend import to_numpy
from gpumpiad.heat import Grid, hostkernels, solve

needs_host = pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")


def fake_compiler(tmp_path, refuse_march):
    """A compiler wrapper that logs its arguments and, if told to, refuses -march."""
    real = kernelbuild._compiler()
    log = tmp_path / "calls.log"
    script = tmp_path / "fake-c++"
    refuse = ('for a in "$@"; do case "$a" in -march=*) echo "error: unrecognized '
              'command-line option $a" >&2; exit 1;; esac; done\n') if refuse_march else ""
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{refuse}exec "{real}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def build_with(monkeypatch, tmp_path, compiler, march=None):
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if march is None:
        monkeypatch.delenv("GPUMPIAD_HOST_MARCH", raising=False)
    else:
        monkeypatch.setenv("GPUMPIAD_HOST_MARCH", march)
    monkeypatch.setattr(hostkernels, "_built", {})
    path = hostkernels._build()
    return path, dict(hostkernels._built)


def step_with(path, dtype=np.float64):
    """One forward step by the library at ``path`` over rows of 45 cells (in float64 the
    512-bit loop's vectors, then its scalar tail)."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, f"host_heat_step_{np.dtype(dtype).name}")
    real = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2 + [real] * 2 + [ctypes.c_int] * 4
    rng = np.random.default_rng(3)
    u, kappa, f = (rng.random((35, 47)).astype(dtype) for _ in range(3))
    out = np.zeros_like(u)
    fn(u.ctypes.data, kappa.ctypes.data, f.ctypes.data, out.ctypes.data, 33, 45, 0.23, 1e-3,
       1, 34, 1, 46)
    return out


@needs_host
def test_portable_fallback_when_the_compiler_refuses_march(monkeypatch, tmp_path):
    compiler, log = fake_compiler(tmp_path, refuse_march=True)
    path, info = build_with(monkeypatch, tmp_path, compiler)
    assert info["march"] == "portable" and "-march=native" not in info["flags"]
    assert "unrecognized" in info["refused"]
    assert path.exists() and path.with_name(path.name).parent == tmp_path / "cache" / "gpumpiad"
    calls = log.read_text().splitlines()
    assert len(calls) == 3           # --version, the refused native build, the portable one
    # The refusal is remembered: the next process goes straight to the cached portable build.
    path_again, _ = build_with(monkeypatch, tmp_path, compiler)
    assert path_again == path and log.read_text().splitlines()[3:] == ["--version"]


def adjoint_with(path, dtype=np.float64):
    """One adjoint step with κ̄ and f̄ by the library at ``path`` over rows of 45 cells (in
    float64 the 512-bit loop's vectors, then its scalar tail): lam, kappa_bar, f_bar."""
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, f"host_heat_adjoint_{np.dtype(dtype).name}")
    real = ctypes.c_double if dtype == np.float64 else ctypes.c_float
    fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int] * 2 + [real] * 2
                   + [ctypes.c_int] * 5)
    rng = np.random.default_rng(4)
    lam_next, kappa, u, kb, fb = (rng.random((23, 47)).astype(dtype) for _ in range(5))
    lam = np.zeros_like(u)
    fn(lam_next.ctypes.data, kappa.ctypes.data, u.ctypes.data, lam.ctypes.data, kb.ctypes.data,
       fb.ctypes.data, 21, 45, 0.23, 1e-3, 1, 22, 1, 46, 3)
    return lam, kb, fb


@needs_host
def test_native_build_by_default_and_portable_when_forced(monkeypatch, tmp_path):
    compiler, log = fake_compiler(tmp_path, refuse_march=False)
    native, info = build_with(monkeypatch, tmp_path, compiler)
    assert info["march"] == "native" and "-march=native" in info["flags"]
    assert info["refused"] is None and info["cpu"]
    portable, info = build_with(monkeypatch, tmp_path, compiler, march="portable")
    assert info["march"] == "portable" and portable != native
    assert not any("-march" in line for line in log.read_text().splitlines()[-1:])
    # No contraction into fused multiply-adds: the two builds compute the same bits.
    for dtype in (np.float32, np.float64):
        assert np.array_equal(step_with(native, dtype), step_with(portable, dtype))
        assert all(np.array_equal(a, b) for a, b in
                   zip(adjoint_with(native, dtype), adjoint_with(portable, dtype)))
    with pytest.raises(ValueError, match="GPUMPIAD_HOST_MARCH must be one of"):
        build_with(monkeypatch, tmp_path, compiler, march="fastest")


@needs_host
def test_pad_copies_and_reports_min_max_and_nonfinite():
    for dtype in (np.float32, np.float64):
        src = np.arange(12, dtype=dtype).reshape(3, 4) - 5
        dst = np.full((5, 6), 7, dtype)
        assert hostkernels.pad(src, dst) == (-5.0, 6.0, 0)
        assert np.array_equal(dst[1:-1, 1:-1], src) and (dst[0] == 7).all()
        src[1, 2], src[2, 0] = np.nan, -np.inf
        assert hostkernels.pad(src, dst) == (-5.0, 6.0, 2)
        src[0, 0] = np.nan
        assert hostkernels.pad(src, dst)[2] == 3
    with pytest.raises(ValueError, match="does not fill the interior"):
        hostkernels.pad(np.zeros((3, 3)), np.zeros((5, 6)))


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pad_of_rows_in_vector_lanes_and_tails_matches_numpy(dtype):
    """Row widths below, at and past a 32-byte register, non-finite values anywhere."""
    rng = np.random.default_rng(8)
    for nx, ny in ((1, 1), (3, 7), (2, 8), (4, 9), (5, 17), (33, 40)):
        for count in (0, 1, 3):
            src = rng.standard_normal((nx, ny)).astype(dtype)
            for _ in range(count):
                src[rng.integers(nx), rng.integers(ny)] = rng.choice([np.nan, np.inf, -np.inf])
            dst = np.zeros((nx + 2, ny + 2), dtype)
            finite = src[np.isfinite(src)]
            want = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            got = hostkernels.pad(src, dst)
            assert got == (*want, int(src.size - finite.size)), (nx, ny, count)
            assert np.array_equal(dst[1:-1, 1:-1], src, equal_nan=True)


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pad_of_a_3d_field_fills_every_interior_plane_and_no_ghost(dtype):
    """A 3-D field's planes each into their padded plane, rows below, at and past a vector
    register, non-finite values in any plane: NumPy's copy and statistics; every ghost cell
    (the first and last planes, each plane's ring) keeps its value."""
    rng = np.random.default_rng(9)
    for shape in ((1, 1, 1), (2, 3, 7), (3, 1, 8), (4, 5, 17), (6, 7, 40)):
        for count in (0, 1, 3):
            src = rng.standard_normal(shape).astype(dtype)
            for _ in range(count):
                src[tuple(rng.integers(n) for n in shape)] = rng.choice([np.nan, np.inf])
            dst = np.full(tuple(n + 2 for n in shape), 7, dtype)
            finite = src[np.isfinite(src)]
            want = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            assert hostkernels.pad(src, dst) == (*want, int(src.size - finite.size)), shape
            expected = np.full(dst.shape, 7, dtype)
            expected[1:-1, 1:-1, 1:-1] = src
            assert np.array_equal(dst, expected, equal_nan=True), (shape, count)
    with pytest.raises(ValueError, match="does not fill the interior"):
        hostkernels.pad(np.zeros((3, 3, 3)), np.zeros((5, 5, 6)))


def wrapped(a, wrap):
    """``a``'s ghosts along the wrapped axes filled as a self-exchange would."""
    if wrap[0]:
        a[0, 1:-1], a[-1, 1:-1] = a[-2, 1:-1], a[1, 1:-1]
    if wrap[1]:
        a[1:-1, 0], a[1:-1, -1] = a[1:-1, -2], a[1:-1, 1]
    return a


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wrap", [(False, False), (True, False), (False, True), (True, True)])
def test_many_steps_per_call_give_the_bits_of_single_steps(dtype, wrap):
    rng = np.random.default_rng(5)
    shape = (13, 9)
    kappa, f = (rng.random(shape).astype(dtype) for _ in range(2))
    # Kept states in their own buffers, the others in two buffers in turn.
    first = rng.random(shape).astype(dtype)
    a, b, kept = np.zeros_like(first), np.zeros_like(first), np.zeros_like(first)
    states = [first, a, b, kept, a, b, a]
    loop = hostkernels.Loop(kappa, f, 0.21, 0.003, wrap)
    loop.steps(states)
    u = first.copy()
    history = []
    for _ in range(6):
        nxt = np.zeros_like(u)
        hostkernels.step(wrapped(u, wrap), kappa, f, nxt, 0.21, 0.003, 1, 12, 1, 8)
        history.append(u)
        u = nxt
    wrapped(u, wrap)
    assert np.array_equal(kept, history[3]) and np.array_equal(states[-1], u)
    one = np.zeros_like(first)
    loop.step(history[2], one)
    assert np.array_equal(one[1:-1, 1:-1], history[3][1:-1, 1:-1])
    # The adjoint with wrapped ghosts equals wrapping, then the plain adjoint.
    lam_next, lam, kb, fb = (rng.random(shape).astype(dtype) for _ in range(4))
    want = [lam.copy(), kb.copy(), fb.copy()]
    hostkernels.adjoint(wrapped(lam_next.copy(), wrap), kappa, u, *want, 0.21, 0.003, 1, 12,
                        1, 8)
    loop.adjoint(lam_next, u, lam, kb, fb)
    assert all(np.array_equal(g, w) for g, w in zip((lam, kb, fb), want))



def test_loop_holds_its_fields_given_as_temporaries():
    # The kernels read kappa and f through the addresses the loop took: fields that only the
    # loop refers to must stay alive and unchanged, whatever memory is allocated afterwards.
    fields = [np.ones((6, 5)), np.zeros((6, 5))]
    alive = [weakref.ref(a) for a in fields]
    loop = hostkernels.Loop(*fields, 0.2, 1e-3)
    del fields
    gc.collect()
    assert all(ref() is not None for ref in alive)
    del loop
    gc.collect()
    assert all(ref() is None for ref in alive)
    rng = np.random.default_rng(6)
    shape = (258, 258)
    kappa, f, first = (rng.random(shape) for _ in range(3))
    loop = hostkernels.Loop(kappa.copy(), f.copy(), 0.2, 1e-3)
    gc.collect()
    clutter = [np.full(shape, np.nan) for _ in range(8)]
    states = [first, np.zeros(shape), np.zeros(shape)]
    loop.steps(states)
    want = [first, np.zeros(shape), np.zeros(shape)]
    hostkernels.Loop(kappa, f, 0.2, 1e-3).steps(want)
    assert np.array_equal(states[-1], want[-1]) and len(clutter) == 8


def test_loop_refuses_no_states_and_depths_it_cannot_run():
    kappa, f = np.ones((6, 5)), np.zeros((6, 5))
    with pytest.raises(ValueError, match="steps needs the first state"):
        hostkernels.Loop(kappa, f, 0.1, 1e-3).steps([])
    for depths in ((0, 2), (2, 0), (2, 3), (65, 2), (2, 66), (2, 2 ** 32), (2 ** 31, 2),
                   (2.0, 2), (True, 2)):
        with pytest.raises(ValueError, match="depths must be"):
            hostkernels.Loop(kappa, f, 0.1, 1e-3, depths=depths)
    top = hostkernels.MAX_DEPTH
    assert hostkernels.Loop(kappa, f, 0.1, 1e-3, depths=(top, top)).depths == (top, top)


@pytest.mark.parametrize("periodic", [False, True])
def test_persistent_exchange_after_free_is_an_error(periodic):
    grid = Grid((4, 3), periodic=periodic)
    u = np.arange(30.0).reshape(grid.padded_shape)
    exchange = halo.Persistent(grid, u.dtype)
    assert exchange.exchange(u) is u
    exchange.free()
    with pytest.raises(RuntimeError, match="rank 0: halo.Persistent.exchange after free"):
        exchange.exchange(u)
    exchange.free()


def splits(size):
    return [(size, 1), (1, size)] if size > 1 else [(1, 1)]


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_persistent_exchange_fills_the_ghosts_as_the_exchange_does():
    comm = MPI.COMM_WORLD
    failures = []
    for periodic in ((False, False), (True, False), (False, True), (True, True)):
        for dims in splits(comm.size):
            with Grid((9, 7), dims=dims, periodic=periodic) as grid:
                rng = np.random.default_rng(comm.rank)
                with halo.Persistent(grid, np.float64) as persistent:
                    for _ in range(3):
                        a = rng.random(grid.padded_shape)
                        b = a.copy()
                        persistent.exchange(a)
                        halo.exchange(b, grid)
                        if not np.array_equal(a, b):
                            failures.append(f"periodic {periodic}, dims {dims}")
    parallel_assert(not failures, f"persistent exchange differs: {failures}")


@needs_host
@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_host_loops_match_the_reference_kernels_values_and_gradients():
    """The solver's host loops (one call for many steps on one rank, persistent requests
    across ranks) against the NumPy reference kernels' time loop, with stored states and
    with checkpoints, physical and periodic sides, and a trajectory."""
    comm = MPI.COMM_WORLD
    failures = []
    for periodic in ((False, False), (True, False), (True, True)):
        for dims in splits(comm.size):
            with Grid((10, 8), dims=dims, periodic=periodic) as grid:
                rng = np.random.default_rng(7 + comm.rank)
                u0, f = rng.random(grid.local_shape), rng.random(grid.local_shape)
                kappa = 0.5 + rng.random(grid.local_shape)
                w = rng.standard_normal(grid.local_shape)
                h = min(grid.h)
                dt = 0.1 * h * h
                for checkpoints in (None, 3):
                    results = {}
                    for backend in ("host", "numpy"):
                        def objective(*a):
                            out, traj = solve(*a, dt, h, 7, grid=grid, boundary=0.5,
                                              checkpoints=checkpoints, trajectory=True,
                                              backend=backend)
                            return gpumpiad.mpi_sum((out * out * w).sum() + traj.sum())

                        args = [gpumpiad.tensor(a, distributed=True) for a in (u0, kappa, f)]
                        value, grads = gpumpiad.value_and_grad(objective, argnums=(0, 1, 2))(
                            *args)
                        results[backend] = [to_numpy(value)] + [to_numpy(g) for g in grads]
                    for got, want in zip(results["host"], results["numpy"]):
                        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
                        if not err <= 1e-13:
                            failures.append(f"periodic {periodic}, dims {dims}, checkpoints "
                                            f"{checkpoints}: relative difference {err:.2e}")
    parallel_assert(not failures, "\n".join(failures))


@needs_host
@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_host_loop_gradients_pass_check_grad():
    comm = MPI.COMM_WORLD
    for periodic in ((False, False), (True, True)):
        with Grid((7, 6), dims=(comm.size, 1), periodic=periodic) as grid:
            rng = np.random.default_rng(11 + comm.rank)
            u0, f = rng.random(grid.local_shape), rng.random(grid.local_shape)
            kappa = 0.5 + rng.random(grid.local_shape)
            h = min(grid.h)

            def objective(u_, k_, s_):
                out = solve(u_, k_, s_, 0.1 * h * h, h, 5, grid=grid, checkpoints=2,
                            backend="host")
                return gpumpiad.mpi_sum((out * out).sum())

            gpumpiad.check_grad(objective, *(gpumpiad.tensor(a, distributed=True)
                                              for a in (u0, kappa, f)), max_elements=4)


@needs_host
def test_solver_runs_one_call_for_many_steps_on_one_rank(monkeypatch):
    """On a patch no other rank borders, a forward solve is one kernel call, whatever the
    number of steps."""
    calls = []
    steps = hostkernels.Loop.steps
    single = hostkernels.Loop.step
    monkeypatch.setattr(hostkernels.Loop, "steps",
                        lambda self, states: calls.append(len(states)) or steps(self, states))
    monkeypatch.setattr(hostkernels.Loop, "step",
                        lambda self, u, v: calls.append("step") or single(self, u, v))
    rng = np.random.default_rng(1)
    u0, kappa, f = rng.random((6, 5)), 0.5 + rng.random((6, 5)), rng.random((6, 5))
    with Grid((6, 5), comm=gpumpiad.Comm(MPI.COMM_SELF), periodic=True) as grid:
        solve(u0, kappa, f, 1e-3, 0.1, 40, grid=grid, backend="host")
    assert calls == [41]


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wrap", [(False, False), (True, True)])
def test_many_adjoint_steps_per_call_give_the_bits_of_single_steps(dtype, wrap):
    rng = np.random.default_rng(9)
    shape, steps = (11, 8), 5
    kappa = (0.5 + rng.random(shape)).astype(dtype)
    f = rng.random(shape).astype(dtype)
    loop = hostkernels.Loop(kappa, f, 0.2, 0.003, wrap)
    states = [rng.random(shape).astype(dtype) for _ in range(steps)]
    traj = rng.standard_normal((steps + 1, shape[0] - 2, shape[1] - 2)).astype(dtype)
    for with_traj in (False, True):
        for grads_wanted in ((True, True), (True, False), (False, True), (False, False)):
            start = np.zeros(shape, dtype)
            start[1:-1, 1:-1] = rng.standard_normal((shape[0] - 2, shape[1] - 2))
            bars = [np.zeros(shape, dtype) if w else None for w in grads_wanted]
            want = [None if b is None else b.copy() for b in bars]
            lam, spare = start.copy(), np.zeros(shape, dtype)
            for n in range(steps - 1, -1, -1):
                loop.adjoint(lam, states[n], spare, *want)
                if with_traj:
                    spare[1:-1, 1:-1] += traj[n]
                lam, spare = spare, lam
            a, b = start.copy(), np.zeros(shape, dtype)
            read = states if grads_wanted[0] else steps
            got = loop.adjoints(a, b, read, *bars, traj if with_traj else None)
            assert got is (a if steps % 2 == 0 else b)
            assert np.array_equal(got[1:-1, 1:-1], lam[1:-1, 1:-1])
            for g, w in zip(bars, want):
                assert (g is None) == (w is None) and (g is None or np.array_equal(g, w))
    with pytest.raises(ValueError, match="traj must be a C-contiguous"):
        loop.adjoints(np.zeros(shape, dtype), np.zeros(shape, dtype), steps, None, None,
                      traj[:, ::2])
    with pytest.raises(ValueError, match="needed to accumulate kappa_bar"):
        loop.adjoints(np.zeros(shape, dtype), np.zeros(shape, dtype), steps,
                      np.zeros(shape, dtype), None)


def one_rank_gradients(shape, dtype, periodic, checkpoints, trajectory, argnums):
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    u0 = rng.random(shape).astype(dtype)
    kappa = (0.5 + rng.random(shape)).astype(dtype)
    f = rng.random(shape).astype(dtype)
    w = rng.standard_normal(shape).astype(dtype)
    h = 1.0 / max(shape)
    with Grid(shape, comm=gpumpiad.Comm(MPI.COMM_SELF), periodic=periodic) as grid:
        def objective(*a):
            out = solve(*a, 0.1 * h * h, h, 9, grid=grid, boundary=0.25,
                        checkpoints=checkpoints, trajectory=trajectory, backend="host")
            if trajectory:
                out, traj = out
                return gpumpiad.mpi_sum((out * w).sum() + (traj * traj).sum())
            return gpumpiad.mpi_sum((out * out * w).sum())

        value, grads = gpumpiad.value_and_grad(objective, argnums=argnums)(u0, kappa, f)
    grads = grads if isinstance(grads, tuple) else (grads,)
    return [to_numpy(value)] + [to_numpy(g) for g in grads]


@needs_host
def test_one_call_reverse_pass_gives_the_bits_of_the_per_step_loop(monkeypatch):
    """The one-rank reverse pass in one call against the per-step loop it replaces: the same
    bits at several sizes, periodic or not, with and without a trajectory and checkpoints,
    whatever cotangents are wanted; and the one call is made (O(1) Python calls)."""
    from gpumpiad.heat import solver

    cases = [(shape, dtype, periodic, checkpoints, trajectory, argnums)
             for shape in ((5, 4), (16, 12), (33, 40))
             for dtype in (np.float64, np.float32)
             for periodic in (False, True)
             for checkpoints in (None, 3)
             for trajectory in (False, True)
             for argnums in ((0, 1, 2), (0,), (1,), (0, 2))
             if dtype == np.float64 or shape == (16, 12)]
    calls = []
    batch = hostkernels.Loop.adjoints
    monkeypatch.setattr(hostkernels.Loop, "adjoints",
                        lambda self, *a: calls.append(1) or batch(self, *a))
    new = [one_rank_gradients(*case) for case in cases]
    batched = len(calls)
    assert batched == sum(1 for c in cases if c[3] is None or 1 not in c[5])
    monkeypatch.setattr(solver._Heat, "_adjoints_host", lambda self, *a: None)
    old = [one_rank_gradients(*case) for case in cases]
    assert len(calls) == batched
    for case, got, want in zip(cases, new, old):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w), case


@needs_host
def test_one_rank_reverse_pass_without_checkpoints_is_one_kernel_call(monkeypatch):
    calls = []
    single = hostkernels.Loop.adjoint
    monkeypatch.setattr(hostkernels.Loop, "adjoint",
                        lambda self, *a: calls.append("adjoint") or single(self, *a))
    batch = hostkernels.Loop.adjoints
    monkeypatch.setattr(hostkernels.Loop, "adjoints",
                        lambda self, *a: calls.append("adjoints") or batch(self, *a))
    one_rank_gradients((6, 5), np.float64, True, None, True, (0, 1, 2))
    assert calls == ["adjoints"]
