"""The serial/distributed convention (tape.py, POEM 075) at 1-4 ranks.

A serial value is the same on every rank and its cotangent is the same *total* on every rank;
a distributed value is each rank's own piece. These tests run the seed programs (ADCME's MPI
chapter: test_simple, Reduce Sum, Broadcast; OpenMDAO POEM 075's four-component model), check
their values and gradients against closed forms and against check_grad, and check that
programs breaking the convention are refused loudly.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import mpi_bcast, mpi_rank, mpi_size, mpi_sum
from gpumpiad.backend import get_array_module, to_numpy


@pytest.fixture
def short_timeouts(monkeypatch):
    """A hang fails within seconds: the watchdog bounds every wait, mpiexec bounds the run."""
    monkeypatch.setitem(gp.debug._settings, "timeout", 10.0)
    monkeypatch.setenv("MPIEXEC_TIMEOUT", "30")


def _same(a, b, rtol=1e-12):
    return bool(np.allclose(to_numpy(a), to_numpy(b), rtol=rtol, atol=0.0))


# -- ADCME test_simple: L = sum(mpi_sum(mpi_bcast(θ) ** rank)) ------------------------------

def _test_simple(theta):
    return gp.sum(mpi_sum(mpi_bcast(theta) ** mpi_rank()))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_seed_test_simple():
    size, rank = mpi_size(), mpi_rank()
    value = 2.0 ** size - 1
    slope = (size - 2) * 2.0 ** (size - 1) + 1  # d/dθ of θ^0 + θ^1 + ... + θ^(P-1) at θ = 2
    for theta in (np.array([2.0]), np.array(2.0), 2.0):
        v, g = gp.value_and_grad(_test_simple)(theta)
        parallel_assert(_same(v, value) and _same(g, slope) and np.shape(g) == np.shape(theta),
                        f"serial θ={theta!r}: L={v}, dL/dθ={g!r}; expected {value}, {slope}")
    for theta in (gp.tensor([2.0], distributed=True), gp.tensor(2.0, distributed=True)):
        v, g = gp.value_and_grad(_test_simple)(theta)
        expected = slope if rank == 0 else 0.0
        parallel_assert(_same(v, value) and _same(g, expected),
                        f"distributed θ: L={v}, dL/dθ={g!r} on rank {rank}; expected {expected}")
    gp.check_grad(_test_simple, np.array([2.0]))
    gp.check_grad(_test_simple, gp.tensor([2.0], distributed=True))
    parallel_assert(size != 4 or (value, slope) == (15.0, 17.0))


# -- POEM 075: serial dv -> aoa -> distributed flow -> force -> serial lift ---------------------

def _flow_forward(aoa):
    n = 2 if MPI.COMM_WORLD.rank == 0 else 1
    return get_array_module(aoa).full(n, 0.5, dtype=aoa.dtype) * aoa


flow = gp.custom_op(_flow_forward, layout="distributed", name="flow")


@flow.defvjp
def _flow_vjp(g, ans, aoa):
    # Serial in, distributed out: this rank's share only; gpumpiad adds the allreduce.
    return np.reshape(0.5 * g.sum(), np.shape(aoa))


def _lift(dv):
    aoa = 2.0 * dv
    force = 3.0 * flow(aoa)
    return 2.0 * aoa + mpi_sum(3.0 * gp.sum(force))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_poem075_model():
    size = mpi_size()
    for dv in (1.0, np.array(1.0), np.array([1.0]), np.array([1.0], dtype=np.float32)):
        aoa = 2.0
        lift = 2.0 * aoa + 3.0 * 3.0 * 0.5 * aoa * (size + 1)
        v, g = gp.value_and_grad(_lift)(dv)
        parallel_assert(_same(v, lift, 1e-6) and _same(g, 9 * size + 13, 1e-6),
                        f"dv={dv!r}: lift={v}, d lift/d dv={g!r}; expected {lift}, {9 * size + 13}")
        report = gp.check_grad(_lift, dv)
        parallel_assert(report["max_rank_disagreement"] == 0.0, str(report))


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_poem075_old_convention_is_caught():
    """POEM 075's *old* convention: the flow component's vjp allreduces itself, so the tape's
    allreduce doubles it (derivative P times too large); check_grad's finite differences say so."""
    twice = gp.custom_op(_flow_forward, layout="distributed", name="flow_old_convention")

    @twice.defvjp
    def _(g, ans, aoa):
        return np.reshape(MPI.COMM_WORLD.allreduce(0.5 * float(g.sum())), np.shape(aoa))

    def lift(dv):
        aoa = 2.0 * dv
        return 2.0 * aoa + mpi_sum(9.0 * gp.sum(twice(aoa)))

    with pytest.raises(gp.GradientCheckError, match=r"argument 0, element .* \(serial\): "
                       r"reverse mode gives .*finite differences give"):
        gp.check_grad(lift, np.array([1.0]))


