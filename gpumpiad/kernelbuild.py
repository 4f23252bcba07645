"""One loader for ``kernels/*.cu``: their sources, the CUDA build through CuPy and the host
build through a C++ compiler.

Every kernel file compiles two ways. For a GPU, CuPy's NVRTC compiles the source once per
device and option set (:func:`cuda_module`). For the CPU, the compiler compiles it as C++ with
``-DGPUMPIAD_HOST`` (the file then includes ``host_cuda.h``, which turns the CUDA qualifiers
into plain C++) into a shared library that :mod:`ctypes` loads (:func:`host_library`).

The host library is built for the machine it runs on (``-march=native``) when the compiler
accepts that, and portably otherwise; floating-point contraction is off in both, so the two
give the same bits. It is cached under ``$XDG_CACHE_HOME/gpumpiad`` (default
``~/.cache/gpumpiad``) keyed by a hash of the sources, the compiler's path and version, the
flags and, for a native build, the CPU (model and feature flags): a cache shared between
machines never hands one a library built for another. It is built atomically, so several MPI
ranks may build it at once, and a native build the compiler refuses is remembered beside the
cache entry, so later processes go straight to the portable one.

This module imports neither CuPy (until :func:`cuda_module` is called) nor any solver.

Environment
-----------
CXX
    The C++ compiler (default ``g++``).
GPUMPIAD_HOST_MARCH : ``native`` | ``portable``
    ``native`` (default): build for this CPU, falling back to the portable build when the
    compiler refuses ``-march=native``; ``portable``: no ``-march`` (a library that runs on
    any CPU of the architecture).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["source", "cuda_module", "host_library", "native_flags", "CXXFLAGS", "NATIVE_FLAGS",
           "WIDE_VECTOR_FLAGS"]

#: Flags of every host build. ``-ffp-contract=off``: no fused multiply-adds, so that a build
#: for any CPU computes the same bits as the portable one and as the NumPy reference's order.
CXXFLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-DGPUMPIAD_HOST",
            "-x", "c++")
#: Added for a build for the machine it runs on.
NATIVE_FLAGS = ("-march=native",)
#: Added to a native build on a CPU with 512-bit vectors (``avx512f``). Compilers prefer 256-bit
#: vectors there by default, for the older CPUs that lowered their clock on wider ones; the
#: stencils, in cache, take 10-17 % less time with 512 (bench/results/heat_kernels_cpu.md).
WIDE_VECTOR_FLAGS = ("-mprefer-vector-width=512",)
_MARCH_CHOICES = ("native", "portable")

_lock = threading.Lock()
_sources: dict[str, str] = {}
_modules: dict[tuple, object] = {}


def _package_root():
    try:
        return importlib.resources.files("gpumpiad.kernels")
    except ModuleNotFoundError:
        # Run from a source tree whose kernels the install does not map: the tree's own.
        return Path(__file__).resolve().parents[1] / "kernels"


def source(name: str) -> str:
    """Text of ``kernels/<name>``, read once per process.

    Parameters
    ----------
    name : str
        A file of package ``gpumpiad.kernels``, e.g. ``"heat.cu"`` or ``"host_cuda.h"``;
        when the installed package does not map that package, the source tree's
        ``kernels/`` folder.

    Returns
    -------
    str

    Raises
    ------
    FileNotFoundError
        When no such kernel file exists.

    Examples
    --------
    >>> from gpumpiad import kernelbuild
    >>> 'extern "C"' in kernelbuild.source("heat.cu")
    True
    """
    text = _sources.get(name)
    if text is None:
        path = _package_root().joinpath(name)
        if not path.is_file():
            raise FileNotFoundError(f"no kernel source {name!r} in gpumpiad.kernels ({path})")
        text = _sources[name] = path.read_text()
    return text


def cuda_module(name: str, options=(), device_id: int | None = None):
    """The ``cupy.RawModule`` of ``kernels/<name>`` compiled with ``options`` for a device,
    built once per device, file and options; safe to call from several threads.

    Parameters
    ----------
    name : str
        The kernel file, e.g. ``"heat.cu"``.
    options : sequence of str
        NVRTC options (``-D`` parameters, ``-std=``...).
    device_id : int, optional
        CUDA device; defaults to CuPy's current device.

    Returns
    -------
    cupy.RawModule
        Compiled; fetch kernels with ``get_function(name)``.

    Examples
    --------
    >>> from gpumpiad import kernelbuild
    >>> mod = kernelbuild.cuda_module("heat.cu", ("-std=c++17",))  # doctest: +SKIP
    >>> kernel = mod.get_function("copy4_float64")                   # doctest: +SKIP
    """
    import cupy

    if device_id is None:
        device_id = cupy.cuda.runtime.getDevice()
    key = (int(device_id), name, tuple(options))
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                with cupy.cuda.Device(device_id):
                    mod = cupy.RawModule(code=source(name), options=key[2])
                    mod.compile()
                _modules[key] = mod
    return mod


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpumpiad"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _march() -> str:
    choice = os.environ.get("GPUMPIAD_HOST_MARCH", "").strip().lower() or "native"
    if choice not in _MARCH_CHOICES:
        raise ValueError(f"GPUMPIAD_HOST_MARCH must be one of {_MARCH_CHOICES}, got {choice!r}")
    return choice


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_features() -> tuple[str | None, str]:
    """The CPU's model name (None if unknown) and its feature flags, sorted, space-separated."""
    model, features = None, None
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and features is None:
                    features = " ".join(sorted(value.split()))
                if model is not None and features is not None:
                    break
    except OSError:
        pass
    return model, features or ""


