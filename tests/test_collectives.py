"""Communication primitives (gpumpiad/mpi/*.py) at 1-4 ranks.

Every primitive is checked on the world, on a split communicator (reversed rank order) and on a
Cartesian one, with serial and with distributed inputs (uneven row blocks where the primitive
allows them): forward values against a NumPy reference computed from the allgathered inputs,
reverse mode against finite differences of the global objective (``check_grad``), and, for the
linear ones, a cross-rank dot-product test ``<A x, y> = <x, A^T y>``. Then the seed's
send/receive example, ring shifts (eager and rendezvous sizes), rank-dependent programs, ties,
input validation, threads, debug mode, the watchdog and the host-staging data path.

Each parallel test loops over its cases and reports every failing one at once (one ``mpiexec``
per test and size).
"""
from __future__ import annotations

import threading
import time
import traceback

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import control
from gpumpiad.backend import to_numpy
from gpumpiad.mpi._record import REVERSE_TAG, split_rows

NPROCS = [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# The cases: (gpumpiad program, NumPy reference, row shape of the input, linear?)
# ---------------------------------------------------------------------------------------------

def _uneven(P):
    """Row counts that differ from rank to rank (1, 2, 3, 1, ...)."""
    return [q % 3 + 1 for q in range(P)]


def _a2a_rows(r, P):
    """Rows rank r sends to each rank: uneven, some blocks empty."""
    return [(r + q) % 3 for q in range(P)]


def _offsets(rows):
    return np.concatenate([[0], np.cumsum(rows)]).astype(int)


def _seed_source(P):
    return 2 if P >= 3 else P - 1


def _partner(r, P):
    """Pairs (0, 1), (2, 3), ...; an odd last rank is its own partner."""
    partner = r ^ 1
    return partner if partner < P else r


class Case:
    """``fn(x, comm)`` is the program; ``ref(xs, r, P, serial)`` its value on comm rank r from
    every rank's input ``xs``; ``rows(r, P, serial)`` the input's leading length (for a serial
    input it must not depend on the communicator)."""

    def __init__(self, fn, ref, rows=lambda r, P, serial: 3, linear=True, positive=False):
        self.fn, self.ref, self.rows, self.linear, self.positive = fn, ref, rows, linear, positive


def _ring(x, comm):
    P, r = comm.size, comm.rank
    kept = gp.mpi_send(x, (r + 1) % P, tag=3, comm=comm)
    got = gp.mpi_recv(x, (r - 1) % P, tag=3, comm=comm)
    return kept + got


def _a2a(x, comm):
    if not x.distributed:
        return gp.mpi_alltoall(x, comm=comm)
    return gp.mpi_alltoall(x, rows=_a2a_rows(comm.rank, comm.size), comm=comm)


def _a2a_ref(xs, r, P, serial):
    blocks = []
    for q in range(P):
        sent = split_rows(len(xs[q]), P) if serial else _a2a_rows(q, P)
        off = _offsets(sent)
        blocks.append(xs[q][off[r]:off[r + 1]])
    return np.concatenate(blocks)


def _blocks(x, P):
    """Row blocks: uneven for distributed inputs, the default split of a serial one (whose
    length must not depend on the communicator: serial means the same on every world rank)."""
    return _uneven(P) if x.distributed else split_rows(len(x), P)


def _block(whole, r, P, serial):
    off = _offsets(split_rows(len(whole), P) if serial else _uneven(P))
    return whole[off[r]:off[r + 1]]


CASES = {
    "sum": Case(lambda x, c: gp.mpi_sum(x, comm=c), lambda xs, r, P, s: np.sum(xs, axis=0)),
    "allreduce_sum": Case(lambda x, c: gp.mpi_allreduce(x, gp.SUM, comm=c),
                          lambda xs, r, P, s: np.sum(xs, axis=0)),
    "allreduce_max": Case(lambda x, c: gp.mpi_allreduce(x, gp.MAX, comm=c),
                          lambda xs, r, P, s: np.max(xs, axis=0), linear=False),
    "allreduce_min": Case(lambda x, c: gp.mpi_allreduce(x, gp.MIN, comm=c),
                          lambda xs, r, P, s: np.min(xs, axis=0), linear=False),
    "allreduce_prod": Case(lambda x, c: gp.mpi_allreduce(x, gp.PROD, comm=c),
                           lambda xs, r, P, s: np.prod(xs, axis=0), linear=False, positive=True),
    "reduce": Case(lambda x, c: gp.mpi_reduce(x, root=c.size - 1, comm=c),
                   lambda xs, r, P, s: np.sum(xs, axis=0) if r == P - 1 else 0 * xs[r]),
    "bcast": Case(lambda x, c: gp.mpi_bcast(x, root=c.size - 1, comm=c),
                  lambda xs, r, P, s: xs[P - 1]),
    "gather": Case(lambda x, c: gp.mpi_gather(x, root=c.size - 1, comm=c),
                   lambda xs, r, P, s: np.concatenate(xs) if r == P - 1 else xs[r][:0],
                   rows=lambda r, P, serial: 2 if serial else _uneven(P)[r]),
    "allgather": Case(lambda x, c: gp.mpi_allgather(x, comm=c),
                      lambda xs, r, P, s: np.concatenate(xs),
                      rows=lambda r, P, serial: 2 if serial else _uneven(P)[r]),
    "scatter": Case(lambda x, c: gp.mpi_scatter(x, root=c.size - 1, rows=_blocks(x, c.size),
                                                comm=c),
                    lambda xs, r, P, s: _block(xs[P - 1], r, P, s),
                    rows=lambda r, P, serial: 5 if serial else sum(_uneven(P))),
    "reduce_scatter": Case(lambda x, c: gp.mpi_reduce_scatter(x, rows=_blocks(x, c.size),
                                                              comm=c),
                           lambda xs, r, P, s: _block(np.sum(xs, axis=0), r, P, s),
                           rows=lambda r, P, serial: 5 if serial else sum(_uneven(P))),
    "alltoall": Case(_a2a, _a2a_ref,
                     rows=lambda r, P, serial: 5 if serial else sum(_a2a_rows(r, P))),
    "send_recv_ring": Case(_ring, lambda xs, r, P, s: xs[r] + xs[(r - 1) % P]),
    "sendrecv": Case(lambda x, c: gp.mpi_sendrecv(x, 0, _seed_source(c.size), comm=c),
                     lambda xs, r, P, s: xs[_seed_source(P)] if r == 0 else xs[r]),
    "exchange_ring": Case(lambda x, c: gp.mpi_exchange(x, dest=(c.rank + 1) % c.size,
                                                       source=(c.rank - 1) % c.size, comm=c),
                          lambda xs, r, P, s: xs[(r - 1) % P]),
    "exchange_swap": Case(lambda x, c: gp.mpi_exchange(x, dest=_partner(c.rank, c.size),
                                                       source=_partner(c.rank, c.size), tag=7,
                                                       comm=c),
                          lambda xs, r, P, s: xs[_partner(r, P)]),
    "exchange_open_shift": Case(
        lambda x, c: gp.mpi_exchange(x, dest=c.rank + 1 if c.rank + 1 < c.size else None,
                                     source=c.rank - 1 if c.rank > 0 else None, comm=c),
        lambda xs, r, P, s: xs[r - 1] if r > 0 else 0 * xs[r]),
}
LINEAR = [name for name, case in CASES.items() if case.linear]


def _communicators():
    """The world, a split (two colours, reversed rank order) and a Cartesian communicator."""
    world = gp.Comm()
    rank = world.rank
    return {"world": world,
            "split": world.split(rank % 2, key=-rank),
            "cart": world.cart(ndims=2)}


def _input(case, comm, layout, seed):
    """A random input: serial (same on every rank of the world) or this rank's own piece."""
    serial = layout == "serial"
    world_rank = MPI.COMM_WORLD.rank
    rng = np.random.default_rng(seed if serial else seed + 1000 * (world_rank + 1))
    n = case.rows(comm.rank, comm.size, serial)
    if case.positive:
        data = rng.uniform(0.5, 1.5, (n, 2))
    else:
        data = rng.standard_normal((n, 2))
    return gp.tensor(data, distributed=not serial)


def _weight(shape, seed):
    """A random distributed weight: the objective is sum over ranks of <w, y> + 0.1 |y|^2."""
    rng = np.random.default_rng(seed + 77 * (MPI.COMM_WORLD.rank + 1))
    return gp.tensor(rng.standard_normal(shape), distributed=True)


def _run_cases(check):
    """Call ``check(name, case, comm_name, comm, layout, seed)`` for every combination and
    collect failures; a failure's message must not depend on whether it failed elsewhere."""
    failures = []
    comms = _communicators()
    seed = 0
    for name, case in CASES.items():
        for comm_name, comm in comms.items():
            for layout in ("serial", "distributed"):
                seed += 1
                try:
                    check(name, case, comm_name, comm, layout, seed)
                except AssertionError as exc:  # raised after the case's communication
                    failures.append(f"{name} on {comm_name} with {layout} input: "
                                    f"{type(exc).__name__}: {exc}")
                except Exception:  # the ranks may now disagree: fail fast, do not hang
                    traceback.print_exc()
                    print(f"rank {MPI.COMM_WORLD.rank}: {name} on {comm_name} with {layout} "
                          "input raised; aborting", flush=True)
                    MPI.COMM_WORLD.Abort(1)
    return failures


# ---------------------------------------------------------------------------------------------
# Forward values, finite differences, dot-product tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=NPROCS)
def test_forward_matches_numpy_reference():
    def check(name, case, comm_name, comm, layout, seed):
        x = _input(case, comm, layout, seed)
        y = case.fn(x, comm)
        xs = comm.mpi.allgather(x.numpy())
        expected = case.ref(xs, comm.rank, comm.size, layout == "serial")
        got = y.numpy()
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-13, atol=0):
            raise AssertionError(f"rank {comm.rank}: got {got} expected {expected}")
        serial_out = name in ("sum", "allgather", "bcast") or name.startswith("allreduce")
        if y.distributed == serial_out:
            raise AssertionError(f"rank {comm.rank}: result layout {y.layout}")

    failures = _run_cases(check)
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=NPROCS)
def test_check_grad_every_primitive():
    def check(name, case, comm_name, comm, layout, seed):
        x = _input(case, comm, layout, seed)
        w = _weight(case.fn(x, comm).shape, seed)

        def objective(x):
            y = case.fn(x, comm)
            return gp.mpi_sum(gp.sum(w * y + 0.1 * y * y))

        gp.check_grad(objective, x, max_elements=4, seed=seed)

    failures = _run_cases(check)
    parallel_assert(not failures, "\n".join(failures))


