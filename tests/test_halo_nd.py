"""Tests for gpumpiad.halo_exchange on 1-, 2- and 3-D grids: ghosts (faces, edges, corners)
against a global padded field for every split of the ranks into the grid's axes, widths 1 and
2, Dirichlet and periodic axes; the cross-rank dot-product test of the exchange against the
tape's adjoint; several fields in one message per neighbour; the argument errors; and the
device path on the CPU model of CuPy's streams."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gm
from gpumpiad import halo
from gpumpiad.backend import to_numpy

SHAPES = {1: (9,), 2: (9, 8), 3: (9, 8, 10)}
PERIODIC = {1: ((False,), (True,)),
            2: ((False, False), (True, True), (True, False)),
            3: ((False, False, False), (True, True, True), (False, True, True))}
MODEL_PATH = os.path.join(os.path.dirname(__file__), "cudamodel")


def splits(size, d):
    """Every ``dims`` of ``d`` axes whose product is ``size``."""
    return [dims for dims in itertools.product(range(1, size + 1), repeat=d)
            if int(np.prod(dims)) == size]


def cases(size):
    for d in (1, 2, 3):
        for dims in splits(size, d):
            for periodic in PERIODIC[d]:
                yield d, dims, periodic


def global_padded(shape, widths, periodic, seed=0):
    """A global field with ``widths`` ghost layers whose ghosts along the periodic axes hold
    the wrapped-around cells (axes in turn, each over the full extent of the others)."""
    g = np.random.default_rng(seed).standard_normal(tuple(n + 2 * w for n, w in
                                                          zip(shape, widths)))
    for axis, (n, w) in enumerate(zip(shape, widths)):
        if periodic[axis] and w:
            g = np.moveaxis(g, axis, 0)
            g[:w], g[n + w:] = g[n:n + w].copy(), g[w:2 * w].copy()
            g = np.moveaxis(g, 0, axis)
    return g


def window(grid, g, widths):
    """This rank's padded patch of the global padded field ``g``."""
    return g[tuple(slice(o, o + n + 2 * w) for o, n, w in
                   zip(grid.offset, grid.local_shape, widths))].copy()


def written(grid, shape, widths, corners):
    """Mask of the ghosts the exchange fills: with corners, those whose last ghost axis faces a
    neighbour on that side; without, the face ghosts facing a neighbour; and the mask of edge
    and corner ghosts (two or more ghost axes)."""
    side = np.full(shape, -1)
    count = np.zeros(shape, int)
    for axis, (n, w) in enumerate(zip(shape, widths)):
        index = np.arange(n).reshape([-1 if b == axis else 1 for b in range(len(shape))])
        low, high = np.broadcast_to(index < w, shape), np.broadcast_to(index >= n - w, shape)
        side[low], side[high] = 2 * axis, 2 * axis + 1
        count += low | high
    facing = np.zeros(shape, bool)
    for s, physical in enumerate(grid.physical):
        facing |= (side == s) & (not physical)
    return (facing if corners else facing & (count == 1)), count >= 2


def check_forward(grid, widths, corners, label):
    g = global_padded(grid.shape, widths, grid.periodic)
    expected = window(grid, g, widths)
    fill, edges = written(grid, expected.shape, widths, corners)
    if not corners:
        expected[edges] = 7.0     # edge and corner ghosts keep u's values
    u = expected.copy()
    u[fill] = np.nan
    v = gm.halo_exchange(gm.tensor(u, distributed=True), grid, width=widths,
                         corners=corners).numpy()
    parallel_assert(np.array_equal(v, expected),
                    f"{label}: {int((v != expected).sum())} cells differ from the global field")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_ghosts_equal_the_global_field():
    size = MPI.COMM_WORLD.size
    for d, dims, periodic in cases(size):
        with gm.Grid(SHAPES[d], dims=dims, periodic=periodic) as grid:
            for width, corners in itertools.product((1, 2), (False, True)):
                check_forward(grid, (width,) * d, corners,
                              f"dims {dims}, periodic {periodic}, width {width}, corners "
                              f"{corners}")
            if d == 3:
                check_forward(grid, (2, 0, 1), True, f"dims {dims}, width (2, 0, 1)")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_one_cell_thick_patches():
    size = MPI.COMM_WORLD.size
    for shape, dims in (((size,), (size,)), ((size, 3), (size, 1)), ((2, size, 1), (1, size, 1))):
        for periodic in (False, True):
            with gm.Grid(shape, dims=dims, periodic=periodic) as grid:
                for corners in (False, True):
                    check_forward(grid, (1,) * len(shape), corners,
                                  f"shape {shape}, periodic {periodic}, corners {corners}")


