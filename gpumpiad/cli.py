"""Command line: ``gpumpiad <job>`` (also ``python -m gpumpiad``), run under ``mpiexec``."""
from __future__ import annotations

import argparse
import os
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


class JobError(Exception):
    """A setting the job cannot run with; raised alike on every rank."""


def _prepare_output(folder):
    """Root creates ``folder`` and checks it is writable; every rank learns the outcome."""
    from gpumpiad import control
    from gpumpiad.comm import world
    comm = world()
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


def _heat_inverse(args):
    """Recover κ(x, y) of the heat equation from observed temperatures (the main job)."""
    import numpy as np

    import gpumpiad as gm
    from gpumpiad.heat import inverse, report
    from gpumpiad.halo import kernels_for

    rank, size = gm.mpi_rank(), gm.mpi_size()
    settings = inverse.Settings(
        n=args.n, steps=args.steps, snapshots=args.snapshots,
        dims=tuple(args.dims) if args.dims else None, dtype=args.dtype, noise=args.noise,
        regularization=args.regularization, maxiter=args.maxiter,
        checkpoints=args.checkpoints, seed=args.seed)
    try:
        _prepare_output(args.out)
        gm.array_module()
        problem = inverse.Problem(settings)
    except (ValueError, JobError, gm.backend.BackendError) as exc:
        # One write per line, so that mpiexec does not interleave the ranks' lines.
        sys.stderr.write(f"gpumpiad heat-inverse: error: {exc}\n")
        sys.stderr.flush()
        return 1
    grid = problem.grid
    say = print if rank == 0 else (lambda *a, **k: None)
    kernels = kernels_for(problem.u0).__name__.rsplit(".", 1)[-1]
    say(f"gpumpiad heat-inverse: {size} rank(s), {grid.dims[0]}x{grid.dims[1]} patches of "
        f"about {grid.local_shape[0]}x{grid.local_shape[1]} cells, grid {settings.n}x"
        f"{settings.n}, {settings.steps} steps, {settings.snapshots} snapshots, "
        f"{settings.dtype}", flush=True)
    say(f"backend {gm.backend_name()} (GPU {'yes' if gm.backend_name() == 'cupy' else 'no'}), "
        f"kernels {kernels}, MPI data path {gm.path_description()} "
        f"(CUDA-aware MPI {'yes' if gm.cuda_aware() else 'no'})", flush=True)
    started = time.perf_counter()
    result, history = inverse.recover(problem, progress=lambda line: say(line, flush=True))
    seconds = time.perf_counter() - started
    recovered = problem.assemble(result.x) if rank == 0 else None
    true = grid.gather(problem.kappa_true)
    if rank == 0:
        error = float(np.linalg.norm(recovered - true) / np.linalg.norm(true))
        initial = float(np.linalg.norm(settings.kappa_guess - true) / np.linalg.norm(true))
        report.kappa_figure(os.path.join(args.out, "kappa.png"), true, recovered)
        report.loss_figure(os.path.join(args.out, "loss.png"), history)
        summary = {
            "settings": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in vars(settings).items()},
            "ranks": size, "patches": list(grid.dims), "backend": gm.backend_name(),
            "kernels": kernels, "mpi_data_path": gm.path_description(),
            "versions": report.versions(),
            "iterations": int(result.nit), "evaluations": int(result.nfev),
            "final_loss": float(result.fun), "optimizer_message": str(result.message),
            "kappa_relative_error_initial": initial, "kappa_relative_error": error,
            "seconds_total": seconds,
            "seconds_per_iteration": seconds / max(1, int(result.nit)),
            "history": history,
        }
        report.write_summary(os.path.join(args.out, "summary.json"), summary)
        print(f"done in {seconds:.1f} s: relative κ error {100 * initial:.1f}% -> "
              f"{100 * error:.2f}% after {result.nit} iterations; wrote kappa.png, loss.png, "
              f"summary.json to {args.out}", flush=True)
    return 0


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _non_negative(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def main(argv=None):
    """Entry point of the ``gpumpiad`` console script."""
    import gpumpiad

    parser = argparse.ArgumentParser(prog="gpumpiad", description=gpumpiad.__doc__.splitlines()[0])
    jobs = parser.add_subparsers(dest="job", required=True)
    example = jobs.add_parser("theta-rank",
                              help="the θ^rank sum/broadcast example and its gradient")
    example.add_argument("--theta", type=float, default=2.0)
    example.set_defaults(run=_theta_rank)
    inv = jobs.add_parser("heat-inverse", help="recover a diffusivity field from observations")
    inv.add_argument("--n", type=_positive(int), default=32, help="cells per side (32)")
    inv.add_argument("--steps", type=_positive(int), default=240, help="time steps (240)")
    inv.add_argument("--snapshots", type=_positive(int), default=4,
                     help="observed states, evenly spaced in time (4)")
    inv.add_argument("--dims", type=_positive(int), nargs=2, metavar=("N", "M"),
                     help="patches along x and y (default: MPI.Compute_dims)")
    inv.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    inv.add_argument("--backend", choices=("numpy", "cupy"),
                     help="array backend (default: CuPy when a GPU is usable)")
    inv.add_argument("--noise", type=_non_negative, default=0.0,
                     help="observation noise, relative to the largest state value (0)")
    inv.add_argument("--regularization", type=_non_negative, default=1e-6,
                     help="weight of the smoothness term (1e-6)")
    inv.add_argument("--maxiter", type=_positive(int), default=30,
                     help="optimiser iterations at most (30)")
    inv.add_argument("--checkpoints", type=_positive(int),
                     help="states stored per solve for the gradient (default: all)")
    inv.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    inv.add_argument("--out", default="heat-inverse-out", help="output folder")
    inv.set_defaults(run=_heat_inverse)
    args = parser.parse_args(argv)
    if getattr(args, "backend", None):
        os.environ["GPUMPIAD_BACKEND"] = args.backend
    gpumpiad.mpi_init()
    code = args.run(args)
    gpumpiad.mpi_finalize()
    return code


if __name__ == "__main__":
    sys.exit(main())
