"""Value semantics of communication (gpumpiad/transport.py): what a call sends is the value at
the time of the call, whatever the caller writes into its array afterwards.

MPI reads a non-blocking call's send buffer until the request completes; with 8 MiB arrays
(MPICH's rendezvous protocol) a sender that overwrites its array before the receiver has
taken the message would change what arrives, were the library to hand MPI the caller's memory.
"""
from __future__ import annotations

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp

N = 1 << 20  # 8 MiB of float64


def _values(rank):
    return np.arange(N, dtype=np.float64) + 1000.0 * rank


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_what_is_sent_is_the_value_at_the_call():
    r, P = gp.mpi_rank(), gp.mpi_size()
    failures = []

    x = _values(r)
    gp.mpi_send(x, dest=(r + 1) % P, tag=1)
    x[:] = -1.0                                    # overwritten right after the call
    got = gp.mpi_recv(x, source=(r - 1) % P, tag=1).numpy()
    if not np.array_equal(got, _values((r - 1) % P)):
        failures.append(f"mpi_send: received {got[:3]}...")

    x = _values(r)
    y = gp.mpi_exchange(x, dest=(r + 1) % P, source=(r - 1) % P)
    x[:] = -1.0
    if not np.array_equal(y.numpy(), _values((r - 1) % P)):
        failures.append("mpi_exchange")

    x = _values(r)
    b = gp.mpi_bcast(x, root=P - 1)
    x[:] = -1.0                                    # before the result is read
    if not np.array_equal(b.numpy(), _values(P - 1)):
        failures.append(f"mpi_bcast: {b.numpy()[:3]}...")

    x = _values(r)[: N // P]
    g = gp.mpi_gather(x, root=0)
    x[:] = -1.0
    expected = np.concatenate([_values(q)[: N // P] for q in range(P)]) if r == 0 else None
    if r == 0 and not np.array_equal(g.numpy(), expected):
        failures.append("mpi_gather")

    x = _values(r)
    s = gp.mpi_sum(x)
    x[:] = -1.0
    if not np.array_equal(s.numpy(), sum(_values(q) for q in range(P))):
        failures.append("mpi_sum")
    parallel_assert(not failures, "; ".join(failures))


@pytest.mark.parallel(nprocs=[1, 2])
def test_a_result_never_shares_memory_with_the_input():
    """The root of a broadcast, a one-rank sum and a send's own returned value hold the value,
    not the caller's array: writing the input leaves the result alone."""
    x = np.arange(4.0)
    results = [gp.mpi_bcast(x), gp.mpi_sum(x), gp.mpi_allgather(x)]
    x[:] = -1.0
    P = gp.mpi_size()
    expected = [np.arange(4.0), P * np.arange(4.0), np.tile(np.arange(4.0), P)]
    parallel_assert(all(np.array_equal(t.numpy(), e) for t, e in zip(results, expected)),
                    f"{[t.numpy() for t in results]}")
