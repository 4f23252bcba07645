"""Physics-constrained learning: a neural network κθ(x, y) trained through the distributed heat
solver inside PyTorch.

The problem is :mod:`gpumpiad.heat.inverse`'s (the true κ, initial state, source and
observations), but κ is a small MLP of the cell coordinates, replicated on every rank
(:func:`gpumpiad.torch.replicate`) and evaluated on each rank's own cells; the solver runs on
the patches through :func:`gpumpiad.torch.function`, and Adam minimises the data misfit

    J(θ) = ½ Σ_k ‖u_k(κθ) − d_k‖² / ‖d‖².

PyTorch is imported by the functions that need it, so the command line lists this job
without it.
"""
from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

import gpumpiad as gm

from .. import control
from . import inverse, report

NETWORK_FILE = "kappa_net.pt"


def add_job(jobs):
    """Register the ``heat-learn`` job on the command line's subparsers ``jobs``."""
    import argparse
    job = jobs.add_parser(
        "heat-learn", help="learn κ(x, y) as a neural network through the heat solver "
                           "(needs PyTorch)",
        description="The heat-inverse problem with κ a small MLP κθ(x, y), replicated on\n"
                    "every rank and evaluated on each rank's cells; the distributed solver\n"
                    "runs inside PyTorch's autograd and Adam trains θ. Rank 0 prints the loss\n"
                    "and writes loss.png, kappa.png (learned next to true), summary.json\n"
                    f"and the network ({NETWORK_FILE}, torch.save) to the output folder.\n"
                    'Needs PyTorch: pip install "gpumpiad[torch]".',
        epilog="Run under MPI, e.g.: mpiexec -n 4 gpumpiad heat-learn --steps 300",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    job.add_argument("--n", type=_positive(int), default=32,
                     help="cells per side of the square grid (default: %(default)s)")
    job.add_argument("--time", type=_positive(float), default=0.02,
                     help="simulated physical time (default: %(default)s)")
    job.add_argument("--snapshots", type=_positive(int), default=4,
                     help="observed states, evenly spaced in time (default: %(default)s)")
    job.add_argument("--steps", type=_positive(int), default=300,
                     help="Adam steps (default: %(default)s)")
    job.add_argument("--lr", type=_positive(float), default=0.01,
                     help="Adam's learning rate (default: %(default)s)")
    job.add_argument("--hidden", type=_positive(int), default=32,
                     help="width of the network's two hidden layers (default: %(default)s)")
    job.add_argument("--seed", type=int, default=0,
                     help="seed of the network's initial weights (default: %(default)s)")
    job.add_argument("--out", default="heat-learn-out",
                     help="output folder, created if missing (default: %(default)s)")
    job.set_defaults(run=run)


def _positive(kind):
    import argparse

    def parse(text):
        value = kind(text)
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def network(hidden=32, seed=0, kappa_guess=1.0, kappa_bounds=(0.2, 2.5)):
    """The MLP ``(x, y) -> z`` (float64, tanh, two hidden layers), seeded so that every rank
    builds the same weights, its last bias set so that :func:`kappa` starts near
    ``kappa_guess``; on the device of gpumpiad's arrays (:func:`gpumpiad.torch.device`).

    Examples
    --------
    >>> from gpumpiad.heat.learn import network
    >>> network(hidden=8)[0].weight.shape
    torch.Size([8, 2])
    """
    import torch
    generator = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
              torch.nn.Tanh(), torch.nn.Linear(hidden, 1)]
    net = torch.nn.Sequential(*layers).double()
    lo, hi = kappa_bounds
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=generator)
                    / np.sqrt(p.shape[-1]))
        net[-1].weight.mul_(0.1)
        net[-1].bias.fill_(float(np.log((kappa_guess - lo) / (hi - kappa_guess))))
    # Drawn on the CPU so that every device holds the same bits.
    return net.to(_device())


def points(problem):
    """This rank's cell centres as a ``(cells, 2)`` float64 torch tensor, in patch order, on
    the device of gpumpiad's arrays."""
    import torch
    x, y = problem.grid.coordinates()
    X, Y = np.meshgrid(x, y, indexing="ij")
    return torch.from_numpy(np.stack([X.reshape(-1), Y.reshape(-1)], axis=1)).to(_device())


def _device():
    import gpumpiad.torch as gt
    return gt.device()


def kappa(net, xy, shape, kappa_bounds=(0.2, 2.5)):
    """κθ on the cells ``xy``, as a patch of ``shape``: ``lo + (hi − lo) σ(net(x, y))``, so
    every value stays within the bounds the time step is stable for."""
    import torch
    lo, hi = kappa_bounds
    return (lo + (hi - lo) * torch.sigmoid(net(xy))).reshape(shape)


def misfit(problem, kappa_patch):
    """J(κ) on the problem's communicator: ½ Σ_k ‖u_k(κ) − d_k‖² / ‖d‖² (a serial scalar
    Tensor); ``kappa_patch`` is this rank's piece."""
    total = 0.0
    for u, d in zip(problem.states(kappa_patch), problem.observed):
        total = total + ((u - d) ** 2).sum()
    return gm.mpi_sum(total, comm=problem.grid.cart) * (0.5 / problem.norm)


def objective(problem):
    """J as a torch function of this rank's κ patch (a ``torch.Tensor``), through the bridge."""
    import gpumpiad.torch as gt
    return gt.function(lambda k: misfit(problem, k), "distributed", comm=problem.grid.cart)


