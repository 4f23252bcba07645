"""Weak and strong scaling of the heat solver to 1,024 GPUs, on paper, from measured numbers.

    python bench/scaling.py [--out bench/scaling.md] [--no-pingpong] [--mpiexec mpiexec]

Writes ``bench/scaling.md``: the model's inputs (the single-GPU step time per cell from
``bench/results/heat_gpu.md``, the halo bytes per step, the latency and bandwidth of a ping-pong
measured here over MPI's shared-memory path, and an interconnect's published figures, cited),
its assumptions, and the projected weak- and strong-scaling efficiency with and without
communication hiding. The model's functions are plain arithmetic (tested in
``tests/test_scaling_model.py``); only the ping-pong needs MPI (``mpiexec -n 2``, run by this
script in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ITEMSIZE = 8  # float64
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Measured on an NVIDIA H100 80GB HBM3 (``bench/results/heat_gpu.md``): the step kernel on a
#: 4096^2 patch, two ranks sharing the one GPU and running at once, so the GPU updates
#: 2 x 4096^2 cells in that time (copy4 of the same run: 2 x 1375 GB/s of the card's ~3 TB/s).
#: The exchange alone, staged through pinned host memory (the MPI is not CUDA-aware), took
#: 1.492 kernel steps.
H100_STEP = {"step_s": 0.396e-3, "n": 4096, "ranks_sharing": 2, "adjoint_s": 0.979e-3,
             "exchange_s": 1.492 * 0.396e-3, "source": "bench/results/heat_gpu.md"}


@dataclass(frozen=True)
class Link:
    """One message path: ``time(bytes) = latency + bytes / bandwidth`` (one direction)."""
    name: str
    latency: float    # s
    bandwidth: float  # B/s, one direction, per GPU
    source: str


#: Published figures. NVLink 4: 18 links, 900 GB/s both directions per H100/H200 SXM GPU
#: (450 GB/s each way; MLCommons' system description of an 8 x H200 SXM node lists
#: "18x 4th Gen NVLink, 900GB/s"); measured peer-to-peer on H100 SXM: 380 GB/s one way, 749 GB/s
#: both (NVIDIA/nccl issue 1264, p2pBandwidthLatencyTest) -- the measured figure is used.
#: InfiniBand NDR: 400 Gb/s = 50 GB/s each way per ConnectX-7 port (NVIDIA ConnectX-7 user
#: manual), one port per GPU as in HGX/DGX H100 nodes; latency: "<1 usec" for InfiniBand
#: (MVAPICH2, D. K. Panda, SC'18), taken as 2 us here for GPU buffers over GPUDirect RDMA
#: (an assumption, not a published figure).
NVLINK4 = Link("NVLink 4 (within a node, H100/H200 SXM)", 2e-6, 380e9,
               "380 GB/s one way measured peer-to-peer on H100 SXM (github.com/NVIDIA/nccl/"
               "issues/1264; 900 GB/s both ways nominal, 18 links); latency 2 us assumed")
NDR = Link("InfiniBand NDR 400 Gb/s (between nodes)", 2e-6, 50e9,
           "400 Gb/s per ConnectX-7 port (docs.nvidia.com/networking/display/ConnectX7VPI/"
           "Introduction), one port per GPU; latency: InfiniBand \"<1 usec\" (D. K. Panda, "
           "MVAPICH2, SC'18, docslib.org/doc/1131852), 2 us assumed for GPU buffers")
GPUS_PER_NODE = 8

#: ImplicitGlobalGrid.jl's published weak scaling: "a parallel efficiency of more than 96 % on
#: 2197 GPUs" (Raess, Utkin, Duretz, Omlin, Podladchikov, Geosci. Model Dev. 15, 5757-5786,
#: 2022, doi:10.5194/gmd-15-5757-2022; Piz Daint, P100 GPUs, communication hidden).
IGG = {"efficiency": 0.96, "gpus": 2197,
       "source": "Raess et al., GMD 15, 5757 (2022), doi:10.5194/gmd-15-5757-2022"}


def cell_time(step_s, n, ranks_sharing=1):
    """Seconds per cell and step of one device: ``step_s`` to update ``ranks_sharing`` patches of
    ``n x n`` cells at once."""
    return step_s / (ranks_sharing * n * n)


def dims_create(p):
    """The ``(px, py)`` process grid of ``MPI_Dims_create(p, 2)``: as square as possible,
    ``px >= py``."""
    py = max(d for d in range(1, math.isqrt(p) + 1) if p % d == 0)
    return p // py, py


def neighbours(d):
    """Most neighbours a patch has along an axis split into ``d`` parts (non-periodic)."""
    return min(d - 1, 2)


def halo_time(nx, ny, dims, link, kernel_gap=0.0):
    """Seconds per step of the halo exchange of an ``nx x ny`` patch in a ``dims`` grid.

    The axes are exchanged one after the other (corners in two hops); along one axis the
    patch sends to both neighbours at once, through one outbound link: ``latency + k * m /
    bandwidth`` with ``k`` neighbours and ``m`` the bytes of one face, plus two kernels (pack
    before, unpack after) of ``kernel_gap`` seconds each.
    """
    total = 0.0
    for d, face in zip(dims, (ny, nx)):
        k = neighbours(d)
        if k:
            total += link.latency + k * face * ITEMSIZE / link.bandwidth + 2 * kernel_gap
    return total


def halo_bytes(nx, ny, dims):
    """Bytes one patch sends per step (its most-connected rank)."""
    return sum(neighbours(d) * face * ITEMSIZE for d, face in zip(dims, (ny, nx)))


def step_time(nx, ny, dims, tau, link, kernel_gap=0.0, hiding=False):
    """Seconds per step of an ``nx x ny`` patch: ``tau`` per cell, the halo through ``link``.

    Without hiding: the exchange, then the whole patch. With hiding: first the cells beside
    the faces that have a neighbour (one extra kernel of ``kernel_gap`` per such face), then
    the rest while the halos travel. One patch (one GPU, ``dims == (1, 1)``) exchanges nothing.
    """
    halo = halo_time(nx, ny, dims, link, kernel_gap)
    if halo == 0.0:
        return nx * ny * tau
    if not hiding:
        return nx * ny * tau + halo
    kx, ky = neighbours(dims[0]), neighbours(dims[1])
    inner = max(nx - kx, 0) * max(ny - ky, 0)
    return (nx * ny - inner) * tau + (kx + ky) * kernel_gap + max(inner * tau, halo)


def link_for(p, gpus_per_node=GPUS_PER_NODE, intra=NVLINK4, inter=NDR):
    """The slowest path a patch's halo takes with ``p`` GPUs: within one node, or between."""
    return intra if p <= gpus_per_node else inter


