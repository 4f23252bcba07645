"""``solve``: the explicit heat equation in 2-D or 3-D on a patch decomposition, one
differentiable op.

The whole time loop is a single :func:`gpumpiad.custom_op` on the tape, with a hand-written
adjoint time loop, so the tape holds one node whatever the number of steps. States for the
reverse pass are all stored, or only ``checkpoints`` of them with binomial recomputation
(revolve, Griewank & Walther 2000); by default on the host, states that outgrow the cache are
kept one per segment and the others made again a segment at a time.
"""
from __future__ import annotations

import math
import os
import socket
import threading
import weakref
import zlib
from functools import lru_cache
from numbers import Real

import numpy as np
from mpi4py import MPI

from .. import control, halo, streams, trace, transport
from ..arguments import is_int
from ..backend import all_finite, asarray, get_array_module, is_device_array
from ..comm import Comm, world
from ..custom import CustomOp
from ..tape import active_tape
from ..tensor import DISTRIBUTED, Tensor
from . import hostkernels, hostkernels3d
from .grid import Grid, check_grid
from .kernels import kernels_for

__all__ = ["solve", "recompute_steps"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_ARGUMENTS = ("u0", "kappa", "f")
_SIDES = {2: ("north", "south", "west", "east"), 3: ("-x", "+x", "-y", "+y", "-z", "+z")}
_self_grids = {}


def solve(u0, kappa, f, dt, h, steps, grid=None, boundary=0.0, checkpoints=None,
          trajectory=False, backend=None):
    """March ``u_t = kappa * Laplace(u) + f`` with explicit Euler steps on each rank's patch.

    ``u^{n+1} = u^n + r * kappa * L(u^n) + dt * f`` with ``r = dt / h**2`` and ``L`` the
    5-point (2-D) or 7-point (3-D) Laplacian numerator; ghost cells come from the neighbouring
    patches (halo exchange) or, on the physical boundary, from the Dirichlet values
    ``boundary``. Where kernels run asynchronously (a GPU) and the patch borders another rank,
    each step overlaps the exchange with the interior cells: start the exchange, update the
    cells that read no ghost, finish, update the boundary layer. Collective over ``grid``.

    Parameters
    ----------
    u0, kappa, f : Tensor or array, shape grid.local_shape (2 or 3 axes)
        This rank's patch (no ghosts) of the initial state, the diffusivity and the source
        (constant in time). One floating dtype (float32 or float64) and array kind for all
        three. A distributed Tensor is this rank's piece; a serial one is the same patch on
        every rank (its gradient is then the total over ranks).
    dt, h : float
        Time step and cell size.
    steps : int
        Number of time steps.
    grid : gpumpiad.Grid, optional
        The decomposition, 2-D or 3-D. Default: every rank solves on its own, its patch being
        the whole domain.
    boundary : float, callable or array, optional
        Dirichlet values in the ghost cells of the physical boundary: a number (default 0), a
        function ``g(x, y)`` (3-D: ``g(x, y, z)``) of broadcastable NumPy coordinate arrays
        (see :meth:`Grid.coordinates`), or an array of the padded shape ``(nx+2, ny+2[,
        nz+2])`` whose outer layer is used on the sides that are physical boundary (none along
        an axis the grid makes periodic; edges and corners are never read). The values used
        must be finite.
    checkpoints : int, optional
        None (default): store all ``steps`` states for the reverse pass; but where every
        rank runs the host kernels of a 2-D grid and its states outgrow the core's caches,
        store the first state of each segment of steps whose states fill about twice the L2
        cache (the shortest segment any rank picks), and make the others again a segment at
        a time in the reverse pass (one more forward sweep and its halo exchanges instead of
        the states' trips to memory; the same bits); and where the states would fill more
        than half the memory available at the call (the host's, or the GPU's for device
        arrays, shared by the grid's ranks on it) on some rank, store as many as fit there on
        every rank, as ``k`` below (the same bits, more steps). ``k >= 1``:
        store at most ``k`` states (the initial one included) and recompute the others with
        binomial checkpointing; see :func:`recompute_steps`. Only kappa's cotangent reads
        the states: a gradient with respect to ``u0`` and ``f`` alone stores none.
    trajectory : bool
        Also return every state, shape ``(steps + 1, nx, ny[, nz])``.
    backend : {"numpy", "host", "cuda"}, optional
        Heat kernels; see :func:`gpumpiad.heat.kernels.kernels_for`
        (``GPUMPIAD_HEAT_KERNELS`` for NumPy arrays).

    Returns
    -------
    Tensor or (Tensor, Tensor)
        The final state ``u^steps`` (distributed, the patch's shape) and, with ``trajectory``, all
        states: new arrays, which no later solve writes to.

    Raises
    ------
    ValueError
        On every rank, for a bad ``dt``, ``h``, ``steps`` or ``checkpoints``, a shape, dtype or
        kind mismatch or a ``boundary`` holding NaN or Inf (naming the argument and the rank),
        when ranks pass different ``dt``, ``h``, ``steps``, ``checkpoints``, ``trajectory`` or
        dtypes, when ``u0``, ``kappa`` or ``f`` holds NaN or Inf or ``kappa`` a negative value
        on some rank (naming the ranks), or when ``dt > h**2 / (2 d max kappa)`` with ``d``
        the number of axes and the global maximum: the scheme is unstable. Also when ``grid``
        was freed or has neither 2 nor 3 axes.
    TypeError
        When ``grid`` is not a :class:`Grid`.

    Notes
    -----
    Reverse pass (gather form). With ``lam^n`` the cotangent of ``u^n`` and ``lam^steps`` the
    cotangent of the result,

    .. math::

        \\lambda^{n} = \\lambda^{n+1} + r\\,L(\\kappa \\odot \\lambda^{n+1}), \\qquad
        \\bar\\kappa \\mathrel{+}= r\\,\\lambda^{n+1} \\odot L(u^n), \\qquad
        \\bar f \\mathrel{+}= \\Delta t\\,\\lambda^{n+1},

    for ``n = steps-1 ... 0``, and ``u0_bar = lam^0`` (plus the trajectory's cotangents, added
    to ``lam^n`` on the way). Only the cotangents of the arguments being differentiated are
    accumulated: 64 bytes per cell and step (float64) for all three, 48 for kappa's alone, 40
    or fewer without kappa's. ``L(kappa * lam)`` reads ``lam^{n+1}`` and ``kappa`` in the
    ghost layer: a forward halo exchange of ``lam^{n+1}`` per step (``kappa`` once), zero on
    the physical boundary. This equals the scatter form, whose halo adjoint sends ghost
    cotangents back to their owners and adds them (:func:`gpumpiad.halo_exchange`). ``u^n``
    with its ghosts comes from the stored states or is recomputed from the nearest checkpoint.

    Examples
    --------
    >>> import numpy as np, gpumpiad
    >>> from gpumpiad.heat import Grid, solve
    >>> grid = Grid((24, 20))
    >>> x, y = grid.coordinates()
    >>> u0 = np.outer(np.sin(np.pi * x), np.sin(np.pi * y))
    >>> kappa, f = np.ones(grid.local_shape), np.zeros(grid.local_shape)
    >>> h = grid.h[0]
    >>> u = solve(u0, kappa, f, dt=0.2 * h * h, h=h, steps=10, grid=grid)
    >>> def loss(k):
    ...     u = solve(u0, k, f, 0.2 * h * h, h, 10, grid=grid, checkpoints=4)
    ...     return gpumpiad.mpi_sum((u * u).sum())
    >>> g = gpumpiad.grad(loss)(gpumpiad.tensor(kappa, distributed=True))
    >>> g.shape == grid.local_shape
    True

    In 3-D, the same call on a 3-D grid (7-point stencil, ``dt <= h**2 / (6 max kappa)``):

    >>> cube = gpumpiad.Grid((8, 6, 5))
    >>> ones = np.ones(cube.local_shape)
    >>> u3 = solve(ones, ones, 0 * ones, dt=0.1 * cube.h[0] ** 2, h=cube.h[0], steps=4,
    ...            grid=cube)
    >>> u3.shape == cube.local_shape
    True
    """
    if grid is None:
        grid = _own_grid(np.shape(u0.data if isinstance(u0, Tensor) else u0))
    check_grid(grid, "solve")
    if grid.ndim not in (2, 3):
        raise ValueError(f"rank {world().rank}: solve's grid must have 2 or 3 axes, got a "
                         f"{grid.ndim}-D grid of shape {grid.shape}")
    rank = world().rank
    args = [a if isinstance(a, Tensor) else asarray(a) for a in (u0, kappa, f)]
    raws = [a.data if isinstance(a, Tensor) else a for a in args]
    problem = _check_scalars(dt, h, steps, checkpoints, rank)
    if problem is None:
        problem = _check_arrays(grid, raws)
    kmin = kmax = settings = pads = None
    nonfinite, segment, capacity, where = (), 0, -1, 0
    if problem is None:
        dt, h, steps = float(dt), float(h), int(steps)
        checkpoints = None if checkpoints is None else int(checkpoints)
        # The halos of patches of different dtypes would not fill each other's buffers.
        settings = (dt, h, steps, checkpoints, bool(trajectory), _dtype_name(raws[0].dtype))
        try:
            kernels = kernels_for(raws[0], backend, ndim=grid.ndim)
            frame, ghosts = _frame(grid, boundary, raws[0])
        except (ValueError, TypeError) as exc:
            problem = f"rank {rank}: {exc}"
        if problem is None and kernels is hostkernels and grid.ndim == 2 and \
                checkpoints is None and not getattr(kernels, "ASYNCHRONOUS", False):
            segment = _segment_length(frame.nbytes, steps)
        if problem is None and checkpoints is None and active_tape() is not None:
            capacity, where = _state_capacity(frame, steps)
        if problem is None and (kernels is hostkernels or kernels is hostkernels3d
                                and hostkernels.available()) and \
                all(a.flags.c_contiguous for a in raws):
            # The padded copies the time loop needs, and the check's statistics, in one pass.
            pads = (_state_buffer(frame, ghosts), _pad_buffer(frame), _pad_buffer(frame))
            stats = [hostkernels.pad(a, p) for a, p in zip(raws, pads)]
            kmin, kmax = stats[1][:2]
            nonfinite = tuple(name for name, st in zip(_ARGUMENTS, stats) if st[2])
        else:
            xp = get_array_module(raws[1])
            kmin, kmax = float(xp.min(raws[1])), float(xp.max(raws[1]))
            nonfinite = tuple(name for name, a in zip(_ARGUMENTS, raws) if not all_finite(a))
    tape = active_tape()
    # Which arguments the reverse pass differentiates on this rank: only kappa's cotangent needs
    # the states u^n, only f's and kappa's are accumulated over the steps.
    wants = tuple(tape is not None and isinstance(a, Tensor) and a._tape is tape for a in args)
    reports = _reports(grid.cart, dict(problem=problem, kmin=kmin, kmax=kmax, kappa=wants[1],
                                       settings=settings, nonfinite=nonfinite,
                                       segment=segment, capacity=capacity, where=where))
    problems = [r["problem"] for r in reports if r["problem"] is not None]
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else
                         "; ".join(dict.fromkeys(problems)))
    # Ranks that disagree on the time loop would wait for each other's halos forever.
    if any(r["settings"] != settings for r in reports):
        for k, name in enumerate(("dt", "h", "steps", "checkpoints", "trajectory", "dtype")):
            values = [r["settings"][k] for r in reports]
            if any(v != values[0] for v in values):
                raise ValueError(f"rank {rank}: solve's {name} differs between ranks: "
                                 + ", ".join(f"rank {q}: {v!r}" for q, v in enumerate(values))
                                 + "; every rank must march the same time loop")
    if any(r["nonfinite"] for r in reports):
        holding = {name: [q for q, r in enumerate(reports) if name in r["nonfinite"]]
                   for name in _ARGUMENTS}
        raise ValueError(f"rank {rank}: " + "; ".join(
            f"{name} holds NaN or Inf on rank(s) {ranks}" for name, ranks in holding.items()
            if ranks) + ": expected finite values")
    negative = [q for q, r in enumerate(reports) if r["kmin"] < 0]
    if negative:
        lowest = min(negative, key=lambda q: reports[q]["kmin"])
        raise ValueError(f"rank {rank}: kappa holds negative values on rank(s) {negative} "
                         f"(min kappa = {reports[lowest]['kmin']!r} on rank {lowest}): expected "
                         "kappa >= 0 (a negative diffusivity makes the scheme blow up)")
    owner = max(range(len(reports)), key=lambda q: reports[q]["kmax"])
    kmax, limit = reports[owner]["kmax"], 2 * grid.ndim
    if kmax > 0 and dt > h * h / (limit * kmax):
        raise ValueError(
            f"rank {rank}: dt = {dt!r} exceeds the stability limit h**2 / ({limit} max kappa) "
            f"= {h * h / (limit * kmax)!r} of the {grid.ndim}-D scheme (h = {h!r}, "
            f"max kappa = {kmax!r} on rank {owner})")
    # Recomputing states from checkpoints exchanges halos: when any rank differentiates kappa,
    # every rank keeps (and recomputes) its states, so that they all exchange in step.
    keep_states = any(r["kappa"] for r in reports)
    # Making states again exchanges halos too: one segment length, or none, on every rank.
    segment = min(r["segment"] for r in reports) if keep_states else 0
    # States that some rank cannot hold: as many checkpoints as the tightest rank holds.
    if keep_states and not segment and checkpoints is None:
        fit = min(_states_that_fit(reports))
        if fit < steps:
            checkpoints = max(fit, 1)
    run = _Heat(grid, kernels, frame, ghosts, dt, h, steps, checkpoints, trajectory, wants,
                keep_states, retain=getattr(tape, "retain", False), recorded=tape is not None,
                pads=pads, segment=segment)
    layout = (DISTRIBUTED, DISTRIBUTED) if trajectory else DISTRIBUTED
    # The reverse pass reads the solver's own padded copies of the arguments, not the arrays.
    return CustomOp(run.forward, run.vjp, name="heat.solve", layout=layout,
                    reads_args=False)(*args)


