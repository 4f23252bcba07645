"""The main job end to end: ``mpiexec -n P gpumpiad heat-inverse`` and its failures."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from pytest_mpi import parallel_assert

ENV = dict(os.environ, GPUMPIAD_BACKEND="numpy", PYTHONUNBUFFERED="1")


def run(ranks, *args, timeout=60):
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "gpumpiad", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def run_job(ranks, *flags, timeout=240):
    return run(ranks, "heat-inverse", *flags, timeout=timeout)


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


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
    summary = summary_of(folder)
    assert summary["ranks"] == ranks
    assert summary["kappa_relative_error"] < 0.10
    assert summary["kappa_relative_error"] < summary["kappa_relative_error_initial"] / 5
    assert summary["backend"] == "numpy"
    assert "backend numpy" in proc.stdout and "relative κ error" in proc.stdout
    import matplotlib.image
    kappa = matplotlib.image.imread(folder / "kappa.png")
    loss = matplotlib.image.imread(folder / "loss.png")
    assert kappa.shape[:2] == (460, 1350)
    assert loss.shape[:2] == (600, 700)
    # Real plots: many distinct colours, not a blank canvas.
    assert len(np.unique(kappa.reshape(-1, kappa.shape[-1]), axis=0)) > 200
    assert len(np.unique(loss.reshape(-1, loss.shape[-1]), axis=0)) > 20


@pytest.mark.parametrize("ranks", [2, 4])
def test_reports_whether_it_converged_and_starts_at_iteration_zero(runs, ranks):
    folder, proc = runs[ranks]
    summary = summary_of(folder)
    # The default run stops at its iteration limit, and says so on the last line.
    assert summary["iterations"] == 30 and not summary["converged"]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done in ")
    assert "not converged: stopped at the iteration limit (30 iterations)" in last
    assert summary["outcome"] in last
    history = summary["history"]
    assert len(history["loss"]) == len(history["kappa_error"]) == 31
    assert history["kappa_error"][0] == summary["kappa_relative_error_initial"]
    assert history["kappa_error"][-1] == pytest.approx(summary["kappa_relative_error"])
    lines = [line.split() for line in proc.stdout.splitlines() if "κ error" in line
             and not line.startswith("done")]
    assert [int(words[0]) for words in lines] == list(range(31))
    assert float(lines[0][2]) == pytest.approx(history["loss"][0], rel=1e-5)


def test_two_and_four_ranks_agree(runs):
    s2 = summary_of(runs[2][0])
    s4 = summary_of(runs[4][0])
    assert s2["iterations"] == s4["iterations"]
    # Different decompositions sum in different orders; the runs agree to rounding.
    assert s2["kappa_relative_error"] == pytest.approx(s4["kappa_relative_error"], rel=1e-6)
    np.testing.assert_allclose(s2["history"]["loss"], s4["history"]["loss"], rtol=1e-6)


def test_final_time_is_fixed_and_printed(runs, tmp_path):
    proc = run_job(2, "--n", "16", "--maxiter", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    coarse, fine = summary_of(tmp_path), summary_of(runs[2][0])
    assert (coarse["steps"], fine["steps"]) == (64, 232)
    for summary in (coarse, fine):
        assert summary["steps"] * summary["dt"] == pytest.approx(0.02, rel=1e-12)
    assert "time 0.02 in 64 steps" in proc.stdout.splitlines()[0]
    assert "time 0.02 in 232 steps" in runs[2][1].stdout.splitlines()[0]


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_objective_gradient_in_float32_and_float64():
    import gpumpiad as gm
    from gpumpiad.heat.inverse import Problem, Settings
    values = {}
    for dtype in ("float64", "float32"):
        problem = Problem(Settings(n=8, dtype=dtype, noise=0.01))
        rng = np.random.default_rng(problem.grid.rank)
        kappa = gm.tensor(1 + 0.3 * rng.random(problem.grid.local_shape), distributed=True)
        if dtype == "float64":
            # The optimiser's float64 κ drives the objective: finite differences agree.
            gm.check_grad(problem.loss, kappa, max_elements=6)
        values[dtype] = gm.value_and_grad(problem.loss)(kappa)
        problem.grid.free()
    (f64, g64), (f32, g32) = values["float64"], values["float32"]
    parallel_assert(g32.dtype == np.float64 and g32.shape == g64.shape)
    parallel_assert(abs(float(f32) - float(f64)) <= 1e-4 * abs(float(f64)))
    parallel_assert(np.abs(g32 - g64).max() <= 1e-3 * np.abs(g64).max(),
                    f"{np.abs(g32 - g64).max()} vs {np.abs(g64).max()}")


def test_float32(tmp_path):
    proc = run_job(2, "--n", "16", "--dtype", "float32", "--maxiter", "3",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = summary_of(tmp_path)
    assert summary["settings"]["dtype"] == "float32"
    assert summary["kappa_relative_error"] < 0.7 * summary["kappa_relative_error_initial"]


def test_resume_reaches_the_uninterrupted_result(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    flags = ["--n", "16"]
    proc = run_job(2, *flags, "--maxiter", "6", "--out", str(whole))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_job(2, *flags, "--maxiter", "3", "--resume", "--out", str(parts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (parts / "restart.ckpt").exists()
    assert summary_of(parts)["iterations"] == 3
    proc = run_job(2, *flags, "--maxiter", "6", "--resume", "--out", str(parts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout
    a, b = summary_of(whole), summary_of(parts)
    assert b["resumed"] and b["iterations"] == a["iterations"] == 6
    assert b["final_loss"] == a["final_loss"]
    assert b["kappa_relative_error"] == a["kappa_relative_error"]
    assert b["history"]["loss"] == a["history"]["loss"]
    # A restart file of other settings is refused, naming the difference, once.
    proc = run_job(2, *flags, "--noise", "0.01", "--resume", "--out", str(parts), timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "other settings: noise 0.0 (this run: 0.01)" in proc.stderr


@pytest.mark.parametrize("flags, words, code", [
    (["--n", "0"], "must be positive", 2),
    (["--time", "-1"], "must be positive", 2),
    (["--dtype", "float16"], "invalid choice", 2),
    (["--bogus"], "unrecognized arguments", 2),
    (["--n", "2", "--dims", "4", "1"], "ranks 0-3: a grid of 2x2 cells", 1),
    (["--steps", "10", "--snapshots", "4"], "multiple of snapshots", 1),
    (["--n", "16", "--steps", "8"], "expected at least 60 steps", 1),
    (["--out", "/proc/gpumpiad-cannot-write-here"], "not writable", 1),
])
def test_bad_settings_are_reported_once(tmp_path, flags, words, code):
    if "--out" not in flags:
        flags = flags + ["--out", str(tmp_path)]
    proc = run_job(4, *flags, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert proc.stderr.count(words) == 1, proc.stderr
    # One line, nothing from the other ranks; argparse's usage text (its continuation lines
    # indented) comes first.
    lines = [line for line in proc.stderr.splitlines()
             if not line.startswith(("usage:", " "))]
    assert lines == [next(line for line in lines if words in line)], proc.stderr


def test_version_and_help_print_once():
    import gpumpiad
    proc = run(2, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gpumpiad {gpumpiad.__version__}", proc.stdout
    proc = run(2, "heat-inverse", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("usage:") == 1, proc.stdout
    assert "mpiexec -n 4 gpumpiad heat-inverse" in proc.stdout


def test_every_flag_has_a_description_and_its_default():
    from gpumpiad.cli import _parser
    jobs = next(a for a in _parser()._actions if a.dest == "job")
    assert "mpiexec -n 4 gpumpiad" in _parser().epilog
    for name, job in jobs.choices.items():
        for action in job._actions:
            if action.dest == "help":
                continue
            assert action.help and "default" in action.help, (name, action.dest)
    help_text = jobs.choices["heat-inverse"].format_help()
    assert "restart" in help_text and "for the gradient" in help_text


def test_outcome_says_converged_or_why_not():
    from scipy.optimize import OptimizeResult

    from gpumpiad.heat.inverse import outcome
    converged = OptimizeResult(status=0, nit=12,
                               message="CONVERGENCE: REL_REDUCTION_OF_F_<=_FACTR*EPSMCH")
    assert outcome(converged) == (
        True, "converged after 12 iterations: the loss stopped decreasing (relative change "
              "below ftol)")
    limit = OptimizeResult(status=1, nit=30, message="STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT")
    assert outcome(limit) == (
        False, "not converged: stopped at the iteration limit (30 iterations)")
    other = OptimizeResult(status=2, nit=4, message="ABNORMAL: ")
    assert outcome(other) == (False, "not converged: stopped after 4 iterations: ABNORMAL: ")


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_theta_root_example_reaches_the_root(ranks):
    """The seed's L-BFGS example with the default stopping rule: θ solves 1 + θ + ... +
    θ^(P-1) = 2 to 1e-10, as Optim.jl's defaults do in the seed."""
    proc = run(ranks, "theta-root")
    assert proc.returncode == 0, proc.stderr
    theta = float(re.search(r"θ = ([0-9.e+-]+)", proc.stdout).group(1))
    roots = np.roots([1.0] * (ranks - 1) + [-1.0])  # θ^(P-1) + ... + θ + 1 - 2 = 0
    root = min(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0)
    assert abs(theta - root) < 1e-10, proc.stdout


