"""Every benchmark in one command, at sizes that fit this machine, with one results file.

    python bench/run.py [--quick] [--runs 3] [--only NAME ...] [--results-dir bench/results]

Finds the machine (CPUs, memory, GPU), runs the benchmark scripts of ``bench/`` through their
command lines (the MPI ones under ``mpiexec -n 2`` when there are two CPUs or more), each
``--runs`` times in turn, and the heat problem against JAX and PyTorch (``bench_peers.py``,
which keeps its own repeats). Writes ``<results-dir>/<machine>-<date>.json`` (machine, versions,
sizes, every figure's min / median / max over the runs, the load average before and after each
benchmark) and ``<machine>-<date>.md`` with the table of targets, and prints that table.

Every figure is a ratio measured in the same run against its reference: the copy bandwidth of
the same build (heat kernels), raw mpi4py (collectives, ``mpi_sum``), JAX ``jit`` and PyTorch
(the heat problem, the tape), the kernel step (per-step overhead). Sizes run from 64² to 2048²
(``--quick``: 64², 256², 1024², fewer repeats, one run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = (64, 128, 256, 512, 1024, 2048)
QUICK_SIZES = (64, 256, 1024)


# ---------------------------------------------------------------------------------------------
# The machine

def _run_text(cmd, timeout=20):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine():
    """CPU model and count, memory, GPUs (``nvidia-smi``) and a short name for file names."""
    cpu = platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in _run_text(["lscpu"]).splitlines() if ":" in line)
    cpu = info.get("Model name", cpu).strip()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = avail = None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text()
                       .splitlines())
        mem = int(meminfo["MemTotal"].split()[0]) * 1024
        avail = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    gpus = [g.strip() for g in _run_text(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]).splitlines()
        if g.strip()] if shutil.which("nvidia-smi") else []
    name = "-".join(re.sub(r"[^a-z0-9]+", " ", cpu.lower()).split()[:2] + [f"{cores}cpu"])
    if gpus:
        model = gpus[0].split(",")[0].replace("NVIDIA", "").strip().split()[0].lower()
        name += f"-{len(gpus)}x{re.sub(r'[^a-z0-9]+', '', model)}"
    return {"name": name, "cpu": cpu, "cpus": cores, "memory_bytes": mem,
            "memory_available_bytes": avail, "gpus": gpus, "platform": platform.platform()}


def versions():
    out = {"python": platform.python_version()}
    for module in ("gpumpiad", "numpy", "mpi4py", "jax", "jaxlib", "torch", "cupy"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # not installed, or broken: the benchmark notes it and goes on
            out[module] = None
    try:
        from mpi4py import MPI
        out["mpi"] = " ".join(MPI.Get_library_version().splitlines()[0].split())
    except Exception:
        out["mpi"] = None
    out["commit"] = _run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).strip() or None
    out["tree_modified"] = bool(_run_text(["git", "-C", str(ROOT), "status", "--porcelain",
                                           "--untracked-files=no"]).strip())
    return out


# ---------------------------------------------------------------------------------------------
# Parsing what the scripts print

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _number(cell):
    """The number in a table cell, a time or percentage unit dropped (sizes such as "8 B"
    stay labels)."""
    cell = re.sub(r"\s*(µs|us|ns|ms|%|×)$", "", cell.strip().strip("*")).strip()
    return float(cell) if _NUMBER.match(cell) else None


def markdown_figures(text, prefix=""):
    """``{"<label> | <column>": value}`` for every numeric cell of every Markdown table in
    ``text``; the label is the row's first cell and its other non-numeric cells."""
    figures, header = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            header = None
            continue
        cells = [c.strip() for c in line[1:-1].split("|")]
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        values = [None] + [_number(c) for c in cells[1:]]
        label = " ".join(c for c, v in zip(cells, values) if v is None and c)
        for col, v in zip(header, values):
            if v is not None:
                figures[f"{prefix}{label} | {col}".strip()] = v
    return figures