def weak_efficiency(n, p, tau, link, kernel_gap=0.0, hiding=False):
    """``t(1 GPU) / t(p GPUs)`` with ``n x n`` cells per GPU."""
    return step_time(n, n, (1, 1), tau, link) / step_time(n, n, dims_create(p), tau, link,
                                                          kernel_gap, hiding)


def strong_efficiency(global_n, p, tau, link, kernel_gap=0.0, hiding=False):
    """``t(1 GPU) / (p * t(p GPUs))`` for a fixed ``global_n x global_n`` grid (patches rounded
    up)."""
    px, py = dims_create(p)
    nx, ny = -(-global_n // px), -(-global_n // py)
    t1 = step_time(global_n, global_n, (1, 1), tau, link)
    return t1 / (p * step_time(nx, ny, (px, py), tau, link, kernel_gap, hiding))


def fit_latency_bandwidth(sizes, times):
    """Least-squares ``(latency, bandwidth)`` of ``time = latency + bytes / bandwidth``."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(times) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, times)) / sxx
    return my - slope * mx, 1.0 / slope


# ---------------------------------------------------------------------------------------------
# Ping-pong (mpiexec -n 2)

PINGPONG_SIZES = (8, 64, 512, 4096, 32768, 65536, 262144, 1 << 20, 4 << 20)


def pingpong_worker(out, repeats=200):
    import time

    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    peer = 1 - comm.rank
    result = {}
    for size in PINGPONG_SIZES:
        buf = np.zeros(size, np.uint8)
        reps = max(10, min(repeats, (64 << 20) // max(size, 1)))
        best = []
        for _ in range(5):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                if comm.rank == 0:
                    comm.Send(buf, peer, 0)
                    comm.Recv(buf, peer, 0)
                else:
                    comm.Recv(buf, peer, 0)
                    comm.Send(buf, peer, 0)
            best.append((time.perf_counter() - t0) / (2 * reps))
        result[size] = sorted(best)[len(best) // 2]
    if comm.rank == 0:
        Path(out).write_text(json.dumps(result))


def measure_pingpong(mpiexec="mpiexec"):
    """``{bytes: one-way seconds}`` (median of 5 batches) between two ranks on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pingpong.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent),
                                                        env.get("PYTHONPATH")) if p)
        subprocess.run([mpiexec, "-n", "2", sys.executable, str(Path(__file__).resolve()),
                        "--pingpong-worker", str(out)], check=True, timeout=300, env=env)
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


