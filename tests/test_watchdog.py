"""The watchdog (``set_timeout``) bounds every wait without slowing the prompt ones: a wait that
completes within the spin budget makes no ``time.sleep`` call, a stuck one ends in
``CommunicationTimeout`` (``test_control.py``, ``test_collectives.py`` and ``test_failure.py``
cover the calls it names)."""
from __future__ import annotations

import time
import types

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad import debug


def _counting_time(monkeypatch):
    """Replace the ``time`` module debug sees by one whose ``sleep`` counts its calls."""
    sleeps = []
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time)
                                     if not name.startswith("_")})
    clock.sleep = lambda seconds: (sleeps.append(seconds), time.sleep(seconds))[1]
    monkeypatch.setattr(debug, "time", clock)
    return sleeps


@pytest.mark.parallel(nprocs=[2, 3])
def test_a_prompt_wait_makes_no_sleep(monkeypatch):
    """Real mpi_sum exchanges under the watchdog: every one that completes within the spin
    budget did so without sleeping, and its result is right."""
    monkeypatch.setitem(debug._settings, "timeout", 30.0)
    sleeps = _counting_time(monkeypatch)
    world = MPI.COMM_WORLD
    x = np.full(2, world.rank + 1.0)
    expected = np.full(2, world.size * (world.size + 1) / 2)
    prompt, slept, wrong = 0, [], 0
    for trial in range(60):
        world.Barrier()
        sleeps.clear()
        start = time.perf_counter()
        got = gp.mpi_sum(x).numpy()
        seconds = time.perf_counter() - start
        wrong += not np.array_equal(got, expected)
        if seconds < debug.SPIN_SECONDS:
            prompt += 1
            if sleeps:
                slept.append((trial, f"{seconds * 1e6:.0f} us", len(sleeps)))
    parallel_assert(wrong == 0, f"{wrong} wrong sums")
    parallel_assert(prompt > 0, "no exchange completed within the spin budget")
    parallel_assert(not slept, f"prompt waits that slept (trial, time, sleeps): {slept}")


@pytest.mark.parallel(nprocs=[2])
def test_a_stuck_wait_still_times_out_and_sleeps_after_the_spin(monkeypatch):
    """A receive no rank sends: CommunicationTimeout with the watchdog's message after about
    the bound, having slept (not spun) for most of it; an idle wait too."""
    # Made before the short bound: the ranks may reach this collective far apart in time.
    comm = gp.Comm().dup()  # the cancelled receive stays off the world communicator
    monkeypatch.setitem(debug._settings, "timeout", 0.3)
    monkeypatch.setitem(debug._settings, "timeout from", "GPUMPIAD_TIMEOUT")
    sleeps = _counting_time(monkeypatch)
    results = []
    for idle in (False, True):
        sleeps.clear()
        request = comm.mpi.Irecv(np.empty(1), source=MPI.ANY_SOURCE, tag=3)
        start = time.monotonic()
        try:
            debug.wait(request, comm, "the test's receive", idle=idle)
            message = "no timeout"
        except gp.CommunicationTimeout as exc:
            message = str(exc)
        seconds = time.monotonic() - start
        request.Cancel()
        request.Wait()
        results.append((idle, message, seconds, len(sleeps)))
    comm.free()
    for idle, message, seconds, count in results:
        parallel_assert(message.startswith(f"rank {MPI.COMM_WORLD.rank}: the test's receive on "
                                           "Comm(")
                        and "did not complete within 0.3 s (the watchdog, GPUMPIAD_TIMEOUT)"
                        in message, message)
        parallel_assert(0.3 <= seconds < 3.0, f"idle={idle}: timed out after {seconds:.2f} s")
        parallel_assert(count >= 5, f"idle={idle}: {count} sleeps in {seconds:.2f} s")
