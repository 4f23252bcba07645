"""The heat benchmark that ``ci/gpu-check.sh bench`` runs on a GPU, run at a tiny size on the
CPU model of CuPy (tests/cudamodel), so that the device path of the benchmark is exercised
between GPU loans: it runs to its end at 1 and 2 ranks and writes its tables. The model's
timings mean nothing; only that each figure is there is checked. Each run is a subprocess
under ``mpiexec`` and a hard timeout."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_PATH = ROOT / "tests" / "cudamodel"
# The script under the model: its ``cupy`` (with the kernels' host builds) before any import.
RUN = ("import runpy, sys; sys.path.insert(0, {model!r}); import heat_kernels; "
       "heat_kernels.register(); sys.argv = sys.argv[1:]; "
       "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("ranks, extra", [(2, []), (1, ["--periodic"])])
def test_heat_benchmark_runs_on_the_model_and_writes_every_figure(tmp_path, ranks, extra):
    out = tmp_path / "heat.md"
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE="0")
    proc = subprocess.run(
        ["mpiexec", "-n", str(ranks), sys.executable, "-c", RUN.format(model=str(MODEL_PATH)),
         str(ROOT / "bench" / "bench_heat.py"), "--n", "32", "--steps", "8", "--repeats", "1",
         "--checkpoints", "2", "--out", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert "GPU CPU model of CuPy" in table and "(cupy, float64)" in table, table
    assert f"{ranks} MPI ranks" in table, table
    for figure in ("copy4 (3 reads + 1 write)", "step kernel, no halo",
                   "solver step with halo exchange / kernel step without halo",
                   "gradient (d/d kappa) / forward, all 8 states stored",
                   "gradient (d/d kappa) / forward, 2 checkpoints",
                   "gradient (d/d u0, kappa, f) / forward"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {figure}")]
        assert len(rows) == 1, (figure, table)
        assert rows[0].rstrip(" |").split("|")[-1].strip() not in ("", "nan"), rows[0]