def train(problem, net, steps, lr=0.01, progress=None, kappa_bounds=(0.2, 2.5)):
    """Adam on the network's parameters for ``steps`` steps; collective.

    Returns the history: per step from 0 (the initial network), the loss, the relative κ error
    ``‖κθ − κ_true‖ / ‖κ_true‖`` and the seconds since the start. ``progress(step, loss,
    error, seconds)`` is called after every step on every rank.
    """
    import torch

    import gpumpiad.torch as gt
    cart = problem.grid.cart
    xy = points(problem)
    replicated = gt.replicate(net, comm=cart)
    J = objective(problem)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    true = torch.from_numpy(gm.backend.to_numpy(problem.kappa_true)).to(xy.device)
    true_norm = control.allreduce(cart, float((true ** 2).sum()), MPI.SUM,
                                  "heat-learn κ norm") ** 0.5
    history = {"loss": [], "kappa_error": [], "seconds": []}
    start = time.perf_counter()
    try:
        for step in range(steps + 1):
            optimizer.zero_grad()
            k = kappa(net, xy, problem.grid.local_shape, kappa_bounds)
            loss = J(k)
            error = control.allreduce(cart, float(((k.detach() - true) ** 2).sum()),
                                      MPI.SUM, "heat-learn κ error") ** 0.5 / true_norm
            history["loss"].append(float(loss.detach()))
            history["kappa_error"].append(error)
            history["seconds"].append(time.perf_counter() - start)
            if progress is not None:
                progress(step, history["loss"][-1], error, history["seconds"][-1])
            if step == steps:
                break
            loss.backward()
            optimizer.step()
    finally:
        replicated.remove()
    return history


def run(args):
    """The ``heat-learn`` job (collective); returns the exit code."""
    from ..comm import world
    comm = world()
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    try:
        import torch
    except ImportError:
        say('gpumpiad heat-learn: error: needs PyTorch: pip install "gpumpiad[torch]"',
            flush=True)
        return 1
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # one rank per core
    settings = inverse.Settings(n=args.n, time=args.time, snapshots=args.snapshots,
                                regularization=0.0, seed=args.seed)
    problem = None
    try:
        problem = inverse.Problem(settings)
    except ValueError as exc:
        say(f"gpumpiad heat-learn: error: {exc}", flush=True)
        return 1
    if comm.rank == 0:
        os.makedirs(args.out, exist_ok=True)
    grid = problem.grid
    say(f"gpumpiad heat-learn: {comm.size} rank(s), {grid.dims[0]}x{grid.dims[1]} patches, "
        f"grid {settings.n}x{settings.n}, time {settings.time:g} in {problem.steps} steps, "
        f"{settings.snapshots} snapshots; MLP 2-{args.hidden}-{args.hidden}-1, Adam lr "
        f"{args.lr:g}, {args.steps} steps; torch {torch.__version__}", flush=True)
    net = network(args.hidden, args.seed, settings.kappa_guess, settings.kappa_bounds)
    every = max(1, args.steps // 20)

    def progress(step, loss, error, seconds):
        if step % every == 0 or step == args.steps:
            say(f"{step:5d}  loss {loss:12.5e}  κ error {100 * error:7.3f}%  {seconds:8.2f} s",
                flush=True)

    history = train(problem, net, args.steps, args.lr, progress, settings.kappa_bounds)
    with torch.no_grad():
        learned = kappa(net, points(problem), grid.local_shape, settings.kappa_bounds)
    learned = grid.gather(learned.cpu().numpy())
    true = grid.gather(problem.kappa_true)
    if comm.rank == 0:
        title = (f"heat-learn: grid {settings.n}×{settings.n} on {comm.size} rank(s), MLP "
                 f"2-{args.hidden}-{args.hidden}-1, Adam {args.steps} steps; relative κ error "
                 f"{100 * history['kappa_error'][0]:.1f}% → "
                 f"{100 * history['kappa_error'][-1]:.2f}%")
        report.kappa_figure(os.path.join(args.out, "kappa.png"), true, learned, title,
                            recovered_name="learned")
        loss_figure(os.path.join(args.out, "loss.png"), history, title)
        torch.save({"state_dict": net.state_dict(), "hidden": args.hidden,
                    "kappa_bounds": settings.kappa_bounds},
                   os.path.join(args.out, NETWORK_FILE))
        report.write_summary(os.path.join(args.out, "summary.json"), {
            "settings": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in vars(settings).items()},
            "ranks": comm.size, "steps": args.steps, "lr": args.lr, "hidden": args.hidden,
            "solver_steps": problem.steps, "versions": dict(report.versions(),
                                                            torch=torch.__version__),
            "history": history})
        say(f"done in {history['seconds'][-1]:.1f} s; loss {history['loss'][0]:.4e} -> "
            f"{history['loss'][-1]:.4e}, relative κ error {100 * history['kappa_error'][0]:.1f}%"
            f" -> {100 * history['kappa_error'][-1]:.2f}%; wrote kappa.png, loss.png, "
            f"summary.json, {NETWORK_FILE} to {args.out}", flush=True)
    return 0


def loss_figure(path, history, title=None):
    """Loss and relative κ error per Adam step, each on its own log axis."""
    plt = report._pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      constrained_layout=True)
    steps = range(len(history["loss"]))
    top.semilogy(steps, history["loss"], color="tab:blue", label="loss J(θ): data misfit")
    top.set_ylabel("loss J(θ)")
    bottom.semilogy(steps, [100 * e for e in history["kappa_error"]], color="tab:red",
                    label="relative κ error ‖κθ − κ_true‖ / ‖κ_true‖")
    bottom.set_ylabel("relative κ error [%]")
    bottom.set_xlabel("Adam step (0: the initial network)")
    for ax in (top, bottom):
        ax.legend(loc="upper right")
        ax.grid(True, which="major", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