def _inner(a, b, layout_comm):
    """This rank's term of a global inner product: a serial value counts once per communicator
    (so 1/size on each of its ranks), a distributed one on every rank."""
    local = float(np.vdot(to_numpy(a), to_numpy(b)))
    return local / layout_comm.size if layout_comm is not None else local


@pytest.mark.parallel(nprocs=NPROCS)
def test_dot_product_linear_primitives():
    world = MPI.COMM_WORLD

    def check(name, case, comm_name, comm, layout, seed):
        if not case.linear:
            return
        x = _input(case, comm, layout, seed)
        probe = case.fn(x, comm)
        serial_out = not probe.distributed
        # y: serial outputs get a cotangent that is the same on every rank of ``comm``.
        rng = np.random.default_rng(seed + (comm.mpi.allgather(world.rank)[0] if serial_out
                                            else 1000 + world.rank))
        y = rng.standard_normal(probe.shape)

        def pairing(x):
            out = case.fn(x, comm)
            term = gp.sum(out * y)
            if serial_out:  # serial on ``comm``: count it once per communicator
                term = gp.tensor(1.0 / comm.size, distributed=True) * term
            return gp.mpi_sum(term)

        value, xbar = gp.value_and_grad(pairing)(x)
        lhs = world.allreduce(_inner(probe.numpy(), y, comm if serial_out else None))
        rhs = world.allreduce(_inner(x.numpy(), xbar,
                                     None if x.distributed else gp.Comm()))
        scale = max(1.0, abs(lhs))
        if abs(lhs - rhs) > 1e-12 * scale or abs(float(value) - lhs) > 1e-12 * scale:
            raise AssertionError(f"<Ax,y> = {lhs!r}, <x,A^T y> = {rhs!r}, value {value!r}")

    failures = _run_cases(check)
    parallel_assert(not failures, "\n".join(failures))


