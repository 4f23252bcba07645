"""Timing shared by the MPI benchmarks."""
import statistics
import time

from mpi4py import MPI


def median_time(fn, repeats, comm=MPI.COMM_WORLD):
    """Median over ``repeats`` barrier-synchronised runs of the slowest rank's time of ``fn()``
    (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return statistics.median(times)