# -- ADCME Reduce Sum and Broadcast -------------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_seed_reduce_sum():
    size, rank = mpi_size(), mpi_rank()
    a = gp.tensor(np.arange(1.0, 11.0) * rank, distributed=True)

    def objective(a):
        b = mpi_sum(a)
        return gp.sum(b)

    b = mpi_sum(a)
    v, g = gp.value_and_grad(objective)(a)
    expected_b = np.arange(1.0, 11.0) * size * (size - 1) / 2
    parallel_assert(not b.distributed and _same(b.numpy(), expected_b), f"b = {b}")
    parallel_assert(_same(v, expected_b.sum()) and _same(g, np.ones(10)), f"L={v}, g={g}")
    gp.check_grad(objective, a)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_seed_broadcast():
    size, rank = mpi_size(), mpi_rank()
    root = 3 if size >= 4 else size - 1
    a = gp.tensor(np.ones(10) * rank, distributed=True)

    def objective(a):
        b = mpi_bcast(a, root)
        L = gp.sum(b ** 2)
        return mpi_sum(L)  # b is serial: every rank adds the same sum(b²), so L = P sum(b²)

    b = mpi_bcast(a, root)
    v, g = gp.value_and_grad(objective)(a)
    expected_g = 2.0 * size * root * np.ones(10) if rank == root else np.zeros(10)
    parallel_assert(not b.distributed and _same(b.numpy(), root * np.ones(10)), f"b = {b}")
    parallel_assert(_same(v, size * 10.0 * root ** 2) and _same(g, expected_g),
                    f"L={v}, g={g} on rank {rank}; expected {size * 10.0 * root ** 2}, "
                    f"{expected_g}")
    gp.check_grad(objective, a)


# -- a custom op with the allreduce in the wrong place ------------------------------------------

def _rank_weight():
    return float(MPI.COMM_WORLD.rank + 1)


def _make_reduced_op(vjp_allreduces):
    """Serial in, serial out; the forward sums distributed work over ranks with mpi4py."""

    def forward(x):
        return MPI.COMM_WORLD.allreduce(_rank_weight() * x, op=MPI.SUM)

    def vjp(g, ans, x):
        share = _rank_weight() * g
        return MPI.COMM_WORLD.allreduce(share, op=MPI.SUM) if vjp_allreduces else share

    return gp.custom_op(forward, vjp, name="reduced")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_misplaced_allreduce_in_custom_op():
    size = mpi_size()
    right, wrong = _make_reduced_op(True), _make_reduced_op(False)
    x = np.array([0.7, -0.4])
    objective = lambda op: lambda x: gp.sum(op(x) ** 2)  # noqa: E731
    gp.check_grad(objective(right), x)
    if size == 1:
        gp.check_grad(objective(wrong), x)  # one rank: its share is the total
        return
    match = (r"argument 0 is serial but its gradient differs across ranks: element \d+ is .* "
             r"on rank [1-9]\d* and .* on rank 0")
    with pytest.raises(gp.GradientCheckError, match=match) as info:
        gp.check_grad(objective(wrong), x)
    parallel_assert("finite differences" in str(info.value), str(info.value))


