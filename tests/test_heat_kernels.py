"""Serial tests for the heat-equation kernels (kernels/heat.cu).

* heat.cu compiles with nvcc, exporting every kernel, the adjoint kernels within 32 registers
  and without spills (NVRTC 12 and 13: tests/test_nvrtc.py);
* the NumPy reference matches an independent loop implementation and its
  adjoint is the exact transpose of the linearised step (dot-product test);
* the host (g++) build of heat.cu matches the NumPy reference, for every choice of the
  adjoint's cotangents;
* the CuPy launchers, driving the host build of the same kernels, match it too.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpumpiad.heat import cudakernels
from gpumpiad.heat import hostkernels, stencil
from test_heat3d_kernels import _device

DTYPES = ("float32", "float64")
OPS = ("heat_step", "heat_adjoint", "halo_pack", "halo_unpack", "copy4")
EXPECTED_KERNELS = [f"{op}_{d}" for op in OPS for d in DTYPES]
SHAPES = [(1, 1), (1, 7), (9, 1), (2, 3), (5, 5), (13, 17), (32, 31), (64, 65)]
RTOL = {np.float64: 1e-14, np.float32: 1e-6}


def _source_bytes() -> bytes:
    return importlib.resources.files("gpumpiad.kernels").joinpath("heat.cu").read_bytes()


def _rand_fields(rng, nx, ny, dtype, count):
    return [rng.standard_normal((nx + 2, ny + 2)).astype(dtype) for _ in range(count)]


def _rand_rects(rng, nx, ny, count=4):
    rects = [(1, nx + 1, 1, ny + 1), (1, 1, 1, ny + 1)]  # full and empty
    for _ in range(count):
        i0 = int(rng.integers(1, nx + 2))
        i1 = int(rng.integers(i0, nx + 2))
        j0 = int(rng.integers(1, ny + 2))
        j1 = int(rng.integers(j0, ny + 2))
        rects.append((i0, i1, j0, j1))
    return rects


def _assert_close(actual, expected, dtype):
    # Relative to the field's scale: per-cell relative error is meaningless
    # where a value happens to cancel to ~0.
    scale = max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)


# ---------------------------------------------------------------------------
# Compilation: NVRTC and nvcc
# ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_all_kernels(tmp_path):
    src = tmp_path / "heat.cu"
    src.write_bytes(_source_bytes())
    out = tmp_path / "heat.cubin"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", str(src), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    for name in EXPECTED_KERNELS:
        assert name.encode() + b"\0" in data, f"{name} missing from nvcc cubin"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_adjoint_fits_32_registers_without_spills(arch):
    path = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("bench_kernel_resources", path)
    kernel_resources = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kernel_resources
    spec.loader.exec_module(kernel_resources)
    used = kernel_resources.resources(cudakernels.source(), arch)
    for name in ("heat_adjoint_float32", "heat_adjoint_float64"):
        regs, stores, loads = used[name]
        assert regs <= 32 and (stores, loads) == (0, 0), (name, arch, used[name])


def test_cudakernels_module_imports_without_cupy():
    # Only names, grid maths and source loading: no CuPy needed.
    assert "heat_adjoint_float64" in cudakernels.KERNEL_NAMES
    assert "extern \"C\" __global__" in cudakernels.source()
    grid, block = cudakernels._grid2d(1, 101, 1, 65)
    assert block == (cudakernels.BLOCK_X, cudakernels.BLOCK_Y, 1)
    assert grid[0] * block[0] >= 64 and grid[1] * block[1] >= 100


# ---------------------------------------------------------------------------
# NumPy reference vs an independent loop implementation
# ---------------------------------------------------------------------------


def _loop_step(u, kappa, f, r, dt, i0, i1, j0, j1, out):
    for i in range(i0, i1):
        for j in range(j0, j1):
            lap = u[i + 1, j] + u[i - 1, j] + u[i, j + 1] + u[i, j - 1] - 4 * u[i, j]
            out[i, j] = u[i, j] + r * kappa[i, j] * lap + dt * f[i, j]


def _loop_adjoint(lam_next, kappa, u, r, dt, i0, i1, j0, j1, lam, kbar, fbar):
    def w(i, j):
        return kappa[i, j] * lam_next[i, j]

    for i in range(i0, i1):
        for j in range(j0, j1):
            lapw = w(i + 1, j) + w(i - 1, j) + w(i, j + 1) + w(i, j - 1) - 4 * w(i, j)
            lapu = u[i + 1, j] + u[i - 1, j] + u[i, j + 1] + u[i, j - 1] - 4 * u[i, j]
            lam[i, j] = lam_next[i, j] + r * lapw
            kbar[i, j] += r * lam_next[i, j] * lapu
            fbar[i, j] += dt * lam_next[i, j]


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (3, 1), (4, 5), (6, 3)])
def test_reference_matches_loops(shape):
    rng = np.random.default_rng(1)
    nx, ny = shape
    r, dt = 0.21, 0.013
    for i0, i1, j0, j1 in _rand_rects(rng, nx, ny):
        u, kappa, f, lam_next, kb0, fb0 = _rand_fields(rng, nx, ny, np.float64, 6)
        sentinel = np.full_like(u, 7.5)

        got = sentinel.copy()
        stencil.step(u, kappa, f, got, r, dt, i0, i1, j0, j1)
        want = sentinel.copy()
        _loop_step(u, kappa, f, r, dt, i0, i1, j0, j1, want)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)

        lam, kb, fb = sentinel.copy(), kb0.copy(), fb0.copy()
        stencil.adjoint(lam_next, kappa, u, lam, kb, fb, r, dt, i0, i1, j0, j1)
        lam_w, kb_w, fb_w = sentinel.copy(), kb0.copy(), fb0.copy()
        _loop_adjoint(lam_next, kappa, u, r, dt, i0, i1, j0, j1, lam_w, kb_w, fb_w)
        np.testing.assert_allclose(lam, lam_w, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(kb, kb_w, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(fb, fb_w, rtol=1e-14, atol=1e-14)


def test_reference_halo_matches_loops():
    rng = np.random.default_rng(2)
    nx, ny = 4, 6
    u = rng.standard_normal((nx + 2, ny + 2))
    cells = {  # (side, ghost) -> list of (i, j)
        (0, 0): [(1, j) for j in range(1, ny + 1)],
        (0, 1): [(0, j) for j in range(1, ny + 1)],
        (1, 0): [(nx, j) for j in range(1, ny + 1)],
        (1, 1): [(nx + 1, j) for j in range(1, ny + 1)],
        (2, 0): [(i, 1) for i in range(1, nx + 1)],
        (2, 1): [(i, 0) for i in range(1, nx + 1)],
        (3, 0): [(i, ny) for i in range(1, nx + 1)],
        (3, 1): [(i, ny + 1) for i in range(1, nx + 1)],
    }
    for (side, ghost), idx in cells.items():
        buf = np.full(len(idx) + 2, -1.0)
        stencil.pack(u, buf, side, ghost)
        np.testing.assert_array_equal(buf[: len(idx)], [u[c] for c in idx])
        assert np.all(buf[len(idx):] == -1.0)

        src = rng.standard_normal(len(idx))
        for add in (0, 1):
            v = u.copy()
            stencil.unpack(v, src, side, ghost, add)
            want = u.copy()
            for k, c in enumerate(idx):
                want[c] = want[c] + src[k] if add else src[k]
            np.testing.assert_array_equal(v, want)


# ---------------------------------------------------------------------------
# Adjoint = transpose of the linearised step (dot-product test)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (12, 9)])
def test_adjoint_dot_product(shape):
    rng = np.random.default_rng(3)
    nx, ny = shape
    r, dt = 0.19, 0.01
    full = (1, nx + 1, 1, ny + 1)
    I = stencil.interior
    u, kappa, f = _rand_fields(rng, nx, ny, np.float64, 3)

    def interior_only(a):
        b = np.zeros_like(a)
        b[I] = a[I]
        return b

    # Tangents on interior cells only (ghost u fixed); cotangent w with zero ghosts.
    du, dk, df, w = (interior_only(a) for a in _rand_fields(rng, nx, ny, np.float64, 4))

    # J v, the step being affine in u and f and bilinear in (kappa, u):
    # d u_new = du + r*kappa*lap(du) + r*dk*lap(u) + dt*df.
    zero = np.zeros_like(u)
    ju = np.zeros_like(u)
    stencil.step(du, kappa, zero, ju, r, dt, *full)
    lapu = np.zeros_like(u)
    lapu[I] = stencil._lap(u, *full)
    jv = ju[I] + r * dk[I] * lapu[I] + dt * df[I]

    lam, kb, fb = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
    stencil.adjoint(w, kappa, u, lam, kb, fb, r, dt, *full)

    lhs = np.dot(jv.ravel(), w[I].ravel())
    rhs = (np.dot(du[I].ravel(), lam[I].ravel()) + np.dot(dk[I].ravel(), kb[I].ravel())
           + np.dot(df[I].ravel(), fb[I].ravel()))
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)

    # Each part separately, too.
    lhs_u = np.dot(ju[I].ravel(), w[I].ravel())
    assert abs(lhs_u - np.dot(du[I].ravel(), lam[I].ravel())) <= 1e-12 * max(abs(lhs_u), 1.0)
    lhs_k = np.dot((r * dk[I] * lapu[I]).ravel(), w[I].ravel())
    assert abs(lhs_k - np.dot(dk[I].ravel(), kb[I].ravel())) <= 1e-12 * max(abs(lhs_k), 1.0)
    lhs_f = np.dot((dt * df[I]).ravel(), w[I].ravel())
    assert abs(lhs_f - np.dot(df[I].ravel(), fb[I].ravel())) <= 1e-12 * max(abs(lhs_f), 1.0)


def test_adjoint_matches_finite_differences_of_step():
    # The adjoint of u^n against an explicit Jacobian built column by column.
    rng = np.random.default_rng(4)
    nx, ny = 3, 4
    r, dt = 0.23, 0.02
    full = (1, nx + 1, 1, ny + 1)
    u, kappa, f, w = _rand_fields(rng, nx, ny, np.float64, 4)
    w[0, :] = w[-1, :] = w[:, 0] = w[:, -1] = 0.0
    n = nx * ny
    J = np.zeros((n, n))
    zero = np.zeros_like(u)
    for k in range(n):
        e = np.zeros_like(u)
        e[1 + k // ny, 1 + k % ny] = 1.0
        out = np.zeros_like(u)
        stencil.step(e, kappa, zero, out, r, dt, *full)
        J[:, k] = out[stencil.interior].ravel()
    lam, kb, fb = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
    stencil.adjoint(w, kappa, u, lam, kb, fb, r, dt, *full)
    np.testing.assert_allclose(lam[stencil.interior].ravel(),
                               J.T @ w[stencil.interior].ravel(), rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------
# Host build of heat.cu vs the NumPy reference
# ---------------------------------------------------------------------------

needs_host = pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_host_step_matches_reference(dtype, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    nx, ny = shape
    r, dt = 0.2, 0.015
    for rect in _rand_rects(rng, nx, ny):
        u, kappa, f, out0 = _rand_fields(rng, nx, ny, dtype, 4)
        got, want = out0.copy(), out0.copy()
        hostkernels.step(u, kappa, f, got, r, dt, *rect)
        stencil.step(u, kappa, f, want, r, dt, *rect)
        _assert_close(got, want, dtype)
        # Outside the sub-rectangle nothing changes.
        mask = np.ones(u.shape, bool)
        mask[rect[0]:rect[1], rect[2]:rect[3]] = False
        np.testing.assert_array_equal(got[mask], out0[mask])


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_host_adjoint_matches_reference(dtype, shape):
    rng = np.random.default_rng(hash(shape) % 2**32 + 1)
    nx, ny = shape
    r, dt = 0.17, 0.02
    for rect in _rand_rects(rng, nx, ny):
        lam_next, kappa, u, lam0, kb0, fb0 = _rand_fields(rng, nx, ny, dtype, 6)
        got = [lam0.copy(), kb0.copy(), fb0.copy()]
        want = [lam0.copy(), kb0.copy(), fb0.copy()]
        hostkernels.adjoint(lam_next, kappa, u, *got, r, dt, *rect)
        stencil.adjoint(lam_next, kappa, u, *want, r, dt, *rect)
        for g, w in zip(got, want):
            _assert_close(g, w, dtype)
        mask = np.ones(u.shape, bool)
        mask[rect[0]:rect[1], rect[2]:rect[3]] = False
        for g, a0 in zip(got, (lam0, kb0, fb0)):
            np.testing.assert_array_equal(g[mask], a0[mask])
        # Cotangents not asked for (None): the others are the same; u is not read without
        # kappa_bar.
        for kb_on, fb_on in ((True, False), (False, True), (False, False)):
            lam = lam0.copy()
            kb = kb0.copy() if kb_on else None
            fb = fb0.copy() if fb_on else None
            hostkernels.adjoint(lam_next, kappa, u if kb_on else None, lam, kb, fb, r, dt, *rect)
            _assert_close(lam, want[0], dtype)
            for g, w in ((kb, want[1]), (fb, want[2])):
                if g is not None:
                    _assert_close(g, w, dtype)


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (6, 1), (7, 4)])
def test_host_halo_matches_reference(dtype, shape):
    rng = np.random.default_rng(5)
    nx, ny = shape
    (u,) = _rand_fields(rng, nx, ny, dtype, 1)
    for side in range(4):
        n = ny if side < 2 else nx
        for ghost in (0, 1):
            got = np.full(n + 3, -1, dtype)
            want = got.copy()
            hostkernels.pack(u, got, side, ghost)
            stencil.pack(u, want, side, ghost)
            np.testing.assert_array_equal(got, want)
            buf = rng.standard_normal(n).astype(dtype)
            for add in (0, 1):
                v_got, v_want = u.copy(), u.copy()
                hostkernels.unpack(v_got, buf, side, ghost, add)
                stencil.unpack(v_want, buf, side, ghost, add)
                np.testing.assert_array_equal(v_got, v_want)


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_launchers_drive_their_kernels_correctly(monkeypatch, dtype):
    """The __global__ kernels, launched by the CuPy launchers, run on the host.

    ``get_kernel`` is replaced by the host library's extern "C" kernel of that name: host_cuda.h
    maps threadIdx/blockIdx to a 1x1 launch, so the GPU kernels' grid-stride loops cover the
    whole launch in one thread. NumPy arrays stand in for CuPy ones: the kernels' index
    arithmetic and the launchers' pointer order, scalar widths, the adjoint's ``grads`` mask
    and the arrays passed for unused pointers are checked against NumPy without a GPU.
    """
    lib = ctypes.CDLL(str(hostkernels.library_path()))
    scalars = {np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
               np.float32: ctypes.c_float, np.float64: ctypes.c_double}

    def host_kernel(name):
        fn = lib[name]

        def launch(grid, block, args):
            fn.argtypes = [ctypes.c_void_p if isinstance(a, np.ndarray) else scalars[type(a)]
                           for a in args]
            fn(*(a.ctypes.data if isinstance(a, np.ndarray) else a for a in args))
        return launch

    monkeypatch.setattr(cudakernels, "get_kernel", host_kernel)
    rng = np.random.default_rng(12)
    nx, ny = 9, 6
    r, dt = 0.2, 0.01
    rect = (2, 9, 1, 6)
    u, kappa, f, lam_next, kb0, fb0 = map(_device, _rand_fields(rng, nx, ny, dtype, 6))
    got, want = np.zeros_like(u), np.zeros_like(u)
    cudakernels.launch_step(u, kappa, f, got, r, dt, *rect)
    stencil.step(u, kappa, f, want, r, dt, *rect)
    _assert_close(got, want, dtype)
    for kb_on in (True, False):
        for fb_on in (True, False):
            g = [np.zeros_like(u), kb0.copy() if kb_on else None, fb0.copy() if fb_on else None]
            w = [np.zeros_like(u), kb0.copy() if kb_on else None, fb0.copy() if fb_on else None]
            state = u if kb_on else None
            cudakernels.launch_adjoint(lam_next, kappa, state, *g, r, dt, *rect)
            stencil.adjoint(lam_next, kappa, state, *w, r, dt, *rect)
            for a, b in zip(g, w):
                if b is not None:
                    _assert_close(a, b, dtype)
            # The stand-ins for unused pointers are inputs the kernel must not have written.
            _assert_close(lam_next, _rand_fields(np.random.default_rng(12), nx, ny, dtype, 6)[3],
                          dtype)
    for side in range(4):
        n = ny if side < 2 else nx
        for ghost in (0, 1):
            buf_g, buf_w = _device(np.zeros(n, dtype)), np.zeros(n, dtype)
            cudakernels.launch_pack(u, buf_g, side, ghost)
            stencil.pack(u, buf_w, side, ghost)
            np.testing.assert_array_equal(buf_g, buf_w)
            for add in (0, 1):
                v_g, v_w = u.copy(), u.copy()
                cudakernels.launch_unpack(v_g, buf_g, side, ghost, add)
                stencil.unpack(v_w, buf_w, side, ghost, add)
                np.testing.assert_array_equal(v_g, v_w)
    for wraps in ((True, False), (False, True), (True, True)):
        v_g, v_w = u.copy(), u.copy()
        cudakernels.launch_wrap(v_g, *wraps)
        stencil.wrap(v_w, *wraps)
        np.testing.assert_array_equal(v_g, v_w)
        assert not np.array_equal(v_w, u), wraps
    a, b, c, d = (_device(x.ravel()) for x in _rand_fields(rng, nx, ny, dtype, 4))
    cudakernels.launch_copy4(a, b, c, d)
    np.testing.assert_array_equal(d, a + b + c)


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cudakernels_grid_stride_loops_cover_each_cell_once(monkeypatch, dtype):
    """A launch of 2x2 blocks of 3x2 threads, run thread by thread on the host build.

    The rectangle is narrower than the launch along j (threads with no column) and taller
    along i (threads that loop), so a cell that the loops skipped or visited twice shows in
    ``lam`` or in the accumulated ``kappa_bar`` and ``f_bar``.
    """
    lib = ctypes.CDLL(str(hostkernels.library_path()))
    scalars = {np.int32: ctypes.c_int, np.float32: ctypes.c_float, np.float64: ctypes.c_double}
    block, grid = (3, 2), (2, 2)

    def host_kernel(name):
        fn = lib[name]

        def launch(_grid, _block, args):
            fn.argtypes = [ctypes.c_void_p if isinstance(a, np.ndarray) else scalars[type(a)]
                           for a in args]
            values = [a.ctypes.data if isinstance(a, np.ndarray) else a for a in args]
            for by in range(grid[1]):
                for bx in range(grid[0]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            lib.gpumpiad_host_thread(tx, ty, bx, by, *block, *grid)
                            fn(*values)
        return launch

    monkeypatch.setattr(cudakernels, "get_kernel", host_kernel)
    rng = np.random.default_rng(5)
    nx, ny = 9, 6
    r, dt = 0.2, 0.01
    rect = (2, 9, 1, 6)
    u, kappa, f, lam_next, kb0, fb0 = map(_device, _rand_fields(rng, nx, ny, dtype, 6))
    try:
        got, want = np.zeros_like(u), np.zeros_like(u)
        cudakernels.launch_step(u, kappa, f, got, r, dt, *rect)
        stencil.step(u, kappa, f, want, r, dt, *rect)
        _assert_close(got, want, dtype)
        for kb_on in (True, False):
            for fb_on in (True, False):
                g = [np.zeros_like(u), kb0.copy() if kb_on else None,
                     fb0.copy() if fb_on else None]
                w = [np.zeros_like(u), kb0.copy() if kb_on else None,
                     fb0.copy() if fb_on else None]
                state = u if kb_on else None
                cudakernels.launch_adjoint(lam_next, kappa, state, *g, r, dt, *rect)
                stencil.adjoint(lam_next, kappa, state, *w, r, dt, *rect)
                for a, b in zip(g, w):
                    if b is not None:
                        _assert_close(a, b, dtype)
        # 2 (ny + nx) = 30 ghost cells: more than the launch's 12 threads, which loop.
        got, want = u.copy(), u.copy()
        cudakernels.launch_wrap(got, True, True)
        stencil.wrap(want, True, True)
        np.testing.assert_array_equal(got, want)
    finally:
        lib.gpumpiad_host_thread(0, 0, 0, 0, 1, 1, 1, 1)


@needs_host
def test_host_rejects_bad_arguments():
    u = np.zeros((5, 6))
    ok = [np.zeros_like(u) for _ in range(3)]
    with pytest.raises(ValueError, match="kappa"):
        hostkernels.step(u, u.astype(np.float32), ok[0], ok[1], 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="f must be C-contiguous"):
        hostkernels.step(u, ok[0], np.asfortranarray(ok[1]), ok[2], 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="u must be float32 or float64"):
        hostkernels.step(u.astype(np.int64), ok[0], ok[1], ok[2], 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="i0"):
        hostkernels.step(u, ok[0], ok[1], ok[2], 0.1, 0.1, 0, 4, 1, 5)
    with pytest.raises(ValueError, match="u_new must not overlap u"):
        hostkernels.step(u, ok[0], ok[1], u, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="buf"):
        hostkernels.pack(u, np.zeros(2), 0, 0)
    with pytest.raises(ValueError, match="side"):
        hostkernels.unpack(u, np.zeros(8), 4, 0, 0)
    with pytest.raises(ValueError, match="u .* is needed to accumulate kappa_bar"):
        hostkernels.adjoint(u, ok[0], None, ok[1], ok[2], None, 0.1, 0.1, 1, 4, 1, 5)


GUARDED = """
import ctypes, mmap, sys
import numpy as np
from gpumpiad.heat import hostkernels, stencil

libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def guarded(a):
    # A copy of a whose last byte is the last before a page nobody may read.
    pages = -(-a.nbytes // mmap.PAGESIZE)
    memory = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert libc.mprotect(start + pages * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
    out = np.frombuffer(memory, a.dtype, a.size, pages * mmap.PAGESIZE - a.nbytes)
    out = out.reshape(a.shape)
    out[...] = a
    keep.append(memory)
    return out

def close(got, want):
    scale = max(float(np.abs(w).max()) for w in want)
    return all(np.abs(g - w).max() <= 1e-13 * scale for g, w in zip(got, want))

rng = np.random.default_rng(0)
for ny in range(1, 20):
    lam_next, kappa, u, f, kb, fb = (rng.standard_normal((6, ny + 2)) for _ in range(6))
    rect = (1, 5, 1, ny + 1)
    want = [np.zeros_like(u)]
    stencil.step(u, kappa, f, *want, 0.2, 0.01, *rect)
    got = [guarded(np.zeros_like(u))]
    hostkernels.step(*map(guarded, (u, kappa, f)), *got, 0.2, 0.01, *rect)
    assert close(got, want), ny
    loop = hostkernels.Loop(guarded(kappa), guarded(f), 0.2, 0.01)
    loop.steps([guarded(u), guarded(np.zeros_like(u)), guarded(np.zeros_like(u))])
    want = [np.zeros_like(u), kb.copy(), fb.copy()]
    stencil.adjoint(lam_next, kappa, u, *want, 0.2, 0.01, *rect)
    got = [guarded(np.zeros_like(u)), guarded(kb), guarded(fb)]
    hostkernels.adjoint(*map(guarded, (lam_next, kappa, u)), *got, 0.2, 0.01, *rect)
    assert close(got, want), ny
    lam, spare = guarded(lam_next), guarded(np.zeros_like(u))
    loop.adjoints(lam, spare, [guarded(u)] * 3, guarded(kb), guarded(fb))
print("ok")
"""


@needs_host
def test_host_kernels_touch_nothing_past_their_arrays_on_narrow_patches():
    # Every field ends right before a page nobody may touch, on patches 1 to 19 cells wide: the
    # vector loops must not load a row's first vectors where the row is shorter than them.
    proc = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode,
                                                                 proc.stderr[-2000:])


def test_cuda_launchers_refuse_outputs_that_overlap_their_inputs():
    """As the host kernels and the 3-D launchers do: a kernel writing memory it also reads
    would race (checked before any launch, so no GPU is needed)."""
    memory = np.zeros(64)
    u, shifted = _device(memory[:30].reshape(5, 6)), _device(memory[3:33].reshape(5, 6))
    ok = [_device(np.zeros((5, 6))) for _ in range(3)]
    with pytest.raises(ValueError, match="u_new must not overlap u"):
        cudakernels.launch_step(u, ok[0], ok[1], u, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="u_new must not overlap u"):
        cudakernels.launch_step(u, ok[0], ok[1], shifted, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="lam must not overlap kappa_bar"):
        cudakernels.launch_adjoint(u, ok[0], ok[1], ok[2], ok[2], None, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="f_bar must not overlap lam_next"):
        cudakernels.launch_adjoint(u, ok[0], None, ok[1], None, u, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="buf must not overlap u"):
        cudakernels.launch_pack(u, _device(memory[20:28]), 0, 0)
    with pytest.raises(ValueError, match="buf must not overlap u"):
        cudakernels.launch_unpack(u, _device(memory[20:28]), 0, 0, 0)
    flat = _device(memory[:8])
    with pytest.raises(ValueError, match="d must not overlap b"):
        cudakernels.launch_copy4(_device(np.ones(8)), flat, _device(np.ones(8)),
                                 _device(memory[4:12]))


@needs_host
def test_host_quick_checks_catch_what_the_full_checks_do():
    """The kernels' cheap first-pass checks let nothing through that the full checks refuse:
    overlaps by address range (not only the same object), read-only outputs."""
    memory = np.zeros(64)
    u, shifted = memory[:30].reshape(5, 6), memory[3:33].reshape(5, 6)
    ok = [np.zeros((5, 6)) for _ in range(3)]
    with pytest.raises(ValueError, match="u_new must not overlap u"):
        hostkernels.step(u, ok[0], ok[1], shifted, 0.1, 0.1, 1, 4, 1, 5)
    frozen = np.zeros((5, 6))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="u_new must be writable"):
        hostkernels.step(u, ok[0], ok[1], frozen, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="lam must not overlap kappa_bar"):
        hostkernels.adjoint(u, ok[0], ok[1], ok[2], ok[2], None, 0.1, 0.1, 1, 4, 1, 5)
    with pytest.raises(ValueError, match="buf must not overlap u"):
        hostkernels.pack(u, memory[20:28], 0, 0)
    with pytest.raises(ValueError, match="u must be writable"):
        hostkernels.unpack(frozen, np.zeros(8), 0, 0, 0)
    with pytest.raises(ValueError, match="d must not overlap a"):
        hostkernels.copy4(memory[:8], np.ones(8), np.ones(8), memory[1:9])
    skewed = np.frombuffer(np.zeros(31 * 8 + 1, np.uint8), np.float64, 30, 1).reshape(5, 6)
    with pytest.raises(ValueError, match="kappa must be aligned to its 8-byte elements"):
        hostkernels.step(u, skewed, ok[0], ok[1], 0.1, 0.1, 1, 4, 1, 5)


@needs_host
def test_host_kernels_take_read_only_inputs_and_numpy_ints():
    rng = np.random.default_rng(5)
    u, kappa, f = _rand_fields(rng, 6, 7, np.float64, 3)
    for a in (u, kappa, f):
        a.flags.writeable = False
    got, want = np.zeros_like(u), np.zeros_like(u)
    hostkernels.step(u, kappa, f, got, 0.1, 0.01, np.int64(1), 7, 1, np.int32(8))
    stencil.step(u, kappa, f, want, 0.1, 0.01, 1, 7, 1, 8)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    buf = np.zeros(7)
    hostkernels.pack(u, buf, np.int64(0), 0)
    np.testing.assert_array_equal(buf, u[1, 1:-1])
