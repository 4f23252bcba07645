"""Figures and the summary of an inverse run: ``kappa.png``, ``loss.png``, ``summary.json``,
and with ``--profile`` the per-rank phase profile ``profile.json`` and ``profile.png``. A 3-D
run's κ figure shows the middle z-plane (:func:`middle_plane`)."""
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
    first = (f"grid {_by(grid)} on {summary['ranks']} rank(s) ({_by(patches)} patches), "
             f"time {st['time']:g} in {summary['steps']} steps, "
             f"{st['snapshots']} snapshots, noise {100 * st['noise']:g}%, "
             f"α {st['regularization']:g}, {st['dtype']}")
    second = (f"{summary['outcome']}; relative κ error "
              f"{100 * summary['kappa_relative_error_initial']:.1f}% → "
              f"{100 * summary['kappa_relative_error']:.2f}%")
    return f"{first}\n{second}"


def _by(values):
    return "×".join(str(v) for v in values)


def middle_plane(shape):
    """The z-plane a 3-D field of ``shape`` is shown at: ``{"axis": "z", "index": k, "cells":
    NZ, "z": z}``, ``k = NZ // 2`` (0-based) at ``z = (k + 1) h`` on the cells of width
    ``h = 1 / (max(shape) + 1)`` (:func:`gpumpiad.heat.inverse.cell_width`).

    Examples
    --------
    >>> from gpumpiad.heat.report import middle_plane
    >>> middle_plane((32, 32, 16))
    {'axis': 'z', 'index': 8, 'cells': 16, 'z': 0.2727272727272727}
    """
    k = shape[2] // 2
    return {"axis": "z", "index": k, "cells": shape[2], "z": (k + 1) / (max(shape) + 1)}


def kappa_figure(path, true, recovered, title=None, recovered_name="recovered"):
    """True and recovered κ on one colour scale, and the error in percent of the true κ;
    ``recovered_name`` names the second field in the panels ("learned" for a network's κ).

    The fields are global 2-D or 3-D arrays; of a 3-D one the panels show the middle z-plane
    (:func:`middle_plane`) and name it. The axes span the domain: the unit square, or for
    unequal sizes the box of square (cubic) cells whose longest side is 1.
    """
    plt = _pyplot()
    shape = true.shape
    extent = tuple(v for n in shape[:2] for v in (0, (n + 1) / (max(shape) + 1)))
    where = ""
    if true.ndim == 3:
        plane = middle_plane(shape)
        true = true[:, :, plane["index"]]
        recovered = recovered[:, :, plane["index"]]
        where = (f"\nz-plane k = {plane['index']} of 0–{plane['cells'] - 1}, "
                 f"z = {plane['z']:.3g}")
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6), constrained_layout=True)
    low, high = min(true.min(), recovered.min()), max(true.max(), recovered.max())
    error = 100 * (recovered - true) / true
    bound = float(abs(error).max()) or 1.0
    panels = (("true κ", true, "viridis", (low, high), "κ"),
              (f"{recovered_name} κ", recovered, "viridis", (low, high), "κ"),
              (f"error of the {recovered_name} κ", error, "RdBu_r", (-bound, bound),
               f"({recovered_name} − true) / true  [%]"))
    for ax, (name, field, cmap, limits, label) in zip(axes, panels):
        image = ax.imshow(field.T, origin="lower", extent=extent, cmap=cmap,
                          vmin=limits[0], vmax=limits[1])
        ax.set_title(name + where)
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


# The profile's phases, in table and bar order, from the trace categories each one sums.
PHASES = (("compute", ("compute",)), ("adjoint", ("adjoint",)),
          ("communication", ("communication",)), ("waiting", ("wait",)),
          ("host staging", ("staging",)), ("other", ("other",)))
_PHASE_COLORS = ("#2e7d32", "#6a1b9a", "#1565c0", "#c62828", "#ef6c00", "#9e9e9e")


def profile_rows(per_rank):
    """One row per rank, ``{"rank", <phase>..., "wall", "spans"}`` in seconds, from every
    rank's :func:`gpumpiad.trace.profile_totals` (indexed by rank); ``spans`` holds the
    seconds per span name, largest first."""
    rows = []
    for rank, totals in enumerate(per_rank):
        row = {"rank": rank}
        for phase, categories in PHASES:
            row[phase] = float(sum(totals[c] for c in categories))
        row["wall"] = float(totals["wall"])
        row["spans"] = dict(sorted(totals.get("by_name", {}).items(), key=lambda kv: -kv[1]))
        rows.append(row)
    return rows


def profile_table(rows):
    """The profile as text: seconds per phase and rank, with each phase's share of the wall
    time summed over the ranks on the last line."""
    names = [phase for phase, _ in PHASES]
    widths = [max(8, len(n)) for n in names]
    head = "rank  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + "      wall"
    lines = [head]
    for row in rows:
        lines.append(f"{row['rank']:>4}  " + "  ".join(
            f"{row[n]:>{w}.3f}" for n, w in zip(names, widths)) + f"  {row['wall']:>8.3f}")
    wall = sum(row["wall"] for row in rows) or 1.0
    lines.append("   %  " + "  ".join(
        f"{100 * sum(row[n] for row in rows) / wall:>{w}.1f}" for n, w in zip(names, widths))
        + f"  {100.0:>8.1f}")
    return "\n".join(lines)


def profile_figure(path, rows, title=None):
    """A stacked bar per rank: seconds in each phase, adding up to the rank's wall time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(9.0, 1.2 * len(rows) + 3.0), 4.6),
                           constrained_layout=True)
    ranks = [row["rank"] for row in rows]
    bottom = [0.0] * len(rows)
    for (phase, _), color in zip(PHASES, _PHASE_COLORS):
        heights = [row[phase] for row in rows]
        ax.bar(ranks, heights, bottom=bottom, color=color, label=phase, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(ranks)
    ax.set_xlabel("rank")
    ax.set_ylabel("seconds (exclusive time per phase)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
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
