"""Bad input across the public API: one table of cases, run at 1, 2 and 4 ranks (a subset at 3).

Each case calls a public entry point with one bad argument and states the error type and the
words its message must hold: the argument's name, the expected and actual value, and
``rank N`` (this rank, unless the error comes from another rank). Every case must raise on every
rank alike, so after the table the world communicator must still be in step. Non-contiguous
buffers are packed: their results are checked against contiguous copies.

Related checks elsewhere: mismatched collectives in debug mode
(``test_collectives.py::test_debug_mode_reports_mismatched_calls``), the watchdog on a stuck
receive (``test_collectives.py::test_watchdog_names_the_stuck_receive``), corrupted checkpoint
files (``test_checkpoint.py``), a killed-then-resumed optimisation
(``test_optimize.py::test_resume_after_kill``); aborts and timeouts of whole jobs are in
``test_failure.py``. Every parallel test here runs under conftest's ``MPIEXEC_TIMEOUT``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi import parallel_assert

import gpumpiad as gp
from gpumpiad.backend import to_numpy
from gpumpiad import checkpoint
from gpumpiad.checkpoint import CheckpointError
from gpumpiad.heat import Grid, solve
from gpumpiad.mpi._record import REVERSE_TAG
from gpumpiad.optimize import minimize


class FakeDeviceArray:
    """Stands in for a GPU array the NumPy backend cannot read (a CuPy array itself would be
    copied to the host, which is correct, and cannot be made without a GPU)."""

    __cuda_array_interface__ = {"shape": (2,), "typestr": "<f8", "data": (0, False),
                                "version": 3}


def _serial_loss(x):
    return gp.sum(x * x)


def _ones_like_vjp(g, ans, x):
    return np.ones(3)


def _double(t):
    return t * 2.0


def _float_vjp(g, ans, a):
    return 3.0


def _complex_vjp(g, ans, a):
    return g * (1 + 1j)


def _released_pullback():
    _, pullback = gp.vjp(_double, np.ones(3))
    pullback.__del__()  # what dropping the last reference does
    return pullback


def _freed_grid():
    grid = Grid((8, 6))
    grid.free()
    return grid


def _freed():
    comm = gp.Comm().dup()
    comm.free()
    return comm


def _timeout_from_env(text):
    """The watchdog's bound read from GPUMPIAD_TIMEOUT=text (settings restored after)."""
    saved = dict(gp.debug._settings), os.environ.get("GPUMPIAD_TIMEOUT")
    os.environ["GPUMPIAD_TIMEOUT"] = text
    gp.debug._settings["timeout"] = gp.debug._UNREAD
    try:
        return gp.debug.timeout()
    finally:
        gp.debug._settings.update(saved[0])
        if saved[1] is None:
            del os.environ["GPUMPIAD_TIMEOUT"]
        else:
            os.environ["GPUMPIAD_TIMEOUT"] = saved[1]


class Case:
    """``call()`` must raise ``error`` with every string of ``words`` in its message."""

    def __init__(self, name, call, error, words, min_ranks=1, subset=False, debug=False):
        self.name, self.call, self.error, self.words = name, call, error, words
        self.min_ranks, self.subset, self.debug = min_ranks, subset, debug


