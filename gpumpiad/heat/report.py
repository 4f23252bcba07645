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


def kappa_figure(path, true, recovered):
    """True, recovered and error fields side by side, each with its colour bar."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4), constrained_layout=True)
    low, high = min(true.min(), recovered.min()), max(true.max(), recovered.max())
    panels = (("true κ", true, "viridis", (low, high)),
              ("recovered κ", recovered, "viridis", (low, high)),
              ("recovered − true", recovered - true, "RdBu_r", None))
    for ax, (title, field, cmap, limits) in zip(axes, panels):
        if limits is None:
            bound = float(abs(field).max()) or 1.0
            limits = (-bound, bound)
        image = ax.imshow(field.T, origin="lower", extent=(0, 1, 0, 1), cmap=cmap,
                          vmin=limits[0], vmax=limits[1])
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        fig.colorbar(image, ax=ax, shrink=0.85)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_figure(path, history):
    """Loss and relative κ error per iteration, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    its = range(1, len(history["loss"]) + 1)
    ax.semilogy(its, history["loss"], label="loss J(κ)", color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss", color="tab:blue")
    twin = ax.twinx()
    twin.semilogy(its, history["kappa_error"], label="relative κ error", color="tab:red")
    twin.set_ylabel("relative κ error", color="tab:red")
    ax.set_title("inverse heat problem")
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
