"""The kernel loader: sources of kernels/*.cu (package resource or source tree), the host build's
cache key and cache, the CUDA build per device."""
import os
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from gpumpiad import kernelbuild

TREE = Path(__file__).resolve().parents[1] / "kernels"


def test_source_reads_the_kernel_files():
    for name in ("heat.cu", "host_cuda.h"):
        assert kernelbuild.source(name) == (TREE / name).read_text()
    with pytest.raises(FileNotFoundError, match="no kernel source 'nope.cu'"):
        kernelbuild.source("nope.cu")


def test_source_falls_back_to_the_source_tree(monkeypatch):
    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(kernelbuild.importlib.resources, "files", missing)
    monkeypatch.setattr(kernelbuild, "_sources", {})
    assert kernelbuild.source("heat.cu") == (TREE / "heat.cu").read_text()


def test_cache_key_changes_with_compiler_version_flags_cpu_and_sources():
    sources = {"heat.cu": "a", "host_cuda.h": "b"}
    base = ("/usr/bin/g++", "g++ 12.2.0", kernelbuild.CXXFLAGS, "x86_64 CPU flags:1", sources)
    key = kernelbuild._build_key(*base)
    assert key == kernelbuild._build_key(*base)
    variants = [
        ("/usr/bin/clang++",) + base[1:],
        base[:1] + ("g++ 13.1.0",) + base[2:],
        base[:2] + (kernelbuild.CXXFLAGS + kernelbuild.NATIVE_FLAGS,) + base[3:],
        base[:3] + ("x86_64 CPU flags:2",) + base[4:],
        base[:4] + ({"heat.cu": "a2", "host_cuda.h": "b"},),
        base[:4] + ({"heat.cu": "a", "host_cuda.h": "b2"},),
    ]
    keys = {kernelbuild._build_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_cpu_identity_names_the_model_and_hashes_the_features():
    cpu = kernelbuild._cpu_identity()
    assert "flags:" in cpu and cpu == kernelbuild._cpu_identity()


def stub_compiler(tmp_path):
    """A compiler that logs its arguments and writes an empty library (no real build)."""
    log = tmp_path / "calls.log"
    script = tmp_path / "stub-c++"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{log}"\n'
        'if [ "$1" = --version ]; then echo "stub 1.0"; exit 0; fi\n'
        'while [ $# -gt 1 ]; do if [ "$1" = -o ]; then : > "$2"; exit 0; fi; shift; done\n'
        'exit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def test_host_library_path_changes_with_flags_and_source(monkeypatch, tmp_path):
    compiler, log = stub_compiler(tmp_path)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("GPUMPIAD_HOST_MARCH", raising=False)
    native = kernelbuild.host_library("heat.cu")
    assert native["march"] == "native" and native["version"] == "stub 1.0"
    assert native["path"].parent == tmp_path / "cache" / "gpumpiad"
    assert native["path"].name.startswith("heat_host-")
    monkeypatch.setenv("GPUMPIAD_HOST_MARCH", "portable")
    portable = kernelbuild.host_library("heat.cu")
    assert portable["march"] == "portable" and portable["path"] != native["path"]
    monkeypatch.setattr(kernelbuild, "_sources",
                        {"heat.cu": kernelbuild.source("heat.cu") + "\n// changed\n",
                         "host_cuda.h": kernelbuild.source("host_cuda.h")})
    changed = kernelbuild.host_library("heat.cu")
    assert changed["path"] not in (native["path"], portable["path"])
    builds = [line for line in log.read_text().splitlines() if " -o " in line]
    assert len(builds) == 3
    # Found in the cache the second time: no build.
    assert kernelbuild.host_library("heat.cu")["path"] == changed["path"]
    assert len([line for line in log.read_text().splitlines() if " -o " in line]) == 3


def test_host_library_without_compiler_or_with_a_wrong_march(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        kernelbuild.host_library("heat.cu")
    monkeypatch.setenv("GPUMPIAD_HOST_MARCH", "fastest")
    with pytest.raises(ValueError, match="GPUMPIAD_HOST_MARCH must be one of"):
        kernelbuild.host_library("heat.cu")


@pytest.mark.skipif(kernelbuild._compiler() is None, reason="no C++ compiler")
def test_a_second_process_reuses_the_cached_library(tmp_path):
    real = kernelbuild._compiler()
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "logging-c++"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, CXX=str(wrapper), XDG_CACHE_HOME=str(tmp_path / "cache"),
               GPUMPIAD_HOST_MARCH="portable")
    code = ("import ctypes; from gpumpiad import kernelbuild; "
            "info = kernelbuild.host_library('heat.cu'); ctypes.CDLL(str(info['path'])); "
            "print(info['path'])")
    paths = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        paths.append(proc.stdout.strip())
    assert paths[0] == paths[1] and Path(paths[0]).exists()
    calls = log.read_text().splitlines()
    assert calls[0] == "--version" and " -o " in calls[1]
    assert calls[2:] == ["--version"]


def fake_cupy(monkeypatch):
    """A ``cupy`` with only what :func:`kernelbuild.cuda_module` uses; counts compilations."""
    compiled = []
    state = threading.local()

    class Device:
        def __init__(self, device_id):
            self.id = device_id

        def __enter__(self):
            self.previous = getattr(state, "device", 0)
            state.device = self.id

        def __exit__(self, *exc):
            state.device = self.previous

    class RawModule:
        def __init__(self, code, options):
            self.code, self.options = code, options

        def compile(self):
            compiled.append((getattr(state, "device", 0), self.options))
            self.device = getattr(state, "device", 0)

    runtime = types.SimpleNamespace(getDevice=lambda: getattr(state, "device", 0))
    cuda = types.SimpleNamespace(Device=Device, runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda,
                                                                    RawModule=RawModule))
    monkeypatch.setattr(kernelbuild, "_modules", {})
    return compiled


def test_cuda_module_is_built_once_per_device_and_options(monkeypatch):
    compiled = fake_cupy(monkeypatch)
    options = ("-std=c++17", "-DHEAT_BLOCK_X=32")
    results = []
    barrier = threading.Barrier(8)

    def worker(device):
        barrier.wait()
        results.append((device, kernelbuild.cuda_module("heat.cu", options, device)))

    threads = [threading.Thread(target=worker, args=(k % 2,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(compiled) == [(0, options), (1, options)]
    for device, mod in results:
        assert mod.device == device and mod.code == kernelbuild.source("heat.cu")
        assert mod is kernelbuild.cuda_module("heat.cu", list(options), device)
    assert kernelbuild.cuda_module("heat.cu", options) is kernelbuild.cuda_module(
        "heat.cu", options, 0)
    kernelbuild.cuda_module("heat.cu", options + ("-DHALO_BLOCK=128",), 1)
    assert len(compiled) == 3
