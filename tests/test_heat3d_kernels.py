"""Serial tests of the 3-D heat kernels (kernels/heat3d.cu) and their launchers.

* the host (g++) build, through gpumpiad.heat.hostkernels3d, gives the NumPy reference
  gpumpiad.heat.stencil3d's bits on the whole interior and on random and one-cell-thick
  sub-boxes, in float32 and float64, for every choice of the adjoint's cotangents, and leaves
  every cell outside the box alone;
* hostkernels3d and cudakernels3d refuse bad arguments with errors naming the rank, the
  argument, what was expected and what was given;
* the CuPy launchers (gpumpiad.heat.cudakernels3d), driving the __global__ kernels of the host
  build, match the reference, and the kernels' marches and grid-stride loops cover the box
  exactly once when a launch is run thread by thread, blocks along x, y and z included;
* on the CPU model of CuPy (tests/cudamodel) the launchers queue their kernels on the current
  stream: a read from another stream without an event is a hazard, one after it is not.

heat3d.cu compiles with nvcc, every kernel within its registers and without spills (NVRTC 12
and 13: tests/test_nvrtc.py).
"""

from __future__ import annotations

import ctypes
import itertools
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

from gpumpiad.heat import cudakernels3d, hostkernels3d, stencil3d

DTYPES = (np.float32, np.float64)
SHAPES = [(1, 1, 1), (1, 5, 3), (4, 1, 6), (3, 7, 1), (6, 5, 9), (19, 4, 13), (34, 3, 5)]
MODEL_PATH = os.path.join(os.path.dirname(__file__), "cudamodel")

needs_host = pytest.mark.skipif(not hostkernels3d.available(), reason="no C++ compiler")


def _fields(rng, shape, dtype, count):
    nx, ny, nz = shape
    return [rng.standard_normal((nx + 2, ny + 2, nz + 2)).astype(dtype) for _ in range(count)]


def _boxes(rng, shape, count=4):
    """The whole interior, an empty box, one-cell-thick slabs along each axis, one cell, and
    random boxes."""
    nx, ny, nz = shape
    i, j, k = (int(rng.integers(1, n + 1)) for n in shape)
    boxes = [(1, nx + 1, 1, ny + 1, 1, nz + 1), (1, nx + 1, 2, 2, 1, nz + 1),
             (i, i + 1, 1, ny + 1, 1, nz + 1), (1, nx + 1, j, j + 1, 1, nz + 1),
             (1, nx + 1, 1, ny + 1, k, k + 1), (i, i + 1, j, j + 1, k, k + 1)]
    for _ in range(count):
        box = []
        for n in shape:
            lo = int(rng.integers(1, n + 2))
            box += [lo, int(rng.integers(lo, n + 2))]
        boxes.append(tuple(box))
    return boxes


def _outside(shape, box):
    mask = np.ones(shape, bool)
    i0, i1, j0, j1, k0, k1 = box
    mask[i0:i1, j0:j1, k0:k1] = False
    return mask


# ---------------------------------------------------------------------------
# Host build against the NumPy reference
# ---------------------------------------------------------------------------
# Exact equality: the host build is compiled with -ffp-contract=off (kernelbuild.CXXFLAGS, no
# fused multiply-adds, with or without -march=native) and no reassociation, and the per-cell
# functions add the neighbours in stencil3d's order (+i, -i, +j, -j, +k, -k, then -6u) and
# group the products as it does, so every cell is the same IEEE operations on the same values.


@needs_host
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_host_step_gives_the_references_bits(dtype, shape):
    rng = np.random.default_rng(sum(shape) * 7 + 1)
    r, dt = 0.13, 0.017
    for box in _boxes(rng, shape):
        u, kappa, f, out0 = _fields(rng, shape, dtype, 4)
        got, want = out0.copy(), out0.copy()
        hostkernels3d.step(u, kappa, f, got, r, dt, *box)
        stencil3d.step(u, kappa, f, want, r, dt, *box)
        np.testing.assert_array_equal(got, want, err_msg=str(box))
        np.testing.assert_array_equal(got[_outside(u.shape, box)], out0[_outside(u.shape, box)])


