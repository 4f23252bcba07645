"""The CPU model of CUDA streams (tests/cudamodel): each ordering rule it enforces, shown to
catch the missing edge and to accept the edge CUDA provides. Runs in a subprocess so that the
model's ``cupy`` never meets a real one."""
import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

MODEL_PATH = os.path.join(os.path.dirname(__file__), "cudamodel")

PRELUDE = """
import threading
import numpy as np
import cupy, cupyx
from cupy import Hazard, MODEL

def expect_hazard(fn, *words):
    try:
        fn()
    except Hazard as exc:
        for w in words:
            assert w in str(exc), (w, str(exc))
        return str(exc)
    raise AssertionError("no hazard")

def mpi_reads(x):   # what the transport does before MPI reads memory
    MODEL.host_op("MPI send", reads=[x])

def mpi_writes(x):
    MODEL.host_op("MPI receive", writes=[x])
"""

CASES = {
    "producing stream not waited for before MPI reads": ("""
s = cupy.cuda.Stream(non_blocking=True)
a = cupy.ones(8)
cupy.cuda.Stream.null.synchronize()
with s:
    x = a * 2
expect_hazard(lambda: mpi_reads(x), "MPI send", "multiply")
""", """
s = cupy.cuda.Stream(non_blocking=True)
a = cupy.ones(8)
cupy.cuda.Stream.null.synchronize()
with s:
    x = a * 2
s.synchronize()
mpi_reads(x)
"""),
    "a stream reads what another wrote, without an event": ("""
s1 = cupy.cuda.Stream(non_blocking=True); s2 = cupy.cuda.Stream(non_blocking=True)
with s1:
    x = cupy.zeros(16) + 1
with s2:
    expect_hazard(lambda: x * 3, "multiply", "reads")
""", """
s1 = cupy.cuda.Stream(non_blocking=True); s2 = cupy.cuda.Stream(non_blocking=True)
with s1:
    x = cupy.zeros(16) + 1
s2.wait_event(s1.record())
with s2:
    y = x * 3
"""),
    "a write before another stream's read of the same words": ("""
s1 = cupy.cuda.Stream(non_blocking=True); s2 = cupy.cuda.Stream(non_blocking=True)
with s1:
    x = cupy.zeros(16)
    x.get(stream=s1, out=cupyx.empty_pinned(16), blocking=False) if False else None
s2.wait_event(s1.record())
with s2:
    y = x + 1            # s2 reads x
with s1:
    expect_hazard(lambda: x.fill(5), "fill", "reads it")
""", """
s1 = cupy.cuda.Stream(non_blocking=True); s2 = cupy.cuda.Stream(non_blocking=True)
with s1:
    x = cupy.zeros(16)
s2.wait_event(s1.record())
with s2:
    y = x + 1
s1.wait_event(s2.record())
with s1:
    x.fill(5)
"""),
    "disjoint rows of one array on two streams": (None, """
s1 = cupy.cuda.Stream(non_blocking=True); s2 = cupy.cuda.Stream(non_blocking=True)
with s1:
    u = cupy.zeros((6, 6))
s2.wait_event(s1.record())
with s1:
    u[1:-1, 1:-1] += 1        # interior
with s2:
    u[0, :] = 7               # a ghost row, meanwhile
"""),
    "device pool hands a block back to its stream while another still reads it": ("""
comm = cupy.cuda.Stream(non_blocking=True)
x = cupy.ones(64)
host = cupyx.empty_pinned(64)
comm.wait_event(cupy.cuda.Stream.null.record())
x.get(stream=comm, out=host, blocking=False)
del x
y = cupy.empty(64)          # same stream, same size: the freed block
expect_hazard(lambda: y.fill(0), "fill", "copy device to host")
""", """
comm = cupy.cuda.Stream(non_blocking=True)
x = cupy.ones(64)
host = cupyx.empty_pinned(64)
comm.wait_event(cupy.cuda.Stream.null.record())
x.get(stream=comm, out=host, blocking=False)
cupy.cuda.Stream.null.wait_event(comm.record())
del x
y = cupy.empty(64)
y.fill(0)
"""),
    "pinned pool reuses a block an asynchronous copy still reads": ("""
comm = cupy.cuda.Stream(non_blocking=True)
p = cupyx.empty_pinned(32)
mpi_writes(p)
d = cupy.empty(32)
d.set(p, stream=comm)
del p
q = cupyx.empty_pinned(32)   # the same block, at once
expect_hazard(lambda: mpi_writes(q), "MPI receive", "copy host to device")
""", """
comm = cupy.cuda.Stream(non_blocking=True)
p = cupyx.empty_pinned(32)
mpi_writes(p)
d = cupy.empty(32)
d.set(p, stream=comm)
done = comm.record()
done.synchronize()
del p
q = cupyx.empty_pinned(32)
mpi_writes(q)
"""),
    "legacy default stream orders blocking streams only": ("""
s = cupy.cuda.Stream(non_blocking=True)
with s:
    x = cupy.zeros(8) + 2
expect_hazard(lambda: x * 2, "multiply")
""", """
s = cupy.cuda.Stream(non_blocking=False)
with s:
    x = cupy.zeros(8) + 2
y = x * 2
"""),
    "each thread has its own current stream": ("""
out = {}
def work():
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        out["x"] = cupy.arange(10.0) * 2
t = threading.Thread(target=work); t.start(); t.join()
expect_hazard(lambda: mpi_reads(out["x"]), "MPI send")
""", """
out = {}
def work():
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        out["x"] = cupy.arange(10.0) * 2
    s.synchronize()
t = threading.Thread(target=work); t.start(); t.join()
mpi_reads(out["x"])   # the host thread joined the worker, which waited for its stream
"""),
}


