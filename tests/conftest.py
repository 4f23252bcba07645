"""Test configuration: MPI vendor and rank/size in the header, and a hard timeout on every
parallel test (MPICH's mpiexec honours MPIEXEC_TIMEOUT), so a hang fails instead of stalling."""
import os

os.environ.setdefault("MPIEXEC_TIMEOUT", "300")
os.environ.setdefault("GPUMPIAD_BACKEND", os.environ.get("GPUMPIAD_TEST_BACKEND", "numpy"))

# The CUDA stream model's stand-in ``cupy`` runs in subprocesses only (tests/test_cudamodel.py);
# collecting it for doctests would import it as ``cupy`` into this process.
collect_ignore = ["cudamodel"]


def pytest_report_header(config):
    from mpi4py import MPI
    import gpumpiad
    vendor = MPI.Get_library_version().splitlines()[0].strip()
    return (f"gpumpiad {gpumpiad.__version__}, backend {gpumpiad.backend_name()}, {vendor}, "
            f"rank {MPI.COMM_WORLD.rank} of {MPI.COMM_WORLD.size}")