def dot_test(grid, widths, corners, label, dtype=np.float64):
    comm = MPI.COMM_WORLD
    shape = tuple(n + 2 * w for n, w in zip(grid.local_shape, widths))
    rng = np.random.default_rng(10 + comm.rank)
    x, y = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    ex, pullback = gm.vjp(lambda u: gm.halo_exchange(u, grid, width=widths, corners=corners),
                          gm.tensor(x, distributed=True))
    ety = gm.backend.to_numpy(pullback(y))
    lhs = comm.allreduce(float(np.vdot(gm.backend.to_numpy(ex), y)))
    rhs = comm.allreduce(float(np.vdot(x, ety)))
    parallel_assert(abs(lhs - rhs) <= 1e-13 * max(abs(lhs), abs(rhs), 1e-300),
                    f"{label}: <Ex, y> = {lhs!r}, <x, E'y> = {rhs!r}")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_dot_product_with_the_tapes_adjoint():
    size = MPI.COMM_WORLD.size
    for d, dims, periodic in cases(size):
        with gm.Grid(SHAPES[d], dims=dims, periodic=periodic) as grid:
            for width, corners in itertools.product((1, 2), (False, True)):
                dot_test(grid, (width,) * d, corners,
                         f"dims {dims}, periodic {periodic}, width {width}, corners {corners}")
            if d == 3:
                dot_test(grid, (1, 2, 0), True, f"dims {dims}, width (1, 2, 0)")
    with gm.Grid((size, 2), dims=(size, 1), periodic=(True, False)) as grid:
        dot_test(grid, (1, 1), True, "one-cell-thick periodic patches")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_gradient_of_a_global_objective_against_finite_differences():
    """Two fields, corners, a nonlinear objective of the exchanged fields: the tape's gradient
    against central differences of the global objective, one element on one rank at a time."""
    size = MPI.COMM_WORLD.size
    for d, periodic, widths in ((1, (True,), (2,)), (2, (False, True), (2, 1)),
                                (3, (True, False, True), (1, 1, 1))):
        with gm.Grid(SHAPES[d], dims=(size,) + (1,) * (d - 1), periodic=periodic) as grid:
            shape = tuple(n + 2 * w for n, w in zip(grid.local_shape, widths))
            rng = np.random.default_rng(MPI.COMM_WORLD.rank)
            a, b, wa, wb = (rng.standard_normal(shape) for _ in range(4))

            def objective(fa, fb):
                va, vb = gm.halo_exchange((fa, fb), grid, width=widths, corners=True)
                return gm.mpi_sum((gm.sin(va) * wa).sum() + (vb * vb * wb).sum())

            report = gm.check_grad(objective, gm.tensor(a, distributed=True),
                                   gm.tensor(b, distributed=True), max_elements=24)
            parallel_assert(report["checked"] > 0, f"{d}-D: nothing checked")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_two_d_width_one_is_the_raw_exchange():
    """The 2-D, width 1, no-corner exchange gives the raw exchange's values and adjoint bit
    for bit."""
    size = MPI.COMM_WORLD.size
    for dims, periodic in itertools.product(splits(size, 2), PERIODIC[2]):
        with gm.Grid((13, 11), dims=dims, periodic=periodic) as grid:
            rng = np.random.default_rng(MPI.COMM_WORLD.rank)
            x, y = rng.standard_normal(grid.padded_shape), rng.standard_normal(grid.padded_shape)
            ex, pullback = gm.vjp(lambda u: gm.halo_exchange(u, grid),
                                  gm.tensor(x, distributed=True))
            parallel_assert(np.array_equal(to_numpy(ex), halo.exchange(x.copy(), grid)),
                            f"dims {dims}")
            parallel_assert(np.array_equal(to_numpy(pullback(y)),
                                           halo.exchange_adjoint(y.copy(), grid)),
                            f"dims {dims}: adjoint")