def test_theta_rank_example():
    proc = run(4, "theta-rank")
    assert proc.returncode == 0, proc.stderr
    assert "ranks 4: L = 15, dL/dθ = 17" in proc.stdout


def test_profile_writes_a_consistent_table_json_and_bars(tmp_path):
    proc = run_job(2, "--profile", "--n", "16", "--maxiter", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert "profile.json, profile.png" in proc.stdout.splitlines()[-1]
    profile = json.loads((tmp_path / "profile.json").read_text())
    phases = profile["phases"]
    assert phases == ["compute", "adjoint", "communication", "waiting", "host staging", "other"]
    rows = profile["ranks"]
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        assert all(row[p] >= 0 for p in phases), row
        assert row["wall"] > 0
        assert sum(row[p] for p in phases) == pytest.approx(row["wall"], rel=1e-9, abs=1e-9)
        # The library's spans ran: the solver's and the halo exchange's MPI calls.
        assert row["communication"] > 0 and row["compute"] + row["adjoint"] > 0, row
        assert sum(row["spans"].values()) <= row["wall"] - row["other"] + 1e-9
    # Rank 0's own clock: the profile covers the optimisation the job timed.
    assert rows[0]["wall"] <= summary_of(tmp_path)["seconds_total"]
    # The table, printed once by rank 0, holds the same numbers.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("profile, seconds per rank") for line in lines) == 1
    head = lines.index(next(line for line in lines if line.startswith("rank ")))
    for row, line in zip(rows, lines[head + 1:head + 3]):
        numbers = [float(v) for v in line.split()]
        assert numbers[0] == row["rank"]
        assert numbers[1:] == pytest.approx([row[p] for p in phases] + [row["wall"]],
                                            abs=6e-4)
    assert lines[head + 3].split()[0] == "%"


def test_without_profile_no_profile_is_written(runs):
    folder, proc = runs[2]
    assert not (folder / "profile.json").exists() and not (folder / "profile.png").exists()
    assert "profile" not in proc.stdout