# ---------------------------------------------------------------------------------------------
# The seed's send/receive example, ring shifts, rank-dependent programs, ties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=NPROCS)
def test_seed_send_receive_example():
    """``a = mpi_sendrecv(a, 0, 2)`` and its ``mpi_send``/``mpi_recv`` form agree."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    src = _seed_source(P)

    def with_sendrecv(a):
        a = gp.mpi_sendrecv(a, 0, src)
        return gp.mpi_sum(gp.sum(a ** 2))

    def with_send_and_recv(a):
        if r == src:
            a = gp.mpi_send(a, 0)
        if r == 0:
            a = gp.mpi_recv(a, src)
        return gp.mpi_sum(gp.sum(a ** 2))

    a = gp.tensor(np.ones(10) * r, distributed=True)
    v1, g1 = gp.value_and_grad(with_sendrecv)(a)
    v2, g2 = gp.value_and_grad(with_send_and_recv)(a)
    expected_value = 10.0 * (sum(q * q for q in range(P)) + src * src)
    factor = 0.0 if (r == 0 and src != 0) else (4.0 if r == src else 2.0)
    expected_grad = factor * r * np.ones(10)
    problems = []
    if not (float(v1) == expected_value and float(v2) == expected_value):
        problems.append(f"rank {r}: values {v1}, {v2}, expected {expected_value}")
    # CuPy's power is not exact for an exponent of 1: compare to rounding.
    if not (np.allclose(to_numpy(g1), expected_grad, rtol=1e-15, atol=0)
            and np.allclose(to_numpy(g2), expected_grad, rtol=1e-15, atol=0)):
        problems.append(f"rank {r}: gradients {g1}, {g2}, expected {expected_grad}")
    everyone = [p for ps in MPI.COMM_WORLD.allgather(problems) for p in ps]
    parallel_assert(not everyone, "\n".join(everyone))
    b = gp.tensor(np.random.default_rng(r).standard_normal(10), distributed=True)
    gp.check_grad(with_sendrecv, b, max_elements=3)
    gp.check_grad(with_send_and_recv, b, max_elements=3)


def _ring_shift(x, w, comm=None, tag=0):
    """Every rank sends ``x`` to its right neighbour first, then receives from its left."""
    comm = comm or gp.Comm()
    P, r = comm.size, comm.rank
    gp.mpi_send(x, (r + 1) % P, tag=tag, comm=comm)
    got = gp.mpi_recv(x, (r - 1) % P, tag=tag, comm=comm)
    return gp.mpi_sum(gp.sum(w * got))


@pytest.mark.parallel(nprocs=NPROCS)
@pytest.mark.parametrize("n", [10, 1 << 20], ids=["80B", "8MB"])
def test_ring_shift_sends_before_receives(n):
    """Eager and rendezvous (8 MB) messages: forward and gradient complete and are right."""
    world = MPI.COMM_WORLD
    r, P = world.rank, world.size
    i = np.arange(n)
    x = gp.tensor(r + 1e-6 * i, distributed=True)
    w = gp.tensor(np.cos(i) * (r + 1), distributed=True)
    value, g = gp.value_and_grad(_ring_shift)(x, w)
    left, right = (r - 1) % P, (r + 1) % P
    expected = world.allreduce(float(np.dot(np.cos(i) * (r + 1), left + 1e-6 * i)))
    scale = world.allreduce(float(np.abs(np.cos(i) * (r + 1) * (left + 1e-6 * i)).sum()))
    parallel_assert(abs(float(value) - expected) <= 1e-12 * scale,
                    f"rank {r}: value {value} != {expected}")
    parallel_assert(np.array_equal(to_numpy(g), np.cos(i) * (right + 1)),
                    f"rank {r}: the gradient is not the right neighbour's weight")


@pytest.mark.parametrize("staged", [False, True], ids=["host", "staged"])
@pytest.mark.parallel(nprocs=[2, 3])
def test_a_message_of_another_dtype_of_one_size_is_an_error_not_a_number(staged, monkeypatch):
    """Outside debug mode too: a float64 message received as int64 (or complex128), the same
    bytes, arrived as reinterpreted bytes; a message through host memory ends with the
    sender's dtype, so the receive raises CommunicationMismatch naming both dtypes (mpi_recv,
    mpi_exchange, mpi_bcast), and a matching message still arrives intact (also staged: a
    device array's message through pinned host memory, here NumPy arrays down that path)."""
    if staged:
        from gpumpiad import backend, transport
        monkeypatch.setenv("GPUMPIAD_STAGE_HOST_ARRAYS", "1")
        monkeypatch.setenv("GPUMPIAD_CUDA_AWARE", "0")
        monkeypatch.setattr(backend, "_stage", {})
        monkeypatch.setattr(transport, "_aware", {})
    r, P = gp.mpi_rank(), gp.mpi_size()
    dest, source = (r + 1) % P, (r - 1) % P
    failures = []

    def expect_mismatch(what, read, sent, expected, sender=f"rank {source}"):
        try:
            got = to_numpy(gp.backend.asarray(read()))
            failures.append(f"{what}: no error, a result {got.ravel()[:3]}")
        except gp.CommunicationMismatch as exc:
            text = str(exc)
            if not (text.startswith(f"rank {r}: {what} from {sender}")
                    and f"got a message of {sent} data, expected {expected}" in text):
                failures.append(f"{what}: message {text!r}")

    gp.mpi_send(np.arange(4.0), dest=dest, tag=1)
    expect_mismatch("mpi_recv", lambda: gp.mpi_recv(np.zeros(4, np.int64), source=source,
                                                    tag=1).numpy(), "float64", "int64")
    gp.mpi_send(np.arange(4.0), dest=dest, tag=2)
    expect_mismatch("mpi_recv", lambda: gp.mpi_recv(np.zeros(2, np.complex128), source=source,
                                                    tag=2).numpy(), "float64", "complex128")
    mine = np.arange(3, dtype=np.int64 if r == 0 else np.float64)
    if P == 2:  # a pairwise swap: each rank receives the other's dtype
        expect_mismatch("mpi_exchange (recv)",
                        lambda: gp.mpi_exchange(mine, dest=dest, source=source).numpy(),
                        "float64" if r == 0 else "int64", "int64" if r == 0 else "float64")
    # The root's float64 against the others' int64; the root's own result is its array.
    if r == 0:
        got = gp.mpi_bcast(np.arange(5.0), root=0).numpy()
        if not np.array_equal(to_numpy(gp.backend.asarray(got)), np.arange(5.0)):
            failures.append(f"the root's broadcast: {got}")
    else:
        expect_mismatch("mpi_bcast", lambda: gp.mpi_bcast(np.zeros(5, np.int64), root=0).numpy(),
                        "float64", "int64", sender="root 0")
    gp.mpi_send(np.arange(3.0) + r, dest=dest, tag=3)
    got = gp.mpi_recv(np.zeros(3), source=source, tag=3).numpy()
    if not np.array_equal(to_numpy(gp.backend.asarray(got)), np.arange(3.0) + source):
        failures.append(f"a matching message: {got}")
    got = gp.mpi_bcast(np.arange(4.0) * (r + 1), root=P - 1).numpy()
    if not np.array_equal(to_numpy(gp.backend.asarray(got)), np.arange(4.0) * P):
        failures.append(f"a matching broadcast: {got}")
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=[2])
def test_receive_of_another_size_names_both_sizes():
    """A message shorter than the receive's ``like`` would leave the rest of the buffer
    unwritten, a longer one is truncated by MPI: both raise on the receiving rank, naming the
    call and the sizes, and MPI stays usable."""
    r = gp.mpi_rank()
    comm = gp.Comm().dup()
    sent = np.arange(3.0)
    if r == 0:
        for tag in (1, 2, 3):
            gp.mpi_send(sent, dest=1, tag=tag, comm=comm)
        gp.mpi_send(sent.astype(np.float32), dest=1, tag=4, comm=comm)
    else:
        short = gp.mpi_recv(np.zeros(5), source=0, tag=1, comm=comm)
        for _ in range(2):  # every read of the result raises, none returns the buffer
            with pytest.raises(gp.CommunicationMismatch,
                               match=r"rank 1: mpi_recv from rank 0 \(tag 1\) got a message of "
                                     r"24 bytes, expected 40 \(shape \(5,\), float64\)"):
                short.numpy()
        with pytest.raises(RuntimeError, match=r"rank 1: mpi_recv from rank 0 \(tag 2\) failed in "
                                              r"MPI: .*truncated"):
            gp.mpi_recv(np.zeros(2), source=0, tag=2, comm=comm).numpy()
        got = gp.mpi_recv(np.zeros(3), source=0, tag=3, comm=comm).numpy()
        # 12 bytes of float32 for two float64: not a whole number of elements of either
        with pytest.raises(gp.CommunicationMismatch, match="got a message of 12 bytes, "
                                                           "expected 16"):
            gp.mpi_recv(np.zeros(2), source=0, tag=4, comm=comm).numpy()
    parallel_assert(r == 0 or np.array_equal(got, sent), "a receive after the errors")
    gp.mpi_barrier(comm=comm)
    comm.free()


