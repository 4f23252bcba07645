"""gpumpiad.torch: bridged functions inside torch's autograd and replicated parameters."""
import os
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

torch = pytest.importorskip("torch")

import gpumpiad as gm  # noqa: E402
import gpumpiad.torch as gt  # noqa: E402
from gpumpiad import heat  # noqa: E402

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
if gt.device().type == "cuda":
    torch.set_default_device(gt.device())   # the tests' tensors live where gpumpiad's arrays do


def _address(a):
    """Where array ``a`` (NumPy or CuPy) starts in memory."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr


def _overlap(a, t):
    """Whether array ``a`` and torch tensor ``t`` share memory."""
    start, end = _address(a), _address(a) + a.nbytes
    return start < t.data_ptr() + t.nbytes and t.data_ptr() < end


def _problem():
    """A small solve with a halo exchange, a broadcast and a sum across ranks inside."""
    grid = heat.Grid((6, 5))
    x, y = grid.coordinates()
    X, Y = np.meshgrid(x, y, indexing="ij")
    u0 = np.sin(np.pi * X) * np.sin(np.pi * Y)
    f = 1.0 + X * Y

    def fn(kappa, s, w):
        u = heat.solve(u0, kappa, f * gm.mpi_bcast(s), 2e-3, grid.h[0], 4, grid=grid)
        return gm.mpi_sum((w[0] * u ** 2 + w[1] * u).sum())

    return grid, fn


def _inputs(grid, rank):
    rng = np.random.default_rng(1 + rank)
    kappa = torch.tensor(1.0 + 0.3 * rng.random(grid.local_shape), dtype=torch.float64,
                         requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.3, -0.4], dtype=torch.float64, requires_grad=True)
    return kappa, s, w


def _torch_loss(bridged, kappa, s, w):
    """The global objective: torch work before and after the bridge."""
    out = bridged(kappa * 1.0, s, torch.tanh(w))
    return out ** 2 + 0.5 * s


def _finite_differences(loss_of, args, eps=1e-6, per_arg=3):
    """Central differences of the global objective: serial arguments perturbed on every rank,
    distributed ones on one rank at a time. Returns {(arg, rank, index): value}."""
    comm = WORLD
    out = {}
    for a, (t, distributed) in enumerate(args):
        owners = range(comm.size) if distributed else [None]
        for owner in owners:
            for i in range(min(per_arg, t.numel())):
                values = []
                for sign in (1, -1):
                    with torch.no_grad():
                        hit = owner is None or owner == comm.rank
                        if hit:
                            t.view(-1)[i] += sign * eps
                        values.append(float(loss_of()))
                        if hit:
                            t.view(-1)[i] -= sign * eps
                out[(a, owner, i)] = (values[0] - values[1]) / (2 * eps)
    return out


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_bridge_matches_finite_differences_of_the_global_objective():
    grid, fn = _problem()
    bridged = gt.function(fn, ("distributed", "serial", "serial"))
    kappa, s, w = _inputs(grid, WORLD.rank)
    loss = _torch_loss(bridged, kappa, s, w)
    loss.backward()
    fd = _finite_differences(lambda: _torch_loss(bridged, kappa, s, w),
                             [(kappa, True), (s, False), (w, False)])
    grads = [kappa.grad, s.grad, w.grad]
    worst = 0.0
    for (a, owner, i), value in fd.items():
        mine = float(grads[a].reshape(-1)[i])
        ad = WORLD.bcast(mine, root=owner) if owner is not None else mine
        worst = max(worst, abs(ad - value) / max(1.0, abs(value)))
    parallel_assert(worst < 1e-7, f"largest relative difference to finite differences {worst}")
    serial = np.concatenate([s.grad.cpu().numpy().reshape(-1), w.grad.cpu().numpy()])
    everyone = WORLD.allgather(serial.tobytes())
    parallel_assert(all(b == everyone[0] for b in everyone),
                    "serial gradients differ across ranks")


@pytest.mark.parallel(nprocs=[1, 2, 3, 4])
def test_two_bridges_in_one_graph_and_a_distributed_output():
    """A distributed value crosses into torch and back: its cotangent is each rank's piece."""
    grid, _ = _problem()

    def state(kappa):
        return heat.solve(np.ones(grid.local_shape), kappa, np.zeros(grid.local_shape), 2e-3,
                          grid.h[0], 3, grid=grid)

    solve = gt.function(state, "distributed")
    total = gt.function(lambda v: gm.mpi_sum(v.sum()), "distributed")
    kappa = _inputs(grid, WORLD.rank)[0]

    def loss():
        return total(torch.sin(solve(kappa)) ** 2)

    loss().backward()
    fd = _finite_differences(loss, [(kappa, True)])
    worst = max(abs(WORLD.bcast(float(kappa.grad.reshape(-1)[i]), root=owner) - value)
                for (_, owner, i), value in fd.items())
    parallel_assert(worst < 1e-8, f"{worst}")


