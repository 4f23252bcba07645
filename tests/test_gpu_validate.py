"""bench/gpu_validate.py at tiny sizes on the CPU model of CuPy (tests/cudamodel): every stage
but the test suite runs, reports success and writes its table; a failing stage fails the run.
Each run is a subprocess under a hard timeout, so that the model's ``cupy`` never meets this
process and a hang fails the test."""
import json
import os
import subprocess
import sys
from pathlib import Path

from gpumpiad.heat import cudakernels, cudakernels3d

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_validate.py"
MODEL_PATH = ROOT / "tests" / "cudamodel"
STAGES = ["probe", "kernels", "bandwidth", "heat3d", "halo"]


def run_script(tmp_path, *args, **env):
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(MODEL_PATH),
                                                      os.environ.get("PYTHONPATH", "")) if p),
               **env)
    env.pop("OUT", None)
    out, results = tmp_path / "out", tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "small", "--out", str(out),
                           "--results", str(results), *args],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    return proc, out, results


def summary_rows(out):
    rows = {}
    for line in (out / "summary.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1]
    return rows


def test_every_stage_runs_on_the_model_and_writes_its_table(tmp_path):
    proc, out, results = run_script(tmp_path, *STAGES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary_rows(out) == {**{s: "ok" for s in STAGES}, "results": "ok"}, proc.stdout
    for stage in STAGES:
        assert (out / f"{stage}.log").exists()
        result = json.loads((out / f"{stage}.json").read_text())
        assert result["ok"] and result["lines"][-1].startswith("|"), (stage, result)

    probe = json.loads((out / "probe.json").read_text())["data"]
    assert probe["info"]["backend"] == "cupy" and probe["info"]["data path"] == "staged"
    assert sorted(probe["registers"]) == sorted(cudakernels.KERNEL_NAMES)
    kernels = json.loads((out / "kernels.json").read_text())["data"]
    assert {f"{k['kernel'].split(' ')[0]}_{k['dtype']}" for k in kernels} == set(
        cudakernels.KERNEL_NAMES)
    assert all(k["result"] == "ok" for k in kernels)
    assert sum(k["kernel"].startswith("heat_adjoint") for k in kernels) == 8  # 4 grads masks
    bandwidth = json.loads((out / "bandwidth.json").read_text())["data"]
    assert all(row["t_eff_over_copy"] is None for row in bandwidth)  # the model has no timings
    assert "n/a" in (out / "bandwidth.json").read_text()
    heat3d = json.loads((out / "heat3d.json").read_text())["data"]
    assert {f"{k['kernel'].split(' ')[0]}_{k['dtype']}" for k in heat3d["kernels"]} == set(
        cudakernels3d.KERNEL_NAMES)
    assert all(k["result"] == "ok" for k in heat3d["kernels"])
    assert sum(k["kernel"].startswith("heat3d_adjoint") for k in heat3d["kernels"]) == 8
    assert sorted(heat3d["registers"]) == sorted(cudakernels3d.KERNEL_NAMES)
    assert [(row["dtype"], row["fields"]) for row in heat3d["bandwidth"]] == [
        (dtype, fields) for dtype in ("float32", "float64") for fields in (4, 8, 6, 3)]
    assert all(row["t_eff_over_copy"] is None and row["target_met"] == "n/a"
               for row in heat3d["bandwidth"])
    halo = json.loads((out / "halo.json").read_text())["data"]
    assert [(c["ndim"], c["ranks"], c["periodic"]) for c in halo] == [
        (2, 1, False), (2, 1, True), (2, 2, False), (3, 1, False), (3, 1, True)]
    # The model's wall times are its Python's: a kernel step takes time, but a solve of N steps
    # need not measure longer than one of none, so the solver ratio may be n/a (None).
    assert all(c["kernel_min_s"] > 0 and c["exchange_step_over_kernel"] is not None
               and (c["solver_over_kernel"] is None or c["solver_over_kernel"] > 0)
               for c in halo)

    written = sorted(p.name for p in results.iterdir())
    assert len(written) == 2 and written[0].startswith("gpu-validate-cpu-model"), written
    text = (results / written[1]).read_text()
    for stage in STAGES:
        assert f"## {stage}" in text
    assert "| halo | ok |" in text


def test_a_failing_stage_fails_the_run(tmp_path):
    proc, out, _ = run_script(tmp_path, "kernels", "heat3d",
                              GPUMPIAD_VALIDATE_SELFTEST="wrong-reference")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary_rows(out)
    assert rows["kernels"] == rows["heat3d"] == "FAILED", proc.stdout
    result = json.loads((out / "kernels.json").read_text())
    failed = {(k["kernel"], k["dtype"]) for k in result["data"] if k["result"] != "ok"}
    assert failed == {("heat_step", "float32"), ("heat_step", "float64")}
    result = json.loads((out / "heat3d.json").read_text())
    failed = {(k["kernel"], k["dtype"]) for k in result["data"]["kernels"]
              if k["result"] != "ok"}
    assert failed == {("heat3d_step", "float32"), ("heat3d_step", "float64")}


def test_unknown_stage_is_refused(tmp_path):
    proc, _, _ = run_script(tmp_path, "kernel")
    assert proc.returncode == 2
    assert "unknown stage(s) kernel" in proc.stderr


def test_tests_stage_keeps_the_parallel_tests_of_the_ranks_asked_for(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Item:
        def __init__(self, name):
            self.name = name

    class Hook:
        def pytest_deselected(self, items):
            self.deselected = [i.name for i in items]

    class Config:
        hook = Hook()

    items = [Item(n) for n in ("test_a", "test_b[nprocs=1]", "test_b[nprocs=2]",
                               "test_b[nprocs=3]", "test_c[float32-nprocs=4]")]
    names = [i.name for i in items]
    monkeypatch.setenv(module.MAX_RANKS_ENV, "2")
    module.pytest_collection_modifyitems(Config, items)
    assert [i.name for i in items] == ["test_a", "test_b[nprocs=1]", "test_b[nprocs=2]"]
    assert Config.hook.deselected == ["test_b[nprocs=3]", "test_c[float32-nprocs=4]"]

    # 3 and 4 ranks only: a test that is not parallel counts as one rank.
    items = [Item(n) for n in names]
    monkeypatch.setenv(module.MAX_RANKS_ENV, "4")
    monkeypatch.setenv(module.MIN_RANKS_ENV, "3")
    module.pytest_collection_modifyitems(Config, items)
    assert [i.name for i in items] == ["test_b[nprocs=3]", "test_c[float32-nprocs=4]"]
    assert Config.hook.deselected == ["test_a", "test_b[nprocs=1]", "test_b[nprocs=2]"]