def run_model(code):
    env = dict(os.environ, PYTHONPATH=MODEL_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    return proc


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_catches_the_missing_edge_and_accepts_cudas(case):
    missing, ordered = CASES[case]
    if missing is not None:
        proc = run_model(missing)
        assert proc.returncode == 0, proc.stderr
    proc = run_model(ordered)
    assert proc.returncode == 0, proc.stderr


def test_model_copies_an_input_overlapping_the_output_as_cupy_does():
    """CuPy's kernels copy an input whose memory bounds overlap an output's first, unless it is
    that output itself: the model logs that copy for a setitem and for a ufunc with ``out``
    (the device operations the op-count tests count)."""
    proc = run_model("""
def ops(fn):
    start = len(MODEL.log)
    fn()
    return [e[2] for e in MODEL.log[start:] if e[0] == "op"]

a = cupy.arange(10.0)
def setitem():
    a[1:] = a[:-1]
def ufunc_out():
    cupy.add(a[1:], a[:-1], out=a[1:])
def in_place():
    a[2:5] += 1
def apart():
    cupy.add(a[:5], 1, out=a[5:])
assert ops(setitem) == ["copy", "setitem"], ops(setitem)
assert ops(ufunc_out) == ["copy", "copy", "add"], ops(ufunc_out)
assert ops(apart) == ["add"], ops(apart)
assert ops(in_place)[0] == "add", ops(in_place)
expected = np.arange(10.0)
expected[1:] = expected[:-1].copy()
np.add(expected[1:], expected[:-1].copy(), out=expected[1:])
np.add(expected[:5], 1, out=expected[5:])
expected[2:5] += 1
assert np.array_equal(a.get(), expected), a.get()
""")
    assert proc.returncode == 0, proc.stderr


def test_model_values_and_host_syncs():
    proc = run_model("""
a = cupy.arange(6.0).reshape(2, 3)
b = (a * 2).sum(axis=0)
assert isinstance(b, cupy.ndarray)
n = len(MODEL.host_syncs)
assert b.get().tolist() == [6.0, 10.0, 14.0]
assert len(MODEL.host_syncs) == n + 1, MODEL.host_syncs
assert float(b[1]) == 10.0
try:
    a + np.ones(3)
except TypeError as exc:
    assert "numpy.ndarray" in str(exc)
else:
    raise AssertionError("a host array mixed with a device array was accepted")
""")
    assert proc.returncode == 0, proc.stderr


LIBRARY_RUN = """
import sys
import numpy as np
sys.path.insert(0, {model!r})
import cupy, heat_kernels, mpi_check
heat_kernels.register()
from cupy import MODEL
import gpumpiad as gm
from gpumpiad import heat
mpi_check.install()
assert gm.backend_name() == "cupy"
P = gm.mpi_size()
grid = heat.Grid((8, 6), dims=(P, 1))
rng = np.random.default_rng(gm.mpi_rank())
shape = grid.local_shape
u0, kappa, f = (cupy.asarray(rng.random(shape) + 0.5) for _ in range(3))

def objective(k, u0, f):
    u = heat.solve(u0, k, f, dt=1e-3, h=0.1, steps=4, grid=grid)
    return gm.sum(gm.mpi_sum(gm.sum(u * u)))

value, grads = gm.value_and_grad(objective, argnums=(0, 1, 2))(
    *(gm.tensor(a, distributed=True) for a in (kappa, u0, f)))  # each rank's own patch
assert all(isinstance(g, cupy.ndarray) for g in grads)
theta = gm.tensor(cupy.asarray([0.3]))
v, g = gm.value_and_grad(lambda t: gm.sum(gm.mpi_sum(gm.mpi_bcast(t) * (gm.mpi_rank() + 1))))(theta)
from mpi4py import MPI
values = MPI.COMM_WORLD.gather(float(value))
if MPI.COMM_WORLD.rank == 0:
    print("ok", len(values), len(set(values)))
"""


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_device_path_of_solver_and_collectives_has_no_hazard(nprocs, cuda_aware):
    """The heat solver's forward and reverse sweeps, halo exchanges and collectives on the
    modelled device, MPI reading and writing pinned buffers (staged) or device arrays
    (CUDA-aware): no access the stream model finds unordered."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, "-c",
                           LIBRARY_RUN.format(model=MODEL_PATH)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok {nprocs} 1" in proc.stdout, proc.stdout  # every rank, one objective


SOLVE_3D_RUN = """
import sys
import numpy as np
sys.path.insert(0, {model!r})
import cupy, heat_kernels, mpi_check
heat_kernels.register()
import gpumpiad as gm
from gpumpiad import heat
mpi_check.install()
grid = gm.Grid((6, 5, 4), periodic=(False, True, False))
rng = np.random.default_rng(1)
fields = [rng.random(grid.shape) + 0.5 for _ in range(3)]

def run(local):
    u0, kappa, f = (gm.tensor(local(a), distributed=True) for a in fields)

    def objective(k, u0, f):
        u = heat.solve(u0, k, f, dt=1e-3, h=0.1, steps=4, grid=grid, checkpoints=2)
        return gm.sum(gm.mpi_sum(gm.sum(u * u)))
    value, grads = gm.value_and_grad(objective, argnums=(0, 1, 2))(kappa, u0, f)
    return float(value), [gm.backend.to_numpy(g) for g in grads]

device_value, device_grads = run(lambda a: cupy.asarray(grid.local(a)))
assert heat.kernels.kernels_for(cupy.zeros((3, 3, 3)), ndim=3).ASYNCHRONOUS
host_value, host_grads = run(grid.local)
assert abs(device_value - host_value) <= 1e-12 * abs(host_value), (device_value, host_value)
for d, h in zip(device_grads, host_grads):
    np.testing.assert_allclose(d, h, rtol=1e-12, atol=1e-14)
print("ok", gm.mpi_rank())
"""


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_device_path_of_3d_solver_has_no_hazard_and_the_host_result(nprocs, cuda_aware):
    """The 3-D solver's overlapped sweeps (heat3d kernels, PaddedExchange on the communication
    stream) forward and reverse with checkpoints, one periodic axis, on the modelled device:
    no unordered access, and the host path's value and gradients."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, "-c",
                           SOLVE_3D_RUN.format(model=MODEL_PATH)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok") == nprocs, proc.stdout