class CountingComm:
    """A communicator that counts the sends it makes, posted or persistent (made once, on a
    rounds' first exchange, and restarted by later ones); the real MPI does the work."""

    def __init__(self, mpi):
        self.mpi, self.sends = mpi, 0

    def Isend(self, *args, **kwargs):
        self.sends += 1
        return self.mpi.Isend(*args, **kwargs)

    def Send_init(self, *args, **kwargs):
        self.sends += 1
        return self.mpi.Send_init(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.mpi, name)


def counted(grid, fn):
    real = grid.cart.mpi
    counter = grid.cart.mpi = CountingComm(real)
    try:
        return fn(), counter.sends
    finally:
        grid.cart.mpi = real


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_several_fields_travel_in_one_message_per_neighbour():
    size = MPI.COMM_WORLD.size
    for d, dims, periodic in cases(size):
        with gm.Grid(SHAPES[d], dims=dims, periodic=periodic) as grid:
            widths = (2,) + (1,) * (d - 1)
            shape = tuple(n + 2 * w for n, w in zip(grid.local_shape, widths))
            rng = np.random.default_rng(MPI.COMM_WORLD.rank)
            a = rng.standard_normal(shape)
            b = rng.standard_normal(shape).astype(np.float32)
            ya, yb = rng.standard_normal(shape), rng.standard_normal(shape).astype(np.float32)
            # A side facing the rank itself (periodic, one patch) sends no message.
            sides = sum(n not in (MPI.PROC_NULL, grid.cart.rank) for n in grid.neighbours)
            for corners in (False, True):
                one = [gm.halo_exchange(f, grid, width=widths, corners=corners).numpy()
                       for f in (a, b)]
                both, sends = counted(grid, lambda: gm.halo_exchange(
                    (a, b), grid, width=widths, corners=corners))
                label = f"dims {dims}, periodic {periodic}, corners {corners}"
                parallel_assert(sends == sides, f"{label}: {sends} messages for {sides} sides")
                parallel_assert(isinstance(both, tuple) and len(both) == 2
                                and all(np.array_equal(o, t.numpy()) for o, t in zip(one, both))
                                and both[1].dtype == np.float32, label)

                def objective(fa, fb, ys=(ya, yb)):
                    va, vb = gm.halo_exchange([fa, fb], grid, width=widths, corners=corners)
                    return gm.mpi_sum((va * ys[0]).sum() + (vb * ys[1]).sum())

                def single(f, y):
                    return gm.mpi_sum((gm.halo_exchange(f, grid, width=widths,
                                                        corners=corners) * y).sum())

                ga, gb = gm.grad(objective, argnums=(0, 1))(gm.tensor(a, distributed=True),
                                                            gm.tensor(b, distributed=True))
                sa = gm.grad(single)(gm.tensor(a, distributed=True), ya)
                sb = gm.grad(single)(gm.tensor(b, distributed=True), yb)
                parallel_assert(np.array_equal(ga, sa) and np.array_equal(gb, sb),
                                f"{label}: adjoint of two fields differs from separate calls")