def _ring_receive_first(x, w):
    r, P = gp.mpi_rank(), gp.mpi_size()
    got = gp.mpi_recv(x, (r - 1) % P, tag=3)
    kept = gp.mpi_send(x * 2.0, (r + 1) % P, tag=3)
    again = gp.mpi_recv(x, (r - 1) % P, tag=3)
    gp.mpi_send(kept * kept, (r + 1) % P, tag=3)
    return gp.mpi_sum(gp.sum(w * got ** 3 + kept + 0.5 * again))


@pytest.mark.parallel(nprocs=NPROCS)
@pytest.mark.parametrize("n", [3, 1 << 20], ids=["24B", "8MB"])
def test_ring_shift_receives_before_sends(n):
    """Every rank receives before it sends, twice on the same tag: the reverse pass sends each
    cotangent as soon as it is complete, to the right receive, without deadlock."""
    world = MPI.COMM_WORLD
    r = world.rank
    rng = np.random.default_rng(r)
    x = gp.tensor(rng.standard_normal(n), distributed=True)
    w = gp.tensor(rng.standard_normal(n), distributed=True)
    if n == 3:
        report = gp.check_grad(_ring_receive_first, x, w)
        parallel_assert(report["checked"] > 0)
    else:
        _, (gx, _) = gp.value_and_grad(_ring_receive_first, argnums=(0, 1))(x, w)
        parallel_assert(gx.shape == (n,) and bool(np.isfinite(gx).all()))