def cases(r, P, tmp):
    """The table; ``r`` this rank, ``P`` the world size, ``tmp`` a folder shared by all ranks."""
    me = f"rank {r}"
    x = np.ones((P + 1, 2))
    vg = gp.value_and_grad
    grid_shape = (8, 6)
    grid = Grid(grid_shape)
    nx, ny = grid.local_shape
    u0, kappa, f = np.ones((nx, ny)), np.ones((nx, ny)), np.zeros((nx, ny))
    h = grid.h[0]
    dt = 0.2 * h * h
    junk = os.path.join(tmp, "junk.ckpt")
    truncated = os.path.join(tmp, "truncated.ckpt")
    good = os.path.join(tmp, "good.ckpt")
    if r == 0:
        with open(junk, "wb") as fh:
            fh.write(b"hello, not a checkpoint")
        checkpoint.save(good, {"x": np.arange(4.0)})
        with open(good, "rb") as fh, open(truncated, "wb") as out:
            out.write(fh.read()[:-7])
    MPI.COMM_WORLD.Barrier()
    kappa_nan = kappa.copy()
    if r == P - 1:
        kappa_nan[0, 0] = np.nan
    C = Case
    return [
        # --- tensor --------------------------------------------------------------------------
        C("tensor: string dtype", lambda: gp.tensor(np.array(["a", "b"])), TypeError,
          [me, "data", "numeric dtype", "<U1"], subset=True),
        C("tensor: ragged list", lambda: gp.tensor([[1.0], [1.0, 2.0]]), TypeError,
          [me, "data", "array_like"]),
        *([C("tensor: device array on the NumPy backend", lambda: gp.tensor(FakeDeviceArray()),
             TypeError, [me, "data", "__cuda_array_interface__", "dtype object"])]
          if gp.backend_name() == "numpy" else []),
        C("tensor: distributed not a bool", lambda: gp.tensor([1.0], distributed="yes"),
          TypeError, [me, "distributed", "True or False", "'yes'"]),
        C("tensor: comm of a wrong type", lambda: gp.tensor([1.0], comm=3), TypeError,
          [me, "comm", "gpumpiad.Comm", "int"]),
        # --- value_and_grad / grad -----------------------------------------------------------
        C("value_and_grad: fn not callable", lambda: vg(3.0), TypeError,
          [me, "fn", "callable", "float"], subset=True),
        C("grad: fn not callable", lambda: gp.grad("loss"), TypeError,
          [me, "fn", "callable", "str"]),
        C("value_and_grad: argnums not int", lambda: vg(_serial_loss, argnums=1.5), TypeError,
          [me, "argnums", "int", "1.5"]),
        C("value_and_grad: argnums out of range", lambda: vg(_serial_loss, argnums=2)(x),
          IndexError, [me, "argnums 2", "out of range", "1 argument"], subset=True),
        C("value_and_grad: argnums out of range (tuple)",
          lambda: vg(lambda a, b: gp.sum(a * b), argnums=(0, -3))(x, x), IndexError,
          [me, "argnums -3", "2 argument"]),
        C("value_and_grad: int argument", lambda: vg(_serial_loss)(np.arange(3)), TypeError,
          [me, "argument 0", "floating-point", "int64"], subset=True),
        C("value_and_grad: complex argument", lambda: vg(_serial_loss)(np.ones(2) * 1j),
          TypeError, [me, "argument 0", "floating-point", "complex128"]),
        C("value_and_grad: NaN in a serial argument",
          lambda: vg(_serial_loss)(np.array([1.0, np.nan])), ValueError,
          [me, "argument 0", "NaN or Inf", "finite"], subset=True),
        C("value_and_grad: Inf in argnums 1",
          lambda: vg(lambda a, b: gp.sum(a * b), argnums=1)(x, np.full(2, np.inf)),
          ValueError, [me, "argument 1", "NaN or Inf"]),
        C("value_and_grad: NaN in a distributed argument makes the loss NaN (one rank)",
          lambda: vg(lambda t: gp.mpi_sum(gp.sum(t)))(
              gp.tensor([np.nan if r == 0 else 1.0], distributed=True)),
          gp.LossError, [me, "loss is nan", "argument 0 (argnums, distributed) holds NaN or "
                         "Inf on rank(s) [0]"]),
        C("value_and_grad: NaN in a distributed argument (debug, one rank)",
          lambda: vg(lambda t: gp.mpi_sum(gp.sum(t)))(
              gp.tensor([np.nan if r == 0 else 1.0], distributed=True)),
          ValueError, [me, "argument 0", "distributed", "NaN or Inf on rank(s) [0]"],
          debug=True, subset=True),
        C("value_and_grad: serial argument differs across ranks (debug)",
          lambda: vg(_serial_loss)(np.full(2, float(r))), gp.CommunicationMismatch,
          [me, "argument 0", "serial", "differs", "rank(s) [0]", "rank(s) [1]"],
          min_ranks=2, debug=True, subset=True),
        C("value_and_grad: loss not a Tensor", lambda: vg(lambda t: 1.0)(x), gp.LossError,
          [me, "Tensor", "float"]),
        C("value_and_grad: loss not a scalar", lambda: vg(lambda t: t * 2.0)(x), gp.LossError,
          [me, "scalar", f"({P + 1}, 2)"], subset=True),
        C("value_and_grad: loss not serial",
          lambda: vg(lambda t: gp.sum(t) * gp.mpi_rank())(x), gp.LossError,
          [me, "distributed", "mpi_sum"]),
        C("value_and_grad: NaN loss", lambda: vg(lambda t: gp.sum(gp.log(t - 2.0)))(x),
          gp.LossError, [me, "loss is nan", "finite"], subset=True),
        C("value_and_grad: Inf loss", lambda: vg(lambda t: gp.sum(t / 0.0))(x), gp.LossError,
          [me, "loss is inf", "finite"]),
        C("value_and_grad: complex loss", lambda: vg(lambda t: gp.sum(t * 1j))(x),
          gp.LossError, [me, "real", "complex128"]),
        # --- check_grad ----------------------------------------------------------------------
        C("check_grad: fn not callable", lambda: gp.check_grad(None, np.ones(2)), TypeError,
          [me, "fn", "callable", "NoneType"]),
        C("check_grad: no floating argument", lambda: gp.check_grad(_serial_loss, np.arange(2)),
          ValueError, [me, "no floating-point argument"]),
        C("check_grad: argnums out of range",
          lambda: gp.check_grad(_serial_loss, np.ones(2), argnums=3), IndexError,
          [me, "argnums 3", "out of range"]),
        C("check_grad: max_elements < 1",
          lambda: gp.check_grad(_serial_loss, np.ones(2), max_elements=0), ValueError,
          [me, "max_elements", "int >= 1", "0"]),
        C("check_grad: negative eps",
          lambda: gp.check_grad(_serial_loss, np.ones(2), eps=-1e-3), ValueError,
          [me, "eps", "positive", "-0.001"]),
        C("vjp: pullback of a string", lambda: gp.vjp(_double, x)[1]("abc"), TypeError,
          [me, "cotangent", "<U3", f"shape {x.shape}"], subset=True),
        C("vjp: pullback of None", lambda: gp.vjp(_double, x)[1](None), TypeError,
          [me, "cotangent is None", "array of real numbers"]),
        C("vjp: a released pullback", lambda: _released_pullback()(np.ones(3)), RuntimeError,
          [me, "pullback's recorded operations were already released"]),
        C("grad: a grad inside the differentiated function",
          lambda: gp.grad(lambda t: gp.sum(t * gp.grad(lambda s: gp.sum(s * t))(x)))(x),
          NotImplementedError, [me, "higher-order derivatives are not supported"],
          subset=True),
        C("concatenate: empty list", lambda: gp.concatenate([]), ValueError,
          [me, "concatenate's tensors", "non-empty sequence", "empty list"]),
        # --- custom_op -----------------------------------------------------------------------
        C("custom_op: forward returns a list",
          lambda: gp.custom_op(lambda a: [a, a], _ones_like_vjp)(np.ones(2)), TypeError,
          [me, "forward of custom_op", "returned list", "expected an array"], subset=True),
        C("custom_op: vjp returns a float for an array argument",
          lambda: gp.grad(lambda t: gp.sum(gp.custom_op(lambda a: 2 * a, _float_vjp)(t)))(
              np.ones(3)), ValueError,
          [me, "vjp of custom_op", "shape ()", "argument 0", "expected its shape (3,)"]),
        C("custom_op: vjp returns a complex cotangent for a real argument",
          lambda: gp.grad(lambda t: gp.sum(gp.custom_op(lambda a: 2 * a, _complex_vjp)(t)))(
              np.ones(3)), TypeError, [me, "custom_op", "complex"]),
        C("custom_op: forward not callable", lambda: gp.custom_op(42), TypeError,
          [me, "forward", "callable", "int"]),
        C("custom_op: bad layout", lambda: gp.custom_op(np.sin, layout="replicated"),
          ValueError, [me, "layout", "'serial'", "'replicated'"], subset=True),
        C("custom_op: bad entry in layout tuple",
          lambda: gp.custom_op(np.sin, layout=("serial", "rows")), ValueError,
          [me, "layout", "'rows'"]),
        C("custom_op: layout tuple of the wrong length",
          lambda: gp.custom_op(lambda a: (a, a), lambda g, ans, a: g[0],
                               layout=("serial",))(gp.tensor([1.0])), ValueError,
          [me, "layout names 1 outputs", "returned 2"]),
        C("custom_op: no vjp", lambda: gp.custom_op(np.sin, name="nv")(gp.tensor([1.0])),
          NotImplementedError, [me, "'nv' has no vjp", "@nv.defvjp"]),
        C("custom_op: vjp returns the wrong number of cotangents",
          lambda: gp.grad(lambda t: gp.sum(gp.custom_op(
              lambda a, b: a * b, lambda g, ans, a, b: g * b, name="two")(t, t)))(np.ones(2)),
          ValueError, [me, "'two'", "1 cotangent(s) for 2 argument(s)"]),
        C("custom_op: vjp returns a cotangent of the wrong shape",
          lambda: gp.grad(lambda t: gp.sum(gp.custom_op(
              lambda a: a * 2.0, _ones_like_vjp, name="wide")(t)))(np.ones(2)),
          ValueError, [me, "'wide'", "shape (3,)", "expected its shape (2,)"]),
        # --- local ops: the array library's own errors, with the rank and the op -------------
        C("indexing: out of range", lambda: gp.tensor(np.ones(3))[7], IndexError,
          [me, "getitem", "ndex 7 is out of bounds"]),  # NumPy: index, CuPy: Index
        C("reshape: to another size", lambda: gp.tensor(np.ones(6)).reshape(4, 2), ValueError,
          [me, "reshape", "cannot reshape array of size 6"]),
        C("matmul: inner sizes differ",
          lambda: gp.tensor(np.ones((2, 3))) @ gp.tensor(np.ones((2, 3))), ValueError,
          [me, "matmul: " + ("Input operand 1" if gp.backend_name() == "numpy"
                              else "Axis dimension mismatch")]),
        C("sum: axis out of range (NumPy's AxisError passes as it is)",
          lambda: gp.sum(gp.tensor(np.ones(3)), axis=4), np.exceptions.AxisError,
          ["axis 4 is out of bounds"]),
        # --- mpi_* ---------------------------------------------------------------------------
        C("mpi_bcast: root out of range", lambda: gp.mpi_bcast(x, root=P), ValueError,
          [me, "root", f"[0, {P})", f"got {P}"], subset=True),
        C("mpi_reduce: negative root", lambda: gp.mpi_reduce(x, root=-1), ValueError,
          [me, "root", "got -1"]),
        C("mpi_gather: float root", lambda: gp.mpi_gather(x, root=1.5), ValueError,
          [me, "root", "got 1.5"]),
        C("mpi_scatter: bool root", lambda: gp.mpi_scatter(x, root=True), ValueError,
          [me, "root", "got True"]),
        C("mpi_scatter: rows that do not sum", lambda: gp.mpi_scatter(x, rows=[1] * (P + 1)),
          ValueError, [me, "rows", f"{P} non-negative ints", f"to {P + 1}"]),
        C("mpi_scatter: fractional rows",
          lambda: gp.mpi_scatter(x, rows=[(P + 1) / P] * P), ValueError,
          [me, "rows", "non-negative ints", f"{(P + 1) / P}"], subset=True),
        # One rank fails its own check: the others learn which and why in the metadata
        # exchange they make anyway, instead of waiting in the collective.
        C("mpi_gather: a scalar on rank 0 only",
          lambda: gp.mpi_gather(1.0 if r == 0 else np.ones(2)), ValueError,
          [me, "mpi_gather", "rank 0: mpi_gather needs an array with at least one axis"],
          min_ranks=2, subset=True),
        C("mpi_gather: root out of range on the last rank only",
          lambda: gp.mpi_gather(x, root=P if r == P - 1 else 0), ValueError,
          [me, f"rank {P - 1}: root must be an int in [0, {P})", f"got {P}"], min_ranks=2),
        C("mpi_allgather: a scalar on the last rank only",
          lambda: gp.mpi_allgather(2.0 if r == P - 1 else np.ones(2)), ValueError,
          [me, f"rank {P - 1}: mpi_allgather needs an array"], min_ranks=2),
        C("mpi_alltoall: rows that do not sum on rank 0 only",
          lambda: gp.mpi_alltoall(x, rows=[P + 1] * P if r == 0 else None), ValueError,
          [me, "rank 0: mpi_alltoall rows", f"summing to {P + 1}"], min_ranks=2, subset=True),
        C("mpi_scatter: root out of range on the last rank only",
          lambda: gp.mpi_scatter(x, root=P if r == P - 1 else 0), ValueError,
          [me, f"rank {P - 1}: root must be an int", f"got {P}"], min_ranks=2),
        # Ranks naming different (valid) roots waited in the collective for ever; the
        # metadata exchange carries each rank's root.
        C("mpi_gather: the last rank names another root",
          lambda: gp.mpi_gather(x, root=1 if r == P - 1 else 0), ValueError,
          [me, "mpi_gather's root must be the same on every rank", "rank 0: 0",
           f"rank {P - 1}: 1"], min_ranks=3, subset=True),
        C("mpi_scatter: each rank names itself as the root",
          lambda: gp.mpi_scatter(x, root=r), ValueError,
          [me, "mpi_scatter's root must be the same on every rank", "rank 0: 0", "rank 1: 1"],
          min_ranks=2, subset=True),
        C("mpi_gather: scalar", lambda: gp.mpi_gather(1.0), ValueError,
          [me, "mpi_gather", "at least one axis", "scalar"]),
        C("mpi_allgather: scalar", lambda: gp.mpi_allgather(2.0), ValueError,
          [me, "mpi_allgather", "at least one axis"]),
        C("mpi_reduce_scatter: negative rows",
          lambda: gp.mpi_reduce_scatter(x, rows=[-1] + [0] * (P - 1) + [P + 2]
                                        if P > 1 else [-1]), ValueError,
          [me, "rows", "non-negative"]),
        C("mpi_alltoall: too many rows", lambda: gp.mpi_alltoall(x, rows=[P + 1] * P),
          ValueError, [me, "mpi_alltoall rows", f"summing to {P + 1}"], min_ranks=2),
        C("mpi_gather: trailing shapes differ across ranks",
          lambda: gp.mpi_gather(np.ones((2, 3 if r == 0 else 4))), ValueError,
          [me, "mpi_gather's pieces", "same trailing shape and dtype",
           "rank 0: (3,) float64", "rank 1: (4,) float64"], min_ranks=2),
        C("mpi_allgather: dtypes differ across ranks",
          lambda: gp.mpi_allgather(np.ones(2, np.float32 if r == P - 1 else np.float64)),
          ValueError, [me, "mpi_allgather's pieces", f"rank {P - 1}: () float32",
                       "rank 0: () float64"], min_ranks=2),
        C("mpi_alltoall: trailing shapes differ across ranks",
          lambda: gp.mpi_alltoall(np.ones((P, 2 if r == 0 else 3))), ValueError,
          [me, "mpi_alltoall's pieces", "same trailing shape and dtype"], min_ranks=2),
        C("mpi_allreduce: unknown op", lambda: gp.mpi_allreduce(x, op=MPI.BAND), ValueError,
          [me, "op", "SUM, MAX, MIN or PROD"], subset=True),
        C("mpi_allreduce: MAX of complex", lambda: gp.mpi_allreduce(x * 1j, op=gp.MAX),
          TypeError, [me, "x", "MAX", "complex128"]),
        C("mpi_sum: bool data", lambda: gp.mpi_sum(np.ones(2, dtype=bool)), TypeError,
          [me, "x", "SUM", "bool"]),
        C("mpi_sum: string data", lambda: gp.mpi_sum(np.array(["a"])), TypeError,
          [me, "data", "numeric dtype", "<U1"]),
        C("mpi_sum: comm of a wrong type", lambda: gp.mpi_sum(x, comm="world"), TypeError,
          [me, "comm", "str"]),
        C("mpi_send: dest out of range", lambda: gp.mpi_send(x, dest=P), ValueError,
          [me, "dest", f"got {P}"], subset=True),
        C("mpi_recv: source out of range", lambda: gp.mpi_recv(x, source=-2), ValueError,
          [me, "source", "got -2"]),
        C("mpi_recv: reverse-range tag", lambda: gp.mpi_recv(x, 0, tag=REVERSE_TAG), ValueError,
          [me, "tag", f"[0, {REVERSE_TAG})", f"got {REVERSE_TAG}"]),
        C("mpi_sendrecv: negative tag", lambda: gp.mpi_sendrecv(x, 0, 0, tag=-5), ValueError,
          [me, "tag", "got -5"]),
        C("mpi_sendrecv: each rank naming its own peers (debug mode)",
          lambda: gp.mpi_sendrecv(x, dest=(r + 1) % P, source=(r - 1) % P),
          gp.CommunicationMismatch, [me, "mpi_sendrecv", "the argument list differs",
                                     "use mpi_exchange"], min_ranks=2, debug=True, subset=True),
        C("mpi_exchange: float dest", lambda: gp.mpi_exchange(x, dest=0.5, source=0),
          ValueError, [me, "dest", "must be an int", "0.5"]),
        C("mpi_recv: another dtype of the same size (debug mode)",
          lambda: (gp.mpi_send(np.ones(2), dest=r),
                   gp.mpi_recv(np.ones(4, np.float32), source=r).numpy()),
          gp.CommunicationMismatch, [me, "mpi_recv from rank", "sent <f8 (2,)",
                                     "expects <f4 (4,)"], debug=True, subset=True),
        C("mpi_sum: dtypes differ across ranks (debug mode)",
          lambda: gp.mpi_sum(np.ones(2, np.float32 if r == 0 else np.float64)),
          gp.CommunicationMismatch, [me, "mpi_sum", "the dtype differs", "float32"],
          min_ranks=2, debug=True),
        C("mpi_sum: a freed communicator", lambda: gp.mpi_sum(x, comm=_freed()), ValueError,
          [me, "communicator was freed"], subset=True),
        C("mpi_barrier: comm of a wrong type", lambda: gp.mpi_barrier(comm=object()), TypeError,
          [me, "comm", "object"]),
        # --- Comm.split / Comm.cart ----------------------------------------------------------
        C("Comm.split: negative color on the last rank only",
          lambda: gp.Comm().split(-1 if r == P - 1 else 0), ValueError,
          [me, "color", "int >= 0", f"got -1 on rank {P - 1}"], subset=True),
        C("Comm.split: key not an int", lambda: gp.Comm().split(0, key="first"), ValueError,
          [me, "key", "'first'"]),
        C("Comm.split: color beyond a C int", lambda: gp.Comm().split(2**40), ValueError,
          [me, "color", "(a C int)", f"got {2**40}"], subset=True),
        C("Comm: a string", lambda: gp.Comm("world"), TypeError,
          [me, "comm", "mpi4py Intracomm", "'world'"], subset=True),
        C("GPUMPIAD_TIMEOUT not a number", lambda: _timeout_from_env("abc"), ValueError,
          [me, "GPUMPIAD_TIMEOUT", "positive number of seconds", "'abc'"], subset=True),
        C("Comm.cart: dims do not fit", lambda: gp.Comm().cart(dims=[P + 1, 1]), ValueError,
          [me, "dims", f"[{P + 1}, 1]", f"{P} rank(s)"], subset=True),
        C("Comm.cart: negative dims", lambda: gp.Comm().cart(dims=[-1, 0]), ValueError,
          [me, "dims", "non-negative", "-1"]),
        C("Comm.cart: periods of the wrong length",
          lambda: gp.Comm().cart(dims=[P, 1], periods=[True]), ValueError,
          [me, "periods", "one bool per dimension (2)", "[True]"]),
        C("Comm.cart: ndims 0", lambda: gp.Comm().cart(ndims=0), ValueError,
          [me, "ndims", "int >= 1", "got 0"]),
        # --- heat.Grid / heat.solve / halo_exchange ------------------------------------------
        C("Grid: fractional dims", lambda: Grid((8, 6), dims=(2.5, 1)), ValueError,
          [me, "dims", "non-negative ints", "2.5"], subset=True),
        C("solve: grid given as a tuple", lambda: solve(u0, kappa, f, dt, h, 3, grid=(2, 2)),
          TypeError, [me, "grid", "gpumpiad.heat.Grid", "tuple (2, 2)"], subset=True),
        C("solve: NaN boundary", lambda: solve(u0, kappa, f, dt, h, 3, grid=grid,
                                               boundary=np.nan), ValueError,
          [me, "boundary", "finite number", "nan"], subset=True),
        C("solve: boundary function returning Inf",
          lambda: solve(u0, kappa, f, dt, h, 3, grid=grid,
                        boundary=lambda bx, by: bx + np.inf), ValueError,
          [me, "boundary function", "NaN or Inf", "finite Dirichlet values"]),
        C("solve: negative kappa on the last rank",
          lambda: solve(u0, np.where(r == P - 1, -1.0, kappa), f, dt, h, 3, grid=grid),
          ValueError, [me, "kappa holds negative values", f"rank(s) [{P - 1}]", "kappa >= 0"],
          subset=True),
        C("solve: a freed grid", lambda: solve(u0, kappa, f, dt, h, 3, grid=_freed_grid()),
          ValueError, [me, "grid was freed", "make a new Grid"]),
        C("halo_exchange: a freed grid",
          lambda: gp.halo_exchange(gp.tensor(np.ones((nx + 2, ny + 2)), distributed=True),
                                   _freed_grid()), ValueError,
          [me, "halo_exchange's grid was freed"], subset=True),
        C("Grid: smaller than the decomposition", lambda: Grid((1, 8), dims=(P, 1)),
          ValueError, [me, "1x8 cells", f"{P}x1 patches", "axis 0 has 1 cell(s)"],
          min_ranks=2, subset=True),
        C("Grid: non-integral shape", lambda: Grid((4.5, 4)), ValueError,
          [me, "grid shape", "pair of ints", "4.5"]),
        C("Grid: shape of strings", lambda: Grid(("a", "b")), ValueError,
          [me, "grid shape", "pair of ints", "'a'"]),
        C("Grid: zero cells", lambda: Grid((0, 4)), ValueError,
          [me, "grid shape", "positive", "(0, 4)"]),
        C("Grid: dims that do not fit", lambda: Grid((8, 8), dims=(P + 1, 1)), ValueError,
          [me, "dims", f"{P + 1}x1", f"{P} rank(s)"]),
        C("Grid: periodic not bools", lambda: Grid((8, 8), periodic=(True, "x")), ValueError,
          [me, "periodic must be a bool or a pair of bools", "'x'"]),
        C("solve: unstable dt", lambda: solve(u0, kappa, f, 1.0 * h * h, h, 3, grid=grid),
          ValueError, [me, "dt", "stability limit", "max kappa = 1.0"], subset=True),
        C("solve: kappa of the wrong shape",
          lambda: solve(u0, np.ones((nx + 1, ny)), f, dt, h, 3, grid=grid), ValueError,
          [me, "kappa", f"shape {(nx, ny)}", f"got shape {(nx + 1, ny)}"]),
        C("solve: int u0", lambda: solve(np.ones((nx, ny), int), kappa, f, dt, h, 3, grid=grid),
          ValueError, [me, "u0", "float32 or float64", "int64"]),
        C("solve: complex f", lambda: solve(u0, kappa, f * 1j, dt, h, 3, grid=grid), ValueError,
          [me, "f", "float32 or float64", "complex128"]),
        C("solve: negative dt", lambda: solve(u0, kappa, f, -dt, h, 3, grid=grid), ValueError,
          [me, "dt", "positive", "-"]),
        C("solve: negative steps", lambda: solve(u0, kappa, f, dt, h, -1, grid=grid),
          ValueError, [me, "steps", "non-negative int", "-1"]),
        C("solve: NaN kappa on the last rank",
          lambda: solve(u0, kappa_nan, f, dt, h, 3, grid=grid), ValueError,
          [me, "kappa", "NaN or Inf", f"rank(s) [{P - 1}]"], subset=True),
        C("solve: NaN u0 on rank 0, Inf f and -Inf kappa on the last rank",
          lambda: solve(np.where(r == 0, np.nan, u0), np.where(r == P - 1, -np.inf, kappa),
                        np.where(r == P - 1, np.inf, f), dt, h, 3, grid=grid), ValueError,
          [me, "u0 holds NaN or Inf on rank(s) [0]",
           f"kappa holds NaN or Inf on rank(s) [{P - 1}]",
           f"f holds NaN or Inf on rank(s) [{P - 1}]", "expected finite values"]),
        C("solve: boundary of the wrong shape",
          lambda: solve(u0, kappa, f, dt, h, 3, grid=grid, boundary=np.ones(3)), ValueError,
          [me, "boundary", "padded shape", "(3,)"]),
        C("halo_exchange: unpadded u",
          lambda: gp.halo_exchange(gp.tensor(u0, distributed=True), grid), ValueError,
          [me, "halo_exchange", f"{grid.padded_shape}", f"{(nx, ny)}"], subset=True),
        C("halo_exchange: int u",
          lambda: gp.halo_exchange(np.ones(grid.padded_shape, int), grid), TypeError,
          [me, "halo_exchange", "floating", "int64"]),
        C("halo_exchange: grid not a Grid",
          lambda: gp.halo_exchange(np.ones(grid.padded_shape), grid_shape), TypeError,
          [me, "grid", "gpumpiad.heat.Grid", "tuple"]),
        # --- optimize.minimize ---------------------------------------------------------------
        C("minimize: maxiter a string",
          lambda: minimize(_serial_loss, np.ones(1), options={"maxiter": "10"}), TypeError,
          [me, "options['maxiter']", "int >= 0", "'10' (str)"], subset=True),
        C("minimize: callback not callable",
          lambda: minimize(_serial_loss, np.ones(1), callback=5), TypeError,
          [me, "callback", "callable or None", "5 (int)"]),
        C("minimize: fn not callable", lambda: minimize(None, np.ones(1)), TypeError,
          [me, "fn", "callable", "NoneType"]),
        C("minimize: unknown method", lambda: minimize(_serial_loss, np.ones(1), method="bogus"),
          ValueError, [me, "method", "'bogus'", "dist-lbfgs"], subset=True),
        C("minimize: checkpoint_every 0",
          lambda: minimize(_serial_loss, np.ones(1), checkpoint_every=0), ValueError,
          [me, "checkpoint_every", "int >= 1", "0"]),
        C("minimize: dist-lbfgs with bounds",
          lambda: minimize(_serial_loss, np.ones(1), method="dist-lbfgs", bounds=[(0, 1)]),
          ValueError, [me, "dist-lbfgs", "bounds"]),
        C("minimize: complex x0", lambda: minimize(_serial_loss, np.ones(2) * 1j), TypeError,
          [me, "x0", "real numbers", "complex128"]),
        C("minimize: NaN in a distributed x0 on rank 0",
          lambda: minimize(lambda t: gp.mpi_sum(gp.sum(t * t)),
                           gp.tensor([np.nan if r == 0 else 1.0], distributed=True),
                           trace=False), ValueError,
          [me, "x0", "distributed", "NaN or Inf on rank(s) [0]"], subset=True),
        C("minimize: loss not a scalar",
          lambda: minimize(lambda t: t * t, np.ones(2), trace=False), gp.LossError,
          [me, "scalar", "(2,)"]),
        # --- checkpoint.load / save ----------------------------------------------------------
        C("checkpoint.load: missing file",
          lambda: checkpoint.load(os.path.join(tmp, "missing.ckpt")), CheckpointError,
          [me, "missing.ckpt"]),
        C("checkpoint.load: foreign file (collective)",
          lambda: checkpoint.load(junk, comm=gp.Comm()), CheckpointError,
          ["rank 0", "junk.ckpt", "not a gpumpiad checkpoint"], subset=True),
        C("checkpoint.load: truncated file (collective)",
          lambda: checkpoint.load(truncated, comm=gp.Comm()), CheckpointError,
          ["rank 0", "truncated.ckpt"]),
        C("checkpoint.load: root out of range",
          lambda: checkpoint.load(good, comm=gp.Comm(), root=P), ValueError,
          [me, "root", f"[0, {P})", f"got {P}"]),
        C("checkpoint.load: path not a path", lambda: checkpoint.load(3.5), TypeError,
          [me, "path", "os.PathLike", "float"]),
        C("checkpoint.save: payload not a dict (collective)",
          lambda: checkpoint.save(os.path.join(tmp, "p.ckpt"), [1, 2], comm=gp.Comm()),
          CheckpointError, ["rank 0", "payload", "dict", "list"]),
        C("checkpoint.save: missing folder",
          lambda: checkpoint.save(os.path.join(tmp, "no", "such", f"dir{r}", "a.ckpt"),
                                  {"x": 1}), CheckpointError, [me, "a.ckpt"]),
    ]


