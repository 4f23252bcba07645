"""The main job end to end: ``mpiexec -n P gpumpiad heat-inverse`` and its failures."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = dict(os.environ, GPUMPIAD_BACKEND="numpy", PYTHONUNBUFFERED="1")


def run_job(ranks, *flags, timeout=240):
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "gpumpiad", "heat-inverse",
           *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for ranks in (2, 4):
        folder = tmp_path_factory.mktemp(f"ranks{ranks}")
        proc = run_job(ranks, "--out", str(folder))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[ranks] = (folder, proc)
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_recovers_kappa_and_writes_outputs(runs, ranks):
    folder, proc = runs[ranks]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["ranks"] == ranks
    assert summary["kappa_relative_error"] < 0.10
    assert summary["kappa_relative_error"] < summary["kappa_relative_error_initial"] / 5
    assert summary["backend"] == "numpy"
    assert "backend numpy" in proc.stdout and "relative κ error" in proc.stdout
    import matplotlib.image
    kappa = matplotlib.image.imread(folder / "kappa.png")
    loss = matplotlib.image.imread(folder / "loss.png")
    assert kappa.shape[:2] == (400, 1350)
    assert loss.shape[:2] == (400, 700)
    # Real plots: many distinct colours, not a blank canvas.
    assert len(np.unique(kappa.reshape(-1, kappa.shape[-1]), axis=0)) > 200
    assert len(np.unique(loss.reshape(-1, loss.shape[-1]), axis=0)) > 20


def test_two_and_four_ranks_agree(runs):
    s2 = json.loads((runs[2][0] / "summary.json").read_text())
    s4 = json.loads((runs[4][0] / "summary.json").read_text())
    assert s2["iterations"] == s4["iterations"]
    # Different decompositions sum in different orders; the runs agree to rounding.
    assert s2["kappa_relative_error"] == pytest.approx(s4["kappa_relative_error"], rel=1e-6)
    np.testing.assert_allclose(s2["history"]["loss"], s4["history"]["loss"], rtol=1e-6)


@pytest.mark.parametrize("flags, words", [
    (["--n", "0"], "must be positive"),
    (["--dtype", "float16"], "invalid choice"),
    (["--bogus"], "unrecognized arguments"),
    (["--n", "2", "--dims", "4", "1"], "rank"),
    (["--steps", "10", "--snapshots", "4"], "multiple of snapshots"),
    (["--out", "/proc/gpumpiad-cannot-write-here"], "not writable"),
])
def test_bad_settings_end_every_rank_with_one_line(tmp_path, flags, words):
    if "--out" not in flags:
        flags = flags + ["--out", str(tmp_path)]
    proc = run_job(4, *flags, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("error") == 4, proc.stderr
    assert proc.stderr.count(words) == 4, proc.stderr
    assert "Traceback" not in proc.stderr


def test_theta_rank_example():
    cmd = ["mpiexec", "-n", "4", sys.executable, "-m", "gpumpiad", "theta-rank"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "ranks 4: L = 15, dL/dθ = 17" in proc.stdout