@pytest.mark.parallel(nprocs=[2, 3, 4])
def test_collectives_run_in_one_order_when_a_rank_contributes_zero():
    """The last rank's piece does not reach the loss (multiplied by zero in torch): its pullback
    still runs every reverse communication, in the same order (debug mode compares every
    collective's call and number across ranks)."""
    grid, fn = _problem()
    bridged = gt.function(fn, ("distributed", "serial", "serial"))
    rank, size = WORLD.rank, WORLD.size
    kappa, s, w = _inputs(grid, rank)
    weight = 0.0 if rank == size - 1 else 1.0
    sum_all = gt.function(lambda v: gm.mpi_sum(v.sum()), "distributed")
    solve = gt.function(lambda k: heat.solve(np.ones(grid.local_shape), k,
                                             np.zeros(grid.local_shape), 2e-3, grid.h[0], 3,
                                             grid=grid), "distributed")

    def loss():
        return bridged(kappa, s, w) + sum_all(weight * solve(kappa))

    gm.set_debug(True)
    try:
        loss().backward()
    finally:
        gm.set_debug(False)
    fd = _finite_differences(loss, [(kappa, True), (s, False)])
    grads = [kappa.grad, s.grad]
    worst = max(abs((WORLD.bcast(float(grads[a].reshape(-1)[i]), root=owner)
                     if owner is not None else float(grads[a].reshape(-1)[i])) - value)
                / max(1.0, abs(value)) for (a, owner, i), value in fd.items())
    parallel_assert(worst < 1e-7, f"{worst}")


@pytest.mark.parallel(nprocs=[1, 2])
def test_no_copy_on_the_way_in_or_out():
    seen = {}

    @gm.custom_op
    def scale(x):
        seen["input"] = x
        seen["output"] = 3.0 * x
        return seen["output"]

    @scale.defvjp
    def _(g, ans, x):
        seen["cotangent"] = g
        seen["gradient"] = 3.0 * g
        return seen["gradient"]

    bridged = gt.function(lambda x: scale(x), "distributed")
    x = torch.arange(6.0, dtype=torch.float64).reshape(2, 3).requires_grad_()
    y = bridged(x)
    gy = torch.ones(2, 3, dtype=torch.float64)
    gx, = torch.autograd.grad(y, x, grad_outputs=gy)
    parallel_assert(_overlap(seen["input"], x), "input copied")
    parallel_assert(y.data_ptr() == _address(seen["output"]), "output copied")
    parallel_assert(_overlap(seen["cotangent"], gy), "cotangent copied")
    parallel_assert(gx.data_ptr() == _address(seen["gradient"]), "gradient copied")
    parallel_assert(torch.equal(gx, 3.0 * gy))