UNWAITED_STAGING = """
from gpumpiad import streams

def device_to_host_without_wait(array, host):
    stream = streams.comm_stream()
    stream.wait_event(cupy.cuda.get_current_stream().record())
    array.get(stream=stream, out=host, blocking=False)
    return host

streams.device_to_host = device_to_host_without_wait
"""


def test_model_catches_mpi_reading_a_staging_buffer_before_its_copy():
    """Remove the one host wait of the staging path (the copy to the pinned buffer MPI sends
    from): the model names the MPI send and the copy it is not ordered after."""
    code = LIBRARY_RUN.format(model=MODEL_PATH).replace(
        "mpi_check.install()", "mpi_check.install()\n" + UNWAITED_STAGING)
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE="0",
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "Hazard" in proc.stderr and "copy device to host" in proc.stderr, proc.stderr


STREAMS_RUN = """
import threading
s = cupy.cuda.Stream(non_blocking=True)
me = np.full(4, gm.mpi_rank() + 1.0)
with s:
    x = gm.tensor(cupy.asarray(me) * 2)           # a library op's Tensor remembers s
total = gm.mpi_sum(x)                             # used after the block
with s:
    y = cupy.asarray(me) * 3
total_y = gm.mpi_sum(gm.tensor(y, stream=s))      # a raw array, its stream named
ranks = np.arange(1, P + 1.0)
assert float(total.numpy()[0]) == 2 * ranks.sum() and float(total_y.numpy()[0]) == 3 * ranks.sum()

own = heat.Grid((6, 5), gm.Comm(MPI.COMM_SELF))
results = {}

def solve_on_own_stream(name):
    with cupy.cuda.Stream(non_blocking=True):
        a = cupy.asarray(np.ones(own.local_shape) * (1 + len(name)))
        results[name] = float(heat.solve(a, a, a, dt=5e-4, h=0.1, steps=3, grid=own).sum())

threads = [threading.Thread(target=solve_on_own_stream, args=(n,)) for n in ("a", "bb")]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert results["a"] != results["bb"], results
for stream in (cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)):
    with stream:    # gradients copied out on one stream, the compute stream's memory reused next
        gm.value_and_grad(objective, argnums=(0, 1, 2))(
            *(gm.tensor(a, distributed=True) for a in (kappa, u0, f)))

def local_objective(k):
    u = heat.solve(u0, k, f, dt=1e-3, h=0.1, steps=3, grid=grid)
    return gm.mpi_sum(gm.sum(gm.exp(u) * u))

with s:                           # recorded under one stream, pulled back under another
    out, pull = gm.vjp(local_objective, gm.tensor(kappa, distributed=True))
pulled = pull(cupy.asarray(1.0))
if MPI.COMM_WORLD.rank == 0:
    print("streams ok")
"""


