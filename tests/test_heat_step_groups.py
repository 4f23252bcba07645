"""The host forward loop in one call (steps taken several per sweep without wrapped ghosts)
against one host step per call: the same bits in every buffer, ghosts included."""

import itertools

import numpy as np
import pytest

from gpumpiad.heat import hostkernels
from statebuffers import buffers, copied

needs_host = pytest.mark.skipif(not hostkernels.available(), reason="no C++ compiler")

SIZES = (1, 2, 3, 17)
STEPS = (0, 1, 2, 3, 4, 5, 6, 7, 20)


def check(shape, dtype, steps, kept, rng, depth):
    kappa = (0.5 + rng.random(shape)).astype(dtype)
    f = rng.standard_normal(shape).astype(dtype)
    loop = hostkernels.Loop(kappa, f, 0.2, 0.003, depths=(depth, 2))
    states = buffers(steps, kept, shape, dtype, rng)
    want = copied(states)
    nx, ny = shape[0] - 2, shape[1] - 2
    for n in range(steps):
        hostkernels.step(want[n], kappa, f, want[n + 1], 0.2, 0.003, 1, nx + 1, 1, ny + 1)
    loop.steps(states)
    case = (shape, np.dtype(dtype).name, steps, sorted(kept), depth)
    for got, expected in zip(states, want):
        assert np.array_equal(got, expected), case


@needs_host
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_forward_steps_give_the_bits_of_single_steps(dtype, depth):
    rng = np.random.default_rng(29)
    for nx, ny in itertools.product(SIZES, SIZES):
        for steps in STEPS:
            for kept in (set(), set(range(steps)), set(range(0, steps, 3))):
                check((nx + 2, ny + 2), dtype, steps, kept, rng, depth)


@needs_host
def test_grouped_forward_steps_on_a_large_patch():
    """Rows longer than a cache line's worth of cells; an odd and an even step count."""
    rng = np.random.default_rng(4)
    for depth in (2, 3, 8):
        for steps in (6, 7, 9):
            check((66, 131), np.float64, steps, {2}, rng, depth)