def test_a_value_that_aliases_an_argument_is_copied():
    x = torch.arange(3.0, dtype=torch.float64, requires_grad=True)
    y = gt.function(lambda v: v, "distributed")(x)
    assert y.data_ptr() + y.nbytes <= x.data_ptr() or x.data_ptr() + x.nbytes <= y.data_ptr()
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.skipif(gt.device().type != "cuda", reason="needs a CUDA device")
def test_on_cuda_the_function_runs_on_torchs_current_stream():
    import warnings

    import cupy
    seen = {}

    def fn(v):
        seen["stream"] = cupy.cuda.get_current_stream().ptr
        return (v * 2).sum()

    x = torch.ones(3, dtype=torch.float64)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gt.function(fn, "serial")(x)
    assert seen["stream"] == side.cuda_stream
    assert float(out) == 6.0
    assert not [w for w in caught if "ExternalStream" in str(w.message)], caught


def test_without_gradients_nothing_is_recorded_and_float32_stays():
    x = torch.ones(3, dtype=torch.float32)
    out = gt.function(lambda v: (v * 2).sum(), "serial")(x)
    assert out.dtype == torch.float32 and float(out) == 6.0 and out.grad_fn is None
    with torch.no_grad():
        y = torch.ones(3, dtype=torch.float64, requires_grad=True)
        assert gt.function(lambda v: (v * 2).sum(), "serial")(y).grad_fn is None


def test_in_place_change_before_backward_is_torchs_error():
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    a = x * 1.0
    out = gt.function(lambda v: (v * v).sum(), "serial")(a)
    with torch.no_grad():
        a += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_in_place_change_of_the_value_before_backward_is_torchs_error():
    """exp's reverse rule reads its result, which the torch value views: a write into it
    before the backward had given a gradient of the value written (e + 1 for e)."""
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    out = gt.function(gm.exp, "distributed")(x)
    with torch.no_grad():
        out += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("layout", ["both", ("serial", "sideways"), (), 3, None])
def test_bad_layout_is_named(layout):
    with pytest.raises(ValueError, match=r"rank 0: gpumpiad.torch.function's layout must be "
                                         r"'serial', 'distributed'.*got"):
        gt.function(lambda x: x, layout)


def test_layout_of_another_length_than_the_arguments():
    f = gt.function(lambda x, y: (x * y).sum(), ("serial",) * 3)
    with pytest.raises(ValueError, match=r"rank 0: .*layout names 3 argument\(s\), the call "
                                         r"passes 2"):
        f(torch.ones(2), torch.ones(2))


def test_fn_not_callable_and_fn_returning_no_tensor():
    with pytest.raises(TypeError, match="rank 0: gpumpiad.torch.function's fn must be callable"):
        gt.function(3, "serial")
    with pytest.raises(TypeError, match="must return a gpumpiad Tensor"):
        gt.function(lambda x: 3.0, "serial")(torch.ones(2, dtype=torch.float64,
                                                        requires_grad=True))


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_replicate_sums_shares_once_even_where_a_rank_has_none():
    """The weight is used on every rank, the bias only on rank 0 (None elsewhere): after
    backward both hold the total over the ranks, bit-identical, and a second backward adds."""
    rank, size = WORLD.rank, WORLD.size
    net = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        net.bias.fill_(0.25)
    replicated = gt.replicate(net)
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64)

    def loss():
        out = x @ net.weight.t()
        return (out.sum() + (net.bias.sum() * 3.0 if rank == 0 else 0.0))

    loss().backward()
    expected_w = 2.0 * sum(r + 1 for r in range(size))
    parallel_assert(net.weight.grad.tolist() == [[expected_w] * 3], f"{net.weight.grad}")
    parallel_assert(net.bias.grad.tolist() == [3.0], f"{net.bias.grad}")
    loss().backward()
    parallel_assert(net.weight.grad.tolist() == [[2 * expected_w] * 3], f"{net.weight.grad}")
    parallel_assert(net.bias.grad.tolist() == [6.0], f"{net.bias.grad}")
    everyone = WORLD.allgather(net.weight.grad.cpu().numpy().tobytes())
    parallel_assert(all(b == everyone[0] for b in everyone))
    replicated.remove()
    net.zero_grad()
    loss().backward()
    parallel_assert(net.weight.grad.tolist() == [[2.0 * (rank + 1)] * 3], "hooks not removed")


