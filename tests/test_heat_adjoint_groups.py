"""The host reverse pass in one call (adjoint steps taken several at a time, the lams between
kept in rows of a ring) against one host adjoint call per step: the same bits."""

import itertools

import numpy as np
import pytest

from gpumpiad.heat import hostkernels

needs_host = pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")

SIZES = (1, 2, 3, 17)
STEPS = (0, 1, 2, 3, 4, 5, 6, 7, 20)
MASKS = ((True, True), (True, False), (False, True), (False, False))
WRAPS = ((False, False), (False, True), (True, False), (True, True))


def per_step(loop, start, spare, states, bars, traj):
    """lam^0's buffer after one ``Loop.adjoint`` per step, as the reverse pass ran before
    ``Loop.adjoints``."""
    lam, spare = start, spare
    for n in range(len(states) - 1, -1, -1):
        loop.adjoint(lam, states[n] if bars[0] is not None else None, spare, *bars)
        if traj is not None:
            spare[1:-1, 1:-1] += traj[n]
        lam, spare = spare, lam
    return lam


def check(shape, dtype, steps, wrap, rng, depth):
    """Every cotangent choice with and without a trajectory: the one call gives the bits of
    the per-step loop in lam^0 (ghosts included), kappa_bar and f_bar; every ghost starts
    non-zero so that a ghost read from the wrong buffer shows."""
    kappa = (0.5 + rng.random(shape)).astype(dtype)
    f = rng.random(shape).astype(dtype)
    loop = hostkernels.Loop(kappa, f, 0.2, 0.003, wrap, depths=(2, depth))
    states = [rng.random(shape).astype(dtype) for _ in range(steps)]
    traj = rng.standard_normal((steps + 1, shape[0] - 2, shape[1] - 2)).astype(dtype)
    for with_traj, wanted in itertools.product((False, True), MASKS):
        start = rng.standard_normal(shape).astype(dtype)
        spare = rng.standard_normal(shape).astype(dtype)
        bars = [rng.standard_normal(shape).astype(dtype) if w else None for w in wanted]
        want_bars = [None if b is None else b.copy() for b in bars]
        t = traj if with_traj else None
        want = per_step(loop, start.copy(), spare.copy(), states, want_bars, t)
        a, b = start.copy(), spare.copy()
        got = loop.adjoints(a, b, states if wanted[0] else steps, *bars, t)
        case = (shape, np.dtype(dtype).name, steps, wrap, with_traj, wanted, depth)
        assert got is (a if steps % 2 == 0 else b), case
        assert np.array_equal(got, want), case
        for g, w in zip(bars, want_bars):
            assert g is None or np.array_equal(g, w), case


@needs_host
@pytest.mark.parametrize("depth", [2, 4, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wrap", WRAPS)
def test_grouped_adjoint_steps_give_the_bits_of_single_steps(dtype, wrap, depth):
    rng = np.random.default_rng(17)
    for nx, ny in itertools.product(SIZES, SIZES):
        for steps in STEPS:
            check((nx + 2, ny + 2), dtype, steps, wrap, rng, depth)


@needs_host
def test_grouped_adjoint_steps_on_a_large_patch():
    """Rows longer than a cache line's worth of cells and more rows than the ring holds."""
    rng = np.random.default_rng(3)
    for wrap, depth in itertools.product(WRAPS, (2, 4)):
        check((66, 131), np.float64, 7, wrap, rng, depth)


@needs_host
def test_loops_sweep_deeper_over_fields_larger_than_the_caches():
    small = np.zeros((130, 130))
    large = np.zeros((1026, 1026))
    assert hostkernels.Loop(small, small, 0.2, 0.003).depths == hostkernels.SHALLOW_DEPTHS
    assert hostkernels.Loop(large, large, 0.2, 0.003).depths == hostkernels.DEEP_DEPTHS
    for bad in ((0, 2), (2, 3), (2, 0)):
        with pytest.raises(ValueError, match="depths"):
            hostkernels.Loop(small, small, 0.2, 0.003, depths=bad)