# -- the loss must be a serial scalar -----------------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_loss_must_be_serial_scalar():
    x = np.array([1.0, 2.0])
    with pytest.raises(gp.LossError, match="distributed.*mpi_sum"):
        gp.grad(lambda x: (x * mpi_rank()).sum())(x)
    with pytest.raises(gp.LossError, match="distributed.*mpi_sum"):
        gp.grad(lambda x: gp.sum(x))(gp.tensor(x, distributed=True))
    with pytest.raises(gp.LossError, match=r"scalar.*\(2,\)"):
        gp.grad(lambda x: mpi_sum(x * mpi_rank()))(x)
    with pytest.raises(gp.LossError, match="Tensor"):
        gp.grad(lambda x: 1.0)(x)
    with pytest.raises(gp.LossError, match="distributed"):
        gp.check_grad(lambda x: (x * mpi_rank()).sum(), x)


# -- structurally zero cotangents on some ranks -------------------------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_structurally_zero_cotangents_finish(short_timeouts):
    size, rank = mpi_size(), mpi_rank()
    theta = np.array([1.5])
    dist_one = gp.tensor(np.ones(1), distributed=True)
    programs = {
        # θ ** 0 on rank 0: the power node exists but its cotangent to θ is exactly zero.
        "power_by_rank": (lambda t: mpi_sum(t ** mpi_rank()).sum(),
                          sum(r * 1.5 ** (r - 1) for r in range(1, size))),
        # Rank 0 never touches θ: its share is structurally absent, the leaf allreduce still runs.
        "rank0_skips_leaf": (lambda t: mpi_sum(t ** mpi_rank() if mpi_rank() > 0 else dist_one)
                             .sum(), sum(r * 1.5 ** (r - 1) for r in range(1, size))),
        # Only the last rank's term depends on θ.
        "last_rank_only": (lambda t: mpi_sum(t * (3.0 * dist_one) if mpi_rank() == size - 1
                                             else dist_one).sum(), 3.0),
        # No rank's result depends on θ at all.
        "nobody": (lambda t: mpi_sum(dist_one * 2.0).sum(), 0.0),
    }
    for name, (fn, expected) in programs.items():
        g = gp.grad(fn)(theta)
        parallel_assert(_same(g, expected), f"{name}: {g} on rank {rank}, expected {expected}")
        gp.check_grad(fn, theta)


@pytest.mark.parallel(nprocs=2)
def test_serial_intermediate_used_on_some_ranks_only(short_timeouts):
    """mpi_bcast(θ) ** rank on ranks > 0 only: the serial intermediate gets per-rank shares on
    some ranks, none on rank 0; every rank must still agree on the reverse communication."""
    size = mpi_size()
    dist_one = gp.tensor(np.ones(1), distributed=True)

    def fn(t):
        y = mpi_bcast(t) * 1.0
        term = y ** mpi_rank() if mpi_rank() > 0 else dist_one
        return mpi_sum(term).sum()

    g = gp.grad(fn)(np.array([1.5]))
    expected = sum(r * 1.5 ** (r - 1) for r in range(1, size))
    parallel_assert(_same(g, expected), f"{g} != {expected}")
    # The same with a leaf: b ** 2 is a serial intermediate used per rank on rank 1 only.
    w = gp.tensor([mpi_rank() + 1.0], distributed=True)
    g = gp.grad(lambda b: mpi_sum(gp.sum(b ** 2 * w) if mpi_rank() == 1 else gp.sum(w)))(
        np.array([0.5, 2.0]))
    parallel_assert(_same(g, 2 * 2.0 * np.array([0.5, 2.0])), f"{g}")
    # ... and with the intermediate t * 3.0 used per rank on the last rank only.
    g = gp.grad(lambda t: mpi_sum(t * 3.0 * dist_one if mpi_rank() == size - 1 else dist_one)
                .sum())(np.array([1.5]))
    parallel_assert(_same(g, 3.0), f"{g}")


