"""Command line: ``gpumpiad <job>`` (also ``python -m gpumpiad``), run under ``mpiexec``."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time


def _theta_rank(args):
    """The θ^rank example: L = sum(mpi_sum(mpi_bcast(θ) ** rank)) and dL/dθ at θ = 2."""
    import numpy as np

    import gpumpiad as gm

    def loss(theta):
        return gm.sum(gm.mpi_sum(gm.mpi_bcast(theta) ** gm.mpi_rank()))

    value, grad = gm.value_and_grad(loss)(np.array([args.theta]))
    if gm.mpi_rank() == 0:
        print(f"ranks {gm.mpi_size()}: L = {float(value):g}, dL/dθ = {float(grad[0]):g}")
    return 0


def _theta_root(args):
    """The seed's distributed L-BFGS example: minimise (Σ_rank θ^rank - 2)² from θ = 1, the
    parameter held on rank 0 and every rank computing its term; rank 0 prints the trace."""
    import numpy as np

    import gpumpiad as gm
    from gpumpiad.optimize import minimize

    def loss(theta):
        return (gm.sum(gm.mpi_sum(gm.mpi_bcast(theta) ** gm.mpi_rank())) - 2.0) ** 2

    result = minimize(loss, np.ones(1))
    if gm.mpi_rank() == 0:
        print(f"ranks {gm.mpi_size()}: θ = {float(result.x[0])!r}, L = {result.fun:g} after "
              f"{result.nit} iterations ({result.message})")
    return 0


class JobError(Exception):
    """A setting the job cannot run with; raised alike on every rank."""


def _failures(comm, message):
    """Every rank's failure message (``None``: none) gathered; the root prints each distinct
    one once, naming the ranks it came from. True on every rank when any rank failed."""
    from gpumpiad import control
    messages = control.allgather(comm, message, "heat-inverse settings check")
    if comm.rank == 0:
        groups = {}
        for rank, text in enumerate(messages):
            if text is not None:
                groups.setdefault(re.sub(r"^rank \d+: ", "", text), []).append(rank)
        for text, ranks in groups.items():
            # One write per line, so that mpiexec does not interleave it with other output.
            sys.stderr.write(f"gpumpiad heat-inverse: error: {_ranks(ranks)}: {text}\n")
    failed = any(m is not None for m in messages)
    if failed:
        _settle()
    return failed


def _ranks(ranks):
    """``rank 3``, ``ranks 0-3`` or ``ranks 0, 2``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def _prepare_output(comm, folder):
    """Root creates ``folder`` and checks it is writable; every rank learns the outcome."""
    from gpumpiad import control
    problem = None
    if comm.rank == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, f".write-test-{os.getpid()}")
            with open(probe, "w", encoding="utf-8"):
                pass
            os.remove(probe)
        except OSError as exc:
            problem = f"output folder {folder!r} is not writable: {exc.strerror or exc}"
    problem = control.bcast(comm, problem, 0, "output folder check")
    if problem:
        raise JobError(problem)


RESTART_FILE = "restart.ckpt"
RESTART_SETTINGS = "restart.json"


def _restart_identity(problem, size):
    """What a restart file must have been written for: everything that changes the
    optimiser's iterates (not ``maxiter``, nor ``checkpoints``, which only trades memory for
    recomputation), with the steps resolved and the patch layout, as the optimiser's vector
    holds the patches in rank order."""
    import json
    settings = dict(vars(problem.settings), steps=problem.steps, dims=problem.grid.dims,
                    ranks=size)
    for key in ("maxiter", "checkpoints"):
        settings.pop(key)
    return json.loads(json.dumps(settings))


def _prepare_restart(comm, folder, identity):
    """The restart file's path, after the root checked that an existing one belongs to these
    settings (or, with none there yet, recorded them); raises JobError alike on every rank."""
    import json

    from gpumpiad import control
    from gpumpiad.heat import report
    path = os.path.join(folder, RESTART_FILE)
    record = os.path.join(folder, RESTART_SETTINGS)
    outcome = None
    if comm.rank == 0:
        try:
            if not os.path.exists(path):
                report.write_summary(record, identity)
                outcome = ("fresh", None)
            else:
                with open(record, encoding="utf-8") as f:
                    written = json.load(f)
                differ = [f"{k} {written.get(k)!r} (this run: {v!r})"
                          for k, v in identity.items() if written.get(k) != v]
                outcome = ("resume", None) if not differ else ("error", (
                    f"{path} was written by a run with other settings: "
                    f"{', '.join(differ)}; rerun with those settings, or delete {path} "
                    "to start afresh"))
        except (OSError, ValueError) as exc:
            outcome = ("error", f"cannot use the restart file {path}: {record}: "
                                f"{getattr(exc, 'strerror', None) or exc}; delete {path} "
                                "to start afresh")
    status, problem = control.bcast(comm, outcome, 0, "restart file check")
    if status == "error":
        raise JobError(problem)
    return path, status == "resume"


