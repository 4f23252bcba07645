"""Registers, spills and theoretical occupancy of every kernel in kernels/heat.cu and
kernels/heat3d.cu, from nvcc.

    python bench/kernel_resources.py [--kernels heat.cu|heat3d.cu] [--source FILE]
                                     [--arch sm_80 sm_90]

compiles each source as a .cu file with ``nvcc -cubin -arch=<arch> --resource-usage`` and the
``-D`` defines of its launchers' options (``gpumpiad.heat.cudakernels._OPTIONS``,
``gpumpiad.heat.cudakernels3d._OPTIONS``), and prints one Markdown table per file and
architecture (``--source``: another version of the file ``--kernels`` names, heat.cu by
default). Occupancy is the theoretical one of a block of the size the launchers use, limited by
registers alone (the kernels use no shared memory): registers are allocated per warp in units
of 256, from 64 Ki per SM, with at most 64 resident warps and 32 blocks per SM on both sm_80
and sm_90. No GPU is needed, and none is measured.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gpumpiad.heat import cudakernels, cudakernels3d

#: Each kernel file and the module that launches its kernels.
LAUNCHERS = {"heat.cu": cudakernels, "heat3d.cu": cudakernels3d}
REGS_PER_SM = 65536
REG_UNIT = 256  # registers, allocated per warp
MAX_WARPS = 64
MAX_BLOCKS = 32
BLOCK_2D = cudakernels.BLOCK_X * cudakernels.BLOCK_Y
BLOCK_3D = cudakernels3d.BLOCK_X * cudakernels3d.BLOCK_Y


def block_threads(name):
    """Threads per block the launcher of kernel ``name`` uses."""
    if name.startswith("heat3d_"):
        return BLOCK_3D
    return BLOCK_2D if name.startswith("heat_") else cudakernels.HALO_BLOCK


def occupancy(regs, threads):
    """Theoretical occupancy (resident warps / 64) of ``threads``-thread blocks at ``regs``."""
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    blocks = min(REGS_PER_SM // per_warp // warps, MAX_BLOCKS, MAX_WARPS // warps)
    return blocks * warps / MAX_WARPS


def resources(source, arch, launcher=cudakernels):
    """{kernel: (registers, spill store bytes, spill load bytes)} from ptxas at ``arch``, the
    source compiled with the ``-D`` defines and standard of ``launcher._OPTIONS``."""
    defines = [o for o in launcher._OPTIONS if o.startswith(("-D", "-std"))]
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "heat.cu"
        cu.write_text(source)
        cmd = ["nvcc", *defines, "-cubin", f"-arch={arch}", "--resource-usage", str(cu),
               "-o", str(Path(tmp) / "heat.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return parse_ptxas(proc.stdout + proc.stderr)


def parse_ptxas(log):
    """{kernel: (registers, spill store bytes, spill load bytes)} from ptxas's verbose log
    (``nvcc --resource-usage``, or NVRTC with ``--ptxas-options=-v``)."""
    out, name, spills = {}, None, (0, 0)
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\w+)", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            out[name] = (int(m.group(1)), *spills)
            name, spills = None, (0, 0)
    return out


def table(source, arch, launcher=cudakernels):
    res = resources(source, arch, launcher)
    rows = [f"| kernel ({arch}) | block | registers | spill stores / loads (bytes) | occupancy |",
            "|---|---:|---:|---:|---:|"]
    for name in launcher.KERNEL_NAMES:
        regs, st, ld = res[name]
        threads = block_threads(name)
        rows.append(f"| {name} | {threads} | {regs} | {st} / {ld} | "
                    f"{occupancy(regs, threads) * 100:g} % |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", choices=sorted(LAUNCHERS),
                    help="one kernel file (default: every one; heat.cu with --source)")
    ap.add_argument("--source", type=Path,
                    help="CUDA file standing for the --kernels one (default: the package's)")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    args = ap.parse_args(argv)
    if args.source and not args.kernels:
        args.kernels = "heat.cu"
    if shutil.which("nvcc") is None:
        sys.exit("nvcc is not on PATH")
    for name in [args.kernels] if args.kernels else list(LAUNCHERS):
        launcher = LAUNCHERS[name]
        source = args.source.read_text() if args.source else launcher.source()
        for arch in args.arch:
            print(table(source, arch, launcher), end="\n\n")


if __name__ == "__main__":
    main()
