"""gpumpiad.heat.learn: the MLP κθ(x, y) trained through the distributed heat solver."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

torch = pytest.importorskip("torch")

import gpumpiad as gm  # noqa: E402
import gpumpiad.torch as gt  # noqa: E402
from gpumpiad.heat import inverse, learn  # noqa: E402

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
SETTINGS = dict(n=12, snapshots=2, regularization=0.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gm.__file__)))
ENV = dict(os.environ, GPUMPIAD_BACKEND="numpy", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]]
                                                if os.environ.get("PYTHONPATH") else [])))


def _gradient(problem, net):
    k = learn.kappa(net, learn.points(problem), problem.grid.local_shape)
    loss = learn.objective(problem)(k)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_network_gradient_is_the_global_problems_on_every_rank():
    settings = inverse.Settings(**SETTINGS)
    problem = inverse.Problem(settings)
    net = learn.network(hidden=8, seed=3)
    replicated = gt.replicate(net)
    loss, grad = _gradient(problem, net)
    replicated.remove()
    everyone = WORLD.allgather(grad.cpu().numpy().tobytes())
    parallel_assert(all(b == everyone[0] for b in everyone),
                    "the parameters' gradients differ across ranks")
    reference = None
    if WORLD.rank == 0:
        with gm.Comm(MPI.COMM_SELF).dup() as alone:
            single = inverse.Problem(settings, comm=alone)
            reference = _gradient(single, learn.network(hidden=8, seed=3))
            single.grid.free()
    ref_loss, ref_grad = WORLD.bcast(reference, root=0)
    error = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
    parallel_assert(error <= 1e-12, f"relative difference to the one-rank gradient {error:.3g}")
    parallel_assert(abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), f"{loss} vs {ref_loss}")


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_twenty_adam_steps_keep_the_copies_bit_identical():
    problem = inverse.Problem(inverse.Settings(**SETTINGS))
    net = learn.network(hidden=8, seed=1)
    history = learn.train(problem, net, 20, lr=0.01)
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu().numpy().tobytes()
    everyone = WORLD.allgather(params)
    parallel_assert(all(b == everyone[0] for b in everyone),
                    "the network's parameters differ across ranks after 20 Adam steps")
    parallel_assert(len(history["loss"]) == 21 and history["loss"][-1] < history["loss"][0],
                    f"{history['loss']}")
    initial = torch.cat([p.detach().reshape(-1)
                         for p in learn.network(hidden=8, seed=1).parameters()]).cpu().numpy()
    parallel_assert(not np.array_equal(initial, np.frombuffer(params)), "nothing trained")


def test_heat_learn_job_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "gpumpiad", "heat-learn",
                           "--n", "12", "--steps", "3", "--hidden", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpumpiad heat-learn: 2 rank(s), 2x1 patches, grid 12x12")
    assert len(re.findall(r"^ +\d+  loss ", proc.stdout, re.M)) == 4  # steps 0-3
    for name in ("loss.png", "kappa.png", "summary.json", learn.NETWORK_FILE):
        assert (out / name).stat().st_size > 0, name
    saved = torch.load(out / learn.NETWORK_FILE)
    net = learn.network(hidden=saved["hidden"])
    net.load_state_dict(saved["state_dict"])
    assert saved["kappa_bounds"] == (0.2, 2.5)


def test_heat_learn_is_listed_and_says_it_needs_torch():
    proc = subprocess.run([sys.executable, "-m", "gpumpiad", "heat-learn", "--help"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "gpumpiad[torch]"' in proc.stdout and "--steps" in proc.stdout