def _heat_inverse(args):
    """Recover κ of the heat equation from observed temperatures (the main job), in 2-D or
    3-D."""
    import numpy as np

    import gpumpiad as gm
    from gpumpiad import trace
    from gpumpiad.checkpoint import CheckpointError
    from gpumpiad.comm import world
    from gpumpiad.heat import inverse, report
    from gpumpiad.heat.kernels import kernels_for

    comm = world()
    rank, size = comm.rank, comm.size
    settings = inverse.Settings(
        n=args.n if isinstance(args.n, int) else tuple(args.n), time=args.time,
        steps=args.steps, snapshots=args.snapshots,
        dims=tuple(args.dims) if args.dims else None, dtype=args.dtype, noise=args.noise,
        regularization=args.regularization, maxiter=args.maxiter,
        checkpoints=args.checkpoints, seed=args.seed)
    failure, problem, restart, resuming = None, None, None, False
    try:
        _prepare_output(comm, args.out)
        gm.array_module()
    except (ValueError, JobError, gm.backend.BackendError) as exc:
        failure = str(exc)
    # The backend may fail on some ranks only: all agree before the collective set-up.
    if _failures(comm, failure):
        return 1
    try:
        problem = inverse.Problem(settings)
        if args.resume:
            restart, resuming = _prepare_restart(comm, args.out,
                                                 _restart_identity(problem, size))
    except (ValueError, JobError) as exc:
        failure = str(exc)
    if _failures(comm, failure):
        return 1
    grid = problem.grid
    say = print if rank == 0 else (lambda *a, **k: None)
    kernels = kernels_for(problem.u0, ndim=grid.ndim).__name__.rsplit(".", 1)[-1]
    say(f"gpumpiad heat-inverse: {size} rank(s), {_by(grid.dims)} patches of about "
        f"{_by(grid.local_shape)} cells, grid {_by(grid.shape)}, time {settings.time:g} in "
        f"{problem.steps} steps (dt "
        f"{problem.dt:.3g}), {settings.snapshots} snapshots, {settings.dtype}", flush=True)
    say(f"noise {settings.noise:g}, regularization {settings.regularization:g}, at most "
        f"{settings.maxiter} iterations; backend {gm.backend_name()} (GPU "
        f"{'yes' if gm.backend_name() == 'cupy' else 'no'}), kernels {kernels}, MPI data "
        f"path {gm.path_description()} (CUDA-aware MPI {'yes' if gm.cuda_aware() else 'no'})",
        flush=True)
    if restart:
        say(f"resuming from {restart}: its iterations are replayed, not recomputed"
            if resuming else f"restart file {restart}, written every iteration", flush=True)
    started = time.perf_counter()
    try:
        with trace.collect() if args.profile else contextlib.nullcontext() as totals:
            result, history = inverse.recover(
                problem, progress=lambda line: say(line, flush=True), checkpoint=restart)
    except CheckpointError as exc:  # raised alike on every rank
        _failures(comm, f"{exc}; delete {restart} to start afresh")
        return 1
    seconds = time.perf_counter() - started
    # Straight through mpi4py: the profile must not add spans of its own.
    profiles = comm.mpi.gather(totals.snapshot(), root=0) if args.profile else None
    recovered = problem.assemble(result.x) if rank == 0 else None
    true = grid.gather(problem.kappa_true)
    if rank == 0:
        error = float(np.linalg.norm(recovered - true) / np.linalg.norm(true))
        initial = history["kappa_error"][0]
        converged, outcome = inverse.outcome(result)
        summary = {
            "settings": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in vars(settings).items()},
            "dimension": grid.ndim, "grid": list(grid.shape), "cell_width": problem.h,
            "slice": report.middle_plane(grid.shape) if grid.ndim == 3 else None,
            "steps": problem.steps, "dt": problem.dt,
            "ranks": size, "patches": list(grid.dims), "backend": gm.backend_name(),
            "kernels": kernels, "mpi_data_path": gm.path_description(),
            "versions": report.versions(),
            "iterations": int(result.nit), "evaluations": int(result.nfev),
            "converged": converged, "outcome": outcome,
            "final_loss": float(result.fun), "optimizer_message": str(result.message),
            "kappa_relative_error_initial": initial, "kappa_relative_error": error,
            "resumed": resuming, "seconds_total": seconds,
            "seconds_per_iteration": seconds / max(1, int(result.nit)),
            "history": history,
        }
        title = report.title(summary)
        report.kappa_figure(os.path.join(args.out, "kappa.png"), true, recovered, title)
        report.loss_figure(os.path.join(args.out, "loss.png"), history, title)
        report.write_summary(os.path.join(args.out, "summary.json"), summary)
        written = "kappa.png, loss.png, summary.json"
        if profiles is not None:
            rows = report.profile_rows(profiles)
            print("profile, seconds per rank (each span's own time, nested spans excluded; "
                  "other: outside every span):\n" + report.profile_table(rows), flush=True)
            report.write_summary(os.path.join(args.out, "profile.json"), {
                "phases": [phase for phase, _ in report.PHASES],
                "categories": dict(report.PHASES), "ranks": rows,
                "attribution": "exclusive: the innermost open span owns the clock"})
            report.profile_figure(os.path.join(args.out, "profile.png"), rows, title)
            written += ", profile.json, profile.png"
        print(f"done in {seconds:.1f} s, {outcome}; relative κ error {100 * initial:.1f}% -> "
              f"{100 * error:.2f}%; wrote {written} to {args.out}", flush=True)
    return 0


