"""The control path's object collectives give what mpi4py's blocking ones give, the watchdog
bounds them (a rank that skips one is ``test_failure.py``'s job tests), and debug mode checks
them like any collective."""
from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import control


def _piece(rank):
    """Objects of rank-dependent size and kind, empty ones included."""
    return {"rank": rank, "data": np.arange(rank * 3, dtype=np.float32),
            "text": "x" * (7 * rank), "none": None}


def _same(a, b):
    return (a.keys() == b.keys() and a["rank"] == b["rank"] and a["text"] == b["text"]
            and a["none"] is b["none"] and a["data"].dtype == b["data"].dtype
            and np.array_equal(a["data"], b["data"]))


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_object_collectives_match_mpi4py():
    comm, raw = gp.Comm(), MPI.COMM_WORLD
    r, P = comm.rank, comm.size
    mine = _piece(r)
    got = control.allgather(comm, mine, "test allgather")
    parallel_assert(len(got) == P and all(_same(g, _piece(q)) for q, g in enumerate(got)))
    for root in range(P):
        value = control.bcast(comm, mine if r == root else "ignored", root, "test bcast")
        parallel_assert(_same(value, raw.bcast(mine, root=root)), f"bcast from {root}")
    parallel_assert(control.allreduce(comm, r + 0.5, MPI.SUM, "test sum")
                    == raw.allreduce(r + 0.5, op=MPI.SUM))
    parallel_assert(control.allreduce(comm, -r, MPI.MAX, "test max") == 0.0)
    control.barrier(comm, "test barrier")


@pytest.mark.parallel(nprocs=[2, 3])
def test_a_late_rank_is_waited_for_within_the_watchdog(monkeypatch):
    """A rank that arrives late but within the bound is waited for; the results are right."""
    monkeypatch.setitem(gp.debug._settings, "timeout", 5.0)
    comm = gp.Comm()
    if comm.rank == 0:
        time.sleep(0.5)
    got = control.allgather(comm, comm.rank, "late allgather")
    parallel_assert(got == list(range(comm.size)), f"{got}")


@pytest.mark.parallel(nprocs=[2])
def test_a_missing_rank_raises_communication_timeout_naming_the_call(monkeypatch):
    """Rank 1 is late to an allgather: rank 0's wait ends in CommunicationTimeout naming it."""
    monkeypatch.setitem(gp.debug._settings, "timeout", 1.0)
    comm = gp.Comm().dup()  # the abandoned request stays off the world communicator
    message = "rank 1 is late, not waiting"
    if comm.rank == 0:
        start = time.monotonic()
        try:
            control.allgather(comm, "payload", "the test's allgather")
            message = "no timeout"
        except gp.CommunicationTimeout as exc:
            seconds = time.monotonic() - start
            message = str(exc) if seconds < 3 else f"took {seconds:.1f} s: {exc}"
    MPI.COMM_WORLD.Barrier()
    if comm.rank == 1:  # matches the size exchange rank 0 posted: nothing is left pending
        comm.mpi.Iallgather(np.array([0], np.int64), np.empty(2, np.int64)).Wait()
    rank = comm.rank
    comm.free()
    parallel_assert(rank != 0 or (message.startswith("rank 0: the test's allgather on Comm(")
                                  and "did not complete within 1 s" in message), message)


@pytest.mark.parallel(nprocs=[2, 3])
def test_debug_mode_reports_ranks_in_different_control_calls():
    """Rank 0 gathers while the others broadcast: in debug mode every rank raises
    CommunicationMismatch naming both calls, and the communicator stays usable."""
    comm = gp.Comm().dup()
    r = comm.rank
    gp.set_debug(True)
    try:
        with pytest.raises(gp.CommunicationMismatch) as info:
            if r == 0:
                control.allgather(comm, r, "the gather")
            else:
                control.bcast(comm, r, 0, "the broadcast")
        message = str(info.value)
        agreed = control.allgather(comm, r, "afterwards")
    finally:
        gp.set_debug(False)
        comm.free()
    parallel_assert("the call differs" in message and "the gather" in message
                    and "the broadcast" in message, message)
    parallel_assert(agreed == list(range(comm.size)), f"{agreed}")