def _library_run(extra="", drop=None):
    code = LIBRARY_RUN.format(model=MODEL_PATH).replace("from mpi4py import MPI\n", "")
    head, tail = code.split("mpi_check.install()\n", 1)
    head += "mpi_check.install()\nfrom mpi4py import MPI\n"
    if drop is not None:
        head += DROP_EDGE.format(function=drop[0], caller=drop[1])
    return head + tail + extra


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_producing_streams_and_threads_with_their_own_streams(nprocs, cuda_aware):
    """A Tensor computed under another stream and used after the block, a raw array with its
    stream named, and solves from threads each on its own stream, besides the solver and
    collectives of the other run: right values, no hazard, at 1-4 ranks."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, "-c",
                           _library_run(STREAMS_RUN)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "streams ok" in proc.stdout and f"ok {nprocs} 1" in proc.stdout, proc.stdout


PADDED_RUN = """
import sys
import numpy as np
sys.path.insert(0, {model!r})
import cupy, mpi_check
import gpumpiad as gm
from gpumpiad import halo
mpi_check.install()
from mpi4py import MPI
assert gm.backend_name() == "cupy"
comm = MPI.COMM_WORLD
P = comm.size
"""

PADDED_ROUNDS = """
import cupyx
from cupy import MODEL
s = cupy.cuda.Stream(non_blocking=True)
rng = np.random.default_rng(comm.rank)
for shape, dims, periodic in (((7, 6, 5), (P, 1, 1), (True, False, True)),
                              ((6, 5, 4), (1, 1, P), False), ((7, 6), (1, P), True),
                              ((5,), (P,), True)):
    grid = gm.Grid(shape, dims=dims, periodic=periodic)
    ex = halo.PaddedExchange(grid, grid.padded_shape, np.float64, device=True)
    with s:
        u = cupy.zeros(grid.padded_shape)
        for step, adjoint in ((0, False), (1, False), (2, True), (3, True)):
            x = rng.standard_normal(grid.padded_shape)
            u[...] = cupy.asarray(x)               # the data of this post, written on s
            ex.post(u, adjoint)
            inner = float(u[(slice(2, -2),) * len(shape)].sum())   # while the halos travel
            ex.finish(u, adjoint, verify=step == 1)
            got = u.get()                          # s reads the ghosts and boundary cells
            expected = halo._exchange_nd([x], grid, (1,) * len(shape), False, adjoint)[0]
            assert np.array_equal(got, expected), (shape, dims, step)
        ex.post(u)
        ex.finish(u)
        ex.free()           # its pinned blocks, handed out again at once, meet MPI next
        blocks = [cupyx.empty_pinned(plan.nbytes, np.uint8) for plan in ex._plans * 2]
        MODEL.host_op("MPI receive", writes=blocks)
        del blocks
        x = rng.standard_normal(grid.padded_shape)
        u[...] = cupy.asarray(x)
        ex.post(u)          # new buffers
        ex.finish(u)
        expected = halo._exchange_nd([x], grid, (1,) * len(shape), False, False)[0]
        assert np.array_equal(u.get(), expected), (shape, dims, "after free")
    ex.free()
    grid.free()
