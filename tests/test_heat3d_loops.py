"""The 3-D host time loops in one call (hostkernels3d.Loop.steps and .adjoints) against one
host step per call: the same bits in every buffer, ghosts included.

* forward steps several per sweep over the planes (no ghosts wrapped along i; those along j and
  k wrapped plane by plane) or one at a time, the ghosts of a patch that is its own neighbour
  wrapped before each state is read, over the solver's buffer patterns (kept states in their
  own buffers, the others in two in turn);
* the wrap fills exactly the face ghosts an exchange with itself fills;
* the adjoint steps, every choice of cotangents, with and without a trajectory's cotangents.
"""

import itertools

import numpy as np
import pytest
from mpi4py import MPI

import gpumpiad
from gpumpiad.halo import PaddedExchange
from gpumpiad.heat import hostkernels3d
from statebuffers import buffers, copied

needs_host = pytest.mark.skipif(not hostkernels3d.available(), reason="no C++ compiler")

SHAPES = [(1, 1, 1), (1, 4, 3), (5, 1, 2), (3, 2, 1), (6, 5, 7), (11, 3, 9)]
WRAPS = list(itertools.product((False, True), repeat=3))
R, DT = 0.11, 0.004


def wrapped(u, wrap):
    """``u`` with the face ghosts of each flagged axis copied from the opposite boundary
    cells, interior extent only (NumPy reference)."""
    u = u.copy()
    inner = (slice(1, -1),) * 3
    for axis, on in enumerate(wrap):
        if on:
            lo, hi = list(inner), list(inner)
            lo[axis], hi[axis] = 0, -1
            src_lo, src_hi = list(inner), list(inner)
            src_lo[axis], src_hi[axis] = -2, 1
            u[tuple(lo)] = u[tuple(src_lo)]
            u[tuple(hi)] = u[tuple(src_hi)]
    return u


def fields(rng, shape, dtype):
    padded = tuple(n + 2 for n in shape)
    kappa = (0.5 + rng.random(padded)).astype(dtype)
    return kappa, rng.standard_normal(padded).astype(dtype)


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_forward_steps_in_one_call_give_the_bits_of_single_steps(dtype, depth):
    rng = np.random.default_rng(31)
    for shape in SHAPES:
        kappa, f = fields(rng, shape, dtype)
        padded = kappa.shape
        for wrap in (WRAPS[0], WRAPS[3], WRAPS[-1]):
            loop = hostkernels3d.Loop(kappa, f, R, DT, wrap=wrap, depths=(depth, 2))
            for steps in (0, 1, 2, 3, 5, 9):
                for kept in (set(), set(range(steps)), set(range(0, steps, 3))):
                    states = buffers(steps, kept, padded, dtype, rng)
                    want = copied(states)
                    for n in range(steps):
                        src = wrapped(want[n], wrap)
                        want[n][...] = src
                        hostkernels3d.step(src, kappa, f, want[n + 1], R, DT)
                    want[-1][...] = wrapped(want[-1], wrap)
                    loop.steps(states)
                    case = (shape, steps, sorted(kept), wrap, depth)
                    for got, expected in zip(states, want):
                        np.testing.assert_array_equal(got, expected, err_msg=str(case))


@needs_host
def test_forward_steps_several_per_sweep_on_a_larger_patch():
    """Planes of more than a page; odd and even step counts; ghosts wrapped along j and k or
    not; states given as addresses."""
    rng = np.random.default_rng(5)
    kappa, f = fields(rng, (13, 24, 40), np.float64)
    for depth, steps, wrap in itertools.product((2, 5, 8), (7, 8, 17), WRAPS[:4]):
        loop = hostkernels3d.Loop(kappa, f, R, DT, wrap=wrap, depths=(depth, 2))
        states = buffers(steps, {4}, kappa.shape, np.float64, rng)
        want = copied(states)
        for n in range(steps):
            want[n][...] = wrapped(want[n], wrap)
            hostkernels3d.step(want[n], kappa, f, want[n + 1], R, DT)
        want[-1][...] = wrapped(want[-1], wrap)
        loop.steps([a.ctypes.data for a in states])
        for got, expected in zip(states, want):
            np.testing.assert_array_equal(got, expected, err_msg=f"{depth}, {steps}, {wrap}")


@needs_host
def test_the_depths_depend_on_the_fields_size_and_are_checked():
    small = np.zeros((10, 10, 10))
    assert hostkernels3d.Loop(small, small, R, DT).depths == hostkernels3d.SHALLOW_DEPTHS
    big = np.zeros((66, 66, 130))       # 4.3 MiB
    assert hostkernels3d.Loop(big, big, R, DT).depths == hostkernels3d.DEEP_DEPTHS
    for bad in ((0, 2), (hostkernels3d.MAX_DEPTH + 1, 2), (2.0, 2), (True, 2), (1, 3), (1, 0),
                (1, hostkernels3d.MAX_DEPTH + 2)):
        with pytest.raises(ValueError, match=r"rank \d+: depths must be \(forward 1 .. 64"):
            hostkernels3d.Loop(small, small, R, DT, depths=bad)
    with pytest.raises(ValueError, match=r"rank \d+: steps needs the first state"):
        hostkernels3d.Loop(small, small, R, DT).steps([])


