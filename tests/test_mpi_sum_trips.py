"""The communications a reverse pass through ``mpi_sum`` issues (real MPI, counted at
``Comm.issue``): ``value_and_grad`` of ``mpi_sum`` makes two round trips for a serial argument
and one for a distributed one; the agreement round trip is issued only where a rank may hold
shares that no bit-free rule covers, and gradients stay right in every case."""
from __future__ import annotations

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import tape
from gpumpiad.backend import to_numpy
from gpumpiad.comm import Comm

SUM, AGREE, SHARES = ("mpi_sum(SUM)", "agreement on reverse-mode allreduces",
                      "allreduce of serial cotangent shares")


@pytest.fixture
def issued(monkeypatch):
    calls = []
    real_issue = Comm.issue

    def counting(self, call, *args, **kwargs):
        if call in (SUM, AGREE, SHARES):  # debug mode adds checks of its own
            calls.append(call)
        return real_issue(self, call, *args, **kwargs)

    monkeypatch.setattr(Comm, "issue", counting)
    return calls


def _run(issued, fn):
    issued.clear()
    result = fn()
    return result, list(issued)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_value_and_grad_of_mpi_sum_makes_one_round_trip_per_allreduce(issued):
    P, r = gp.mpi_size(), gp.mpi_rank()
    loss = gp.value_and_grad(lambda t: gp.sum(gp.mpi_sum(t)))
    x = np.array([0.5])  # 8 B
    (value, g), calls = _run(issued, lambda: loss(x))
    parallel_assert(calls == ([SUM, SHARES] if P > 1 else [SUM]), f"serial x: {calls}")
    parallel_assert(float(value) == 0.5 * P and np.array_equal(to_numpy(g), [float(P)]),
                    f"{value}, {g}")
    xd = gp.tensor(np.array([r + 1.0]), distributed=True)
    (value, g), calls = _run(issued, lambda: loss(xd))
    parallel_assert(calls == [SUM], f"distributed x: {calls}")
    parallel_assert(float(value) == P * (P + 1) / 2 and np.array_equal(to_numpy(g), [1.0]),
                    f"{g}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_an_earlier_sink_with_shares_is_still_agreed_on(issued):
    """``mpi_sum(x) * rank`` sends shares to the first sum's output: the ranks agree on it and
    allreduce them; the last sum and the small leaf need no bit."""
    P, r = gp.mpi_size(), gp.mpi_rank()

    def objective(t):
        return gp.sum(gp.mpi_sum(gp.mpi_sum(t) * r))

    x = np.array([0.25, -1.0])
    g, calls = _run(issued, lambda: gp.grad(objective)(x))
    parallel_assert(calls == ([SUM, SUM, AGREE, SHARES, SHARES] if P > 1 else [SUM, SUM, SHARES]),
                    f"{calls}")
    parallel_assert(np.allclose(g, P * P * (P - 1) / 2), f"{g}")
    gp.check_grad(objective, x)


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_a_distributed_output_agrees_on_the_last_sink(issued):
    """A vjp of a distributed value: its per-rank cotangents reach the last sum as shares."""
    P, r = gp.mpi_size(), gp.mpi_rank()
    x = np.array([1.0, 2.0])
    _, pullback = gp.vjp(lambda t: gp.mpi_sum(t) * r, x)
    g, calls = _run(issued, lambda: pullback(np.ones(2)))
    parallel_assert(calls == ([AGREE, SHARES, SHARES] if P > 1 else [SHARES]), f"{calls}")
    parallel_assert(np.allclose(g, P * P * (P - 1) / 2), f"{g}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_leaves_above_the_fused_size_are_agreed_on(issued):
    """Above ``FUSED_LEAF_BYTES`` the ranks agree before allreducing a leaf's shares, and a
    leaf used only in serial ops gets no allreduce at all; below it the allreduce replaces the
    agreement."""
    P = gp.mpi_size()
    big = np.linspace(-1.0, 1.0, tape.FUSED_LEAF_BYTES // 8 + 1)
    small = np.linspace(-1.0, 1.0, 5)
    expected = {
        ("local", "big"): [AGREE], ("local", "small"): [SHARES],
        ("summed", "big"): [SUM, AGREE, SHARES], ("summed", "small"): [SUM, SHARES]}
    for kind, fn, scale in (("local", lambda t: gp.sum(t * t), 1),
                            ("summed", lambda t: gp.mpi_sum(gp.sum(t * t)), P)):
        for size, x in (("big", big), ("small", small)):
            g, calls = _run(issued, lambda: gp.grad(fn)(x))
            want = expected[kind, size] if P > 1 else [c for c in expected[kind, size]
                                                         if c == SUM]
            parallel_assert(calls == want, f"{kind}, {size}: {calls}, expected {want}")
            parallel_assert(np.allclose(g, 2 * scale * x), f"{kind}, {size}: gradient")