@lru_cache(maxsize=8)
def _dtype_name(dtype):
    """``dtype.name``, which NumPy works out in Python on every read."""
    return np.dtype(dtype).name


def _reports(cart, report):
    """Every rank's argument ``report``: one allgather of numbers when every rank found its
    arguments sound and the ranks' settings agree, else of the pickled reports, whose texts
    the error messages quote. Every rank sees the same table, so all take the same way."""
    call = "heat.solve's argument check"
    settings = report["settings"]
    numbers = [report["problem"] is not None, math.nan, math.nan, report["kappa"],
               sum(1 << k for k, name in enumerate(_ARGUMENTS) if name in report["nonfinite"]),
               report["segment"], report["capacity"], report["where"]]
    if settings is not None and report["problem"] is None:
        dt, h, steps, checkpoints, trajectory, dtype = settings
        numbers[1:3] = report["kmin"], report["kmax"]
        numbers += [dt, h, steps, -1 if checkpoints is None else checkpoints, trajectory,
                    np.dtype(dtype).num]
    else:
        numbers += [math.nan] * 6
    table = control.allgather_floats(cart, numbers, call)
    agreed = table[:, 8:] == table[0, 8:]
    if table[:, 0].any() or not agreed.all():
        return control.allgather(cart, report, call)
    return [dict(problem=None, kmin=float(row[1]), kmax=float(row[2]), kappa=bool(row[3]),
                 settings=settings, nonfinite=tuple(
                     name for k, name in enumerate(_ARGUMENTS) if int(row[4]) >> k & 1),
                 segment=int(row[5]), capacity=int(row[6]), where=int(row[7]))
            for row in table]