if comm.rank == 0:
    print("padded ok", P)
"""


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_padded_exchange_on_the_device_gives_the_host_result(nprocs, cuda_aware):
    """PaddedExchange rounds of device arrays on 1-, 2- and 3-D grids, forward and adjoint, its
    buffers reused, from a producing stream: the host path's values, no unordered access."""
    _run_exchanges(nprocs, cuda_aware, PADDED_ROUNDS, f"padded ok {nprocs}")


def _run_exchanges(nprocs, cuda_aware, rounds, done):
    """``PADDED_RUN`` then ``rounds`` on ``nprocs`` ranks of the modelled device; rank 0
    prints ``done`` at the end."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, "-c",
                           PADDED_RUN.format(model=MODEL_PATH) + rounds],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert done in proc.stdout, proc.stdout


BLOCKING_ROUNDS = """
import cupyx
import heat_kernels
from cupy import MODEL
heat_kernels.register()
from gpumpiad.heat import cudakernels
made = []

class Counted(halo.DeviceExchange):
    __slots__ = ()

    def __init__(self, *args):
        made.append(args)
        super().__init__(*args)

halo.DeviceExchange = Counted
streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
rng = np.random.default_rng(comm.rank)
for dims, periodic in (((P, 1), (True, False)), ((1, P), True), ((P, 1), False)):
    grid = gm.Grid((7, 6), dims=dims, periodic=periodic)
    before = len(made)
    for kernels in (None, cudakernels):
        for step, adjoint in enumerate((False, True, True, False)):
            exchange = halo.exchange_adjoint if adjoint else halo.exchange
            x = rng.standard_normal(grid.padded_shape)
            with streams[step // 2]:       # the caller's stream changes between calls
                a = cupy.asarray(x)
                exchange(a, grid, kernels)
                got = a.get()
            assert np.array_equal(got, exchange(x.copy(), grid)), (dims, periodic, step)
        # Two in flight at once: each has its own buffers, and both are reused afterwards.
        xs = [rng.standard_normal(grid.padded_shape) for _ in range(3)]
        with streams[0]:
            arrays = [cupy.asarray(x) for x in xs]
            posted = [halo.start(b, grid, kernels=kernels) for b in arrays[:2]]
            for p in posted:
                p.wait()
            halo.exchange(arrays[2], grid, kernels)
            got = [b.get() for b in arrays]
        for x, g in zip(xs, got):
            assert np.array_equal(g, halo.exchange(x.copy(), grid)), (dims, periodic)
    halo.exchange(cupy.zeros(grid.padded_shape, np.float32), grid)
    assert len(made) - before == 5, (dims, periodic, len(made) - before)
    grid.free()     # the pinned blocks of its exchanges, handed out again at once, meet MPI next
    assert not grid._exchanges
    blocks = [cupyx.empty_pinned(8, np.uint8) for _ in range(40)]
    MODEL.host_op("MPI receive", writes=blocks)
    del blocks
    try:
        halo.exchange(cupy.zeros(grid.padded_shape), grid)
    except ValueError as exc:
        assert "halo exchange's grid was freed" in str(exc), exc
    else:
        raise AssertionError("an exchange over a freed grid ran")
if comm.rank == 0:
    print("blocking ok", P)
"""


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
@pytest.mark.parametrize("cuda_aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_blocking_device_exchanges_reuse_their_buffers(nprocs, cuda_aware):
    """Blocking 2-D exchanges of device arrays, forward and adjoint, with and without the CUDA
    kernels, from two producing streams, two at once: the host path's values, no unordered
    access, one DeviceExchange made per shape, dtype and kernels and one more for the second
    exchange in flight; Grid.free drops them, their buffers kept until the queued unpacking
    ran."""
    _run_exchanges(nprocs, cuda_aware, BLOCKING_ROUNDS, f"blocking ok {nprocs}")


# Drops one ordering edge of the library: ``function`` does nothing when called from a
# function named ``caller``.
DROP_EDGE = """
import sys as _sys
from gpumpiad import streams as _streams

def _dropping(function, caller):
    def dropped(*args, **kwargs):
        if _sys._getframe(1).f_code.co_name == caller:
            return None
        return function(*args, **kwargs)
    return dropped

_targets = {{"order": (_streams, "order"), "Event.synchronize": (cupy.cuda.Event, "synchronize"),
            "Stream.wait_event": (cupy.cuda.Stream, "wait_event")}}
_owner, _name = _targets[{function!r}]
setattr(_owner, _name, _dropping(getattr(_owner, _name), {caller!r}))
"""

# (what is dropped, called from, MPI path): every stream-ordering edge the library makes.
EDGES = {
    "compute stream after the caller's stream (solve's inputs)": ("order", "__enter__", "0"),
    "caller's stream after the compute stream (solve's outputs)": ("order", "__exit__", "0"),
    "packing after the kernels that wrote the cells": ("order", "post", "1"),
    "host waits for the packing before MPI reads it (staged)": ("Event.synchronize", "finish",
                                                               "0"),
    "host waits for the packing before MPI reads it (CUDA-aware)": ("Event.synchronize",
                                                                   "finish", "1"),
    "kernels reading ghosts after the unpacking": ("Stream.wait_event", "finish", "1"),
    "staging copy to the host after the producing stream": ("order", "device_to_host", "0"),
    "host waits for the staging copy before MPI reads it": ("Event.synchronize",
                                                            "device_to_host", "0"),
    "consumer after the staging copy to the device": ("Stream.wait_event", "host_to_device",
                                                      "0"),
    "host waits for a device array before MPI reads it": ("Event.synchronize",
                                                          "ready_for_mpi", "1"),
    "a Tensor's reader after the stream that produced it": ("order", "data", "0"),
    "compute stream's later work after the copies out of its memory": ("order",
                                                                       "_handed_out", "0"),
    "padded exchange's packing after the kernels that wrote the cells": ("order",
                                                                         "post_device", "0"),
    "host waits for the padded exchange's packing (staged)": ("Event.synchronize",
                                                              "finish_device", "0"),
    "host waits for the padded exchange's packing (CUDA-aware)": ("Event.synchronize",
                                                                  "finish_device", "1"),
    "kernels reading ghosts after the padded exchange's unpacking": ("Stream.wait_event",
                                                                     "finish_device", "1"),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
def test_removing_any_ordering_edge_is_caught(edge):
    """Each ordering edge the library makes between streams, and between streams and MPI, is
    needed: without it the model finds an unordered access in the run above."""
    function, caller, cuda_aware = EDGES[edge]
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    if caller in ("post_device", "finish_device"):   # PaddedExchange's, halo_exchange's rounds'
        code = (PADDED_RUN.format(model=MODEL_PATH)
                + DROP_EDGE.format(function=function, caller=caller) + PADDED_ROUNDS)
    else:
        code = _library_run(STREAMS_RUN, drop=(function, caller))
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", code],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout
    assert "Hazard" in proc.stderr, proc.stderr[-3000:]


def test_every_thread_computes_on_the_ranks_device():
    """CUDA's current device is per thread: a thread that first meets the library after the
    rank chose its device computes on that device too, not on device 0."""
    code = """
import threading
import gpumpiad as gm
assert gm.backend_name() == "cupy"
seen = {}

def work():
    gm.tensor([1.0, 2.0]) * 2
    seen["device"] = cupy.cuda.runtime.getDevice()

t = threading.Thread(target=work); t.start(); t.join()
assert cupy.cuda.runtime.getDevice() == 1 and seen["device"] == 1, seen
"""
    env = dict(os.environ, PYTHONPATH=MODEL_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GPUMPIAD_BACKEND="cupy", GPUMPIAD_DEVICE="1", CUPY_MODEL_DEVICES="2")
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_stream_model.py")


@pytest.mark.parametrize("nprocs,cuda_aware,periodic", [
    (2, "0", False), (2, "1", False), (1, "0", True), (3, "0", False)])
def test_no_host_wait_comes_before_a_steps_interior_kernel(nprocs, cuda_aware, periodic):
    """The solver's time loops, forward and reverse, on the model: no host wait between one
    step's last kernel and the next step's first (the interior), and none for the compute
    stream at all inside the loops; the host waits only for the packed halo cells, and not at
    all on one periodic patch (its halos stay on the device)."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE=cuda_aware,
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, BENCH, "--n", "12",
                           "--steps", "5"] + (["--periodic"] if periodic else []),
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("rank ")]
    assert len(rows) == nprocs, proc.stdout
    for row in rows:
        assert "forward max 0 mean 0.00; adjoint max 0 mean 0.00" in row, row
        assert "for compute / all: forward 0.00 /" in row and "adjoint (whole gradient) 0.00 /" \
            in row, row
        if nprocs == 1:
            # Every neighbour is the rank itself: the halos never leave the device.
            assert "forward 0.00 / 0.00, adjoint (whole gradient) 0.00 / 0.00" in row, row