def mpi_sum_figures(text):
    figures = {}
    pattern = re.compile(r"^\s*(vjp serial|vjp distributed|grad of sum)\s+(\d+ [KMG]?B)\s+"
                         r"([\d.]+)us\s+([\d.]+)us\s+([\d.]+)\s*$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            name, size, ours, raw, ratio = m.groups()
            figures[f"{name} {size} | gpumpiad us"] = float(ours)
            figures[f"{name} {size} | raw mpi4py us"] = float(raw)
            figures[f"{name} {size} | gpumpiad / raw"] = float(ratio)
    return figures


def tape_figures(text):
    figures = {}
    for key, pattern in (("gpumpiad us/op", r"gpumpiad:\s*([\d.]+) us/op"),
                         ("pytorch us/op", r"pytorch\s*:\s*([\d.]+) us/op"),
                         ("gpumpiad / pytorch", r"ratio gpumpiad/pytorch:\s*([\d.]+)")):
        m = re.search(pattern, text)
        if m:
            figures[key] = float(m.group(1))
    return figures


def heat_figures(text):
    """bench_heat's tables, plus the per-step overhead beyond the kernel in µs."""
    figures = markdown_figures(text)
    step = figures.get("solver step with halo exchange (marginal) | time per call/step [ms]")
    kernel = figures.get("step kernel, no halo | time per call/step [ms]")
    if step is not None and kernel is not None:
        figures["per-step overhead beyond the kernel | us"] = (step - kernel) * 1e3
    return figures


# ---------------------------------------------------------------------------------------------
# The benchmarks

@dataclass
class Bench:
    name: str
    script: str
    args: list
    parse: object
    ranks: int = 0           # 0: plain python; n: mpiexec -n n
    reference: str = ""
    out_flag: bool = False   # pass --out FILE and read it as well as stdout
    env: dict = field(default_factory=dict)
    timeout: int = 900


def plan(mach, quick):
    """The benchmarks and their sizes for this machine."""
    two = mach["cpus"] >= 2 and shutil.which("mpiexec") is not None
    avail = mach["memory_available_bytes"] or 8 << 30
    sizes = [n for n in (QUICK_SIZES if quick else SIZES)
             # PyTorch's autograd keeps ~8 arrays per step: leave room for it.
             if 8 * 8 * n * n * 10 * 4 < avail]
    reps = 3 if quick else 5
    benches = [
        Bench("heat kernels", "bench_heat_kernels.py", ["--sizes", *map(str, sizes)],
              markdown_figures, reference="copy4 bandwidth of the same build", out_flag=True),
        Bench("cold memory", "bench_cold.py",
              ["--sizes", *(["128"] if quick else ["64", "128"]), "--repeats", str(2 * reps + 1)],
              markdown_figures, reference="the same call repeated", out_flag=True),
        Bench("tape", "bench_tape.py", ["--ops", "1000", "--repeats", str(10 if quick else 20)],
              tape_figures, reference="PyTorch eager autograd"),
        Bench("heat solver, 1 rank, 128²", "bench_heat.py",
              ["--n", "128", "--steps", "2000", "--checkpoints", "32", "--repeats", str(reps)],
              heat_figures, ranks=1, reference="kernel step, copy4 bandwidth", out_flag=True),
        Bench("3-D heat kernels", "bench_heat3d_kernels.py",
              ["--sizes", *(["64"] if quick else ["64", "128"]), "--repeats", str(reps)],
              markdown_figures, reference="copy of the same bytes", out_flag=True),
        Bench("3-D heat solver, 1 rank", "bench_heat3d.py",
              ["--sizes", *(["48"] if quick else ["48", "96"]), "--repeats", str(reps)],
              markdown_figures, ranks=1, reference="kernel step, halo exchange",
              out_flag=True),
    ]
    if two:
        benches += [
            Bench("heat solver, 2 ranks, 128² per rank", "bench_heat.py",
                  ["--n", "128", "--steps", "2000", "--checkpoints", "32", "--repeats",
                   str(reps)], heat_figures, ranks=2,
                  reference="kernel step, copy4 bandwidth", out_flag=True),
            Bench("3-D heat solver, 2 ranks", "bench_heat3d.py",
                  ["--sizes", *(["48"] if quick else ["48", "96"]), "--repeats", str(reps)],
                  markdown_figures, ranks=2, reference="kernel step, halo exchange",
                  out_flag=True),
            Bench("mpi_sum, 2 ranks", "bench_mpi_sum.py",
                  ["--repeats", str(10 if quick else 30)], mpi_sum_figures, ranks=2,
                  reference="raw mpi4py Allreduce"),
            Bench("collectives, 2 ranks", "bench_collectives.py",
                  ["--repeats", str(5 if quick else 15)], markdown_figures, ranks=2,
                  reference="raw mpi4py"),
            Bench("debug overhead, 2 ranks", "bench_debug.py",
                  ["--repeats", str(5 if quick else 15)], markdown_figures, ranks=2,
                  reference="debug off", out_flag=True),
        ]
        if not quick:
            benches.append(Bench("heat solver, 2 ranks, 1024² per rank", "bench_heat.py",
                                 ["--n", "1024", "--steps", "50", "--checkpoints", "16",
                                  "--repeats", "3"], heat_figures, ranks=2,
                                 reference="kernel step, copy4 bandwidth", out_flag=True))
    if (HERE / "bench_nvtx.py").exists():
        benches.append(Bench("nvtx", "bench_nvtx.py", [], markdown_figures,
                             reference="NVTX off"))
    if mach["gpus"]:
        benches.append(Bench("heat solver, GPU, 1 rank periodic, 4096²", "bench_heat.py",
                             ["--n", "4096", "--steps", "100", "--periodic"], heat_figures,
                             ranks=1, reference="copy4 bandwidth of the GPU", out_flag=True,
                             env={"GPUMPIAD_BACKEND": "cupy"}))
    # Six repeats: each order of the three one-core contenders once (see bench_peers.py).
    peer_reps = reps if quick else 6
    peers = Bench("heat vs JAX and PyTorch", "bench_peers.py",
                  ["--sizes", *map(str, sizes), "--repeats", str(peer_reps),
                   "--rounds", "1" if quick else "2", "--two-core-sizes",
                   *(["256"] if quick else ["128", "256", "1024"])] if two else
                  ["--sizes", *map(str, sizes), "--repeats", str(peer_reps), "--two-core-sizes"],
                  None, reference="JAX jit, PyTorch eager", timeout=3600)
    return benches, peers, sizes


def _env(extra):
    env = dict(os.environ)
    env.update(extra)
    # The scripts import this checkout's gpumpiad, whatever the installed one.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_bench(bench, tmp):
    """One run: ``(figures, record)``; a failure is recorded, not raised."""
    cmd = [sys.executable, f"bench/{bench.script}", *bench.args]
    out = tmp / f"{re.sub(r'[^a-z0-9]+', '-', bench.name.lower())}.out"
    if bench.out_flag:
        out.unlink(missing_ok=True)
        cmd += ["--out", str(out)]
    if bench.ranks:
        cmd = ["mpiexec", "-n", str(bench.ranks), *cmd]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.timeout,
                              env=_env(bench.env), cwd=ROOT)
        text, error = proc.stdout, (None if proc.returncode == 0 else
                                    f"exit {proc.returncode}: {proc.stderr[-1500:]}")
    except subprocess.TimeoutExpired:
        text, error = "", f"timed out after {bench.timeout} s"
    if bench.out_flag and out.exists():
        text += "\n" + out.read_text()
    record = {"command": " ".join(Path(c).name if c == sys.executable else c for c in cmd
                                  ).replace(str(tmp), "<tmp>"),
              "seconds": time.perf_counter() - t0, "load_before": load,
              "load_after": os.getloadavg()[0], "error": error}
    return (bench.parse(text) if error is None else {}), record


