"""A failure on one rank ends the whole job; a stuck collective becomes CommunicationTimeout.

Whole jobs run under ``mpiexec`` in a subprocess with a hard ``timeout=``, so a regression
(a hang) fails the test instead of stalling CI; the in-process test runs under conftest's
``MPIEXEC_TIMEOUT``. Mismatched collectives in debug mode are tested in
``test_collectives.py::test_debug_mode_reports_mismatched_calls`` (call, shape and root).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad as gp

HARD_TIMEOUT = 90  # seconds: a job still running then has hung

PROLOGUE = textwrap.dedent("""\
    import sys, threading, time
    import numpy as np
    import gpumpiad as gm
    r, P = gm.mpi_rank(), gm.mpi_size()
    print(f"rank {r} started at {time.time():.3f}", flush=True)
""")

RAISE_ON_RANK_2 = PROLOGUE + textwrap.dedent("""\
    gm.tensor(np.ones(1))   # the backend and its device ready on every rank before the clocks
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()
    if r == 2:
        time.sleep(0.5)
        raise ValueError("boom from rank 2: the original message")
    gm.mpi_sum(np.ones(3)).numpy()   # never completes: rank 2 is gone
    print(f"rank {r} passed the collective", flush=True)
""")

RAISE_IN_A_THREAD_ON_RANK_2 = PROLOGUE + textwrap.dedent("""\
    if r == 2:
        def work():
            time.sleep(0.5)
            raise RuntimeError("boom from a worker thread on rank 2")
        t = threading.Thread(target=work, name="worker")
        t.start()
        t.join()
        time.sleep(60)               # the main thread would wait here for a minute
    gm.mpi_sum(np.ones(3)).numpy()
    print(f"rank {r} passed the collective", flush=True)
""")

SKIP_A_COLLECTIVE_ON_RANK_0 = PROLOGUE + textwrap.dedent("""\
    if r != 0:
        gm.mpi_sum(np.ones(3)).numpy()   # rank 0 never enters it
    else:
        time.sleep(60)                   # busy elsewhere (another collective would be
                                         # erroneous MPI: MPICH may even match it)
    print(f"rank {r} finished", flush=True)
""")

SKIP_A_SOLVE_ON_RANK_0 = PROLOGUE + textwrap.dedent("""\
    from gpumpiad.heat import Grid, solve
    grid = Grid((12, 12))
    ones = np.ones(grid.local_shape)
    if r != 0:
        solve(0 * ones, ones, ones, 1e-4, grid.h[0], 5, grid=grid)   # rank 0 never enters it
    else:
        time.sleep(60)
    print(f"rank {r} finished", flush=True)
""")

SKIP_A_GRID_ON_RANK_0 = PROLOGUE + textwrap.dedent("""\
    from gpumpiad.heat import Grid
    if r != 0:
        Grid((12, 12))   # rank 0 never enters it: MPI's Create_cart alone would wait forever
    else:
        time.sleep(60)
    print(f"rank {r} finished", flush=True)
""")

SKIP_A_GATHER_ON_RANK_0 = PROLOGUE + textwrap.dedent("""\
    from gpumpiad.heat import Grid
    grid = Grid((12, 12))
    if r != 0:
        grid.gather(np.ones(grid.local_shape), root=None)   # rank 0 never enters it
    else:
        time.sleep(60)
    print(f"rank {r} finished", flush=True)
""")


BCAST_OF_OTHER_SHAPES = PROLOGUE + textwrap.dedent("""\
    x = np.arange(3.0) if r == 0 else np.zeros(5)   # no debug mode: MPI itself fails
    gm.mpi_bcast(x).numpy()
    gm.mpi_sum(np.ones(3)).numpy()
    print(f"rank {r} passed the collectives", flush=True)
""")

SYS_EXIT_ON_RANK_1 = PROLOGUE + textwrap.dedent("""\
    if r == 1:
        time.sleep(0.5)
        sys.exit(3)
    gm.mpi_sum(np.ones(3)).numpy()   # never completes: rank 1 is gone
    print(f"rank {r} passed the collective", flush=True)
""")

UNRECEIVED_SEND = PROLOGUE + textwrap.dedent("""\
    if r == 0:
        gm.mpi_send(np.ones(1 << 20), dest=P - 1, tag=4)   # 8 MiB that no rank receives
    gm.mpi_sum(np.ones(3)).numpy()
    print(f"rank {r} reached the end", flush=True)