PERIODIC_RUN = """
import sys
import numpy as np
sys.path.insert(0, {model!r})
import cupy, heat_kernels, mpi_check
from cupy import MODEL
heat_kernels.register()
import gpumpiad as gm
from gpumpiad import heat
mpi_check.install()
grid = gm.Grid({shape}, dims=(gm.mpi_size(),) + (1,) * ({ndim} - 1), periodic=True)
rng = np.random.default_rng(gm.mpi_rank())
u0, kappa, f = (cupy.asarray(rng.random(grid.local_shape) + 0.5) for _ in range(3))

def loop(run, kernel):
    # Host waits, host copies, ``kernel`` launches and device operations from the time loop's
    # first ``kernel`` launch to its last.
    start = len(MODEL.log)
    run()
    log = MODEL.log[start:]
    kernels = [k for k, e in enumerate(log) if e[0] == "op" and e[2].startswith(kernel)]
    assert len(kernels) >= 4, (kernel, len(kernels))
    log = log[kernels[0]:kernels[-1] + 1]
    return (sum(e[0] == "sync" and e[1] != "Event.done" for e in log),
            sum(e[0] == "op" and e[2].startswith("copy") and "host" in e[2] for e in log),
            len(kernels), sum(e[0] == "op" for e in log))

def objective(k):
    return gm.mpi_sum(gm.sum(heat.solve(u0, k, f, dt=1e-4, h=0.1, steps=4, grid=grid) ** 2))

forward = loop(lambda: heat.solve(u0, kappa, f, dt=1e-4, h=0.1, steps=4, grid=grid),
               "{kernel}_step")
reverse = loop(lambda: gm.value_and_grad(objective)(gm.tensor(kappa, distributed=True)),
               "{kernel}_adjoint")
# One printer: lines the ranks print at once can interleave.
from mpi4py import MPI
for rank, forward, reverse in MPI.COMM_WORLD.gather((gm.mpi_rank(), forward, reverse)) or ():
    print("waits, host copies, launches, ops", rank, forward, reverse)
"""