@needs_host
@pytest.mark.parametrize("wrap", WRAPS, ids=str)
def test_the_wrap_fills_the_face_ghosts_an_exchange_with_itself_fills(wrap):
    shape = (4, 3, 5)
    rng = np.random.default_rng(7)
    u = rng.standard_normal(tuple(n + 2 for n in shape))
    loop = hostkernels3d.Loop(np.ones_like(u), np.ones_like(u), R, DT, wrap=wrap)
    got = u.copy()
    loop.wrap(got)
    np.testing.assert_array_equal(got, wrapped(u, wrap))
    with gpumpiad.Grid(shape, comm=gpumpiad.Comm(MPI.COMM_SELF), periodic=wrap) as grid:
        exchanged = u.copy()
        with PaddedExchange(grid, u.shape, u.dtype) as halo:
            halo.exchange(exchanged)
    faces = np.zeros(u.shape, bool)
    for axis in range(3):
        for end in (0, -1):
            index = [slice(1, -1)] * 3
            index[axis] = end
            faces[tuple(index)] = True
    np.testing.assert_array_equal(got[faces], exchanged[faces])


@needs_host
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("depth", [1, 2, 4, 6])
def test_adjoint_steps_in_one_call_give_the_bits_of_single_steps(dtype, depth):
    """Several per sweep over the planes (without ghosts wrapped along i) or one at a time: the
    bits of single steps in the buffer returned and the cotangents."""
    rng = np.random.default_rng(37)
    for shape, wrap in itertools.product(SHAPES[::2] + [(7, 4, 6)], WRAPS):
        kappa, f = fields(rng, shape, dtype)
        padded = kappa.shape
        loop = hostkernels3d.Loop(kappa, f, R, DT, wrap=wrap, depths=(1, depth))
        for steps, kb_on, fb_on, with_traj in itertools.product(
                (0, 1, 4, 7), (True, False), (True, False), (True, False)):
            states = [rng.standard_normal(padded).astype(dtype) for _ in range(steps)]
            lam, spare = (rng.standard_normal(padded).astype(dtype) for _ in range(2))
            kb = rng.standard_normal(padded).astype(dtype) if kb_on else None
            fb = rng.standard_normal(padded).astype(dtype) if fb_on else None
            traj = rng.standard_normal((steps + 1,) + shape).astype(dtype) if with_traj else None
            want = [lam.copy(), spare.copy(), None if kb is None else kb.copy(),
                    None if fb is None else fb.copy()]
            cur, other = want[0], want[1]
            for n in range(steps - 1, -1, -1):
                cur[...] = wrapped(cur, wrap)
                hostkernels3d.adjoint(cur, kappa, states[n] if kb_on else None, other,
                                      want[2], want[3], R, DT)
                if traj is not None:
                    other[1:-1, 1:-1, 1:-1] += traj[n]
                cur, other = other, cur
            last = loop.adjoints(lam, spare, states if kb_on else steps, kb, fb, traj)
            case = (shape, wrap, steps, kb_on, fb_on, with_traj, depth)
            assert last is (lam if steps % 2 == 0 else spare), case
            for got, expected in zip((last, kb, fb), (cur, want[2], want[3])):
                if expected is not None:
                    np.testing.assert_array_equal(got, expected, err_msg=str(case))


@needs_host
@pytest.mark.parametrize("wrap", WRAPS[::3], ids=str)
def test_a_single_adjoint_step_wraps_lam_next_first(wrap):
    rng = np.random.default_rng(41)
    kappa, f = fields(rng, (5, 4, 3), np.float64)
    loop = hostkernels3d.Loop(kappa, f, R, DT, wrap=wrap)
    lam_next, u, lam, kb, fb = (rng.standard_normal(kappa.shape) for _ in range(5))
    want = [wrapped(lam_next, wrap), lam.copy(), kb.copy(), fb.copy()]
    hostkernels3d.adjoint(want[0], kappa, u, *want[1:], R, DT)
    loop.adjoint(lam_next, u, lam, kb, fb)
    for got, expected in zip((lam_next, lam, kb, fb), want):
        np.testing.assert_array_equal(got, expected)


@needs_host
def test_adjoint_steps_refuse_a_trajectory_of_another_shape_or_dtype_naming_the_rank():
    rng = np.random.default_rng(3)
    kappa, f = fields(rng, (3, 4, 5), np.float64)
    loop = hostkernels3d.Loop(kappa, f, R, DT)
    lam, spare = np.zeros_like(kappa), np.zeros_like(kappa)
    for bad in (np.zeros((3, 3, 4, 5)), np.zeros((2, 3, 4, 5), np.float32),
                np.zeros((2, 3, 4, 5))[:, ::-1], list(np.zeros((2, 3, 4, 5)))):
        with pytest.raises(ValueError, match=r"rank \d+: traj must be a C-contiguous float64 "
                                             r"numpy.ndarray of shape \(2, 3, 4, 5\)"):
            loop.adjoints(lam, spare, 1, None, np.zeros_like(kappa), bad)