""")

UNREAD_RESULTS = PROLOGUE + textwrap.dedent("""\
    from mpi4py import MPI
    gm.mpi_sum(np.ones(1 << 16))     # results never read
    gm.mpi_bcast(np.ones(3))
    gm.mpi_gather(np.ones((2, 2)))
    gm.mpi_finalize()
    MPI.Finalize()
    print(f"rank {r} finalized", flush=True)
""")

AFTER_FINALIZE = PROLOGUE + textwrap.dedent("""\
    from mpi4py import MPI
    gm.mpi_finalize()
    MPI.Finalize()
    for call in (gm.mpi_init, lambda: gm.mpi_sum(np.ones(2)), gm.Comm):
        try:
            call()
            print(f"rank {r}: no error", flush=True)
        except RuntimeError as exc:
            print(f"rank {r} said: {exc}", flush=True)
""")

WAITING_FOR_CTRL_C = PROLOGUE + textwrap.dedent("""\
    print(f"rank {r} ready", flush=True)
    if r == 0:
        while True:                  # busy in Python when Ctrl-C comes
            time.sleep(0.01)
    gm.mpi_sum(np.ones(1)).numpy()   # the others wait in a collective
""")


def _mpiexec(tmp_path, source, nprocs, **env_extra):
    """Run ``source`` under ``mpiexec -n nprocs``; ``(returncode, output, seconds)``, the
    seconds from the last rank's start (its imports done, which a loaded machine or a GPU's
    start-up can stretch) to the job's end."""
    script = tmp_path / "job.py"
    script.write_text(source)
    start = time.time()
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, str(script)],
                          capture_output=True, text=True, env=_job_env(**env_extra),
                          timeout=HARD_TIMEOUT)
    out = proc.stdout + proc.stderr
    started = [float(t) for t in re.findall(r"started at ([\d.]+)", out)]
    return proc.returncode, out, time.time() - max(started, default=start)