def _by(values):
    return "x".join(str(v) for v in values)


def _check_heat_inverse(parser, args):
    """Usage errors of heat-inverse's flags that argparse cannot see one flag at a time: the
    number of --n and --dims values and their agreement."""
    n = args.n if isinstance(args.n, int) else list(args.n)
    if isinstance(n, list) and len(n) == 1:
        n = args.n = n[0]
    if isinstance(n, list) and len(n) > 3:
        parser.error(f"argument --n: expected 1, 2 or 3 ints (one for a square grid, or a cube "
                     f"with three --dims; NX NY; NX NY NZ), got {len(n)}: {' '.join(map(str, n))}")
    if args.dims is None:
        return
    if len(args.dims) not in (2, 3):
        parser.error(f"argument --dims: expected 2 or 3 ints (patches along x, y and for a 3-D "
                     f"grid z), got {len(args.dims)}: {' '.join(map(str, args.dims))}")
    if isinstance(n, list) and len(n) != len(args.dims):
        parser.error(f"arguments --n and --dims disagree: --n {' '.join(map(str, n))} is a "
                     f"{len(n)}-D grid but --dims {' '.join(map(str, args.dims))} gives "
                     f"{len(args.dims)} axes; give --dims {len(n)} ints, or one --n for a "
                     f"grid of {len(args.dims)} equal sides")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _non_negative(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser that prints (help, version, usage errors) on rank 0 only, so that a
    job of P ranks shows its message once; every rank exits with argparse's code."""

    def _print_message(self, message, file=None):
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)

    def exit(self, status=0, message=None):
        if message:
            self._print_message(message, sys.stderr)
        _settle()
        raise SystemExit(status)  # an agreed exit: see main


def _settle(seconds=10.0):
    """Wait (a bounded time) until every rank got here, so that rank 0 has written its message
    before any rank's exit can end the job."""
    from mpi4py import MPI
    sys.stdout.flush()
    sys.stderr.flush()
    request = MPI.COMM_WORLD.Ibarrier()
    deadline = time.monotonic() + seconds
    while not request.Test() and time.monotonic() < deadline:
        time.sleep(0.01)


_EPILOG = """\
Run under MPI, one rank per patch (and per GPU):
  mpiexec -n 4 gpumpiad heat-inverse
  mpiexec -n 4 gpumpiad heat-inverse --n 64 --noise 0.01 --resume
  mpiexec -n 4 gpumpiad heat-inverse --dims 2 2 1 --n 32 32 16
Without mpiexec it runs on one rank. Each job's --help lists its options."""