def _cpu_identity(cpu=None) -> str:
    """The CPU a native build is for (``cpu``: :func:`_cpu_features`'s answer, read here when
    not given): model name and a hash of its feature flags."""
    model, features = _cpu_features() if cpu is None else cpu
    model = model or platform.processor() or "unknown CPU"
    digest = hashlib.sha256(features.encode()).hexdigest()[:16]
    return f"{platform.machine()} {model} flags:{digest}"


def native_flags(features=None) -> tuple[str, ...]:
    """The flags of a build for this CPU (or for one with the feature flags ``features``).

    Examples
    --------
    >>> from gpumpiad import kernelbuild
    >>> kernelbuild.native_flags("fma avx2 avx512f")[-1]
    '-mprefer-vector-width=512'
    >>> kernelbuild.native_flags("fma avx2") == kernelbuild.CXXFLAGS + kernelbuild.NATIVE_FLAGS
    True
    """
    if features is None:
        features = _cpu_features()[1]
    wide = WIDE_VECTOR_FLAGS if "avx512f" in features.split() else ()
    return CXXFLAGS + NATIVE_FLAGS + wide


def _build_key(cxx: str, version: str, flags, cpu: str, sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    for part in (cxx, version, " ".join(flags), cpu):
        h.update(part.encode())
        h.update(b"\0")
    for name in sorted(sources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(sources[name].encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _compile(cxx, flags, main, sources, target):
    """Build ``target`` from ``sources[main]`` atomically; the compiler's complaint, or None."""
    # Private build dir + atomic rename: concurrent ranks never see a partial library.
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        for name, text in sources.items():
            Path(tmp, name).write_text(text)
        out = Path(tmp, target.name)
        cmd = [cxx, *flags, "-I", tmp, str(Path(tmp, main)), "-o", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if proc.returncode != 0 or not out.exists():
            return f"{' '.join(cmd)} (exit code {proc.returncode}):\n{proc.stderr[-4000:]}"
        os.replace(out, target)
    return None


def host_library(name: str, includes=("host_cuda.h",)) -> dict:
    """The host (C++) build of ``kernels/<name>`` for this compiler, CPU and
    ``GPUMPIAD_HOST_MARCH``: found in the cache or built into it.

    Each call looks the build up again (it runs the compiler for its version); a caller loads
    the library once per process.

    Parameters
    ----------
    name : str
        The kernel file, e.g. ``"heat.cu"``.
    includes : sequence of str
        The kernel files it includes; part of the cache key.

    Returns
    -------
    dict
        ``path`` (the shared library), ``march`` (``"native"`` or ``"portable"``), ``flags``,
        ``compiler``, ``version`` (the compiler's first line), ``cpu`` (what a native build
        is keyed by), ``refused`` (the compiler's complaint about a native build it fell back
        from, or None).

    Raises
    ------
    RuntimeError
        When there is no compiler or no build succeeds (with the compiler's messages).
    ValueError
        When ``GPUMPIAD_HOST_MARCH`` has another value than ``native`` or ``portable``.

    Examples
    --------
    >>> from gpumpiad import kernelbuild
    >>> info = kernelbuild.host_library("heat.cu")
    >>> info["path"].exists() and info["march"] in ("native", "portable")
    True
    """
    march = _march()
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX', 'g++')!r}; "
                           "set CXX or install g++)")
    sources = {n: source(n) for n in (name, *includes)}
    version = _compiler_version(cxx)
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    choices = []
    if march == "native":
        cpu = _cpu_features()
        choices.append(("native", native_flags(cpu[1]), _cpu_identity(cpu)))
    choices.append(("portable", CXXFLAGS, ""))
    stem = name.rsplit(".", 1)[0]
    failures = []
    for kind, flags, cpu in choices:
        key = _build_key(cxx, version, flags, cpu, sources)
        target = cache / f"{stem}_host-{key}.so"
        refused = target.with_suffix(".refused")
        if not target.exists():
            if kind == "native" and refused.exists():
                failures.append(refused.read_text())
                continue
            problem = _compile(cxx, flags, name, sources, target)
            if problem is not None:
                failures.append(problem)
                if kind == "native":
                    refused.write_text(problem)
                continue
        return dict(path=target, march=kind, flags=flags, compiler=cxx,
                    version=version.splitlines()[0] if version else "", cpu=cpu,
                    refused=failures[0] if failures else None)
    raise RuntimeError(f"host build of {name} failed: " + "\n".join(failures))
