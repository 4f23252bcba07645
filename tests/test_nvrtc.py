"""kernels/heat.cu and kernels/heat3d.cu compile with NVRTC 12 and NVRTC 13, for sm_80 and sm_90.

Each NVRTC is loaded with ctypes from its PyPI wheel (``nvidia-cuda-nvrtc-cu12`` ships
``libnvrtc.so.12``, ``nvidia-cuda-nvrtc`` ``libnvrtc.so.13``), so one environment tests both.
Each source is compiled with the options a ``cupy.RawModule`` hands NVRTC around its launchers'
``_OPTIONS`` (``cudakernels``, ``cudakernels3d``) and also with ``_OPTIONS`` alone, and every
kernel of the launchers' ``KERNEL_NAMES`` must be in the CUBIN and the PTX. ptxas's report on
CuPy's build holds every kernel to its register budget, without spills.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.resources
import importlib.util
import sys
from pathlib import Path

import pytest

from gpumpiad.heat import cudakernels, cudakernels3d

_PATH = Path(__file__).resolve().parents[1] / "bench" / "kernel_resources.py"
_spec = importlib.util.spec_from_file_location("bench_kernel_resources", _PATH)
kernel_resources = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kernel_resources
_spec.loader.exec_module(kernel_resources)

ARCHS = ("sm_80", "sm_90")
#: Each kernel file and the module that launches its kernels.
LAUNCHERS = {"heat.cu": cudakernels, "heat3d.cu": cudakernels3d}
# Distribution and library file of each NVRTC major.
WHEELS = {12: ("nvidia-cuda-nvrtc-cu12", "libnvrtc.so.12"),
          13: ("nvidia-cuda-nvrtc", "libnvrtc.so.13")}
_libs: dict[int, object] = {}


def _load(major):
    """The ctypes handle of NVRTC ``major`` from its wheel; skips the test when it is absent."""
    if major in _libs:
        return _libs[major]
    dist, soname = WHEELS[major]
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"NVRTC {major}: package {dist} is not installed "
                    f"(pip install -e '.[test]' installs it)")
    paths = [f.locate() for f in files if f.name == soname]
    if not paths:
        pytest.skip(f"NVRTC {major}: package {dist} has no {soname}")
    try:
        lib = ctypes.CDLL(str(paths[0]))
    except OSError as e:
        pytest.skip(f"NVRTC {major}: cannot load {paths[0]}: {e}")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    maj, mnr = ctypes.c_int(), ctypes.c_int()
    assert lib.nvrtcVersion(ctypes.byref(maj), ctypes.byref(mnr)) == 0
    assert maj.value == major, f"{paths[0]} is NVRTC {maj.value}.{mnr.value}, expected {major}"
    _libs[major] = lib
    return lib


def cupy_options(arch, launcher=cudakernels):
    """What a ``cupy.RawModule(code=..., options=launcher._OPTIONS)`` adds for NVRTC on an
    ``arch`` GPU.

    CuPy puts ``-I`` for its bundled CCCL headers first, then the caller's options (with
    ``--std=c++17`` only when they name no standard), ``-I`` for its own and the CUDA runtime's
    headers, ``-ftz=true``, ``-arch=sm_XX`` (it asks NVRTC for a CUBIN) and, outside jitify,
    ``--device-as-default-execution-space``. heat.cu includes nothing, so the include
    directories are left out; their absence is all that differs (heat3d.cu includes nothing
    either).
    """
    return (*launcher._OPTIONS, "-ftz=true", f"-arch={arch}",
            "--device-as-default-execution-space")


def bare_options(arch, launcher=cudakernels):
    """``_OPTIONS`` and the architecture only: what any other NVRTC user would pass."""
    return (*launcher._OPTIONS, f"--gpu-architecture={arch}")


def nvrtc_compile(major, source, options, name="heat.cu"):
    """Compile ``source`` (file ``name``) with NVRTC ``major``; return (ok, log, cubin, ptx)."""
    lib = _load(major)
    prog = ctypes.c_void_p()

    def check(rc):
        if rc != 0:
            pytest.fail(f"NVRTC {major}: {lib.nvrtcGetErrorString(rc).decode()}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source, name.encode(), 0, None, None))
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        n = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n)))
        log = ctypes.create_string_buffer(n.value)
        check(lib.nvrtcGetProgramLog(prog, log))
        if rc != 0:
            return False, log.value.decode(errors="replace"), b"", b""
        out = []
        for size_fn, get_fn in (("nvrtcGetCUBINSize", "nvrtcGetCUBIN"),
                                ("nvrtcGetPTXSize", "nvrtcGetPTX")):
            check(getattr(lib, size_fn)(prog, ctypes.byref(n)))
            buf = ctypes.create_string_buffer(n.value)
            check(getattr(lib, get_fn)(prog, buf))
            out.append(buf.raw)
        return True, log.value.decode(errors="replace"), out[0], out[1]
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _source(name="heat.cu"):
    return importlib.resources.files("gpumpiad.kernels").joinpath(name).read_bytes()


@pytest.mark.parametrize("options", [cupy_options, bare_options], ids=["cupy", "bare"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("major", sorted(WHEELS), ids=lambda m: f"nvrtc{m}")
@pytest.mark.parametrize("kernels", sorted(LAUNCHERS))
def test_kernel_file_compiles_with_every_kernel(kernels, major, arch, options):
    launcher = LAUNCHERS[kernels]
    opts = options(arch, launcher)
    ok, log, cubin, ptx = nvrtc_compile(major, _source(kernels), opts, kernels)
    assert ok, f"NVRTC {major} {kernels} {' '.join(opts)}:\n{log}"
    assert len(cubin) > 0 and len(ptx) > 0
    for name in launcher.KERNEL_NAMES:
        assert f".entry {name}(".encode() in ptx, f"{name} missing from the PTX"
        assert name.encode() + b"\0" in cubin, f"{name} missing from the CUBIN"


@pytest.mark.parametrize("major", sorted(WHEELS), ids=lambda m: f"nvrtc{m}")
def test_compile_errors_are_reported(major):
    # The harness itself: a broken source fails with NVRTC's log, never passes silently.
    ok, log, cubin, _ = nvrtc_compile(major, _source() + b"\nnot_a_type x;\n",
                                      bare_options("sm_80"))
    assert not ok and "not_a_type" in log and cubin == b""


# Registers each kernel may use: 32 is full occupancy with 256-thread blocks, 40 three quarters,
# 64 half. The 2-D adjoint, the heaviest kernel of heat.cu, used 54-59 in float64 (half
# occupancy) before its loop was rewritten; the forward step uses 40 at sm_80. The 3-D adjoint
# reads 17 values per cell and is held to 64 by its launch bounds (HEAT3D_ADJOINT_THREADS):
# NVRTC 13 takes 80-92 uncapped and spills under a cap of 48.
REGISTER_BUDGET = {name: 40 for launcher in LAUNCHERS.values() for name in launcher.KERNEL_NAMES}
REGISTER_BUDGET.update(heat_adjoint_float32=32, heat_adjoint_float64=32,
                       heat3d_adjoint_float32=64, heat3d_adjoint_float64=64)
#: Theoretical occupancy the adjoint kernels' launch bounds promise.
ADJOINT_OCCUPANCY = {"heat.cu": 1.0, "heat3d.cu": 0.5}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("major", sorted(WHEELS), ids=lambda m: f"nvrtc{m}")
@pytest.mark.parametrize("kernels", sorted(LAUNCHERS))
def test_kernels_fit_their_register_budget_without_spills(kernels, major, arch):
    launcher = LAUNCHERS[kernels]
    ok, log, _, _ = nvrtc_compile(major, _source(kernels),
                                  (*cupy_options(arch, launcher), "--ptxas-options=-v"), kernels)
    assert ok, log
    used = kernel_resources.parse_ptxas(log)
    assert set(used) == set(launcher.KERNEL_NAMES), log
    for name, (regs, stores, loads) in used.items():
        assert (stores, loads) == (0, 0), f"{name} spills {stores} / {loads} bytes at {arch}"
        assert regs <= REGISTER_BUDGET[name], (
            f"{name} uses {regs} registers at {arch}, budget {REGISTER_BUDGET[name]}")
    for name in used:
        if "_adjoint_" in name:
            occupancy = kernel_resources.occupancy(used[name][0],
                                                   kernel_resources.block_threads(name))
            assert occupancy >= ADJOINT_OCCUPANCY[kernels], (name, arch, occupancy)