@pytest.mark.parametrize("nprocs", [1, 2])
@pytest.mark.parametrize("ndim", [2, 3])
def test_halos_facing_the_rank_itself_stay_on_the_device(nprocs, ndim):
    """The 2-D and 3-D solvers on a periodic grid, staged MPI: a side whose neighbour is the
    rank itself is filled on the device, so one patch's time loops, forward and reverse, make no
    host wait and no host copy, and with nothing to hide launch one kernel per step (4 steps)
    and one kernel for all the ghosts between steps; with two patches along one axis, that
    axis's sides still stage, behind the interior's kernel."""
    env = dict(os.environ, GPUMPIAD_BACKEND="cupy", GPUMPIAD_CUDA_AWARE="0",
               GPUMPIAD_STAGE_HOST_ARRAYS="0")
    proc = subprocess.run(["mpiexec", "-n", str(nprocs), sys.executable, "-c",
                           PERIODIC_RUN.format(model=MODEL_PATH, ndim=ndim,
                                               shape=(8, 6, 4)[:ndim],
                                               kernel="heat3d" if ndim == 3 else "heat")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("waits, host copies")]
    assert len(rows) == nprocs, proc.stdout
    for row in rows:
        loops = [ast.literal_eval(t) for t in re.findall(r"\([^)]*\)", row)]
        assert len(loops) == 2, row
        for waits, copies, launches, ops in loops:
            if nprocs == 1:
                assert (waits, copies, launches) == (0, 0, 4), row
                # Between steps one kernel fills every ghost (a copy per side would cost
                # two along the inner axes, where CuPy copies a source whose memory bounds
                # overlap the ghosts' first).
                assert ops == 2 * launches - 1, row
            else:
                assert waits > 0 and copies > 0 and launches > 4, row


# What the model adds for its own bookkeeping; every other public name must be CuPy's.
MODEL_ONLY = {"cupy": {"MODEL", "KERNELS", "DEVICE_POOL", "PINNED_POOL", "Hazard",
                       "current_agent"},
              "cupy.cuda": {"MODEL"}, "cupyx": {"MODEL", "PINNED_POOL"}}

NAMES_CHECK = """
import importlib, inspect, json, sys
names = {}
for module in ("cupy", "cupy.cuda", "cupyx"):
    m = importlib.import_module(module)
    for name in dir(m):
        if name.startswith("_"):
            continue
        value = getattr(m, name)
        if inspect.ismodule(value) and not value.__name__.startswith("cupy"):
            continue
        own = vars(value) if inspect.isclass(value) else {}
        names[module + "." + name] = sorted(a for a in own if not a.startswith("_"))
print(json.dumps(names))
"""


def test_the_models_names_are_cupys():
    """Every public name the model defines (module attributes, and the attributes its classes
    and namespaces define themselves) exists in the installed CuPy, so code that runs on the
    model does not call what CuPy lacks. Needs CuPy importable (no GPU needed)."""
    import json
    plain = subprocess.run([sys.executable, "-c", "import cupy"], capture_output=True)
    if plain.returncode != 0:
        pytest.skip("CuPy is not installed")
    env = dict(os.environ, PYTHONPATH=MODEL_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    model = json.loads(subprocess.run([sys.executable, "-c", NAMES_CHECK], env=env, check=True,
                                      capture_output=True, text=True, timeout=120).stdout)
    lookup = """
import importlib, json, sys
missing = []
for path in json.load(sys.stdin):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for part in parts[i:]:
        obj = getattr(obj, part, missing)
        if obj is missing:
            missing.append(path)
            break
print(json.dumps(missing))
"""
    wanted = []
    for path, members in model.items():
        module, name = path.rsplit(".", 1)
        if name in MODEL_ONLY.get(module, ()):
            continue
        wanted.append(path)
        # ndarray's own names beyond NumPy's are the ones to check; NumPy's come with it.
        wanted += [f"{path}.{m}" for m in members]
    found = subprocess.run([sys.executable, "-c", lookup], input=json.dumps(wanted),
                           capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(found.stdout) == []
