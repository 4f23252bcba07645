"""Figures and the summary of an inverse run: ``kappa.png``, ``loss.png``, ``summary.json``."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def title(summary):
    """Two lines naming the run's settings and outcome, from the job's ``summary``."""
    st = summary["settings"]
    grid, patches = summary["grid"], summary["patches"]
    first = (f"grid {grid[0]}×{grid[1]} on {summary['ranks']} rank(s) ({patches[0]}×"
             f"{patches[1]} patches), time {st['time']:g} in {summary['steps']} steps, "
             f"{st['snapshots']} snapshots, noise {100 * st['noise']:g}%, "
             f"α {st['regularization']:g}, {st['dtype']}")
    second = (f"{summary['outcome']}; relative κ error "
              f"{100 * summary['kappa_relative_error_initial']:.1f}% → "
              f"{100 * summary['kappa_relative_error']:.2f}%")
    return f"{first}\n{second}"


def kappa_figure(path, true, recovered, title=None):
    """True and recovered κ on one colour scale, and the error in percent of the true κ."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6), constrained_layout=True)
    low, high = min(true.min(), recovered.min()), max(true.max(), recovered.max())
    error = 100 * (recovered - true) / true
    bound = float(abs(error).max()) or 1.0
    panels = (("true κ", true, "viridis", (low, high), "κ"),
              ("recovered κ", recovered, "viridis", (low, high), "κ"),
              ("error of the recovered κ", error, "RdBu_r", (-bound, bound),
               "(recovered − true) / true  [%]"))
    for ax, (name, field, cmap, limits, label) in zip(axes, panels):
        image = ax.imshow(field.T, origin="lower", extent=(0, 1, 0, 1), cmap=cmap,
                          vmin=limits[0], vmax=limits[1])
        ax.set_title(name)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        fig.colorbar(image, ax=ax, shrink=0.85, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_figure(path, history, title=None):
    """Loss and relative κ error per iteration from 0 (the guess), each on its own log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      constrained_layout=True)
    its = range(len(history["loss"]))
    top.semilogy(its, history["loss"], "o-", ms=3, color="tab:blue",
                 label="loss J(κ): data misfit + α · roughness")
    top.set_ylabel("loss J(κ)")
    top.legend(loc="upper right")
    errors = [100 * e for e in history["kappa_error"]]
    bottom.semilogy(its, errors, "o-", ms=3, color="tab:red",
                    label="relative κ error ‖κ − κ_true‖ / ‖κ_true‖")
    bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}%"))
    bottom.yaxis.set_minor_formatter(NullFormatter())
    bottom.set_ylabel("relative κ error")
    bottom.set_xlabel("iteration (0: the constant guess)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def versions():
    """Versions of the software the run used."""
    import mpi4py
    import numpy
    import scipy
    from mpi4py import MPI

    import gpumpiad
    out = {"gpumpiad": gpumpiad.__version__, "python": platform.python_version(),
           "numpy": numpy.__version__, "scipy": scipy.__version__, "mpi4py": mpi4py.__version__,
           "mpi": MPI.Get_library_version().splitlines()[0].strip()}
    if gpumpiad.backend_name() == "cupy":
        import gpumpiad.backend as backend
        out["cupy"] = backend.array_module().__version__
    return out


def write_summary(path, summary):
    """Write ``summary`` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)