def recompute_steps(steps, checkpoints):
    """Forward steps the reverse pass recomputes with ``checkpoints`` stored states.

    The binomial optimum (Griewank's ``r * steps - C(c + r, c + 1)`` with ``r`` the smallest
    integer such that ``C(c + r, c) >= steps``), less the steps the forward pass already took
    on its way to the first checkpoints.

    Examples
    --------
    >>> recompute_steps(100, 10), recompute_steps(100, 1)
    (125, 4950)
    """
    if checkpoints is None or steps <= 1:
        return 0
    return _cost(steps, checkpoints) - _spine(steps, checkpoints)[-1]


class _Heat:
    """One solve: the forward time loop, the states it keeps and the adjoint time loop."""

    def __init__(self, grid, kernels, frame, ghosts, dt, h, steps, checkpoints, trajectory,
                 wants, keep_states, retain=False, recorded=True, pads=None, segment=0):
        # ghosts: what the frame's ghost ring holds, comparable between solves (None: unknown).
        self.grid, self.kernels, self.frame, self.ghosts = grid, kernels, frame, ghosts
        self.dt, self.r, self.steps = dt, dt / (h * h), steps
        self.checkpoints, self.trajectory = checkpoints, trajectory
        # wants: (u0, kappa, f) differentiated on this rank. keep_states: kappa's cotangent, the
        # only one that reads the states, is wanted on some rank. retain: the reverse pass may
        # run again (a vjp's pullback), so it keeps the states.
        self.wants, self.keep_states, self.retain = wants, keep_states, retain
        shape = grid.local_shape
        rank = grid.cart.rank
        self.local = all(n in (MPI.PROC_NULL, rank) for n in grid.neighbours)
        # Overlapping the exchange with the interior pays where kernels run asynchronously (a
        # GPU) and halos travel between ranks. On the CPU, MPI makes no progress while a kernel
        # runs, and the thin boundary slabs cost more than the exchange hides; a patch that
        # borders no other rank keeps its halos on the device, with nothing to hide: exchange,
        # then one sweep.
        self.overlap = getattr(kernels, "ASYNCHRONOUS", False) and not self.local
        self.whole = tuple(b for n in shape for b in (1, n + 1))
        self.inner = self.ring = None
        if self.overlap:
            self.inner, self.ring = _inner_and_ring(shape, [n != MPI.PROC_NULL
                                                            for n in grid.neighbours])
        self.core = (slice(1, -1),) * len(shape)
        self.states = {}
        self.spare = None
        # Host, every state kept: the states u^1 ... u^steps in one array, and the data
        # addresses of u^0 ... u^steps (computed, not taken from each buffer).
        self.block = self.addresses = None
        # Host, every state wanted but more than the cache holds: steps per segment, whose
        # first state alone is kept and whose others the reverse pass makes again (0: none).
        self.segment = segment
        self.cells = math.prod(shape)
        # The host kernels' loops: arguments checked and converted once per solve, exchanges
        # through preposted persistent requests, and on a patch no other rank borders the
        # whole time loop in one call. recorded: a reverse pass may follow.
        self.host = kernels in (hostkernels, hostkernels3d) and not self.overlap
        self.recorded, self.pads = recorded, pads
        self.loop = self.halo = None
        self.wrap = tuple(self.local and grid.neighbours[2 * axis] == rank
                          for axis in range(grid.ndim))
        # A device solve runs on the library's compute stream; its halos move on the
        # communication stream through buffers made once per solve, as do those of a 3-D solve
        # off the host loops (the host loops exchange through halo.Persistent).
        self.device = is_device_array(frame)
        self.exchange = None
        if grid.ndim != 2 and not self.host:
            self.exchange = halo.PaddedExchange(grid, frame.shape, frame.dtype, self.device,
                                                kernels=kernels if self.device else None)
        elif self.device:
            self.exchange = halo.DeviceExchange(grid, frame.shape, frame.dtype, kernels)

    def forward(self, u0, kappa, f):
        with trace.span("heat.forward", trace.COMPUTE, payload=self.cells):
            if self.host:
                return self._forward_host(u0, kappa, f)
            xp = get_array_module(u0)
            traj = xp.empty((self.steps + 1,) + u0.shape, u0.dtype) if self.trajectory else None
            if not self.device:
                u = self._forward(u0, kappa, f, traj)
                out = self._outputs(u, traj)
            else:
                with streams.on_compute() as compute:
                    u = self._forward(u0, kappa, f, traj)
                out = self._outputs(u, traj)
                self._handed_out(compute)
            _recycle(u, self.ghosts)
            if not self.recorded:
                self._finished()
            return out

    def _finished(self):
        """No pass of this solve runs again: its exchange's requests and (host) its padded
        kappa and f go."""
        free = getattr(self.exchange, "free", None)
        if free is not None:
            free()
        if not self.device:
            for buf in (self.kappa, self.f):
                _recycle(buf, None)
        self.kappa = self.f = None

    @staticmethod
    def _handed_out(compute):
        """After the caller's stream copied what the compute stream made into the caller's
        memory: the compute stream's later work, whose pool gets the buffers back, is ordered
        after the copies."""
        streams.order(compute, streams.current_stream())

    def _outputs(self, u, traj):
        """The forward's outputs from the last padded state ``u``."""
        out = _interior(u)
        if traj is None:
            return out
        traj[self.steps] = out
        return out, traj

    def _forward(self, u0, kappa, f, traj):
        """The forward time loop; returns the last padded state (``traj``: every state's
        interior but the last's, written on the way)."""
        if self.pads is not None:
            # The padded copies solve made while it checked the arguments (host, 3-D).
            u, self.kappa, self.f = self.pads
            self.pads = None
        else:
            xp = get_array_module(u0)
            self.kappa = self._padded(kappa, self._field_buffer(xp))
            self.f = self._padded(f, self._field_buffer(xp))
            u = self._padded(u0, self._buffer())
        self._exchange(self.kappa).wait()
        keep = set()
        if self.keep_states:
            keep = (set(range(self.steps)) if self.checkpoints is None
                    else set(_spine(self.steps, self.checkpoints)))
        for n in range(self.steps):
            if traj is not None:
                traj[n] = u[self.core]
            nxt = self._buffer()
            self._step(u, nxt)
            if n in keep:
                self.states[n] = u
            else:
                self.spare = u
            u = nxt
        if not self.keep_states and self.spare is not None:
            _recycle(self.spare, self.ghosts)
            self.spare = None
        return u

    def vjp(self, g, ans, u0, kappa, f):
        with trace.span("heat.adjoint", trace.ADJOINT, payload=self.cells):
            if self.host:
                return self._vjp_host(g, u0, kappa, f)
            if not self.device:
                out = self._cotangents(self._vjp(g), u0, kappa, f)
            else:
                with streams.on_compute() as compute:
                    bars = self._vjp(g)
                out = self._cotangents(bars, u0, kappa, f)
                self._handed_out(compute)
            if not self.retain:
                self._finished()
            return out

    def _cotangents(self, bars, u0, kappa, f):
        """The cotangents of (u0, kappa, f) from the padded ``bars`` of the reverse loop."""
        return tuple(_interior(a).astype(x.dtype, copy=False) if want else None
                     for a, x, want in zip(bars, (u0, kappa, f), self.wants))

    def _vjp(self, g):
        """The reverse time loop; returns the padded cotangents (lambda^0, kappa_bar, f_bar)."""
        g_out, g_traj = g if self.trajectory else (g, None)
        xp = get_array_module(g_out)
        zeros = xp.zeros_like(self.frame)
        lam = zeros.copy()
        lam[self.core] = g_out
        if g_traj is not None:
            lam[self.core] += g_traj[self.steps]
        _, want_kappa, want_f = self.wants
        kappa_bar = zeros.copy() if want_kappa else None
        f_bar = zeros.copy() if want_f else None
        kept = {id(u) for u in self.states.values()} if self.retain else ()
        spare = zeros
        for n, u in self._reversed_states():
            lam_prev, spare = spare, None
            self._adjoint(lam, u, lam_prev, kappa_bar, f_bar)
            if u is not None and id(u) not in kept:
                _recycle(u, self.ghosts)
            if g_traj is not None:
                lam_prev[self.core] += g_traj[n]
            spare, lam = lam, lam_prev
        if not self.retain:
            self.states.clear()
        self.spare = None
        return lam, kappa_bar, f_bar

    def _field_buffer(self, xp):
        """A padded buffer for kappa or f, zero ghosts: a kept one on the host."""
        if self.device:
            return xp.zeros(self.frame.shape, self.frame.dtype)
        return _pad_buffer(self.frame)

    def _padded(self, interior, out):
        out[self.core] = interior
        return out

    def _buffer(self):
        buf, self.spare = self.spare, None
        if buf is not None:
            return buf
        if self.host:
            return _state_buffer(self.frame, self.ghosts)
        buf = _reuse(self.frame, self.ghosts)
        return self.frame.copy() if buf is None else buf

    def _step(self, u, u_new, exchange=True):
        """``u_new = step(u)`` on the interior; fills ``u``'s ghosts first unless told not to."""
        with trace.span("heat.step", trace.COMPUTE, payload=self.cells):
            self._sweep(self.kernels.step, u, (self.kappa, self.f, u_new, self.r, self.dt),
                        exchange)

    def _adjoint(self, lam_next, u, lam, kappa_bar, f_bar):
        with trace.span("heat.adjoint_step", trace.ADJOINT, payload=self.cells):
            self._sweep(self.kernels.adjoint, lam_next,
                        (self.kappa, u, lam, kappa_bar, f_bar, self.r, self.dt))

    # -- the host kernels' loops ----------------------------------------------------------

    def _forward_host(self, u0, kappa, f):
        if self.pads is not None:
            u, self.kappa, self.f = self.pads
            self.pads = None
        else:
            u = self._padded(u0, _state_buffer(self.frame, self.ghosts))
            self.kappa = self._padded(kappa, _pad_buffer(self.frame))
            self.f = self._padded(f, _pad_buffer(self.frame))
        loop = hostkernels.Loop if self.grid.ndim == 2 else hostkernels3d.Loop
        self.loop = loop(self.kappa, self.f, self.r, self.dt, self.wrap)
        if not self.local:
            self.halo = halo.Persistent(self.grid, self.frame.dtype)
        self._fill(self.kappa)
        states, free = [u], []
        if self.keep_states and self.checkpoints is None and self.steps and not self.segment:
            # A buffer per state, taken and returned one by one, cost a tenth of a 128²
            # gradient: one block, returned whole (_release).
            block = self.block = _state_block(self.frame, self.ghosts, self.steps)
            states.extend(block)
            self.states = dict(enumerate(states[:-1]))
            first, stride = block.ctypes.data, block.strides[0]
            self.addresses = [u.ctypes.data, *range(first, first + self.steps * stride, stride)]
        else:
            keep = set()
            if self.segment:
                keep = set(range(0, self.steps, self.segment))
            elif self.keep_states and self.checkpoints is not None:
                keep = set(_spine(self.steps, self.checkpoints))
            # The states in order: each kept one in its own buffer, written by the step before
            # it (no copy), the others in two buffers in turn.
            for n in range(self.steps):
                nxt = free.pop() if free and n + 1 not in keep else self._buffer()
                states.append(nxt)
                if n in keep:
                    self.states[n] = states[n]
                else:
                    free.append(states[n])
        traj = None
        if self.trajectory:
            traj = np.empty((self.steps + 1,) + u0.shape, u0.dtype)
        self._run(states, 0, traj, self.addresses)
        out = _interior(states[-1])
        _recycle(states[-1], self.ghosts)
        if self.keep_states and free:
            self.spare = free.pop()
        for buf in free:
            _recycle(buf, self.ghosts)
        if not self.recorded:
            self._release()
        if traj is None:
            return out
        traj[self.steps] = out
        return out, traj

    def _run(self, states, first, traj=None, addresses=None):
        """``states[k + 1] = step(states[k])`` for every ``k``, each state's ghosts filled
        before it is read (those of ``states[0]`` from ``first`` on: 0 fills them, 1 takes
        them as filled); the last state's ghosts are filled too, unless ``traj`` (every
        state's interior, written on the way) is given. ``addresses``: the states' data
        addresses, when known."""
        loop, steps = self.loop, len(states) - 1
        with trace.span("heat.steps", trace.COMPUTE, payload=self.cells * steps):
            if self.local and traj is None:
                loop.steps(states if addresses is None else addresses)
                return
            exchange = self.halo.exchange if self.halo is not None else loop.wrap
            for k in range(steps):
                if k >= first:
                    exchange(states[k])
                if traj is not None:
                    traj[k] = states[k][self.core]
                loop.step(states[k], states[k + 1])
            if traj is None:
                exchange(states[-1])

    def _fill(self, a):
        """Fill ``a``'s ghosts from the neighbours (host loops)."""
        if self.halo is not None:
            self.halo.exchange(a)
        else:
            self.loop.wrap(a)

    def _advance_host(self, u, a, b):
        """:meth:`_advance` by the host loops."""
        states = [u]
        for n in range(a, b):
            states.append(self._buffer() if n < a + 2 else states[-2])
        with trace.span("heat.recompute", trace.COMPUTE, payload=self.cells * (b - a)):
            self._run(states, 1)
        if b - a >= 2:
            if self.spare is not None:
                _recycle(self.spare, self.ghosts)
            self.spare = states[-2]
        return states[-1]

    def _vjp_host(self, g, u0, kappa, f):
        g_out, g_traj = g if self.trajectory else (g, None)
        lam = _pad_buffer(self.frame)
        lam[self.core] = g_out
        if g_traj is not None:
            lam[self.core] += g_traj[self.steps]
        _, want_kappa, want_f = self.wants
        kappa_bar = _zeroed(self.frame) if want_kappa else None
        f_bar = _zeroed(self.frame) if want_f else None
        kept = {id(u) for u in self.states.values()} if self.retain else ()
        spare = _pad_buffer(self.frame)
        loop, exchange = self.loop, self.halo.exchange if self.halo is not None else None
        batch = self._adjoints_host(lam, spare, kappa_bar, f_bar, g_traj, kept)
        if batch is not None:
            lam, spare = batch
        for n, u in (() if batch is not None else self._reversed_states()):
            lam_prev, spare = spare, None
            if exchange is not None:
                exchange(lam)
            loop.adjoint(lam, u, lam_prev, kappa_bar, f_bar)
            if u is not None and id(u) not in kept:
                loop.forget(u)      # its cached address would keep it alive
                _recycle(u, self.ghosts)
            if g_traj is not None:
                lam_prev[self.core] += g_traj[n]
            spare, lam = lam, lam_prev
        if not self.retain:
            self.states.clear()
        if self.spare is not None:
            _recycle(self.spare, self.ghosts)
            self.spare = None
        grads = tuple(_interior(a).astype(x.dtype, copy=False) if want else None
                      for a, x, want in zip((lam, kappa_bar, f_bar), (u0, kappa, f),
                                            self.wants))
        for buf in (lam, spare, kappa_bar, f_bar):
            if buf is not None:
                _recycle(buf, None)
        if not self.retain:
            self._release()
        return grads

    def _adjoints_host(self, lam, spare, kappa_bar, f_bar, g_traj, kept):
        """The whole reverse loop in one host call where no halo is exchanged and no state is
        recomputed; ``(lam^0's buffer, the other)``, or None where the loop runs step by
        step."""
        if not self.local or (self.keep_states and self.checkpoints is not None):
            return None
        traj = None
        if g_traj is not None:
            if type(g_traj) is not np.ndarray or g_traj.dtype != self.frame.dtype:
                return None
            traj = np.ascontiguousarray(g_traj)
        if self.segment:
            last = self._segmented_adjoints(lam, spare, kappa_bar, f_bar, traj, kept)
            return last, (spare if last is lam else lam)
        states = self.steps
        if self.addresses is not None:
            states = self.addresses[:-1]
        elif self.keep_states:
            states = [self.states[n] for n in range(self.steps)]
        with trace.span("heat.adjoint_steps", trace.ADJOINT, payload=self.cells * self.steps):
            last = self.loop.adjoints(lam, spare, states, kappa_bar, f_bar, traj)
        if self.keep_states and self.block is None:
            for u in states:
                if id(u) not in kept:
                    _recycle(u, self.ghosts)
        elif self.block is not None and not self.retain:
            _recycle(self.states[0], self.ghosts)   # u^0's own buffer; the block goes whole
        return last, (spare if last is lam else lam)

    def _segmented_adjoints(self, lam, spare, kappa_bar, f_bar, traj, kept):
        """The reverse loop one segment at a time, the last first: the segment's states made
        again from its kept first one into one block, then its adjoint steps in one call;
        returns the buffer that holds lam^0. Same bits as from stored states."""
        loop = self.loop
        for a, b, states in self._segments_made_again(self.states.__getitem__, loop.steps,
                                                       addresses=True):
            with trace.span("heat.adjoint_steps", trace.ADJOINT, payload=self.cells * (b - a)):
                last = loop.adjoints(lam, spare, states, kappa_bar, f_bar,
                                     None if traj is None else traj[a:b + 1])
            if last is not lam:
                lam, spare = spare, lam
            if id(states[0]) not in kept:
                _recycle(states[0], self.ghosts)
        return lam

    def _segments_made_again(self, take, make, addresses=False):
        """``(a, b, states)`` for each segment of steps ``a .. b-1``, the last first:
        ``states`` is u^a (``take(a)``) and the segment's other states, made again by
        ``make(states)`` into one block (their data addresses, given ``addresses``) that goes
        back to the kept buffers after the last segment."""
        k = self.segment
        block = _state_block(self.frame, self.ghosts, k - 1)
        if addresses:
            first, stride = block.ctypes.data, block.strides[0]
            made = list(range(first, first + (k - 1) * stride, stride))
        else:
            made = list(block)
        for a in range(k * ((self.steps - 1) // k), -1, -k):
            b = min(a + k, self.steps)
            states = [take(a), *made[:b - a - 1]]
            if b - a > 1:
                with trace.span("heat.recompute", trace.COMPUTE,
                                payload=self.cells * (b - a - 1)):
                    make(states)
            yield a, b, states
        _recycle(block, self.ghosts)

    def _segments_reversed(self, take):
        """:meth:`_reversed_states` by segments (host loops, halos exchanged while the states
        are made again)."""
        for a, b, states in self._segments_made_again(take, lambda s: self._run(s, 1)):
            for n in range(b - 1, a - 1, -1):
                yield n, states[n - a]

    def _release(self):
        """Return the padded kappa and f (and the block of states) to the kept buffers and free
        the persistent requests: no pass of this solve reads them again."""
        for buf in (self.kappa, self.f):
            _recycle(buf, None)
        self.kappa = self.f = self.loop = None
        if self.block is not None:
            _recycle(self.block, self.ghosts)
            self.states.clear()
            self.block = self.addresses = None
        if self.halo is not None:
            self.halo.free()
            self.halo = None

    def _sweep(self, kernel, a, args, exchange=True):
        """``kernel(a, *args, *rect)`` over the interior once ``a``'s ghosts are filled (unless
        ``exchange`` is False): exchange, then one sweep; or, overlapped, the cells that read
        no exchanged ghost while the halos travel, then the rest."""
        if not exchange:
            kernel(a, *args, *self.whole)
            return
        if not self.overlap:
            self._exchange(a).wait()
            kernel(a, *args, *self.whole)
            return
        if self.exchange is not None:
            # The interior is queued before the host waits for anything (the packing of a's
            # boundary cells, which the previous step wrote last).
            self.exchange.post(a)
            kernel(a, *args, *self.inner)
            self.exchange.finish(a)
        else:
            pending = self._exchange(a)
            kernel(a, *args, *self.inner)
            pending.wait()
        for rect in self.ring:
            kernel(a, *args, *rect)

    def _exchange(self, a):
        """Start filling ``a``'s ghosts. Unverified: solve compared the dtypes across ranks, and
        the grid fixes every message's size."""
        if self.exchange is not None:
            self.exchange.post(a)
            return halo.Posted(self.exchange, a)
        return halo.start(a, self.grid, kernels=self.kernels, verify=False)

    def _advance(self, u, a, b):
        """``u^b`` from ``u^a`` (ghosts filled), in a new buffer with its ghosts filled."""
        if self.host:
            return self._advance_host(u, a, b)
        cur = u
        for n in range(a, b):
            nxt = self._buffer()
            self._step(cur, nxt, exchange=n != a)
            if cur is not u:
                self.spare = cur
            cur = nxt
        self._exchange(cur).wait()
        return cur

    def _reversed_states(self):
        """``(n, u^n)`` with ghosts filled, for ``n = steps-1 ... 0`` (``u^n`` None when no
        rank wants kappa's cotangent, the only one that reads the states)."""
        take = self.states.get if self.retain else self.states.pop
        if not self.keep_states:
            for n in range(self.steps - 1, -1, -1):
                yield n, None
            return
        if self.segment:
            yield from self._segments_reversed(take)
            return
        if self.checkpoints is None:
            for n in range(self.steps - 1, -1, -1):
                yield n, take(n)
            return
        # Revolve with an explicit stack: an entry (a, b, c, u^a) reverses steps a..b-1
        # holding u^a and at most c - 1 further states.
        stack = [(0, self.steps, self.checkpoints, take(0))] if self.steps else []
        while stack:
            a, b, c, ua = stack.pop()
            if b - a == 1:
                yield a, ua
            elif c == 1:
                for n in range(b - 1, a, -1):
                    yield n, self._advance(ua, a, n)
                yield a, ua
            else:
                m = a + _split(b - a, c)
                um = take(m) if m in self.states else self._advance(ua, a, m)
                stack.append((a, m, c, ua))
                stack.append((m, b, c - 1, um))


@lru_cache(maxsize=None)
def _cost(t, c):
    """Fewest forward steps to reverse ``t`` steps holding at most ``c`` states."""
    if t <= 1:
        return 0
    r = 0
    while math.comb(c + r, c) < t:
        r += 1
    return r * t - math.comb(c + r, c + 1)


@lru_cache(maxsize=None)
def _split(t, c):
    """A first checkpoint position that attains :func:`_cost` (``c >= 2``, ``t >= 2``)."""
    best = _cost(t, c)
    for m in range(t - 1, 0, -1):
        if m + _cost(t - m, c - 1) + _cost(m, c) == best:
            return m
    raise AssertionError(f"no optimal split for t={t}, c={c}")


def _inner_and_ring(shape, exchanged):
    """The cells a step may update before its halos arrive (a box ``(i0, i1, j0, j1, ...)``)
    and the rest (a list of boxes, each cell once: the adjoint accumulates). ``exchanged``:
    per side (``-x, +x, -y, +y, ...``), whether its ghosts come from a neighbour; a physical
    boundary's ghosts are fixed, so the cells beside it need not wait."""
    inner = []
    for axis, n in enumerate(shape):
        lo = 2 if exchanged[2 * axis] else 1
        hi = n if exchanged[2 * axis + 1] else n + 1
        inner.append((lo, max(lo, hi)))
    # Peel the slabs off axis by axis: each spans the axes not yet peeled in full.
    rest, ring = [(1, n + 1) for n in shape], []
    for axis, (lo, hi) in enumerate(inner):
        for a, b in ((rest[axis][0], lo), (hi, rest[axis][1])):
            if a < b:
                box = list(rest)
                box[axis] = (a, b)
                if all(p < q for p, q in box):
                    ring.append(tuple(v for pair in box for v in pair))
        rest[axis] = (lo, hi)
    return tuple(v for pair in inner for v in pair), ring


def _segment_length(state_bytes, steps):
    """Steps per segment of a host reverse pass that makes its states again, or 0: keep them
    all. States kept beyond eight times the core's L2 cache go to memory or the shared cache
    and come back from it at more cost than one more forward sweep; segments of states that
    fill about twice the L2 cache measured fastest (``bench/results/heat_kernels_cpu.md``)."""
    l2 = _l2_cache()
    if steps * state_bytes <= 8 * l2:
        return 0
    length = round(2 * l2 / state_bytes)
    return length if length >= 2 else 0


# A reverse pass holds besides its states a few fields (lam, its spare, the cotangents, the
# padded kappa and f, states being made again): kept free of the states' share of memory.
_WORKING_FIELDS = 8
# Smaller reverse passes do not ask how much memory is left (a read of /proc per solve).
_MEMORY_CHECK_BYTES = 64 << 20


def _state_capacity(frame, steps):
    """``(states, where)``: how many states like ``frame`` besides the working fields fit in
    half the memory available now (the host's, or the device's for a device frame), or -1
    where the reverse pass is too small to ask or the memory cannot be told; and a number
    naming that memory (host, or host and device), equal on the ranks that share it."""
    device = is_device_array(frame)
    where = _memory_name(device, streams.current_device() if device else None)
    if (steps + 1 + _WORKING_FIELDS) * frame.nbytes < _MEMORY_CHECK_BYTES:
        return -1, where
    available = _available_memory(device)
    if available is None:
        return -1, where
    return max(available // 2 // frame.nbytes - _WORKING_FIELDS, 0), where


def _states_that_fit(reports):
    """Per rank of ``reports``, the states it may keep with its memory's share among the ranks
    that report the same memory (a large number where it did not ask)."""
    sharing = {}
    for r in reports:
        sharing[r["where"]] = sharing.get(r["where"], 0) + 1
    return [(r["capacity"] + _WORKING_FIELDS) // sharing[r["where"]] - _WORKING_FIELDS
            if r["capacity"] >= 0 else 1 << 62 for r in reports]


@lru_cache(maxsize=None)
def _memory_name(device, ordinal):
    """A 32-bit number for this host, or for this host's GPU ``ordinal`` (its PCI bus id where
    CuPy tells it: ranks that see one GPU under different ordinals share it)."""
    name = socket.gethostname()
    if device:
        import cupy
        try:
            name += "/" + cupy.cuda.Device(ordinal).pci_bus_id
        except (AttributeError, RuntimeError):
            name += f"/{ordinal}"
    return zlib.crc32(name.encode())


def _available_memory(device):
    """Bytes this process may still allocate: the current device's free memory and its
    CuPy pool's cached blocks, or the host's available memory; None where unknown."""
    if device:
        import cupy
        free, _ = cupy.cuda.runtime.memGetInfo()
        return free + cupy.get_default_memory_pool().free_bytes()
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=None)
def _l2_cache():
    """This core's L2 data cache in bytes, from sysfs (1 MiB where it cannot be read)."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = [e for e in os.listdir(root) if e.startswith("index")]
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "level")) as level:
                if level.read().strip() != "2":
                    continue
            with open(os.path.join(root, entry, "type")) as kind:
                if kind.read().strip() == "Instruction":
                    continue
            with open(os.path.join(root, entry, "size")) as size:
                text = size.read().strip()
            scale = {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
            return int(text[:-1] if scale else text) << scale
        except (OSError, ValueError):
            continue
    return 1 << 20


def _spine(steps, checkpoints):
    """The states the forward pass keeps: the first sweep of revolve."""
    positions, a, c = [0], 0, checkpoints
    while c > 1 and steps - a > 1:
        a += _split(steps - a, c)
        positions.append(a)
        c -= 1
    return positions


def _own_grid(shape):
    if len(shape) not in (2, 3):
        raise ValueError(f"rank {world().rank}: u0 must be 2-D or 3-D, got shape {shape}")
    if shape not in _self_grids:
        _self_grids[shape] = Grid(shape, Comm(MPI.COMM_SELF))
    return _self_grids[shape]


def _check_scalars(dt, h, steps, checkpoints, rank):
    """This rank's complaint about the scalar arguments, or None."""
    for name, value in (("dt", dt), ("h", h)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) or \
                not value > 0 or not math.isfinite(value):
            return f"rank {rank}: {name} must be a positive number, got {value!r}"
    if not is_int(steps) or steps < 0:
        return f"rank {rank}: steps must be a non-negative int, got {steps!r}"
    if checkpoints is not None and (not is_int(checkpoints) or checkpoints < 1):
        return f"rank {rank}: checkpoints must be None or an int >= 1, got {checkpoints!r}"
    return None



def _interior(a):
    """A new array holding the interior of padded ``a``. Every array a solve hands out is made
    here: ``a`` may be a state buffer the next solve reuses, and the interior of a one-row
    patch is contiguous, so a mere ``ascontiguousarray`` would hand out the buffer itself.
    A large host one comes from the communication results' pool (memory of an earlier result
    nothing refers to any more): a 2048² gradient's outputs otherwise fault 130 MB of new
    pages in on every call."""
    core = a[(slice(1, -1),) * a.ndim]
    if type(a) is not np.ndarray:
        return core.copy()
    out = transport.host_empty(core.shape, core.dtype)
    np.copyto(out, core)
    return out


def _by(values):
    return "x".join(str(v) for v in values)


def _check_arrays(grid, raws):
    """This rank's complaint about the arrays, or None."""
    rank = world().rank
    for name, a in zip(_ARGUMENTS, raws):
        if tuple(a.shape) != grid.local_shape:
            return (f"rank {rank}: {name} must be this rank's patch of shape {grid.local_shape} "
                    f"(grid {_by(grid.shape)} over {_by(grid.dims)} patches), got shape "
                    f"{tuple(a.shape)}")
        if np.dtype(a.dtype) not in _FLOATS:
            return f"rank {rank}: {name} must be float32 or float64, got {a.dtype}"
        if a.dtype != raws[0].dtype:
            return f"rank {rank}: {name} has dtype {a.dtype}, expected u0's {raws[0].dtype}"
        if is_device_array(a) != is_device_array(raws[0]):
            return (f"rank {rank}: {name} is a {type(a).__module__.split('.')[0]} array, "
                    f"expected u0's kind, {type(raws[0]).__module__.split('.')[0]}")
    return None


# State buffers freed by a reverse pass, kept for the next solve of the same shape: a fresh
# buffer per stored step costs its page faults, which cost more than the step itself. Each is
# kept with the description of its ghost ring's values (see _frame). A device buffer is kept
# only once the compute stream, the only one that reuses it, is ordered after its last use. No
# array a solve hands out is one of them (_interior).
_free = {}                 # (shape, dtype, array type) -> [(buffer, ghosts)]
_free_bytes = {"n": 0, "limit": 1 << 30}
_free_lock = threading.Lock()


def set_buffer_cache(nbytes):
    """Keep at most ``nbytes`` of freed state buffers in this process for later solves; return
    the previous limit (default 1 GiB).

    A gradient stores the solve's states, and its reverse pass frees them. Buffers kept for the
    next solve of the same shape, dtype and array kind spare it the page faults of new memory
    (host) or the allocator (device): repeated gradients in an optimisation loop whose states
    exceed the limit run faster with a larger one. ``0`` releases every kept buffer now.

    Examples
    --------
    >>> from gpumpiad.heat import set_buffer_cache
    >>> previous = set_buffer_cache(0)        # release the kept buffers
    >>> set_buffer_cache(previous)
    0
    """
    if not is_int(nbytes) or nbytes < 0:
        raise ValueError(f"rank {world().rank}: set_buffer_cache needs a number of bytes >= 0, "
                         f"got {nbytes!r}")
    with _free_lock:
        previous, _free_bytes["limit"] = _free_bytes["limit"], int(nbytes)
        for bucket in _free.values():
            while bucket and _free_bytes["n"] > _free_bytes["limit"]:
                _free_bytes["n"] -= bucket.pop()[0].nbytes
    return previous


def _kind(a):
    return a.shape, a.dtype, type(a)


def _recycle(u, ghosts):
    if u.base is not None and _staggered.get(id(u)) is not u:
        # Only a buffer that owns its memory is kept: a state in a block goes back with its
        # block, and a view's memory may still be its owner's.
        return
    with _free_lock:
        if _free_bytes["n"] + u.nbytes <= _free_bytes["limit"]:
            _free.setdefault(_kind(u), []).append((u, ghosts))
            _free_bytes["n"] += u.nbytes


# Host buffers of fields of 128 KiB and more start at staggered offsets from a page boundary:
# the kernels stream through several fields at once, and fields whose addresses agree in their
# low 12 bits make loads wait on stores to other fields (4K aliasing), and NumPy's large arrays
# mostly start within a cache line of each other modulo a page. A 128² host forward took 5-14 %
# less time, its gradient 6-10 % (bench/results/heat_kernels_cpu.md).
_STAGGER_BYTES = 704           # 11 cache lines: 64 offsets before one comes again
_STAGGER_MIN_BYTES = 128 << 10
_stagger_next = [0]
_staggered = weakref.WeakValueDictionary()   # id -> a buffer _host_buffer made


def _host_buffer(shape, dtype, count=None):
    """An uninitialised C-contiguous host array of ``shape``, or with ``count`` a block of
    ``count`` of them (``buf[k]``), each starting at its own staggered offset."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    lead = () if count is None else (count,)
    if nbytes < _STAGGER_MIN_BYTES:
        return np.empty(lead + tuple(shape), dtype)
    # Consecutive buffers of a block _STAGGER_BYTES apart modulo a page.
    stride = nbytes + (_STAGGER_BYTES - nbytes) % 4096
    raw = np.empty((count or 1) * stride + 2 * 4096, np.uint8)
    with _free_lock:
        offset = _stagger_next[0]
        _stagger_next[0] = (offset + _STAGGER_BYTES) % 4096
        start = (-raw.ctypes.data) % 4096 + offset
        rows = raw[start:start + (count or 1) * stride].reshape(-1, stride)[:, :nbytes]
        buf = rows.view(dtype).reshape(lead + tuple(shape))
        _staggered[id(buf)] = buf
    return buf


def _state_buffer(frame, ghosts):
    """A host state buffer with ``frame``'s ghost ring: a kept one, or a new one whose
    interior the caller writes (no copy of ``frame``'s)."""
    buf = _reuse(frame, ghosts)
    if buf is None:
        buf = _host_buffer(frame.shape, frame.dtype)
        _copy_ghosts(buf, frame)
    return buf


@lru_cache(maxsize=None)
def _faces(ndim):
    """Indices of the outer layer of a padded ``ndim``-D array, one per side."""
    return tuple((slice(None),) * axis + (end,) for axis in range(ndim) for end in (0, -1))


def _copy_ghosts(buf, frame):
    """``frame``'s ghost ring into ``buf``, or into each buffer of a block (leading axes)."""
    lead = (slice(None),) * (buf.ndim - frame.ndim)
    for face in _faces(frame.ndim):
        buf[lead + face] = frame[face]


def _pad_buffer(frame):
    """A host buffer shaped like ``frame`` with a zero ghost ring, interior unset."""
    buf = _take(_kind(frame))[0]
    if buf is None:
        buf = _host_buffer(frame.shape, frame.dtype)
    for face in _faces(frame.ndim):
        buf[face] = 0
    return buf


def _zeroed(frame):
    """A host buffer shaped like ``frame``, all zeros."""
    buf = _pad_buffer(frame)
    buf[(slice(1, -1),) * frame.ndim] = 0
    return buf


def _take(kind):
    """A kept ``(buffer, ghosts)`` of ``kind`` (:func:`_kind`), or ``(None, None)``."""
    with _free_lock:
        bucket = _free.get(kind)
        if not bucket:
            return None, None
        buf, written = bucket.pop()
        _free_bytes["n"] -= buf.nbytes
    return buf, written


def _reuse(frame, ghosts):
    """A cached buffer shaped like ``frame`` with ``frame``'s ghost ring, or ``None``. The ring
    is rewritten unless the buffer's came from a frame with the same ``ghosts`` (not None):
    the strided columns of a small patch cost a third of its step."""
    buf, written = _take(_kind(frame))
    if buf is not None and (ghosts is None or written != ghosts):
        _copy_ghosts(buf, frame)
    return buf


def _state_block(frame, ghosts, count):
    """``count`` host state buffers in one array (``block[k]``), each with ``frame``'s ghost
    ring: a kept block (ring rewritten as in :func:`_reuse`) or a new one."""
    shape = (count,) + frame.shape
    block, written = _take((shape, frame.dtype, np.ndarray))
    if block is None:
        block = _host_buffer(frame.shape, frame.dtype, count)
    if ghosts is None or written != ghosts:
        _copy_ghosts(block, frame)
    return block


# Frames of constant boundaries on the host, which solves only read: a solve would otherwise
# spend a pass over a new array on its frame. Only frames up to _FRAME_CACHE_BYTES are kept,
# so that a large patch's frame does not outlive its solve.
_frames = {}
_FRAME_CACHE_BYTES = 64 << 20


def _frame(grid, boundary, like):
    """A padded array with the Dirichlet values in the physical-boundary ghosts and zeros
    elsewhere, and a hashable description of those ghosts for a constant ``boundary`` (None
    otherwise). Exchanged ghosts are always overwritten before they are read; corners are
    never read."""
    nbytes = math.prod(grid.padded_shape) * np.dtype(like.dtype).itemsize
    if isinstance(boundary, Real) and not isinstance(boundary, (bool, np.bool_)) and \
            not is_device_array(like) and nbytes <= _FRAME_CACHE_BYTES:
        key = (grid.padded_shape, tuple(grid.physical), float(boundary),
               np.dtype(like.dtype))
        found = _frames.get(key)
        if found is None:
            found = _make_frame(grid, boundary, like)
            found[0].flags.writeable = False
            if len(_frames) >= 16:
                _frames.clear()
            _frames[key] = found
        return found
    return _make_frame(grid, boundary, like)


def _make_frame(grid, boundary, like):
    """:func:`_frame`'s padded array, built where ``like`` lives (no host copy of a device
    frame): only the physical sides' ghost values are computed on the host."""
    shape, ndim = grid.local_shape, grid.ndim
    dtype = np.dtype(like.dtype)
    # Each side's ghost layer without edges and corners, which no stencil reads.
    sides = [tuple(end if b == axis else slice(1, n + 1) for b, n in enumerate(shape))
             for axis in range(ndim) for end in (0, shape[axis] + 1)]
    variables = "x, y" if ndim == 2 else "x, y, z"
    if isinstance(boundary, Real) and not isinstance(boundary, (bool, np.bool_)):
        if not math.isfinite(boundary):
            raise ValueError(f"boundary must be a finite number, got {boundary!r}")
        constant = np.float64(boundary)

        def side(index):
            return constant
        what = f"boundary {boundary!r} gives"
    elif callable(boundary):
        coords = grid.coordinates(ghosts=True)

        def side(index):
            # Coordinate arrays that broadcast to the side's ghost layer (one cell thick).
            axes = [np.atleast_1d(c[i]) for c, i in zip(coords, index)]
            full = tuple(a.size for a in axes)
            got = np.asarray(boundary(*(a.reshape([-1 if b == k else 1 for b in range(ndim)])
                                        for k, a in enumerate(axes))))
            try:
                values = np.broadcast_to(got.astype(float), full)
            except (TypeError, ValueError):
                values = None
            if values is None or got.dtype.kind not in "biuf":
                raise ValueError(f"boundary function g({variables}) must return real numbers "
                                 f"broadcastable to the shape of its arguments' product (it is "
                                 f"called on each physical side's ghost cells, here "
                                 f"{_by(full)}), got {got.dtype} of shape {got.shape}")
            return values.reshape(-1)
        what = f"boundary function g({variables}) returned"
    else:
        values = np.asarray(boundary.get() if is_device_array(boundary) else boundary)
        if values.shape != grid.padded_shape or values.dtype.kind not in "biuf":
            raise ValueError(f"boundary must be a number, a function g({variables}) or a real "
                             f"array of this rank's padded shape {grid.padded_shape}, got "
                             f"{type(boundary).__name__} of shape {values.shape} and dtype "
                             f"{values.dtype}")

        def side(index):
            return values[index]
        what = "boundary array holds"
    xp = get_array_module(like)
    frame = xp.zeros(grid.padded_shape, dtype)
    bad = []
    for name, index, physical in zip(_SIDES[ndim], sides, grid.physical):
        if physical:
            with np.errstate(over="ignore", invalid="ignore"):
                ring = np.array(side(index), dtype=dtype)
                if ring.ndim:
                    ring = ring.reshape(frame[index].shape)
            if not np.isfinite(ring).all():
                bad.append(name)
            frame[index] = ring if xp is np else xp.asarray(ring)
    if bad:
        coords = grid.coordinates(ghosts=True)
        extent = ", ".join(f"{v} in [{c[0]:.6g}, {c[-1]:.6g}]"
                           for v, c in zip(variables.split(", "), coords))
        raise ValueError(f"{what} NaN or Inf in the ghost cells of this rank's physical "
                         f"boundary (side(s) {', '.join(bad)}; patch {extent}; as "
                         f"{frame.dtype}): expected finite Dirichlet values")
    ghosts = (float(boundary), tuple(grid.physical)) if isinstance(boundary, Real) else None
    return frame, ghosts