def _parser():
    """The command line's parser: the jobs and their flags."""
    import gpumpiad

    parser = _Parser(prog="gpumpiad", description=gpumpiad.__doc__.splitlines()[0],
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"gpumpiad {gpumpiad.__version__}")
    jobs = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    example = jobs.add_parser(
        "theta-rank", help="the θ^rank sum/broadcast example and its gradient",
        description="L(θ) = Σ_rank θ^rank with θ broadcast from rank 0, and dL/dθ (the "
                    "same total on every rank).",
        epilog="Run under MPI: mpiexec -n 4 gpumpiad theta-rank",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    example.add_argument("--theta", type=float, default=2.0,
                         help="the value of θ (default: %(default)s)")
    example.set_defaults(run=_theta_rank)
    root = jobs.add_parser(
        "theta-root", help="the distributed L-BFGS example: solve 1 + θ + ... + θ^(P-1) = 2",
        description="Minimise (Σ_rank θ^rank - 2)² from θ = 1 with L-BFGS-B, the parameter "
                    "held on rank 0 and every rank computing its term and its gradient.",
        epilog="Run under MPI: mpiexec -n 4 gpumpiad theta-root",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    root.set_defaults(run=_theta_root)
    inv = jobs.add_parser(
        "heat-inverse", help="recover a diffusivity field from observed temperatures",
        description="Solve ∂u/∂t = κ(x,y)Δu + f on the unit square (or κ(x,y,z) on the unit\n"
                    "cube: three --n or --dims), split over the ranks, observe u at evenly\n"
                    "spaced times, and recover κ from a constant guess with L-BFGS-B,\n"
                    "differentiating through the halo exchanges. Rank 0 prints one line per\n"
                    "iteration and writes kappa.png (in 3-D: the middle z-plane), loss.png\n"
                    "and summary.json to the output folder.",
        epilog="Run under MPI, e.g.: mpiexec -n 4 gpumpiad heat-inverse --n 64\n"
               "                     mpiexec -n 4 gpumpiad heat-inverse --dims 2 2 1 "
               "--n 32 32 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inv.add_argument("--n", type=_positive(int), nargs="+", default=32, metavar="N",
                     help="the grid: one int, cells per side of a square (a cube with three "
                          "--dims), or cells per axis NX NY or NX NY NZ (a 3-D grid); cells are "
                          "squares or cubes, the longest axis spanning [0, 1] "
                          "(default: %(default)s)")
    inv.add_argument("--time", type=_positive(float), default=0.02,
                     help="simulated physical time, the same for every --n "
                          "(default: %(default)s)")
    inv.add_argument("--steps", type=_positive(int),
                     help="time steps, a multiple of --snapshots, with dt = time/steps within "
                          "the explicit scheme's stability limit (default: the fewest such "
                          "steps, e.g. 232 for --n 32)")
    inv.add_argument("--snapshots", type=_positive(int), default=4,
                     help="observed states, evenly spaced in time (default: %(default)s)")
    inv.add_argument("--dims", type=_positive(int), nargs="+", metavar="P",
                     help="patches per axis, PX PY or PX PY PZ (one per axis of --n), whose "
                          "product is the number of ranks (default: as even as the ranks "
                          "allow, MPI_Dims_create)")
    inv.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                     help="floating type of the fields (default: %(default)s; the optimiser "
                          "works in float64)")
    inv.add_argument("--backend", choices=("numpy", "cupy"),
                     help="array backend (default: CuPy when a GPU is usable, else NumPy)")
    inv.add_argument("--noise", type=_non_negative, default=0.0,
                     help="observation noise: standard deviation relative to the largest "
                          "state value (default: %(default)s)")
    inv.add_argument("--regularization", type=_non_negative, default=1e-6,
                     help="weight α of the smoothness term α Σ (κ_a − κ_b)² over neighbouring "
                          "cells (default: %(default)s)")
    inv.add_argument("--maxiter", type=_positive(int), default=30,
                     help="optimiser iterations at most; the last line says whether it "
                          "converged or stopped at this limit (default: %(default)s)")
    inv.add_argument("--checkpoints", type=_positive(int),
                     help="states each solve stores for the gradient's reverse pass; fewer "
                          "save memory and cost recomputation (binomial checkpointing). Not "
                          "restart files: see --resume (default: every state, no "
                          "recomputation)")
    inv.add_argument("--resume", action="store_true",
                     help=f"write the optimiser's restart file OUT/{RESTART_FILE} every "
                          f"iteration, and resume from it when it exists: after an "
                          f"interruption, rerun the same command (or with a larger --maxiter "
                          f"to continue); the result is that of an uninterrupted run. Needs "
                          f"the same settings and number of ranks (default: off)")
    inv.add_argument("--profile", action="store_true",
                     help="time the optimisation per rank and phase (compute, adjoint, "
                          "communication, waiting, host staging, other) from the library's "
                          "trace spans; rank 0 prints the table and writes profile.json and "
                          "the stacked bars profile.png (default: off)")
    inv.add_argument("--seed", type=int, default=0,
                     help="random seed of the noise (default: %(default)s)")
    inv.add_argument("--out", default="heat-inverse-out",
                     help="output folder, created if missing (default: %(default)s)")
    inv.set_defaults(run=_heat_inverse, check=lambda args: _check_heat_inverse(inv, args))
    from gpumpiad.heat import learn
    learn.add_job(jobs)
    return parser


def main(argv=None):
    """Entry point of the ``gpumpiad`` console script.

    Returns 0 on success. A failure every rank agreed on (a usage error, a setting the job
    cannot run with), which rank 0 has reported, raises ``SystemExit`` with code 2 (usage) or
    1 on every rank.
    """
    import gpumpiad

    args = _parser().parse_args(argv)
    if getattr(args, "check", None):
        args.check(args)
    if getattr(args, "backend", None):
        os.environ["GPUMPIAD_BACKEND"] = args.backend
    gpumpiad.mpi_init()
    code = args.run(args)
    gpumpiad.mpi_finalize()
    if code:
        # Raised, not sys.exit: every rank ends alike with its code, which is no rank failing
        # alone, so the abort-on-error hook (which watches sys.exit) must not end the job.
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