@pytest.mark.parallel(nprocs=NPROCS)
def test_rank_dependent_programs_finish():
    """The seed's theta**rank program, and variants where some ranks' cotangents are
    structurally zero or where some ranks do not use a value at all."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    theta = np.ones(1) * 2.0

    def seed_program(t):
        return gp.sum(gp.mpi_sum(gp.mpi_bcast(t) ** r))

    value, g = gp.value_and_grad(seed_program)(theta)
    expected_value = sum(2.0 ** q for q in range(P))
    expected_grad = sum(q * 2.0 ** (q - 1) for q in range(P))
    parallel_assert(float(value) == expected_value and float(g[0]) == expected_grad,
                    f"rank {r}: ({value}, {g}) != ({expected_value}, {expected_grad})")
    if P == 4:
        parallel_assert((float(value), float(g[0])) == (15.0, 17.0), "the seed's (15, [17])")

    def zero_cotangents(t):
        s = gp.mpi_bcast(t, root=P - 1)
        u = s * 0.0 if r % 2 else s ** 2  # odd ranks: structurally zero cotangent
        m = gp.mpi_allreduce(u * (r + 1), gp.MAX)  # MAX's reverse communicates on every rank
        return gp.mpi_sum(gp.sum(m) * gp.tensor(1.0 * (r == 0), distributed=True))

    value, g = gp.value_and_grad(zero_cotangents)(theta)
    best = max(q + 1 for q in range(P) if q % 2 == 0)
    parallel_assert(float(value) == best * 4.0 and float(g[0]) == best * 4.0,
                    f"rank {r}: ({value}, {g}) != ({best * 4.0}, {best * 4.0})")
    gp.check_grad(zero_cotangents, theta)


@pytest.mark.parallel(nprocs=NPROCS)
def test_max_min_ties_go_to_the_lowest_rank():
    world = MPI.COMM_WORLD
    r, P = world.rank, world.size
    for op in (gp.MAX, gp.MIN):
        parallel_assert("ties go to the lowest rank" in gp.mpi_allreduce.__doc__.replace("\n", " ")
                        .replace("  ", " "), "mpi_allreduce documents the tie rule")
        # element 0: every rank ties; element 1: ranks >= 1 tie (rank 0 loses); element 2: no
        # tie, the last rank holds the extremum.
        loser = -1.0 if op is gp.MAX else 1.0
        x = np.array([3.0, 3.0 if r else 3.0 + loser, float(r) * -loser])
        x = gp.tensor(x, distributed=True)
        g = gp.grad(lambda x: gp.sum(gp.mpi_allreduce(x, op)))(x)
        expected = np.array([r == 0, r == min(1, P - 1), r == P - 1], float)
        parallel_assert(np.array_equal(to_numpy(g), expected),
                        f"rank {r}, op {op}: gradient {g}, expected {expected}")


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=NPROCS)
def test_bad_input_raises_on_every_rank_naming_argument_and_rank():
    r, P = gp.mpi_rank(), gp.mpi_size()
    x = np.ones((P + 1, 2))
    bad = {
        "root": [lambda: gp.mpi_bcast(x, root=P), lambda: gp.mpi_reduce(x, root=-1),
                 lambda: gp.mpi_gather(x, root=1.5), lambda: gp.mpi_scatter(x, root=True)],
        "dest": [lambda: gp.mpi_send(x, dest=P), lambda: gp.mpi_sendrecv(x, -1, 0)],
        "source": [lambda: gp.mpi_recv(x, source=P), lambda: gp.mpi_sendrecv(x, 0, P)],
        "tag": [lambda: gp.mpi_send(x, 0, tag=-1), lambda: gp.mpi_recv(x, 0, tag=REVERSE_TAG),
                lambda: gp.mpi_sendrecv(x, 0, 0, tag="a")],
        "op": [lambda: gp.mpi_allreduce(x, op=MPI.BAND), lambda: gp.mpi_allreduce(x, op="sum")],
        "scalar": [lambda: gp.mpi_gather(1.0), lambda: gp.mpi_allgather(1.0),
                   lambda: gp.mpi_scatter(1.0), lambda: gp.mpi_reduce_scatter(1.0),
                   lambda: gp.mpi_alltoall(1.0)],
        "rows": [lambda: gp.mpi_scatter(x, rows=[1] * (P + 1)),
                 lambda: gp.mpi_scatter(x, rows=[P + 2] + [0] * (P - 1)),
                 lambda: gp.mpi_reduce_scatter(x, rows=[-1] + [0] * (P - 1)),
                 lambda: gp.mpi_alltoall(x, rows=[P + 1] * P + [0])],
    }
    failures = []
    for argument, calls in bad.items():
        for k, call in enumerate(calls):
            try:
                call()
                failures.append(f"{argument} #{k}: no error")
            except ValueError as exc:
                text = str(exc)
                if f"rank {r}" not in text or argument not in text.replace("axis", "scalar"):
                    failures.append(f"{argument} #{k}: message {text!r}")
    gp.mpi_barrier()  # the communicator is still usable and in step
    parallel_assert(not failures, "\n".join(failures))


# ---------------------------------------------------------------------------------------------
# Threads, debug mode, the watchdog
# ---------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=NPROCS)
def test_threads_on_their_own_communicators():
    """3 threads per rank, each on its own ``comm.dup()``, many value_and_grad iterations."""
    world = gp.Comm()
    r, P = world.rank, world.size
    comms = [world.dup() for _ in range(3)]
    errors, iterations = [], 40

    def work(k):
        comm = comms[k]
        try:
            for it in range(iterations):
                theta = gp.tensor(np.full(3, 1.0 + k + it * 1e-3), comm=comm)  # serial on comm

                def f(t):
                    s = gp.mpi_bcast(t, root=(it + k) % P, comm=comm)
                    y = gp.mpi_allgather(gp.reshape(s * (r + 1), (1, 3)), comm=comm)
                    z = gp.mpi_reduce_scatter(y, comm=comm) if it % 2 else y
                    return gp.mpi_sum(gp.sum(z * z), comm=comm) * (1.0 / P if it % 2 else 1.0)

                value, g = gp.value_and_grad(f)(theta)
                # sum over ranks of a serial row block sum: P * sum_q ((q + 1) t)^2 per
                # column; the odd iterations' reduce-scatter and 1/P scaling keep that value.
                c = P * sum((q + 1) ** 2 for q in range(P))
                t0 = 1.0 + k + it * 1e-3
                want_v, want_g = 3 * c * t0 * t0, 2 * c * t0
                if not (np.isclose(float(value), want_v, rtol=1e-12)
                        and np.allclose(to_numpy(g), want_g, rtol=1e-12)):
                    errors.append(f"thread {k} iteration {it}: ({value}, {g}) != "
                                  f"({want_v}, {want_g})")
        except Exception as exc:  # reported below, on every rank
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(k,), name=f"worker-{k}") for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        MPI.COMM_WORLD.Abort(1)
    parallel_assert(not errors, "\n".join(errors[:10]))


@pytest.mark.parallel(nprocs=[2, 3, 4])
@pytest.mark.parametrize("collective", [
    lambda comm, r: gp.mpi_sum(np.full(4, float(r)), comm=comm).numpy(),
    lambda comm, r: control.allgather(comm, r, "a control-path allgather"),
], ids=["mpi_sum", "control.allgather"])
def test_debug_mode_two_threads_racing_one_communicator(collective):
    """Rank 0 issues thread A's collective first, the others thread B's: CommunicationMismatch
    on every rank, in both threads, no hang and no mixed data."""
    comm = gp.Comm().dup()
    r = comm.rank
    gp.set_debug(True)
    outcome = {}
    first_done = threading.Event()
    try:
        def call(name, first):
            if not first:
                first_done.wait(timeout=60)
            try:
                outcome[name] = collective(comm, r)
            except gp.CommunicationMismatch as exc:
                outcome[name] = exc
            finally:
                if first:
                    first_done.set()

        a_first = r == 0
        threads = [threading.Thread(target=call, args=("A", a_first), name="A"),
                   threading.Thread(target=call, args=("B", not a_first), name="B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        gp.set_debug(False)
    ok = all(isinstance(outcome.get(k), gp.CommunicationMismatch) for k in "AB")
    parallel_assert(ok, f"rank {r}: {outcome}")
    parallel_assert(all("thread" in str(outcome[k]) for k in "AB"), f"rank {r}: {outcome}")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_debug_mode_reports_mismatched_calls():
    r = gp.mpi_rank()
    x = np.ones(3)
    P = gp.mpi_size()
    programs = [
        ("call", "mpi_sum", lambda: gp.mpi_sum(x) if r == 0 else gp.mpi_bcast(x)),
        ("shape", "mpi_sum", lambda: gp.mpi_sum(np.ones(3 if r == 0 else 4))),
        ("dtype", "mpi_sum", lambda: gp.mpi_sum(np.ones(3, np.float64 if r == 0
                                                        else np.float32))),
        ("root", "mpi_bcast", lambda: gp.mpi_bcast(x, root=0 if r == 0 else 1)),
        # Same number of bytes, other dtype: MPI alone would deliver reinterpreted bytes.
        ("dtype", "mpi_bcast", lambda: gp.mpi_bcast(np.ones(2) if r == 0
                                                    else np.ones(4, np.float32))),
        ("shape", "mpi_reduce_scatter",
         lambda: gp.mpi_reduce_scatter(np.ones((P + (r == 0), 2)))),
        # MPI_Sendrecv's form passed to the seed's mpi_sendrecv: each rank names its peers.
        ("argument list", "mpi_sendrecv",
         lambda: gp.mpi_sendrecv(x, dest=(r + 1) % P, source=(r - 1) % P)),
    ]
    failures = []
    gp.set_debug(True)
    try:
        for field, call, program in programs:
            try:
                program().numpy()
                failures.append(f"{call} {field}: no CommunicationMismatch")
            except gp.CommunicationMismatch as exc:
                text = str(exc)
                if (f"the {field} differs" not in text or "rank(s) [0]" not in text
                        or call not in text):
                    failures.append(f"{call} {field}: message {text!r}")
        y = gp.mpi_sum(x).numpy()  # still in step afterwards
        if not np.array_equal(y, x * gp.mpi_size()):
            failures.append(f"afterwards: {y}")
    finally:
        gp.set_debug(False)
    parallel_assert(not failures, "\n".join(failures))


# {case: (the call the error names, the program)}; the last rank's array has one row more.
_MISMATCHED_REDUCTIONS = {
    "mpi_sum": ("mpi_sum(SUM)", lambda a: gp.mpi_sum(a)),
    # What a local sum holds is a NumPy scalar, not an array: that on the last rank, a row on
    # the others.
    "mpi_sum of a scalar": ("mpi_sum(SUM)",
                            lambda a: gp.mpi_sum(gp.sum(a) if len(a) % 2 else a[0])),
    "mpi_allreduce(MAX)": ("mpi_allreduce(MAX)", lambda a: gp.mpi_allreduce(a, op=gp.MAX)),
    "mpi_allreduce(MIN) of int32": ("mpi_allreduce(MIN)",
                                    lambda a: gp.mpi_allreduce(a.astype(np.int32), op=gp.MIN)),
    "mpi_reduce": ("mpi_reduce", lambda a: gp.mpi_reduce(a, root=0)),
    "mpi_reduce_scatter": ("mpi_reduce_scatter", lambda a: gp.mpi_reduce_scatter(a)),
    # Arrays of one size, the last rank splitting their rows otherwise: a block's sum mixed
    # rows of different blocks (rank 1's result at 2 ranks).
    "mpi_reduce_scatter of another row split": (
        "mpi_reduce_scatter", lambda a: gp.mpi_reduce_scatter(a[:2 * (len(a) // 2)], rows=(
            [2] * (len(a) // 2) if len(a) % 2 == 0 else [3] + [2] * (len(a) // 2 - 2) + [1]))),
    # A serial argument of another size on one rank: the forward sum is of scalars, and its
    # gradient's allreduce of per-rank shares is where the sizes meet.
    "reverse pass": ("allreduce of serial cotangent shares",
                     lambda a: gp.grad(lambda x: gp.mpi_sum(gp.sum(x * x)))(a)),
}


@pytest.mark.parametrize("case, staged", [
    pytest.param(case, staged, id=f"{case}-{'staged' if staged else 'host'}")
    for staged in (False, True) for case in _MISMATCHED_REDUCTIONS])
@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_a_reduction_of_arrays_of_different_sizes_is_an_error_not_a_number(case, staged,
                                                                            monkeypatch):
    """Outside debug mode too: MPI reduces buffers of different sizes without a word (the
    results were sums of whatever lay in the buffers), so a host reduction carries a
    signature of the array's size and dtype and every rank that checks it (all, for a reduce
    its root) raises CommunicationMismatch naming the call and its own array; so does a
    reduction staged through host memory (a device array's without CUDA-aware MPI, here NumPy
    arrays down that path: GPUMPIAD_STAGE_HOST_ARRAYS=1)."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    call, program = _MISMATCHED_REDUCTIONS[case]
    if staged:
        from gpumpiad import backend, transport
        monkeypatch.setenv("GPUMPIAD_STAGE_HOST_ARRAYS", "1")
        monkeypatch.setenv("GPUMPIAD_CUDA_AWARE", "0")
        # Both variables are read once: forget what was read.
        monkeypatch.setattr(backend, "_stage", {})
        monkeypatch.setattr(transport, "_aware", {})
    try:
        got = to_numpy(gp.backend.asarray(program(np.ones((2 * P + (r == P - 1), 2)))))
        outcome = f"no error, a result {got.ravel()[:4]}"
    except gp.CommunicationMismatch as exc:
        outcome = str(exc)
    except RuntimeError as exc:  # MPI itself refused the buffers' sizes
        outcome = str(exc) if "failed in MPI" in str(exc) else f"{exc!r}"
    expected = (f"rank {r}: {call}: the ranks passed arrays of different sizes or dtypes "
                + ("or row splits " if call == "mpi_reduce_scatter" else "") + "(this rank: ")
    checks = call != "mpi_reduce" or r == 0
    parallel_assert(not checks or outcome.startswith(expected) or "failed in MPI" in outcome,
                    f"rank {r}, {case}: {outcome}")


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_debug_mode_checks_what_a_receive_gets():
    """In debug mode a message carries its dtype and shape: a receive expecting another dtype
    of the same byte size (which MPI delivers as reinterpreted bytes) or another shape raises
    CommunicationMismatch naming both; a matching message arrives intact."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    dest, source = (r + 1) % P, (r - 1) % P
    failures = []
    gp.set_debug(True)
    try:
        cases = [(np.arange(4.0), np.zeros(8, np.float32), "<f8 (4,)", "<f4 (8,)"),
                 (np.arange(6.0).reshape(2, 3), np.zeros((3, 2)), "<f8 (2, 3)", "<f8 (3, 2)")]
        for sent, like, said, expected in cases:
            gp.mpi_send(sent, dest=dest)
            try:
                gp.mpi_recv(like, source=source).numpy()
                failures.append(f"{expected}: no CommunicationMismatch")
            except gp.CommunicationMismatch as exc:
                text = str(exc)
                if not (text.startswith(f"rank {r}: mpi_recv") and said in text
                        and expected in text and f"from rank {source}" in text):
                    failures.append(f"message {text!r}")
        gp.mpi_send(np.arange(3.0) + r, dest=dest)
        got = gp.mpi_recv(np.zeros(3), source=source).numpy()
        if not np.array_equal(got, np.arange(3.0) + source):
            failures.append(f"matching message: {got}")
    finally:
        gp.set_debug(False)
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_debug_mode_counts_collectives_only():
    """Ranks that post different numbers of sends and receives still issue matching
    collectives: debug mode compares the collectives' count, not every call's."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    gp.set_debug(True)
    try:
        x = gp.tensor(np.arange(3.0) + r, distributed=True)
        if r == 0:
            for tag in range(3):
                gp.mpi_send(x, dest=P - 1, tag=tag)
        if r == P - 1:
            got = [gp.mpi_recv(x, source=0, tag=tag).numpy() for tag in range(3)]
        total = gp.mpi_sum(x).numpy()
    finally:
        gp.set_debug(False)
    parallel_assert(np.array_equal(total, sum(np.arange(3.0) + q for q in range(P))))
    parallel_assert(r != P - 1 or all(np.array_equal(g, np.arange(3.0)) for g in got))