@pytest.mark.parallel(nprocs=[2, 3])
def test_replicate_bias_used_on_one_rank_gets_the_total_everywhere():
    rank = WORLD.rank
    net = torch.nn.Linear(2, 1).double()
    gt.replicate(net)
    x = torch.ones(4, 2, dtype=torch.float64)
    out = (x @ net.weight.t()).sum()
    if rank == 0:
        out = out + net.bias.sum()
    out.backward()
    # The bias's share arrives on rank 0 alone; every rank gets the total.
    parallel_assert(net.bias.grad.tolist() == [1.0], f"{net.bias.grad}")
    parallel_assert(net.weight.grad.tolist() == [[4.0 * WORLD.size] * 2], f"{net.weight.grad}")


@pytest.mark.parallel(nprocs=[2])
def test_replicate_after_a_backward_pass_that_failed():
    """A pass that fails after the parameters' gradients arrived never reaches its end; the
    next pass still sums the shares."""
    p = torch.ones(2, dtype=torch.float64, requires_grad=True)
    gt.replicate([p])
    fail = [True]

    def hook(g):
        if fail[0]:
            raise RuntimeError("failed on purpose")

    p.register_hook(hook)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        (p * (WORLD.rank + 1.0)).sum().backward()
    fail[0] = False
    p.grad = None
    (p * (WORLD.rank + 1.0)).sum().backward()
    parallel_assert(p.grad.tolist() == [3.0, 3.0], f"{p.grad}")


@pytest.mark.parallel(nprocs=[2])
def test_debug_mode_names_replicated_parameters_that_differ():
    net = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        net.weight.fill_(1.0 + WORLD.rank)
        net.bias.fill_(0.0)
    gm.set_debug(True)
    try:
        with pytest.raises(gm.CommunicationMismatch,
                           match=r"rank \d: gpumpiad.torch.replicate: replicated weight differs "
                                 r"across ranks \(rank\(s\) \[0\] hold one value; rank\(s\) "
                                 r"\[1\] hold one value\)"):
            gt.replicate(net)
    finally:
        gm.set_debug(False)


def test_replicate_errors():
    with pytest.raises(TypeError, match="rank 0: replicate needs a torch.nn.Module or an "
                                        "iterable of torch tensors, got int"):
        gt.replicate(3)
    with pytest.raises(TypeError, match="rank 0: replicate's parameter 1 is a str"):
        gt.replicate([torch.ones(1, requires_grad=True), "w"])
    with pytest.raises(ValueError, match="rank 0: replicate found no parameter that requires"):
        gt.replicate([torch.ones(1)])


def test_replicated_parameter_as_serial_argument_is_refused():
    p = torch.ones(2, dtype=torch.float64, requires_grad=True)
    replicated = gt.replicate([p])
    f = gt.function(lambda v: (v * v).sum(), "serial")
    try:
        for arg in (p, p * 2.0):
            with pytest.raises(ValueError, match="rank 0: .*argument 0 is serial and computed "
                                                 "from a parameter that gpumpiad.torch.replicate"):
                f(arg)
        assert gt.function(lambda v: (v * v).sum(), "distributed")(p).item() == 2.0
    finally:
        replicated.remove()
    assert f(p).item() == 2.0


def test_import_without_torch_says_how_to_install_it():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import gpumpiad\n"
            "try:\n"
            "    import gpumpiad.torch\n"
            "except ImportError as exc:\n"
            "    print('ImportError:', exc)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(gm.__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert 'ImportError: gpumpiad.torch needs PyTorch, which is not installed: pip install ' \
           '"gpumpiad[torch]"' in done.stdout