def spreads(runs):
    """``{figure: {min, median, max, n}}`` over the runs that produced it."""
    out = {}
    for key in sorted({k for r in runs for k in r}):
        vals = [r[key] for r in runs if key in r]
        out[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals),
                    "n": len(vals)}
    return out


# ---------------------------------------------------------------------------------------------
# The table of targets

def _peer(peers, n, cores, key):
    for e in (peers or {}).get("sizes", []):
        if e["n"] == n and cores in e:
            return e[cores]["ratios"].get(key)
    return None


def _fig(results, bench, key):
    s = results.get(bench, {}).get("figures", {}).get(key)
    return None if s is None else s["median"]


def targets(results, peers, sizes):
    """``[(target, measured, goal, met)]``, the measured value ``None`` where not run."""
    rows = []

    def add(what, value, goal, fmt="{:.2f}"):
        if value is not None and value < 0:
            # Per-step overhead, a difference of two times, came out negative: noise, or a
            # solver loop that takes several steps per sweep (one rank) against one kernel step.
            rows.append((what, f"{fmt.format(value)} (below the kernel step)", f"≤ {goal:g}",
                         None))
            return
        met = None if value is None else value <= goal
        rows.append((what, None if value is None else fmt.format(value), f"≤ {goal:g}", met))

    for n, goal in ((128, 1.0), (256, 0.8), (1024, 0.8)):
        if n in sizes:
            add(f"heat forward {n}², 1 core: gpumpiad / JAX jit",
                _peer(peers, n, "one core", "gpumpiad / jax, forward"), goal)
    add("heat forward 256², 2 ranks: gpumpiad / JAX jit with threads",
        _peer(peers, 256, "two cores", "gpumpiad / jax threads, forward"), 1.0)
    add("heat forward 256², 2 ranks: gpumpiad / JAX shard_map (2 devices)",
        _peer(peers, 256, "two cores", "gpumpiad / jax shard_map, forward"), 1.0)
    for n in sizes:
        if n >= 128:
            add(f"heat gradient {n}², 1 core: gpumpiad / JAX jit(grad)",
                _peer(peers, n, "one core", "gpumpiad / jax, gradient"), 0.5)
    add("heat gradient / forward 1024², 1 core (gpumpiad)",
        _peer(peers, 1024, "one core", "gpumpiad gradient / forward"), 2.5)
    for n in sizes:
        v = _peer(peers, n, "one core", "gpumpiad / torch, gradient")
        if v is not None:
            rows.append((f"heat gradient {n}², 1 core: gpumpiad / PyTorch autograd",
                         f"{v:.2f}", "(reported)", None))
    add("per-step overhead beyond the kernel, 1 rank, 128² [µs]",
        _fig(results, "heat solver, 1 rank, 128²", "per-step overhead beyond the kernel | us"),
        5, "{:.1f}")
    add("per-step overhead beyond the kernel, 2 ranks, 128² per rank [µs]",
        _fig(results, "heat solver, 2 ranks, 128² per rank",
             "per-step overhead beyond the kernel | us"), 10, "{:.1f}")
    for size, goal in (("1 MB", 1.2), ("8 B", 5.0)):
        add(f"value_and_grad of mpi_sum, 2 ranks, {size}: gpumpiad / raw mpi4py",
            _fig(results, "mpi_sum, 2 ranks", f"grad of sum {size} | gpumpiad / raw"), goal)
    add("tape, 1000 tiny ops: gpumpiad / PyTorch eager",
        _fig(results, "tape", "gpumpiad / pytorch"), 0.8)
    for n in (1024, 2048):
        for op in ("step", "adjoint"):
            v = _fig(results, "heat kernels", f"{n} {op} host | T_eff / copy4")
            if v is not None:
                rows.append((f"host {op} kernel {n}²: T_eff / copy4", f"{v:.2f}", "≥ 0.6",
                             v >= 0.6))
    if "nvtx" not in results:
        rows.append(("NVTX off: no measurable change", None, "—", None))
    return rows