# ---------------------------------------------------------------------------------------------
# Report

def report(tau, here, args):
    n = args.n
    lines = ["# Scaling on paper: the heat solver on up to 1,024 GPUs", "",
             "Made by `python bench/scaling.py` (model functions tested in "
             "`tests/test_scaling_model.py`). Numbers are projections from the inputs below, "
             "not measurements at scale.", "", "## Inputs", ""]
    m = H100_STEP
    lines += [
        f"- **Step time per cell, one GPU**: {tau * 1e12:.2f} ps/cell "
        f"({m['step_s'] * 1e3:.3f} ms for the step kernel on {m['n']}² cells with "
        f"{m['ranks_sharing']} ranks sharing one H100 at once, `{m['source']}`; 32 B/cell, "
        f"i.e. {32 / tau / 1e12:.2f} TB/s). At {n}² cells per GPU a step computes in "
        f"{n * n * tau * 1e3:.3f} ms. The adjoint step ({m['adjoint_s'] * 1e3:.3f} ms, "
        f"64 B/cell) has {m['adjoint_s'] / m['step_s']:.2f}x the work and the same halo, so "
        "its efficiency is higher than the forward's; the tables give the forward's.",
        f"- **Halo bytes per step**: float64 faces; an interior patch of {n}² cells sends "
        f"{halo_bytes(n, n, (3, 3)) / 1024:.0f} KiB per step (4 faces of "
        f"{n * ITEMSIZE / 1024:.0f} KiB) and receives as much.",
    ]
    if here:
        lat, bw = here.latency, here.bandwidth
        lines.append(f"- **Measured here** (MPI ping-pong over shared memory, 2 ranks, "
                     f"`mpich` wheel): latency {lat * 1e6:.2f} µs, bandwidth {bw / 1e9:.2f} GB/s "
                     f"(one-way times of 8 B and 4 MiB messages, the median of 5 batches; "
                     f"all {len(args.pingpong)} sizes in the table at the end). Load average "
                     f"{args.load[0]:.1f} before and {args.load[1]:.1f} after on "
                     f"{os.cpu_count()} CPUs: both ranks poll, so other work on the cores "
                     "inflates the latency.")
    for link in (NVLINK4, NDR):
        lines.append(f"- **{link.name}**: latency {link.latency * 1e6:.1f} µs, "
                     f"{link.bandwidth / 1e9:.0f} GB/s one way per GPU. Source: {link.source}.")
    lines += [f"- **Reference**: ImplicitGlobalGrid.jl weak scaling, more than "
              f"{IGG['efficiency']:.0%} parallel efficiency on {IGG['gpus']} GPUs "
              f"({IGG['source']}).", ""]
    lines += ["## Assumptions", "",
              f"- 2-D decomposition as `MPI_Dims_create` makes it; {GPUS_PER_NODE} GPUs per "
              "node; up to one node the halos go over NVLink, beyond it every exchange is "
              "charged the inter-node link (the slowest face sets the step).",
              "- CUDA-aware MPI (device buffers to the network, GPUDirect RDMA): no staging "
              "through host memory. The measured GPU run staged through host memory and took "
              f"{m['exchange_s'] * 1e3:.2f} ms per exchange at {m['n']}² (row \"as measured\").",
              "- The axes are exchanged one after the other; along an axis a patch sends to "
              "both neighbours at once through its one outbound link (bandwidth shared), "
              "full duplex (receives do not slow sends).",
              f"- Each pack or unpack, and each extra kernel of the boundary ring, costs a fixed "
              f"kernel gap of {args.kernel_gap * 1e6:.0f} µs of device time (assumed; sensitivity "
              "below). Without hiding: exchange (pack, send, unpack per axis), then the whole "
              "patch. With hiding: the cells beside each face that has a neighbour first (one "
              "extra kernel per such face), then the rest while the halos travel; the step "
              "takes the longer of the rest and the exchange.",
              "- Compute per cell does not change with the patch size (true down to patches that "
              "still fill the GPU; strong scaling below ~1024² per GPU is optimistic).",
              "- Not modelled: the objective's allreduce (one per solve, not per step), network "
              "contention between jobs, stragglers, and the Python time-loop overhead per step "
              "(a few µs on the host, hidden when kernels are queued ahead).", ""]

    def weak_rows(link_of, label):
        rows = []
        for p in GPU_COUNTS:
            link = link_of(p)
            rows.append((p, dims_create(p),
                         weak_efficiency(n, p, tau, link, args.kernel_gap, hiding=False),
                         weak_efficiency(n, p, tau, link, args.kernel_gap, hiding=True)))
        return rows

    lines += [f"## Weak scaling, {n}² cells per GPU", "",
              "| GPUs | process grid | halo path | no hiding | with hiding |",
              "|---:|---|---|---:|---:|"]
    for p, dims, e0, e1 in weak_rows(link_for, ""):
        lines.append(f"| {p} | {dims[0]}×{dims[1]} | "
                     f"{'NVLink' if p <= GPUS_PER_NODE else 'NDR'} | {e0:.2%} | {e1:.2%} |")
    e_target = weak_efficiency(n, 1024, tau, NDR, args.kernel_gap, hiding=True)
    e_plain = weak_efficiency(n, 1024, tau, NDR, args.kernel_gap, hiding=False)
    lines += ["", f"**Target ≥ 97 % at 1,024 GPUs, {n}² per GPU: {e_target:.2%} with "
              f"communication hiding ({'met' if e_target >= 0.97 else 'not met'} on paper), "
              f"{e_plain:.2%} without.** ImplicitGlobalGrid.jl's published figure is "
              f"{IGG['efficiency']:.0%} at {IGG['gpus']} GPUs (P100s over Cray Aries, a 3-D "
              "problem whose faces are a larger share of the cells).", ""]
    staged = n * n * tau / (n * n * tau + m["exchange_s"] * n / m["n"])
    lines += [f"As measured (halo staged through host memory, exchange time scaled with the "
              f"face length from {m['n']}²): {staged:.1%} at any GPU count beyond one; the "
              "CUDA-aware path and the overlapped pipeline are what the projection above "
              "assumes.", ""]
    if here:
        lines += ["With this machine's shared-memory MPI as the link between GPUs instead "
                  f"(latency {here.latency * 1e6:.2f} µs, {here.bandwidth / 1e9:.1f} GB/s):", "",
                  "| GPUs | no hiding | with hiding |", "|---:|---:|---:|"]
        for p in GPU_COUNTS:
            lines.append(f"| {p} | {weak_efficiency(n, p, tau, here, args.kernel_gap):.2%} | "
                         f"{weak_efficiency(n, p, tau, here, args.kernel_gap, True):.2%} |")
        lines.append("")
    lines += ["Sensitivity at 1,024 GPUs (NDR), to the kernel gap and the latency:", "",
              "| kernel gap | latency | no hiding | with hiding |", "|---:|---:|---:|---:|"]
    for gap in (0.0, 2e-6, 4e-6, 8e-6, 16e-6):
        for lat in (2e-6, 5e-6):
            link = Link(NDR.name, lat, NDR.bandwidth, NDR.source)
            lines.append(f"| {gap * 1e6:.0f} µs | {lat * 1e6:.0f} µs | "
                         f"{weak_efficiency(n, 1024, tau, link, gap):.2%} | "
                         f"{weak_efficiency(n, 1024, tau, link, gap, True):.2%} |")
    g = args.strong_n
    lines += ["", f"## Strong scaling, {g}² cells in all", "",
              f"One GPU holds {g}² float64 cells ({3 * g * g * ITEMSIZE / 2**30:.0f} GiB for u, "
              "κ and f, plus the second state buffer).", "",
              "| GPUs | cells per GPU | no hiding | with hiding |", "|---:|---|---:|---:|"]
    for p in GPU_COUNTS:
        px, py = dims_create(p)
        link = link_for(p)
        lines.append(f"| {p} | {-(-g // px)}×{-(-g // py)} | "
                     f"{strong_efficiency(g, p, tau, link, args.kernel_gap):.2%} | "
                     f"{strong_efficiency(g, p, tau, link, args.kernel_gap, True):.2%} |")
    lines += ["", "Strong scaling ends where a patch's compute time nears the fixed costs of a "
              "step (latency and kernel gaps, ~10-20 µs): at 1,024 GPUs a patch is "
              f"{g // 32}² cells, {(g // 32) ** 2 * tau * 1e6:.1f} µs of compute.", ""]
    if here:
        lines += ["## Ping-pong here (one way, median of 5 batches)", "",
                  "| bytes | time [µs] | GB/s |", "|---:|---:|---:|"]
        for size, t in sorted(args.pingpong.items()):
            lines.append(f"| {size} | {t * 1e6:.2f} | {size / t / 1e9:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "scaling.md"))
    parser.add_argument("--n", type=int, default=8192, help="cells per GPU along each axis")
    parser.add_argument("--strong-n", type=int, default=32768, help="global cells per axis")
    parser.add_argument("--kernel-gap", type=float, default=4e-6,
                        help="seconds of device time per extra small kernel")
    parser.add_argument("--no-pingpong", action="store_true",
                        help="leave out the shared-memory ping-pong (no MPI needed)")
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--json", default=None, help="also write the key figures as JSON")
    parser.add_argument("--pingpong-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pingpong_worker:
        return pingpong_worker(args.pingpong_worker)
    tau = cell_time(H100_STEP["step_s"], H100_STEP["n"], H100_STEP["ranks_sharing"])
    here = None
    if not args.no_pingpong:
        load = os.getloadavg()[0]
        args.pingpong = measure_pingpong(args.mpiexec)
        args.load = (load, os.getloadavg()[0])
        # Two points, the smallest and the largest message: a least-squares fit over all
        # sizes is set by the large ones and leaves the latency to their noise.
        small, large = min(args.pingpong), max(args.pingpong)
        lat, bw = fit_latency_bandwidth([small, large],
                                        [args.pingpong[small], args.pingpong[large]])
        here = Link("MPI shared memory, this machine", lat, bw, "measured by this script")
    text = report(tau, here, args)
    Path(args.out).write_text(text + "\n")
    print(text)
    figures = {
        "cell_time_s": tau, "n_per_gpu": args.n,
        "weak_1024_hiding": weak_efficiency(args.n, 1024, tau, NDR, args.kernel_gap, True),
        "weak_1024_no_hiding": weak_efficiency(args.n, 1024, tau, NDR, args.kernel_gap),
        "pingpong_latency_s": here.latency if here else None,
        "pingpong_bandwidth_Bps": here.bandwidth if here else None,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
