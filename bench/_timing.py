"""Timing shared by the MPI benchmarks."""
import statistics
import time

from mpi4py import MPI


def times(fn, repeats, comm=MPI.COMM_WORLD):
    """The slowest rank's time of ``fn()`` in each of ``repeats`` barrier-synchronised runs
    (after one warm-up run)."""
    fn()
    out = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        out.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return out


def median_time(fn, repeats, comm=MPI.COMM_WORLD):
    """Median of :func:`times`."""
    return statistics.median(times(fn, repeats, comm))