@pytest.mark.parallel(nprocs=[2])
def test_errors_name_rank_argument_expected_and_actual():
    rank = MPI.COMM_WORLD.rank
    grid = gm.Grid((6, 5, 4), dims=(2, 1, 1))
    padded = tuple(n + 2 for n in grid.local_shape)
    u = np.zeros(padded)
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange expects u of padded "
                                         rf"shape \({padded[0]}, 7, 6\) .*got \(3, 5, 4\)"):
        gm.halo_exchange(np.zeros(grid.local_shape), grid)
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange expects u\[1\] of padded"
                                         rf" shape .*width \(2, 2, 2\)\), got \(5, 7, 6\)"):
        gm.halo_exchange((np.zeros(tuple(n + 4 for n in grid.local_shape)), u), grid, width=2)
    with pytest.raises(TypeError, match=rf"rank {rank}: halo_exchange expects u of a floating "
                                        r"dtype \(float32 or float64\), got int64"):
        gm.halo_exchange(np.zeros(padded, np.int64), grid)
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange expects u with 3 axes, "
                                         r"one per axis of the 3-D grid \(6, 5, 4\), got shape "
                                         r"\(5, 7\) \(2 axes\)"):
        gm.halo_exchange(np.zeros(padded[:2]), grid)
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange's width along axis 0 is "
                                         rf"4, larger than the patch of grid rank {1 - rank}, its "
                                         r"neighbour on side \d, which has 3 cell\(s\) "
                                         r"along axis 0: expected a width of at most 3"):
        gm.halo_exchange(np.zeros(tuple(n + 8 for n in grid.local_shape)), grid, width=4)
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange's width must be an int "
                                         r"or 3 ints \(one per axis of the 3-D grid\), got 2"):
        gm.halo_exchange(u, grid, width=(1, 1))
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange's width must be >= 0"):
        gm.halo_exchange(u, grid, width=(1, -1, 1))
    with pytest.raises(TypeError, match=rf"rank {rank}: halo_exchange's width must be an int"):
        gm.halo_exchange(u, grid, width=1.0)
    with pytest.raises(TypeError, match=rf"rank {rank}: halo_exchange's corners must be a bool"):
        gm.halo_exchange(u, grid, corners="yes")
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange expects u to be a field "
                                         r"or a non-empty tuple"):
        gm.halo_exchange((), grid)
    # Along an axis with one patch and no periodicity nothing is exchanged: any width fits.
    wide = np.zeros((padded[0], 5 + 20, 6))
    out = gm.halo_exchange(wide, grid, width=(1, 10, 1))
    parallel_assert(out.shape == wide.shape)
    grid.free()
    with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange's grid was freed"):
        gm.halo_exchange(u, grid)
    with gm.Grid((5,), periodic=True, comm=gm.Comm(MPI.COMM_SELF)) as own:
        with pytest.raises(ValueError, match=rf"rank {rank}: halo_exchange's width along axis 0 "
                                             r"is 6, larger than this rank's own patch, its "
                                             r"neighbour on side 0, which has 5 cell"):
            gm.halo_exchange(np.zeros(17), own, width=6)


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_exchanges_reuse_the_rounds_the_first_one_made(monkeypatch):
    """A grid's first exchange of fields of one padded shape and dtype makes its rounds (message
    buffers); later ones, forward and adjoint, reuse them: the global field's ghosts, and the
    first adjoint's values; another dtype makes its own; Grid.free drops them."""
    made = []

    class Counted(halo._Round):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            made.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(halo, "_Round", Counted)
    size = MPI.COMM_WORLD.size
    # Axes 0 and 2 exchange (periodic), axis 1 faces the boundary on both sides: corners take
    # a round per exchanging axis.
    grid = gm.Grid((9, 8, 10), dims=(size, 1, 1), periodic=(True, False, True))
    rng = np.random.default_rng(MPI.COMM_WORLD.rank)
    for widths, corners, rounds in (((1, 1, 1), False, 1), ((2, 1, 1), True, 2)):
        label = f"widths {widths}, corners {corners}"
        u, y = (rng.standard_normal(tuple(n + 2 * w for n, w in zip(grid.local_shape, widths)))
                for _ in range(2))
        before = len(made)
        pulled = []
        for _ in range(3):
            check_forward(grid, widths, corners, label)
            _, pullback = gm.vjp(lambda t: gm.halo_exchange(t, grid, width=widths,
                                                            corners=corners),
                                 gm.tensor(u, distributed=True))
            pulled.append(to_numpy(pullback(y)))
        parallel_assert(all(np.array_equal(p, pulled[0]) for p in pulled),
                        f"{label}: a later adjoint differs from the first")
        parallel_assert(len(made) - before == rounds,
                        f"{label}: {len(made) - before} rounds made, expected {rounds}")
        exchange = [gm.halo_exchange(gm.tensor(u.astype(dtype), distributed=True), grid,
                                     width=widths, corners=corners).numpy()
                    for dtype in (np.float64, np.float32)]
        parallel_assert(np.array_equal(exchange[0].astype(np.float32), exchange[1]),
                        f"{label}: float32 values differ")
        parallel_assert(len(made) - before == 2 * rounds, f"{label}: float32 reused float64's")
    grid.free()
    parallel_assert(not grid._exchanges, "the freed grid keeps its rounds")


@pytest.mark.parallel(nprocs=[1, 2])
@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "bounded"])
def test_reverse_pass_after_its_grid_was_freed_is_an_error_on_every_rank(periodic):
    """A pullback of halo_exchange run after its grid was freed names the freed grid, also on
    one periodic rank, whose exchange faces only itself and sends no message."""
    rank = MPI.COMM_WORLD.rank
    grid = gm.Grid((6, 4, 4), periodic=periodic)
    padded = tuple(n + 2 for n in grid.local_shape)
    u = gm.tensor(np.ones(padded), distributed=True)
    _, pullback = gm.vjp(lambda t: gm.halo_exchange(t, grid), u)
    grid.free()
    with pytest.raises(ValueError, match=rf"rank {rank}: halo exchange's grid was freed"):
        pullback(np.ones(padded))


