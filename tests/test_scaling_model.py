"""The arithmetic of the scaling model in bench/scaling.py, on hand-computed cases (no MPI)."""
import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "scaling.py"
_spec = importlib.util.spec_from_file_location("bench_scaling", _PATH)
scaling = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = scaling  # dataclasses look their module up while the file runs
_spec.loader.exec_module(scaling)

# 1 us latency, 1 GB/s: a 1000-cell float64 face (8000 B) takes 1 + 8 = 9 us.
LINK = scaling.Link("test", 1e-6, 1e9, "hand-computed")
TAU = 1e-10  # s per cell: a 1000 x 1000 patch computes in 100 us


def test_cell_time():
    assert scaling.cell_time(0.4e-3, 1000, ranks_sharing=2) == pytest.approx(2e-10)
    assert scaling.cell_time(1e-3, 100) == pytest.approx(1e-7)


@pytest.mark.parametrize("p, dims", [(1, (1, 1)), (2, (2, 1)), (8, (4, 2)), (12, (4, 3)),
                                     (1024, (32, 32)), (7, (7, 1))])
def test_dims_create(p, dims):
    assert scaling.dims_create(p) == dims


def test_halo_time_and_bytes():
    # 2 x 2: one neighbour per axis, two phases of 9 us; two 2 us kernels per phase.
    assert scaling.halo_time(1000, 1000, (2, 2), LINK) == pytest.approx(18e-6)
    assert scaling.halo_time(1000, 1000, (2, 2), LINK, kernel_gap=2e-6) == pytest.approx(26e-6)
    # 3 x 1: two neighbours along x share the link: 1 + 2 * 8 = 17 us.
    assert scaling.halo_time(1000, 1000, (3, 1), LINK) == pytest.approx(17e-6)
    assert scaling.halo_time(1000, 1000, (1, 1), LINK) == 0.0
    assert scaling.halo_bytes(1000, 500, (3, 3)) == 2 * 500 * 8 + 2 * 1000 * 8


def test_step_time_without_and_with_hiding():
    assert scaling.step_time(1000, 1000, (1, 1), TAU, LINK) == pytest.approx(100e-6)
    assert scaling.step_time(1000, 1000, (2, 2), TAU, LINK) == pytest.approx(118e-6)
    # Hiding on 2 x 2: 1999 cells beside the two faces first (0.1999 us), the other 998001
    # (99.8001 us) overlap the 18 us exchange; two extra 3 us kernels.
    t = scaling.step_time(1000, 1000, (2, 2), TAU, LINK, kernel_gap=3e-6, hiding=True)
    halo = 18e-6 + 4 * 3e-6
    assert t == pytest.approx(0.1999e-6 + 6e-6 + max(99.8001e-6, halo))
    # A 100 x 100 patch (1 us of compute) waits for its exchange of two 800 B faces,
    # 2 * (1 + 0.8) us, after its 199 cells beside the faces.
    t = scaling.step_time(100, 100, (2, 2), TAU, LINK, hiding=True)
    assert t == pytest.approx(199 * TAU + 3.6e-6)


def test_efficiencies():
    # Weak, 4 GPUs (2 x 2): 100 / 118 without hiding, all of it hidden with.
    assert scaling.weak_efficiency(1000, 4, TAU, LINK) == pytest.approx(100 / 118)
    assert scaling.weak_efficiency(1000, 4, TAU, LINK, hiding=True) == pytest.approx(1.0)
    # Strong, 2000^2 on 4 GPUs: t1 = 400 us, each GPU a 1000^2 patch in 118 us.
    assert scaling.strong_efficiency(2000, 4, TAU, LINK) == pytest.approx(400 / (4 * 118))
    assert scaling.link_for(8) is scaling.NVLINK4
    assert scaling.link_for(9) is scaling.NDR


def test_fit_latency_bandwidth():
    sizes = [8, 1000, 10**6]
    lat, bw = scaling.fit_latency_bandwidth(sizes, [2e-6 + s / 5e9 for s in sizes])
    assert lat == pytest.approx(2e-6)
    assert bw == pytest.approx(5e9)


def test_target_case_from_recorded_inputs():
    tau = scaling.cell_time(0.396e-3, 4096, 2)
    n = 8192
    compute = n * n * tau
    # Interior patch at 1,024 GPUs over NDR (2 us, 50 GB/s), 4 us kernels: two phases of
    # 2 us + 2 * 65536 B / 50 GB/s + 8 us.
    halo = 2 * (2e-6 + 2 * n * 8 / 50e9 + 8e-6)
    assert scaling.weak_efficiency(n, 1024, tau, scaling.NDR, 4e-6) == pytest.approx(
        compute / (compute + halo))