@needs_host
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_host_adjoint_gives_the_references_bits_for_every_choice_of_cotangents(dtype, shape):
    rng = np.random.default_rng(sum(shape) * 7 + 2)
    r, dt = 0.11, 0.02
    for box in _boxes(rng, shape):
        lam_next, kappa, u, lam0, kb0, fb0 = _fields(rng, shape, dtype, 6)
        outside = _outside(u.shape, box)
        for kb_on in (True, False):
            for fb_on in (True, False):
                # u None whenever kappa_bar is, and also given without it (then unread).
                for state in ((u,) if kb_on else (u, None)):
                    got = [lam0.copy(), kb0.copy() if kb_on else None,
                           fb0.copy() if fb_on else None]
                    want = [lam0.copy(), kb0.copy() if kb_on else None,
                            fb0.copy() if fb_on else None]
                    hostkernels3d.adjoint(lam_next, kappa, state, *got, r, dt, *box)
                    stencil3d.adjoint(lam_next, kappa, state, *want, r, dt, *box)
                    for g, w, a0 in zip(got, want, (lam0, kb0, fb0)):
                        if w is not None:
                            np.testing.assert_array_equal(g, w, err_msg=str(box))
                            np.testing.assert_array_equal(g[outside], a0[outside])


@needs_host
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_loop_bound_to_kappa_and_f_gives_the_references_bits(dtype, shape):
    """Loop's step and adjoint (every choice of cotangents), its buffers' addresses made once
    and reused as the buffers alternate: the NumPy reference's bits on the whole interior."""
    rng = np.random.default_rng(sum(shape) * 7 + 4)
    r, dt = 0.12, 0.015
    u, kappa, f, lam_next, kb0, fb0 = _fields(rng, shape, dtype, 6)
    loop = hostkernels3d.Loop(kappa, f, r, dt)
    a, b = u.copy(), np.zeros_like(u)
    want_a, want_b = u.copy(), np.zeros_like(u)
    for _ in range(3):
        loop.step(a, b)
        stencil3d.step(want_a, kappa, f, want_b, r, dt)
        np.testing.assert_array_equal(b, want_b)
        a, b, want_a, want_b = b, a, want_b, want_a
    for kb_on, fb_on in itertools.product((True, False), (True, False)):
        got = [np.zeros_like(u), kb0.copy() if kb_on else None, fb0.copy() if fb_on else None]
        want = [np.zeros_like(u), kb0.copy() if kb_on else None, fb0.copy() if fb_on else None]
        loop.adjoint(lam_next, u if kb_on else None, *got)
        stencil3d.adjoint(lam_next, kappa, u if kb_on else None, *want, r, dt)
        for g, w in zip(got, want):
            if w is not None:
                np.testing.assert_array_equal(g, w, err_msg=f"kappa_bar {kb_on}, f_bar {fb_on}")
    once = u.copy()     # a state the solver hands over once, then recycles
    ref = weakref.ref(once)
    loop.step(once, b)
    loop.forget(once)
    del once
    assert ref() is None, "the loop keeps a buffer it was told to forget"
    with pytest.raises(ValueError, match="f has dtype"):
        hostkernels3d.Loop(kappa, f.astype(np.float32 if dtype == np.float64 else np.float64),
                           r, dt)


@needs_host
def test_host_defaults_are_the_whole_interior_and_inputs_may_be_read_only():
    rng = np.random.default_rng(3)
    u, kappa, f, lam_next, kb = _fields(rng, (3, 4, 5), np.float64, 5)
    for a in (u, kappa, f, lam_next):
        a.flags.writeable = False
    got, want = np.zeros_like(u), np.zeros_like(u)
    hostkernels3d.step(u, kappa, f, got, 0.1, 0.01)
    stencil3d.step(u, kappa, f, want, 0.1, 0.01, np.int64(1), 4, 1, np.int32(5), 1, None)
    np.testing.assert_array_equal(got, want)
    lam, lam_w, kb_w = np.zeros_like(u), np.zeros_like(u), kb.copy()
    hostkernels3d.adjoint(lam_next, kappa, u, lam, kb, None, 0.1, 0.01, k1=np.int64(6))
    stencil3d.adjoint(lam_next, kappa, u, lam_w, kb_w, None, 0.1, 0.01)
    np.testing.assert_array_equal(lam, lam_w)
    np.testing.assert_array_equal(kb, kb_w)
    assert hostkernels3d.build_info()["march"] in ("native", "portable")