@pytest.mark.parallel(nprocs=[1, 2])
def test_watchdog_names_the_stuck_receive(monkeypatch):
    monkeypatch.setitem(gp.debug._settings, "timeout", 2.0)
    world = MPI.COMM_WORLD
    message = "not waited"
    if world.rank == 0:
        y = gp.mpi_recv(np.ones(3), source=world.size - 1, tag=11)  # never sent
        start = time.monotonic()
        try:
            y.data
            message = "no timeout"
        except gp.CommunicationTimeout as exc:
            elapsed = time.monotonic() - start
            message = str(exc) if elapsed < 10 else f"took {elapsed:.1f} s"
            for request in y._pending.requests:  # leave nothing posted behind
                request.Cancel()
                request.Wait()
    message = world.bcast(message, root=0)
    parallel_assert("mpi_recv" in message and "within 2 s (the watchdog" in message, message)


# ---------------------------------------------------------------------------------------------
# Host staging vs direct paths
# ---------------------------------------------------------------------------------------------

@pytest.mark.parallel(nprocs=NPROCS)
def test_host_staging_and_direct_paths_agree_bit_for_bit(monkeypatch):
    """GPUMPIAD_STAGE_HOST_ARRAYS=1 sends NumPy arrays down the device paths: staged through
    separate host buffers (GPUMPIAD_CUDA_AWARE=0) or handed to MPI directly (=1)."""
    from gpumpiad import backend, streams, transport
    staged_calls = []
    real = streams.device_to_host

    def counting(array, host):
        staged_calls.append(array.shape)
        return real(array, host)

    monkeypatch.setattr(streams, "device_to_host", counting)

    def run_all():
        results = {}

        def run(name, case, comm_name, comm, layout, seed):
            x = _input(case, comm, layout, seed)
            w = _weight(case.fn(x, comm).shape, seed)
            loss = lambda x: gp.mpi_sum(gp.sum(w * case.fn(x, comm) ** 2))  # noqa: E731
            value, g = gp.value_and_grad(loss)(x)
            results[name, comm_name, layout] = (to_numpy(value).copy(), to_numpy(g).copy(),
                                                case.fn(x, comm).numpy())

        problems = _run_cases(run)
        assert not problems, problems
        return results

    settings = (("host", {"GPUMPIAD_STAGE_HOST_ARRAYS": "0"}),
                ("staged", {"GPUMPIAD_STAGE_HOST_ARRAYS": "1", "GPUMPIAD_CUDA_AWARE": "0"}),
                ("direct", {"GPUMPIAD_STAGE_HOST_ARRAYS": "1", "GPUMPIAD_CUDA_AWARE": "1"}))
    if backend.device_backend():
        # Real device arrays: the staged path is the reference, checked against the direct one.
        if not transport._probe_cuda_support():
            pytest.skip("the MPI library is not CUDA-aware: device buffers always take the "
                        "staged path, which every other test exercises on this backend")
        settings = (("staged", {"GPUMPIAD_CUDA_AWARE": "0"}),
                    ("direct", {"GPUMPIAD_CUDA_AWARE": "1"}))
    paths = {}
    for path, env in settings:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # Both variables are read once: forget what was read.
        monkeypatch.setattr(backend, "_stage", {})
        monkeypatch.setattr(transport, "_aware", {})
        before = len(staged_calls)
        paths[path] = run_all()
        paths[path + " staged copies"] = len(staged_calls) - before
    failures = []
    reference = settings[0][0]
    for key, (value, g, y) in paths[reference].items():
        for path, _ in settings[1:]:
            v2, g2, y2 = paths[path][key]
            if not (np.array_equal(value, v2) and np.array_equal(g, g2) and np.array_equal(y, y2)
                    and type(g2) is np.ndarray and type(y2) is np.ndarray):
                failures.append(f"{key}: {path} path differs from the {reference} path")
    counts = tuple(paths[path + " staged copies"] for path, _ in settings)
    expected = tuple(path == "staged" for path, _ in settings)
    if tuple(c > 0 for c in counts) != expected:
        failures.append(f"staged copies per path {[p for p, _ in settings]}: {counts}")
    if not backend.device_backend() and not transport.is_device(np.ones(1)):
        # GPUMPIAD_STAGE_HOST_ARRAYS=1 is still set
        failures.append("GPUMPIAD_STAGE_HOST_ARRAYS=1 does not make NumPy arrays 'device' ones")
    parallel_assert(not failures, "\n".join(failures[:20]))