def _run_table(subset_only):
    r, P = gp.mpi_rank(), gp.mpi_size()
    world = MPI.COMM_WORLD
    tmp = world.bcast(__import__("tempfile").mkdtemp(prefix="gpumpiad-errors-")
                      if world.rank == 0 else None)
    table = cases(r, P, tmp)
    names = [c.name for c in table]
    assert len(names) == len(set(names))
    failures, ran = [], 0
    for case in table:
        if P < case.min_ranks or (subset_only and not case.subset):
            continue
        ran += 1
        gp.set_debug(case.debug)
        try:
            case.call()
            failures.append(f"{case.name}: no error")
        except case.error as exc:
            text = str(exc)
            missing = [w for w in case.words if w not in text]
            if missing:
                failures.append(f"{case.name}: {missing} not in {type(exc).__name__}: {text!r}")
        except Exception as exc:  # the wrong type: report it, go on with the table
            failures.append(f"{case.name}: expected {case.error.__name__}, got "
                            f"{type(exc).__name__}: {exc}")
        finally:
            gp.set_debug(False)
    # Every case raised on every rank alike, so the world is still in step.
    after = gp.mpi_sum(np.ones(2)).numpy()
    if not np.array_equal(after, np.full(2, float(P))):
        failures.append(f"afterwards mpi_sum gives {after}")
    failures = [f"rank {r}: {f}" for f in failures]
    return ran, failures


