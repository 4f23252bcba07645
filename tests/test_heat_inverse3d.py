"""The inverse heat problem in 3-D: settings, the true field, the regulariser, the objective's
gradient, the recovery at several decompositions, and ``gpumpiad heat-inverse`` on a 3-D grid."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gm
from gpumpiad.heat import inverse, report
from gpumpiad.heat.inverse import Problem, Settings

WORLD = MPI.COMM_WORLD
ENV = dict(os.environ, GPUMPIAD_BACKEND="numpy", PYTHONUNBUFFERED="1")
TINY = dict(n=(8, 8, 6), maxiter=4)


def run_job(ranks, *flags, timeout=240):
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "gpumpiad", "heat-inverse",
           *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


def global_roughness(kappa):
    """Σ (κ_a − κ_b)² over every pair of neighbouring cells of a global field."""
    return sum(float((np.diff(kappa, axis=axis) ** 2).sum()) for axis in range(kappa.ndim))


# Settings and the fields: no solver involved.

def test_settings_give_the_grid_of_two_or_three_axes():
    assert Settings().grid_shape() == (32, 32)
    assert Settings(n=32, dims=(2, 2, 1)).grid_shape() == (32, 32, 32)
    assert Settings(n=(32, 32, 16)).grid_shape() == (32, 32, 16)
    assert Settings(n=(32, 16), dims=(2, 1)).grid_shape() == (32, 16)
    assert Settings(n=(np.int64(6), 5, 4), dims=(1, 1, 2)).grid_shape() == (6, 5, 4)


@pytest.mark.parametrize("n, dims, words", [
    ((32, 32), (2, 2, 1), "dims (2, 2, 1) has 3 entries for the 2-D grid n = (32, 32): "
                          "expected 2"),
    ((8, 8, 6), (2, 2), "dims (2, 2) has 2 entries for the 3-D grid n = (8, 8, 6)"),
    (32, (4,), "dims must have 2 or 3 entries"),
    (32, 4, "dims must be None or 2 or 3 ints"),
    ((8, 8, 6, 2), None, "n must be a positive int or 2 or 3 positive ints"),
    ((8, 0, 6), None, "got (8, 0, 6)"),
    (8.0, None, "got 8.0"),
    (True, None, "got True"),
])
def test_bad_grid_settings_name_the_argument_and_the_rank(n, dims, words):
    with pytest.raises(ValueError, match=r"^rank 0: ") as error:
        Settings(n=n, dims=dims).grid_shape(rank=0)
    assert words in str(error.value)


def test_steps_keep_the_three_dimensional_limit_with_the_same_margin():
    h = 1 / 33
    steps = inverse.stable_steps(Settings(n=(32, 32, 16)), h)
    limit = h * h / (6 * 2.5)
    dt = 0.02 / steps
    assert dt <= 0.95 * limit < 0.02 / (steps - 4)  # the fewest multiple of the 4 snapshots
    # The 2-D limit is h²/(4 κ_max): the default job keeps its 232 steps.
    assert inverse.stable_steps(Settings(), h) == 232
    with pytest.raises(ValueError, match=r"h²/\(6 κ_max\).*expected at least 328 steps"):
        inverse.stable_steps(Settings(n=(32, 32, 16), steps=320), h)


def test_true_kappa_in_three_dimensions_is_a_smooth_bump_and_dip_in_the_same_range():
    x = np.linspace(0, 1, 61)
    k3 = inverse.true_kappa(*np.meshgrid(x, x, x, indexing="ij"))
    assert 0.6 <= k3.min() < 0.65 and 1.55 < k3.max() <= 1.6
    # The bump and the dip lie near the middle z-plane, where the figure shows them.
    middle = k3[:, :, 30]
    assert middle.max() > 1.5 and middle.min() < 0.7
    assert np.abs(np.diff(k3, axis=2)).max() < 0.1  # smooth along z as along x and y
    for field in (inverse.initial_state, inverse.source):
        values = field(*np.meshgrid(x, x, x, indexing="ij"))
        assert values.shape == k3.shape and np.isfinite(values).all()
    u0 = inverse.initial_state(*np.meshgrid(x, x, x, indexing="ij"))
    assert np.abs(u0[[0, -1]]).max() < 1e-12 and np.abs(u0[:, :, [0, -1]]).max() < 1e-12


def test_middle_plane_and_cell_width():
    assert report.middle_plane((32, 32, 16)) == {"axis": "z", "index": 8, "cells": 16,
                                                 "z": 9 / 33}
    assert report.middle_plane((8, 8, 7))["index"] == 3
    assert inverse.cell_width((32, 32, 16)) == 1 / 33 == inverse.cell_width((32, 32))


def test_kappa_figure_of_a_three_dimensional_field_shows_the_middle_plane(tmp_path):
    import matplotlib.image
    x = (np.arange(1, 9) / 9, np.arange(1, 9) / 9, np.arange(1, 7) / 7)
    true = inverse.true_kappa(*np.meshgrid(*x, indexing="ij"))
    recovered = true * (1 + 0.01 * np.sin(np.arange(true.size)).reshape(true.shape))
    report.kappa_figure(tmp_path / "kappa.png", true, recovered, "title")
    image = matplotlib.image.imread(tmp_path / "kappa.png")
    assert image.shape[:2] == (460, 1350)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 200


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_regulariser_sums_every_edge_of_every_axis_once():
    rng = np.random.default_rng(5)
    field = rng.random((7, 6, 5))
    values = {}
    for dims in ((0, 0, 0), (1, 1, WORLD.size), (WORLD.size, 1, 1)):
        with gm.Grid(field.shape, dims=dims) as grid:
            kappa = gm.tensor(field[grid.slices()], distributed=True)
            values[dims] = float(gm.mpi_sum(inverse.roughness(kappa, grid)))
            # The gradient flows back through the halo exchange to the owners of the cells.
            report_ = gm.check_grad(lambda k: gm.mpi_sum(inverse.roughness(k, grid)), kappa,
                                    max_elements=8)
            parallel_assert(report_["checked"] > 0)
    expected = global_roughness(field)
    for dims, value in values.items():
        parallel_assert(abs(value - expected) <= 1e-12 * expected, f"{dims}: {value} vs "
                        f"{expected}")


# The job itself: needs the 3-D solver.

@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_objective_gradient_with_the_regulariser_matches_finite_differences():
    for regularization in (1e-6, 1e-2):
        problem = Problem(Settings(n=(6, 5, 4), noise=0.01, regularization=regularization))
        rng = np.random.default_rng(problem.grid.rank)
        kappa = gm.tensor(1 + 0.3 * rng.random(problem.grid.local_shape), distributed=True)
        checked = gm.check_grad(problem.loss, kappa, max_elements=5)
        parallel_assert(checked["checked"] > 0)
        if regularization == 1e-2:
            # The smoothness term is then a good part of the objective the check covered.
            rough = regularization * float(gm.mpi_sum(problem.roughness(kappa)))
            parallel_assert(rough > 0.1 * float(problem.loss(kappa)), f"{rough}")
        problem.grid.free()


@pytest.mark.parallel(nprocs=[2, 4])
def test_problem_on_a_sub_communicator_sums_over_its_own_ranks():
    settings = Settings(n=(6, 5, 4), regularization=1e-2)
    kappa = 1 + 0.2 * np.arange(120.0).reshape(6, 5, 4) / 120
    values = []
    with gm.Comm(WORLD).split(WORLD.rank % 2) as half:
        for comm in (None, half):
            problem = Problem(settings, comm=comm)
            patch = gm.tensor(kappa[problem.grid.slices()], distributed=True,
                              comm=problem.grid.cart)
            values.append(gm.value_and_grad(problem.loss)(patch))
            values[-1] = (float(values[-1][0]), problem.grid.gather(values[-1][1], root=None))
            problem.grid.free()
    (whole, g_whole), (part, g_part) = values
    parallel_assert(abs(part - whole) <= 1e-12 * whole, f"{part} vs {whole}")
    parallel_assert(np.abs(g_part - g_whole).max() <= 1e-12 * np.abs(g_whole).max())


def _recover(settings, comm=None):
    problem = Problem(settings, comm=comm)
    result, history = inverse.recover(problem, progress=lambda line: None)
    x = problem.assemble(result.x) if problem.grid.cart.rank == 0 else None
    problem.grid.free()
    return x, result, history


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_recovery_in_three_dimensions_is_the_same_on_any_decomposition():
    factorings = {1: [(1, 1, 1)], 2: [(2, 1, 1), (1, 1, 2)], 4: [(2, 2, 1), (1, 2, 2)]}
    reference = None
    if WORLD.rank == 0:
        with gm.Comm(MPI.COMM_SELF).dup() as alone:
            reference = _recover(Settings(**TINY), comm=alone)
    reference = WORLD.bcast(reference, root=0)
    x1, r1, h1 = reference
    parallel_assert(h1["loss"][-1] < 0.2 * h1["loss"][0], f"{h1['loss']}")
    parallel_assert(h1["kappa_error"][-1] < 0.9 * h1["kappa_error"][0], f"{h1['kappa_error']}")
    parallel_assert(r1.nit == TINY["maxiter"])
    for dims in factorings[WORLD.size]:
        x, result, history = _recover(Settings(**TINY, dims=dims))
        parallel_assert(result.nit == r1.nit and result.nfev == r1.nfev, f"{dims}")
        parallel_assert(abs(result.fun - r1.fun) <= 1e-10 * abs(r1.fun),
                        f"{dims}: {result.fun} vs {r1.fun}")
        differences = None
        if WORLD.rank == 0:
            differences = (float(np.abs(x - x1).max()),
                           max(abs(a / b - 1) for key in ("loss", "kappa_error")
                               for a, b in zip(history[key], h1[key])))
        field, curves = WORLD.bcast(differences, root=0)
        parallel_assert(field <= 1e-10 and curves <= 1e-10, f"{dims}: κ differs by {field}, "
                        f"the history by {curves} (relative)")


# The command line.

def test_cli_runs_the_three_dimensional_job_alike_at_one_two_and_four_ranks(tmp_path):
    runs = {}
    for ranks, dims in ((1, []), (2, ["--dims", "1", "1", "2"]), (4, ["--dims", "2", "2", "1"])):
        folder = tmp_path / f"ranks{ranks}"
        proc = run_job(ranks, *dims, "--n", "8", "8", "6", "--maxiter", "4", "--out",
                       str(folder))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[ranks] = (summary_of(folder), proc)
    summary, proc = runs[4]
    first = proc.stdout.splitlines()[0]
    assert "4 rank(s), 2x2x1 patches of about 4x4x6 cells, grid 8x8x6" in first, first
    assert summary["dimension"] == 3 and summary["grid"] == [8, 8, 6]
    assert summary["patches"] == [2, 2, 1]
    assert summary["slice"] == {"axis": "z", "index": 3, "cells": 6, "z": 4 / 9}
    assert summary["steps"] == inverse.stable_steps(Settings(n=(8, 8, 6)), 1 / 9)
    history = summary["history"]
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    assert summary["kappa_relative_error"] < 0.9 * summary["kappa_relative_error_initial"]
    for ranks in (1, 2):
        other = runs[ranks][0]
        assert other["iterations"] == summary["iterations"] == 4
        np.testing.assert_allclose(other["history"]["loss"], history["loss"], rtol=1e-10)
        assert other["kappa_relative_error"] == pytest.approx(
            summary["kappa_relative_error"], rel=1e-10)
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "ranks4" / "kappa.png")
    assert image.shape[:2] == (460, 1350)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 200
    assert (tmp_path / "ranks4" / "loss.png").stat().st_size > 0


def test_cli_one_n_with_three_dims_is_a_cube(tmp_path):
    proc = run_job(2, "--n", "6", "--dims", "1", "1", "2", "--maxiter", "1",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = summary_of(tmp_path)
    assert summary["grid"] == [6, 6, 6] and summary["patches"] == [1, 1, 2]
    assert summary["settings"]["n"] == 6 and summary["settings"]["dims"] == [1, 1, 2]


def test_cli_resume_profile_noise_checkpoints_and_float32_in_three_dimensions(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    flags = ["--n", "8", "8", "6", "--noise", "0.01", "--checkpoints", "3"]
    proc = run_job(2, *flags, "--maxiter", "4", "--out", str(whole))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_job(2, *flags, "--maxiter", "2", "--resume", "--out", str(parts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_job(2, *flags, "--maxiter", "4", "--resume", "--profile", "--out", str(parts))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout and "profile.json, profile.png" in proc.stdout
    a, b = summary_of(whole), summary_of(parts)
    assert b["resumed"] and b["iterations"] == a["iterations"] == 4
    assert b["history"]["loss"] == a["history"]["loss"] and b["final_loss"] == a["final_loss"]
    assert a["settings"]["noise"] == 0.01 and a["dimension"] == 3
    profile = json.loads((parts / "profile.json").read_text())
    assert all(row["communication"] > 0 for row in profile["ranks"])
    proc = run_job(2, "--n", "8", "8", "6", "--dtype", "float32", "--maxiter", "3", "--out",
                   str(tmp_path / "f32"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single = summary_of(tmp_path / "f32")
    assert single["kappa_relative_error"] < 0.9 * single["kappa_relative_error_initial"]


@pytest.mark.parametrize("flags, words", [
    (["--n", "8", "8", "--dims", "2", "1", "1"],
     "arguments --n and --dims disagree: --n 8 8 is a 2-D grid but --dims 2 1 1 gives 3 axes"),
    (["--n", "8", "8", "6", "--dims", "2", "1"],
     "arguments --n and --dims disagree: --n 8 8 6 is a 3-D grid but --dims 2 1 gives 2 axes"),
    (["--n", "8", "8", "6", "2"], "argument --n: expected 1, 2 or 3 ints"),
    (["--dims", "2"], "argument --dims: expected 2 or 3 ints"),
    (["--dims", "1", "1", "1", "2"], "argument --dims: expected 2 or 3 ints"),
    (["--n", "8", "0", "6"], "argument --n: must be positive"),
])
def test_cli_bad_grid_flags_are_usage_errors(tmp_path, flags, words):
    proc = run_job(2, *flags, "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count(words) == 1, proc.stderr
    assert proc.stderr.count("usage:") == 1, proc.stderr
    assert not (tmp_path / "summary.json").exists()