# -- mpi_rank() is an int in Python and distributed on Tensors ---------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_mpi_rank_is_an_int():
    size, r = mpi_size(), mpi_rank()
    rank = MPI.COMM_WORLD.rank
    parallel_assert(isinstance(r, int) and r == rank and hash(r) == hash(rank))
    parallel_assert(["a", "b", "c", "d"][r] == "abcd"[rank] and len(range(r)) == rank)
    parallel_assert((r if r == 0 else -1) == (0 if rank == 0 else -1) and bool(r) == bool(rank))
    parallel_assert(f"{r}" == str(rank) and int(r + 1) == rank + 1 and np.arange(8)[r] == rank)
    x = gp.tensor([1.0, 2.0])
    for y in (r * x, x * r, x + r, x ** r, (r + 1) * x, x[r % 2], gp.multiply(r, x)):
        parallel_assert(y.distributed, f"{y!r} is not distributed")
    parallel_assert(not (x * int(r) * 0 + x).distributed)  # plain ints are serial
    parallel_assert(_same((r * x).numpy(), rank * np.array([1.0, 2.0])))
    g = gp.grad(lambda t: mpi_sum((t * (r + 1)).sum()))(np.array([1.0, 2.0]))
    parallel_assert(_same(g, size * (size + 1) / 2), f"{g}")


@pytest.mark.parallel(nprocs=[2, 3])
def test_rank_times_float_is_distributed():
    x = gp.tensor([1.0])
    parallel_assert((x * (mpi_rank() + 0.5)).distributed and (x * (mpi_rank() * 0.5)).distributed)
    gp.check_grad(lambda t: mpi_sum(t * (mpi_rank() + 0.5)).sum(), np.array([1.0]))


# -- the fused leaf allreduce with rank-dependent control flow ----------------------------------

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_fused_leaf_allreduce_with_rank_dependent_control_flow():
    """Serial leaves a, b (float64) and c (float32); rank r uses a if r % 3 == 0, b if
    r % 3 == 1 and none if r % 3 == 2, in a distributed op; c only in serial ops."""
    size, rank = mpi_size(), mpi_rank()
    w = gp.tensor([rank + 1.0], distributed=True)

    def objective(a, b, c):
        if rank % 3 == 0:
            part = gp.sum(a * w)
        elif rank % 3 == 1:
            part = gp.sum(b * w * b)  # b * w is distributed: b is used directly
        else:
            part = gp.sum(w * 0.5)
        return mpi_sum(part) + gp.sum(c * c)

    a = np.array([0.3, -1.2])
    b = np.array([0.5, 2.0, -1.0])
    c = np.array([1.5, -0.5], dtype=np.float32)
    ga, gb, gc = gp.grad(objective, argnums=(0, 1, 2))(a, b, c)
    wa = sum(r + 1.0 for r in range(size) if r % 3 == 0)
    wb = sum(r + 1.0 for r in range(size) if r % 3 == 1)
    parallel_assert(_same(ga, wa * np.ones(2)) and _same(gb, 2 * wb * b) and _same(gc, 2 * c)
                    and gc.dtype == np.float32, f"{ga}, {gb}, {gc} on rank {rank}")
    gp.check_grad(objective, a, b, c.astype(np.float64))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_leaf_allreduce_only_where_some_rank_has_shares(monkeypatch):
    """A small serial leaf's shares are allreduced on every pass, without an agreement on
    whether any rank has some: used only in serial ops its (zero) shares cost that one
    allreduce, used per rank it gets the forward sum and that allreduce; no agreement
    collective either way (a large leaf's agreement: tests/test_mpi_sum_trips.py)."""
    from gpumpiad.comm import Comm
    size = mpi_size()
    x = np.linspace(-1.0, 1.0, 5)
    agree, leaf = "agreement on reverse-mode allreduces", "allreduce of serial cotangent shares"
    issued = []
    real_issue = Comm.issue
    monkeypatch.setattr(Comm, "issue", lambda self, call, *a, **k: (
        call in (agree, leaf, "mpi_sum(SUM)") and issued.append(call),
        real_issue(self, call, *a, **k))[1])  # (debug mode adds checks of its own)
    calls = []
    for fn, expected in ((lambda t: gp.sum(t * t), 2 * x),
                         (lambda t: mpi_sum(gp.sum(t * t)), 2 * size * x)):
        issued.clear()
        g = gp.grad(fn)(x)
        calls.append(list(issued))
        parallel_assert(_same(g, expected), f"{g} != {expected}")
    wanted = ([[], ["mpi_sum(SUM)"]] if size == 1 else
              [[leaf], ["mpi_sum(SUM)", leaf]])
    parallel_assert(calls == wanted, f"communications issued: {calls}, expected {wanted}")