@pytest.mark.parallel(nprocs=[1, 2, 4])
def test_error_table():
    ran, failures = _run_table(subset_only=False)
    parallel_assert(ran >= 40, f"only {ran} cases ran")
    parallel_assert(not failures, "\n".join(failures))


@pytest.mark.parallel(nprocs=[3])
def test_error_table_subset():
    ran, failures = _run_table(subset_only=True)
    parallel_assert(ran >= 15, f"only {ran} cases ran")
    parallel_assert(not failures, "\n".join(failures))


# ---------------------------------------------------------------------------------------------
# Non-contiguous buffers are packed: the results equal those of contiguous copies
# ---------------------------------------------------------------------------------------------

def _programs(r, P):
    rows = P + 1

    def scatter(t):
        return gp.mpi_scatter(t, root=P - 1)

    return {
        "mpi_sum": lambda t: gp.mpi_sum(t * (r + 1)),
        "mpi_allreduce(MAX)": lambda t: gp.mpi_allreduce(t * (r + 1), op=gp.MAX),
        "mpi_bcast": lambda t: gp.mpi_bcast(t * (r + 1), root=P - 1),
        "mpi_reduce": lambda t: gp.mpi_reduce(t * (r + 1), root=0),
        "mpi_gather": lambda t: gp.mpi_gather(t, root=0),
        "mpi_allgather": lambda t: gp.mpi_allgather(t),
        "mpi_scatter": scatter,
        "mpi_reduce_scatter": lambda t: gp.mpi_reduce_scatter(t),
        "mpi_alltoall": lambda t: gp.mpi_alltoall(t),
        "mpi_send/recv ring": lambda t: gp.mpi_send(t, (r + 1) % P, tag=5)
        + gp.mpi_recv(t, (r - 1) % P, tag=5),
        "mpi_sendrecv": lambda t: gp.mpi_sendrecv(t, (r - 1) % P, (r + 1) % P),
    }, rows


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_non_contiguous_buffers_are_packed():
    r, P = gp.mpi_rank(), gp.mpi_size()
    programs, rows = _programs(r, P)
    base = np.arange(rows * 6 * 2, dtype=np.float64).reshape(rows * 2, 6) + 10.0 * r
    views = {"every other row and column": base[::2, ::2],
             "transposed": base[:, :rows].T,
             "reversed": base[:rows, ::-1]}
    failures = []
    for name, program in programs.items():
        for kind, view in views.items():
            assert not view.flags.c_contiguous
            packed = np.ascontiguousarray(view)
            try:
                got = program(gp.tensor(view, distributed=True)).numpy()
                want = program(gp.tensor(packed, distributed=True)).numpy()
                if got.shape != want.shape or not np.array_equal(got, want):
                    failures.append(f"{name} on a {kind} view: {got} != {want}")

                def loss(t, program=program):
                    return gp.mpi_sum(gp.sum(gp.sin(program(t))))
                g_view = gp.grad(loss)(gp.tensor(view, distributed=True))
                g_packed = gp.grad(loss)(gp.tensor(packed, distributed=True))
                if not np.array_equal(to_numpy(g_view), to_numpy(g_packed)):
                    failures.append(f"{name} on a {kind} view: gradients differ")
            except Exception as exc:
                failures.append(f"{name} on a {kind} view: {type(exc).__name__}: {exc}")
    parallel_assert(not failures, "\n".join(failures))
