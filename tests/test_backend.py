"""Array backend (backend.py): the array module, the GPUMPIAD_BACKEND override, devices."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpumpiad as gp
from gpumpiad import backend


def _cuda_usable():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_GPU = _cuda_usable()


def _run(env_value, code):
    env = dict(os.environ, GPUMPIAD_BACKEND=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_array_module_and_backend_name():
    xp = gp.array_module()
    assert xp.__name__ == gp.backend_name() in ("numpy", "cupy")
    assert backend.array_module() is xp
    t = gp.tensor([1.0, 2.0])
    assert backend.get_array_module(t.data) is xp
    assert t.device == ("cpu" if xp is np else f"cuda:{t.data.device.id}")


def test_get_array_module_and_helpers_on_numpy():
    a = np.arange(3.0)
    assert backend.get_array_module(a) is np
    assert backend.get_array_module(np.float64(1.0)) is np
    assert not backend.is_device_array(a)
    assert backend.device_of(a) == "cpu"
    assert backend.to_numpy(a) is a or np.shares_memory(backend.to_numpy(a), a)
    assert backend.asarray([1, 2], dtype=np.float32).dtype == np.float32


def test_numpy_override_in_subprocess():
    res = _run("numpy", "import gpumpiad as g; print(g.backend_name(), g.tensor([1.0]).device)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["numpy", "cpu"]
    res = _run("  NumPy ", "import gpumpiad as g; print(g.backend_name())")
    assert res.returncode == 0 and res.stdout.strip() == "numpy", res.stderr


def test_bogus_override_is_a_clear_error():
    res = _run("bogus", "import gpumpiad as g; g.tensor([1.0])")
    assert res.returncode != 0
    assert "BackendError" in res.stderr
    assert "GPUMPIAD_BACKEND must be 'numpy' or 'cupy', got 'bogus'" in res.stderr


@pytest.mark.skipif(HAS_GPU, reason="a CUDA device is usable here")
def test_cupy_override_without_gpu_is_a_clear_error():
    res = _run("cupy", "import gpumpiad as g; g.tensor([1.0])")
    assert res.returncode != 0
    assert "BackendError" in res.stderr
    assert "GPUMPIAD_BACKEND=cupy but no usable CUDA device was found" in res.stderr


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cupy_backend_on_gpu():
    code = ("import gpumpiad as g, numpy as np; t = g.tensor([1.0, 2.0]); "
            "print(g.backend_name(), t.device, type(t.data).__module__.split('.')[0]); "
            "print(float(g.grad(lambda x: g.sum(g.sin(x)))(t).get()[0]) - np.cos(1.0))")
    res = _run("cupy", code)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert first.split() == ["cupy", "cuda:0", "cupy"]
    assert abs(float(second)) < 1e-12


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_communication_stream_has_the_devices_highest_priority():
    code = ("from gpumpiad import streams; "
            "print(streams.comm_stream().priority, streams.compute_stream().priority)")
    res = _run("cupy", code)
    assert res.returncode == 0, res.stderr
    comm, compute = map(int, res.stdout.split())
    assert comm < compute == 0


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_node_local_rank_from_the_launcher_or_a_split(monkeypatch):
    """One node here: the node-local rank is the world rank, whether read from the launcher's
    environment (no communication) or from the shared-memory split fallback."""
    from mpi4py import MPI
    from pytest_mpi import parallel_assert
    rank = MPI.COMM_WORLD.rank
    published = [v for v in backend._LOCAL_RANK_VARIABLES if v in os.environ]
    # One rank runs inside pytest itself, without a launcher.
    parallel_assert(bool(published) or MPI.COMM_WORLD.size == 1,
                    "mpiexec published no node-local rank variable")
    parallel_assert(backend.node_local_rank() == rank, f"{published}: not rank {rank}")
    for name in backend._LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    parallel_assert(backend.node_local_rank() == rank, f"split fallback: not rank {rank}")


def test_operands_reach_forwards_as_plain_numbers_and_backend_arrays():
    """mpi_rank()'s RankInt/RankFloat reach an op's forward as int/float (CuPy refuses their
    subclasses) and NumPy operands as arrays of the backend; the output is still distributed."""
    from gpumpiad.primitive import primitive
    seen = []

    def forward(x, k, w):
        seen.append((type(k), type(w)))
        return x * k + w

    op = primitive(forward, name="probe").defvjp(lambda g, ans, x, k, w: g * k)
    xp = backend.array_module()
    x = gp.tensor([1.0, 2.0])
    out = op(x, gp.mpi_rank() + 1, np.ones(2))
    out2 = op(x, (gp.mpi_rank() + 1) * 0.5, np.ones(2))
    assert seen == [(int, xp.ndarray), (float, xp.ndarray)], seen
    assert out.distributed and out2.distributed
    assert np.array_equal(out.numpy(), np.array([1.0, 2.0]) * (gp.mpi_rank() + 1) + 1.0)


def test_a_device_number_that_is_not_an_int_is_named():
    code = ("import os, gpumpiad.backend as b; os.environ['GPUMPIAD_DEVICE'] = '1.5'; "
            "b.bind_device()")
    res = _run("numpy", code)
    if HAS_GPU:
        assert res.returncode != 0
        assert "rank 0: GPUMPIAD_DEVICE must be a device number (an int >= 0), got '1.5'" \
            in res.stderr, res.stderr
    else:
        assert res.returncode != 0    # no CuPy to bind a device with


def test_a_broken_cupy_installation_is_reported_not_silently_replaced(tmp_path):
    """A CuPy that is installed but fails to import: a warning naming the failure when the
    backend is chosen automatically (NumPy is used), an error naming it when CuPy is asked
    for; no CuPy at all chooses NumPy without a word."""
    broken = tmp_path / "broken" / "cupy"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    code = ("import warnings, gpumpiad.backend as b\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    print(b.array_module().__name__)\n"
            "print('|'.join(str(w.message) for w in seen))\n")

    def run(backend_value, path):
        env = dict(os.environ, GPUMPIAD_BACKEND=backend_value,
                   PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]))
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)

    auto = run("", tmp_path / "broken")
    assert auto.returncode == 0, auto.stderr
    chosen, warned = auto.stdout.splitlines()[:2]
    assert chosen == "numpy"
    assert "computing with NumPy on the CPU because CuPy is installed but does not import" \
        in warned and "libcudart.so.12" in warned, auto.stdout
    forced = run("cupy", tmp_path / "broken")
    assert forced.returncode != 0
    assert "GPUMPIAD_BACKEND=cupy but no usable CUDA device was found: CuPy is installed but " \
        "does not import" in forced.stderr and "libcudart.so.12" in forced.stderr, forced.stderr
    if not HAS_GPU:
        (tmp_path / "empty").mkdir()
        absent = run("", tmp_path / "empty")
        assert absent.returncode == 0 and absent.stdout.splitlines() == ["numpy", ""] or \
            absent.stdout.strip() == "numpy", absent.stdout + absent.stderr