@needs_host
def test_host_rejects_bad_arguments_naming_rank_argument_expected_and_actual():
    u = np.zeros((4, 5, 6))
    a, b, c = (np.zeros_like(u) for _ in range(3))
    step = hostkernels3d.step
    with pytest.raises(ValueError, match=r"rank 0: kappa has shape \(4, 5, 7\), expected "
                                         r"\(4, 5, 6\)"):
        step(u, np.zeros((4, 5, 7)), a, b, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: f has dtype float32, expected float64"):
        step(u, a, b.astype(np.float32), c, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: u must be float32 or float64, got int64"):
        step(u.astype(np.int64), a, b, c, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: kappa must be C-contiguous"):
        step(u, np.asfortranarray(a), b, c, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"rank 0: u must be 3-D of shape \(nx\+2, ny\+2, "
                                         r"nz\+2\).*got shape \(4, 5\)"):
        step(u[..., 0].copy(), a[..., 0].copy(), b[..., 0].copy(), c[..., 0].copy(), 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: kappa must be a numpy.ndarray, got list"):
        step(u, u.tolist(), b, c, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: need 1 <= k0 <= k1 <= 5.*got k0=1, k1=6"):
        step(u, a, b, c, 0.1, 0.1, 1, 3, 1, 4, 1, 6)
    with pytest.raises(ValueError, match="rank 0: need 1 <= i0 <= i1 <= 3.*got i0=0"):
        step(u, a, b, c, 0.1, 0.1, 0, 3)
    with pytest.raises(ValueError, match="rank 0: need 1 <= j0 <= j1 <= 4.*got j0=3, j1=2"):
        step(u, a, b, c, 0.1, 0.1, 1, 3, 3, 2)
    with pytest.raises(ValueError, match="rank 0: u_new must not overlap u"):
        step(u, a, b, u, 0.1, 0.1)
    memory = np.zeros(2 * u.size)
    shifted = memory[5:5 + u.size].reshape(u.shape)
    with pytest.raises(ValueError, match="rank 0: u_new must not overlap kappa"):
        step(u, memory[:u.size].reshape(u.shape), b, shifted, 0.1, 0.1)
    frozen = np.zeros_like(u)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="rank 0: u_new must be writable"):
        step(u, a, b, frozen, 0.1, 0.1)

    adjoint = hostkernels3d.adjoint
    with pytest.raises(ValueError, match=r"rank 0: u \(the state u\^n\) is needed to "
                                         "accumulate kappa_bar, got None"):
        adjoint(u, a, None, b, c, None, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: lam must not overlap kappa_bar"):
        adjoint(u, a, b, c, c, None, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: f_bar must not overlap lam_next"):
        adjoint(u, a, None, b, None, u, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"rank 0: f_bar has shape \(4, 5, 5\)"):
        adjoint(u, a, None, b, None, np.zeros((4, 5, 5)), 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: kappa_bar must be writable"):
        adjoint(u, a, b, c, frozen, None, 0.1, 0.1)


# ---------------------------------------------------------------------------
# CUDA launchers, driving the host build's __global__ kernels
# ---------------------------------------------------------------------------


class _Device(np.ndarray):
    """A NumPy array with the ``data.ptr`` of a CuPy one, standing in for device memory."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _device(a):
    return a.view(_Device)


def test_cudakernels3d_imports_without_cupy_and_names_its_kernels():
    assert cudakernels3d.ASYNCHRONOUS is True
    assert cudakernels3d.KERNEL_NAMES == ("heat3d_step_float32", "heat3d_step_float64",
                                          "heat3d_adjoint_float32", "heat3d_adjoint_float64",
                                          "heat3d_wrap_float32", "heat3d_wrap_float64")
    text = cudakernels3d.source()
    for name in cudakernels3d.KERNEL_NAMES:
        assert f"{name.rsplit('_', 1)[0]}_##SUF(" in text
    grid = cudakernels3d._grid(1, 101, 2, 9, 1, 65)
    assert grid == (2, 1, 7)



def test_cudakernels3d_imports_where_cupy_does_not(tmp_path):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("raise ImportError('no CuPy here')\n")
    code = "import gpumpiad.heat.cudakernels3d as k; print(k.ASYNCHRONOUS)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr


def _launcher(monkeypatch, lib, grid=None, block=None):
    """Replace cudakernels3d.get_kernel by the host library's kernel of that name, run thread
    by thread over the launch the launcher asks for, or over ``grid`` blocks of ``block``
    threads instead."""
    scalars = {np.int32: ctypes.c_int, np.float32: ctypes.c_float, np.float64: ctypes.c_double}

    def host_kernel(name):
        fn = lib[name]

        def launch(asked_grid, asked_block, args):
            assert asked_block in ((cudakernels3d.BLOCK_X, cudakernels3d.BLOCK_Y, 1),
                                   (cudakernels3d.WRAP_BLOCK, 1, 1))
            fn.argtypes = [ctypes.c_void_p if isinstance(a, np.ndarray) else scalars[type(a)]
                           for a in args]
            values = [a.ctypes.data if isinstance(a, np.ndarray) else a for a in args]
            g, b = (asked_grid, asked_block[:2]) if grid is None else (grid, block)
            try:
                for bz in range(g[2]):
                    for by in range(g[1]):
                        for bx in range(g[0]):
                            for ty in range(b[1]):
                                for tx in range(b[0]):
                                    # x and y first: gpumpiad_host_thread resets z.
                                    lib.gpumpiad_host_thread(tx, ty, bx, by, *b, *g[:2])
                                    lib.host_heat3d_block_z(bz, g[2])
                                    fn(*values)
            finally:
                lib.gpumpiad_host_thread(0, 0, 0, 0, 1, 1, 1, 1)
                lib.host_heat3d_block_z(0, 1)
        return launch

    monkeypatch.setattr(cudakernels3d, "get_kernel", host_kernel)


def _library():
    return ctypes.CDLL(str(hostkernels3d.build_info()["path"]))


def _check_launchers(rng, shape, boxes, dtype):
    r, dt = 0.2, 0.01
    for box in boxes:
        u, kappa, f, lam_next, kb0, fb0 = _fields(rng, shape, dtype, 6)
        keep = lam_next.copy()
        got, want = np.zeros_like(u), np.zeros_like(u)
        cudakernels3d.step(*map(_device, (u, kappa, f, got)), r, dt, *box)
        stencil3d.step(u, kappa, f, want, r, dt, *box)
        np.testing.assert_array_equal(got, want, err_msg=f"step {box}")
        for kb_on in (True, False):
            for fb_on in (True, False):
                g = [np.zeros_like(u), kb0.copy() if kb_on else None,
                     fb0.copy() if fb_on else None]
                w = [np.zeros_like(u), kb0.copy() if kb_on else None,
                     fb0.copy() if fb_on else None]
                state = u if kb_on else None
                cudakernels3d.adjoint(_device(lam_next), _device(kappa),
                                      None if state is None else _device(state),
                                      *(None if a is None else _device(a) for a in g),
                                      r, dt, *box)
                stencil3d.adjoint(lam_next, kappa, state, *w, r, dt, *box)
                for a, b in zip(g, w):
                    if b is not None:
                        np.testing.assert_array_equal(a, b, err_msg=f"adjoint {box} "
                                                                    f"{kb_on} {fb_on}")
                # lam_next stands in for the pointers the kernel must not touch.
                np.testing.assert_array_equal(lam_next, keep)
    u = _fields(rng, shape, dtype, 1)[0]
    for flags in itertools.product((False, True), repeat=3):
        got, want = _device(u.copy()), u.copy()
        cudakernels3d.wrap(got, *flags)
        stencil3d.wrap(want, *flags)
        np.testing.assert_array_equal(got, want, err_msg=f"wrap {flags}")
        assert np.array_equal(want, u) == (not any(flags))


@needs_host
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cuda_launchers_drive_their_kernels_correctly(monkeypatch, dtype):
    """The __global__ kernels, launched by cudakernels3d, run on the host thread by thread
    over the launch grid the launcher asks for: its grid covers the box, and its pointer order,
    scalar widths and ``grads`` mask, and the kernels' marches along i (boxes longer than one
    march, shorter, and ending mid-march), give the reference's bits."""
    _launcher(monkeypatch, _library())
    rng = np.random.default_rng(12)
    shape = (2 * cudakernels3d.MARCH + 3, 4, 6)
    boxes = [(1, shape[0] + 1, 1, 5, 1, 7), (2, 2 + cudakernels3d.MARCH, 2, 4, 3, 6),
             (5, 6, 1, 5, 1, 7), (3, 30, 4, 5, 6, 7), (1, 35, 1, 1, 1, 7)]
    _check_launchers(rng, shape, boxes, dtype)


@needs_host
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_cuda_kernels_cover_each_cell_once_thread_by_thread(monkeypatch, dtype):
    """A launch of 2x2x2 blocks of 3x2 threads, run thread by thread on the host build: the box
    is narrower than the launch along k (threads with no column), taller along j (threads that
    stride) and longer along i than two marches (blocks along z that stride), so a cell skipped
    or visited twice shows in ``lam`` or in the accumulated ``kappa_bar`` and ``f_bar``."""
    lib = _library()
    _launcher(monkeypatch, lib, grid=(2, 2, 2), block=(3, 2))
    rng = np.random.default_rng(5)
    march = cudakernels3d.MARCH
    shape = (4 * march + 5, 9, 5)
    _check_launchers(rng, shape, [(2, 4 * march + 4, 1, 10, 1, 5), (1, 2, 3, 4, 2, 3)], dtype)


def test_cuda_launchers_reject_bad_arguments_before_launching(monkeypatch):
    def no_launch(name):
        raise AssertionError(f"{name} launched")

    monkeypatch.setattr(cudakernels3d, "get_kernel", no_launch)
    u = _device(np.zeros((4, 5, 6)))
    a, b, c = (_device(np.zeros((4, 5, 6))) for _ in range(3))
    with pytest.raises(ValueError, match=r"rank 0: f has shape \(4, 5, 7\), expected"):
        cudakernels3d.step(u, a, _device(np.zeros((4, 5, 7))), c, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: kappa has dtype float32, expected float64"):
        cudakernels3d.step(u, _device(np.zeros((4, 5, 6), np.float32)), b, c, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: u must be float32 or float64, got int32"):
        cudakernels3d.step(_device(np.zeros((4, 5, 6), np.int32)), a, b, c, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: u_new must be C-contiguous"):
        cudakernels3d.step(u, a, b, _device(np.zeros((4, 5, 6), order="F")), 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: need 1 <= j0 <= j1 <= 4.*got j0=1, j1=5"):
        cudakernels3d.step(u, a, b, c, 0.1, 0.1, 1, 3, 1, 5)
    with pytest.raises(ValueError, match="rank 0: u_new must not overlap kappa"):
        cudakernels3d.step(u, a, b, a, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: u .* is needed to accumulate kappa_bar"):
        cudakernels3d.adjoint(u, a, None, b, c, None, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: lam must not overlap f_bar"):
        cudakernels3d.adjoint(u, a, None, b, None, b, 0.1, 0.1)
    with pytest.raises(ValueError, match="rank 0: f_bar must not overlap lam_next"):
        cudakernels3d.adjoint(u, a, None, b, None, u, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"rank 0: u must be 3-D .*got shape \(4, 5\)"):
        cudakernels3d.step(*(_device(np.zeros((4, 5))) for _ in range(4)), 0.1, 0.1)
    # Empty boxes launch nothing.
    cudakernels3d.step(u, a, b, c, 0.1, 0.1, 2, 2)
    cudakernels3d.adjoint(u, a, None, b, None, None, 0.1, 0.1, 1, 3, 1, 4, 3, 3)


# ---------------------------------------------------------------------------
# The launchers on the CPU model of CuPy's streams
# ---------------------------------------------------------------------------

MODEL_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {model!r})
    import cupy, heat_kernels
    from cupy import Hazard
    from gpumpiad.heat import cudakernels3d, stencil3d

    heat_kernels.register()

    rng = np.random.default_rng(0)
    host = [rng.random((5, 4, 6)) for _ in range(6)]
    u, kappa, f, lam_next, kb, fb = (cupy.asarray(a) for a in host)
    out, lam = cupy.zeros_like(u), cupy.zeros_like(u)
    cupy.cuda.get_current_stream().synchronize()
    work, other = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    with work:
        cudakernels3d.step(u, kappa, f, out, 0.1, 0.01)
        cudakernels3d.adjoint(lam_next, kappa, u, lam, kb, fb, 0.1, 0.01)
    with other:
        for result in (out, lam, kb, fb):
            try:
                result * 2
            except Hazard:
                pass
            else:
                raise AssertionError("a read on another stream, without an event, passed")
    other.wait_event(work.record())
    with other:
        got = [(a * 1).get(stream=other) for a in (out, lam, kb, fb)]
    want = [np.zeros_like(host[0]), np.zeros_like(host[0]), host[4].copy(), host[5].copy()]
    stencil3d.step(host[0], host[1], host[2], want[0], 0.1, 0.01)
    stencil3d.adjoint(host[3], host[1], host[0], *want[1:], 0.1, 0.01)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    print("ok")
""")


def test_cuda_launchers_queue_their_kernels_on_the_current_stream():
    proc = subprocess.run([sys.executable, "-c", MODEL_RUN.format(model=MODEL_PATH)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, GPUMPIAD_BACKEND="cupy"))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# nvcc (NVRTC 12 and 13: tests/test_nvrtc.py)
# ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_every_kernel_within_its_registers_without_spills(arch):
    path = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("bench_kernel_resources", path)
    kernel_resources = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kernel_resources
    spec.loader.exec_module(kernel_resources)
    used = kernel_resources.resources(cudakernels3d.source(), arch, cudakernels3d)
    assert set(used) == set(cudakernels3d.KERNEL_NAMES), used
    for name, (regs, stores, loads) in used.items():
        budget = 64 if "_adjoint_" in name else 40
        assert regs <= budget and (stores, loads) == (0, 0), (name, arch, used[name])