def markdown_table(rows, mach, load, peers):
    lines = [f"# Benchmarks on {mach['name']} ({mach['cpu']}, {mach['cpus']} CPUs"
             f"{', ' + ', '.join(mach['gpus']) if mach['gpus'] else ', no GPU'})", "",
             f"Load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after. Medians over "
             "the runs (the heat-problem ratios: medians over repeats, contenders alternating).",
             "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for what, value, goal, met in rows:
        lines.append(f"| {what} | {value if value is not None else 'not run'} | {goal} | "
                     f"{'' if met is None else ('yes' if met else '**no**')} |")
    if peers and "table" in peers:
        lines += ["", "## The heat problem: gpumpiad, JAX and PyTorch", "", peers["table"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="64², 256², 1024²; fewer repeats; one run")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs of each script, in turn (default 3, --quick 1)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the benchmarks whose names contain one of these words "
                             "('peers' for the heat problem against JAX and PyTorch)")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        parser.error(f"--runs must be at least 1, got {runs}")
    mach = machine()
    benches, peers_bench, sizes = plan(mach, args.quick)
    if args.only:
        benches = [b for b in benches if any(w in b.name for w in args.only)]
    run_peers = not args.only or "peers" in args.only
    load_before = os.getloadavg()[0]
    stamp = datetime.datetime.now(datetime.timezone.utc)
    results = {b.name: {"script": b.script, "reference": b.reference, "runs": []}
               for b in benches}
    figures = {b.name: [] for b in benches}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for i in range(runs):
            for bench in benches:
                print(f"run.py: {bench.name} (run {i + 1} of {runs})", file=sys.stderr,
                      flush=True)
                figs, record = run_bench(bench, tmp)
                results[bench.name]["runs"].append(record)
                figures[bench.name].append(figs)
        for name, figs in figures.items():
            results[name]["figures"] = spreads(figs)
        peers = None
        if run_peers:
            print("run.py: heat vs JAX and PyTorch", file=sys.stderr, flush=True)
            out_json, out_md = tmp / "peers.json", tmp / "peers.md"
            bench = Bench(peers_bench.name, peers_bench.script,
                          peers_bench.args + ["--json", str(out_json), "--out", str(out_md)],
                          lambda text: {}, reference=peers_bench.reference,
                          timeout=peers_bench.timeout)
            _, record = run_bench(bench, tmp)
            if record["error"] is None and out_json.exists():
                peers = json.loads(out_json.read_text())
                peers["table"] = out_md.read_text()
            peers = dict(peers or {}, run=record)
    load_after = os.getloadavg()[0]
    rows = targets(results, peers, sizes)
    table = markdown_table(rows, mach, (load_before, load_after), peers)
    doc = {"machine": mach, "date": stamp.isoformat(timespec="seconds"),
           "versions": versions(), "quick": args.quick, "runs": runs, "sizes": list(sizes),
           "load_average": {"before": load_before, "after": load_after},
           "targets": [{"target": w, "measured": v, "goal": g, "met": m} for w, v, g, m in rows],
           "benchmarks": results, "peers": peers}
    outdir = Path(args.results_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    base = outdir / f"{mach['name']}-{stamp:%Y-%m-%d}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    base.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