MODEL_RUN = """
import sys
import numpy as np
sys.path.insert(0, {model!r})
import cupy, mpi_check
import gpumpiad as gm
from gpumpiad import halo
from mpi4py import MPI
mpi_check.install()
assert gm.backend_name() == "cupy"
comm = MPI.COMM_WORLD
grid = gm.Grid((6, 5, 4), dims=(comm.size, 1, 1), periodic=(True, False, True))
widths = (2, 1, 1)
shape = tuple(n + 2 * w for n, w in zip(grid.local_shape, widths))
rng = np.random.default_rng(comm.rank)
x = [rng.standard_normal(shape) for _ in range(2)]
y = [rng.standard_normal(shape) for _ in range(2)]
s = cupy.cuda.Stream(non_blocking=True)
with s:
    dx = [cupy.asarray(v) for v in x]
    dy = [cupy.asarray(v) for v in y]

def objective(a, b):
    va, vb = gm.halo_exchange((a, b), grid, width=widths, corners=True)
    return gm.mpi_sum(gm.sum(va * dy[0]) + gm.sum(vb * dy[1]))

with s:
    ex = gm.halo_exchange((gm.tensor(dx[0], distributed=True, stream=s),
                           gm.tensor(dx[1], distributed=True, stream=s)),
                          grid, width=widths, corners=True)
    total = sum(float((e.data * d).sum()) for e, d in zip(ex, dy))
    grads = gm.grad(objective, argnums=(0, 1))(gm.tensor(dx[0], distributed=True, stream=s),
                                               gm.tensor(dx[1], distributed=True, stream=s))
    back = sum(float((g * d).sum()) for g, d in zip(grads, dx))
lhs, rhs = comm.allreduce(total), comm.allreduce(back)
assert all(isinstance(g, cupy.ndarray) for g in grads)
reference = [np.array(v) for v in x]     # the host path on plain NumPy arrays
halo._exchange_nd(reference, grid, widths, True, False)
assert all(np.array_equal(e.data.get(), r) for e, r in zip(ex, reference))
assert abs(lhs - rhs) <= 1e-13 * abs(lhs), (lhs, rhs)
rounds = [id(r) for idle in grid._exchanges.values() for r in idle]
with s:    # again: the rounds of the first exchange and its adjoint, the same values
    again = gm.halo_exchange((gm.tensor(dx[0], distributed=True, stream=s),
                              gm.tensor(dx[1], distributed=True, stream=s)),
                             grid, width=widths, corners=True)
    grads_again = gm.grad(objective, argnums=(0, 1))(
        gm.tensor(dx[0], distributed=True, stream=s), gm.tensor(dx[1], distributed=True, stream=s))
    assert all(bool((a.data == e.data).all()) for a, e in zip(again, ex))
    assert all(bool((a == g).all()) for a, g in zip(grads_again, grads))
assert rounds and [id(r) for idle in grid._exchanges.values() for r in idle] == rounds
import cupyx
from cupy import MODEL
with s:    # its unpacking left queued
    gm.halo_exchange(gm.tensor(dx[0], distributed=True, stream=s), grid, width=widths,
                     corners=True)
grid.free()     # the pinned buffers of its rounds, handed out again at once, meet MPI next
blocks = [cupyx.empty_pinned(n, np.uint8) for n in range(8, 8192, 512) for _ in range(4)]
MODEL.host_op("MPI receive", writes=blocks)
if comm.rank == 0:
    print("ok", comm.size, repr(lhs))
"""


@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_device_path_on_the_stream_model_has_no_hazard(cuda_aware):
    """Two fields, width 2 along x, corners, on the modelled device at 2 ranks from a producing
    stream: the same values as the host path, forward and adjoint agree (dot-product test), a
    second exchange and adjoint reuse the first's rounds, Grid.free keeps their buffers until
    the queued copies ran, and no access is unordered."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0",
               PYTHONPATH=MODEL_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c",
                           MODEL_RUN.format(model=MODEL_PATH)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok 2" in proc.stdout, proc.stdout