def _job_env(**env_extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_"))}
    env.pop("GPUMPIAD_TIMEOUT", None)
    env.pop("GPUMPIAD_DEBUG", None)
    env.update(env_extra)
    return env


def _ended_job(tmp_path, source, messages, nprocs=4, max_seconds=10, **env):
    """Run a job that should end in errors; up to 3 tries for every one of ``messages`` to
    reach the output.

    A failing rank flushes its traceback before ``MPI_Abort``, but Hydra may kill the job
    before forwarding the last bytes of that rank's stderr (seen about once in 8 runs on 2
    cores); every try must still end fast and non-zero.
    """
    for _ in range(3):
        rc, out, seconds = _mpiexec(tmp_path, source, nprocs, **env)
        assert rc != 0, out
        assert seconds < max_seconds, f"took {seconds:.1f} s:\n{out}"
        if all(m in out for m in messages):
            break
    return rc, out, seconds


@pytest.mark.parametrize("program, message", [
    (RAISE_ON_RANK_2, "ValueError: boom from rank 2: the original message"),
    (RAISE_IN_A_THREAD_ON_RANK_2, "RuntimeError: boom from a worker thread on rank 2"),
], ids=["main-thread", "worker-thread"])
def test_exception_on_one_rank_aborts_the_job(tmp_path, program, message):
    rc, out, seconds = _ended_job(tmp_path, program, [message])
    assert rc != 0, out
    assert seconds < 10, f"took {seconds:.1f} s:\n{out}"
    assert message in out, out
    assert "passed the collective" not in out, out


def test_collective_that_mpi_refuses_ends_the_job_naming_the_call(tmp_path):
    """Outside debug mode MPI refuses a broadcast whose receivers expect another size: the
    error names the call and the rank and points to debug mode, and the job ends."""
    message = "rank 1: mpi_bcast failed in MPI. Ranks passing different shapes or dtypes"
    rc, out, seconds = _ended_job(tmp_path, BCAST_OF_OTHER_SHAPES, [message], nprocs=2)
    assert message in out and "GPUMPIAD_DEBUG=1" in out, out
    assert "passed the collectives" not in out, out


def test_without_abort_the_watchdog_ends_the_waiting_ranks(tmp_path):
    """GPUMPIAD_ABORT_ON_ERROR=0 leaves the others waiting (the user's choice); with
    GPUMPIAD_TIMEOUT=3 each of them ends with CommunicationTimeout naming mpi_sum."""
    expected = [f"CommunicationTimeout: rank {rank}: mpi_sum(SUM)" for rank in (0, 1, 3)]
    rc, out, seconds = _ended_job(tmp_path, RAISE_ON_RANK_2, expected, max_seconds=30,
                                  GPUMPIAD_ABORT_ON_ERROR="0", GPUMPIAD_TIMEOUT="3")
    assert "ValueError: boom from rank 2: the original message" in out, out
    assert "passed the collective" not in out, out
    for rank in (0, 1, 3):
        assert (f"CommunicationTimeout: rank {rank}: mpi_sum(SUM)" in out
                and "within 3 s (the watchdog, GPUMPIAD_TIMEOUT)" in out), out


def test_watchdog_ends_a_job_whose_rank_skips_a_collective(tmp_path):
    rc, out, seconds = _ended_job(tmp_path, SKIP_A_COLLECTIVE_ON_RANK_0,
                                  ["CommunicationTimeout: rank"], nprocs=3,
                                  GPUMPIAD_TIMEOUT="3")
    assert ("CommunicationTimeout" in out
            and "did not complete within 3 s (the watchdog, GPUMPIAD_TIMEOUT)" in out), out
    assert "CommunicationTimeout: rank 1: mpi_sum(SUM)" in out or \
        "CommunicationTimeout: rank 2: mpi_sum(SUM)" in out, out
    assert "finished" not in out, out


@pytest.mark.parametrize("program, call", [
    (SKIP_A_SOLVE_ON_RANK_0, "heat.solve's argument check"),
    (SKIP_A_GATHER_ON_RANK_0, "Grid.gather"),
    (SKIP_A_GRID_ON_RANK_0, "Comm.cart"),
], ids=["heat.solve", "Grid.gather", "Grid"])
def test_watchdog_bounds_the_control_path(tmp_path, program, call):
    """Argument checks, field gathers and communicator creation are watched too: a rank
    that skips the call leaves the others with CommunicationTimeout naming it, not a hang."""
    rc, out, seconds = _ended_job(tmp_path, program, [f"CommunicationTimeout: rank 1: {call}"],
                                  nprocs=2, max_seconds=20, GPUMPIAD_TIMEOUT="3")
    assert (f"CommunicationTimeout: rank 1: {call}" in out
            and "did not complete within 3 s (the watchdog, GPUMPIAD_TIMEOUT)" in out), out
    assert "finished" not in out, out


@pytest.mark.parallel(nprocs=[2, 3])
def test_watchdog_names_the_call_on_each_rank(monkeypatch):
    """Rank 0 is late to an mpi_sum: every other rank's wait raises CommunicationTimeout naming
    mpi_sum and its own rank; once rank 0 arrives, the same result completes."""
    r, P = gp.mpi_rank(), gp.mpi_size()
    # Without debug mode's signature exchange, which would be the call that times out.
    monkeypatch.setitem(gp.debug._settings, "debug", False)
    gp.mpi_sum(np.ones(2)).numpy()  # first-use costs (device set-up, kernel loads) come first
    monkeypatch.setitem(gp.debug._settings, "timeout", None)  # restored afterwards
    gp.set_timeout(1)
    message = "rank 0 is late, not waiting"
    if r == 0:
        time.sleep(2.5)
        y = gp.mpi_sum(np.ones(2))
    else:
        y = gp.mpi_sum(np.ones(2))
        start = time.monotonic()
        try:
            y.data
            message = "no timeout"
        except gp.CommunicationTimeout as exc:
            seconds = time.monotonic() - start
            message = str(exc) if seconds < 2.0 else f"took {seconds:.1f} s: {exc}"
    gp.set_timeout(None)
    value = y.numpy()  # rank 0 has arrived: the collective completes
    named = (message.startswith(f"rank {r}: mpi_sum(SUM)")
             and "within 1 s (the watchdog, gpumpiad.set_timeout)" in message)
    parallel_assert(r == 0 or named, message)
    parallel_assert(np.array_equal(value, np.full(2, float(P))), f"{value}")


def test_set_timeout_rejects_what_is_not_a_positive_number(monkeypatch):
    monkeypatch.setitem(gp.debug._settings, "timeout", None)
    for bad in (0, -1.0, "3", True, float("nan")):
        with pytest.raises(ValueError, match="set_timeout needs a positive number of seconds"):
            gp.set_timeout(bad)
    gp.set_timeout(2)
    assert gp.debug.timeout() == 2.0


@pytest.mark.parallel(nprocs=[2])
def test_watchdog_ends_a_stuck_halo_exchange(monkeypatch):
    """Rank 1 is late to a halo exchange: rank 0's wait raises CommunicationTimeout naming it
    instead of hanging; once rank 1 arrives, the same exchange completes."""
    from mpi4py import MPI

    from gpumpiad import halo
    from gpumpiad.heat import Grid
    monkeypatch.setitem(gp.debug._settings, "timeout", 1.0)
    world = MPI.COMM_WORLD
    grid = Grid((8, 6), dims=(2, 1))
    a = np.zeros(grid.padded_shape)
    a[1:-1, 1:-1] = world.rank + 1
    message = "rank 1 is late, not waiting"
    if world.rank == 0:
        pending = halo.start(a, grid)
        try:
            pending.wait()
            message = "no timeout"
        except gp.CommunicationTimeout as exc:
            message = str(exc)
        world.Barrier()
        pending.wait()
    else:
        world.Barrier()
        halo.exchange(a, grid)
    parallel_assert(world.rank != 0 or (message.startswith("rank 0: halo exchange")
                                        and "within 1 s (the watchdog" in message), message)
    ghost = a[-1, 1:-1] if world.rank == 0 else a[0, 1:-1]
    parallel_assert(np.all(ghost == 2 - world.rank), f"ghost row {ghost}")


def test_sys_exit_on_one_rank_ends_the_job_with_its_code(tmp_path):
    """Python runs no exception hook for SystemExit: without the exit handler the other ranks
    would wait in their collective forever."""
    message = "gpumpiad: rank 1 exited with code 3 (sys.exit); ending the whole job"
    rc, out, seconds = _ended_job(tmp_path, SYS_EXIT_ON_RANK_1, [message], nprocs=3,
                                  max_seconds=30)
    assert message in out and "passed the collective" not in out, out


def test_a_send_no_rank_receives_ends_the_job_naming_it(tmp_path):
    """At exit every rank meets the others; a send still unmatched then can never be, so it is
    named and the job exits non-zero instead of waiting for it forever."""
    message = ("never completed (every rank has arrived, so no rank will match them): "
               "mpi_send to rank 2 (tag 4)")
    rc, out, seconds = _ended_job(tmp_path, UNRECEIVED_SEND, [message], nprocs=3,
                                  max_seconds=30)
    # MPICH's shared-memory path may complete the send locally once the receiver's process has
    # mapped the buffer; the unmatched message then fails MPI_Finalize itself. Either way the
    # job ended promptly with a non-zero code (checked by _ended_job), never hung.
    named = message in out and "rank 0: exit: 1 communication(s)" in out
    assert named or "PMPI_Finalize" in out, out


def test_unread_results_are_completed_before_finalize(tmp_path):
    rc, out, seconds = _mpiexec(tmp_path, UNREAD_RESULTS, 2)
    assert rc == 0, out
    assert "pending" not in out and out.count("finalized") == 2, out


def test_use_after_finalize_is_a_clear_error(tmp_path):
    rc, out, seconds = _mpiexec(tmp_path, AFTER_FINALIZE, 2)
    assert rc == 0, out
    for r in (0, 1):
        assert out.count(f"rank {r} said: rank {r}: MPI was finalized") == 3, out
    assert "no error" not in out and "MPICH" not in out, out


def test_ctrl_c_ends_the_whole_job(tmp_path):
    """Ctrl-C reaches mpiexec, which forwards SIGINT to the ranks: the rank interrupted in
    Python aborts the job, so the ranks waiting inside MPI end too, within seconds."""
    script = tmp_path / "job.py"
    script.write_text(WAITING_FOR_CTRL_C)
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(["mpiexec", "-n", "3", sys.executable, str(script)],
                                stdout=out, stderr=subprocess.STDOUT, env=_job_env())
        try:
            deadline = time.monotonic() + HARD_TIMEOUT
            while log.read_text().count("ready") < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=30)
            seconds = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc != 0 and seconds < 10, f"rc {rc} after {seconds:.1f} s:\n{text}"
    assert "KeyboardInterrupt" in text, text
