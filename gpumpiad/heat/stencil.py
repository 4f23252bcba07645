"""Array-slicing reference for the heat-equation kernels in ``kernels/heat.cu``.

Works unchanged on NumPy and CuPy arrays (only array methods and slicing are
used).  Every field is a C-contiguous ``(nx+2, ny+2)`` padded array whose ring
holds ghost cells; the compute functions only write the interior
sub-rectangle ``[i0, i1) x [j0, j1)`` (``1 <= i0 <= i1 <= nx+1``, same for
``j``) of their outputs.  The summation order matches the CUDA/host kernels.
"""

from __future__ import annotations

__all__ = ["interior", "step", "adjoint", "grads", "pack", "unpack", "wrap", "halo_length"]

#: Index of the interior cells of a padded array.
interior = (slice(1, -1), slice(1, -1))

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3


def check_rect(nx, ny, i0, i1, j0, j1):
    """Validate an interior sub-rectangle ``[i0, i1) x [j0, j1)`` of an ``nx x ny`` patch."""
    i0, i1, j0, j1 = (int(v) for v in (i0, i1, j0, j1))
    if not (1 <= i0 <= i1 <= nx + 1):
        raise ValueError(f"need 1 <= i0 <= i1 <= nx+1 = {nx + 1}, got i0={i0}, i1={i1}")
    if not (1 <= j0 <= j1 <= ny + 1):
        raise ValueError(f"need 1 <= j0 <= j1 <= ny+1 = {ny + 1}, got j0={j0}, j1={j1}")
    return i0, i1, j0, j1


def _lap(a, i0, i1, j0, j1):
    """5-point Laplacian numerator of ``a`` on ``[i0, i1) x [j0, j1)``."""
    return (
        a[i0 + 1 : i1 + 1, j0:j1]
        + a[i0 - 1 : i1 - 1, j0:j1]
        + a[i0:i1, j0 + 1 : j1 + 1]
        + a[i0:i1, j0 - 1 : j1 - 1]
        - 4 * a[i0:i1, j0:j1]
    )


def step(u, kappa, f, u_new, r, dt, i0, i1, j0, j1):
    """Forward explicit Euler step on an interior sub-rectangle.

    ``u_new = u + r*kappa*lap(u) + dt*f`` on ``[i0, i1) x [j0, j1)``.

    Parameters
    ----------
    u, kappa, f : array, shape (nx+2, ny+2)
        State (ghosts filled), diffusivity, source.
    u_new : array, shape (nx+2, ny+2)
        Output; only the sub-rectangle is written.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1 : int
        Half-open interior sub-rectangle.
    """
    r = u.dtype.type(r)
    dt = u.dtype.type(dt)
    s = (slice(i0, i1), slice(j0, j1))
    u_new[s] = u[s] + r * kappa[s] * _lap(u, i0, i1, j0, j1) + dt * f[s]


def adjoint(lam_next, kappa, u, lam, kappa_bar, f_bar, r, dt, i0, i1, j0, j1):
    """Fused adjoint of :func:`step` (gather form) on a sub-rectangle.

    ``lam = lam_next + r*lap(kappa*lam_next)``,
    ``kappa_bar += r*lam_next*lap(u)``, ``f_bar += dt*lam_next``.

    Parameters
    ----------
    lam_next : array, shape (nx+2, ny+2)
        Cotangent of ``u^{n+1}``, ghosts included.
    kappa, u : array, shape (nx+2, ny+2)
        Diffusivity and the state ``u^n`` (ghosts filled). ``u`` is read only for
        ``kappa_bar`` and may be ``None`` without it.
    lam : array, shape (nx+2, ny+2)
        Output cotangent of ``u^n``; only the sub-rectangle is written.
    kappa_bar, f_bar : array, shape (nx+2, ny+2), or None
        Accumulated (``+=``) on the sub-rectangle; ``None``: not computed.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1 : int
        Half-open interior sub-rectangle.
    """
    grads(u, kappa_bar, f_bar)
    r = lam.dtype.type(r)
    dt = lam.dtype.type(dt)
    s = (slice(i0, i1), slice(j0, j1))
    # w = kappa*lam_next on the window grown by one cell (corners unused).
    win = (slice(i0 - 1, i1 + 1), slice(j0 - 1, j1 + 1))
    w = kappa[win] * lam_next[win]
    lapw = w[2:, 1:-1] + w[:-2, 1:-1] + w[1:-1, 2:] + w[1:-1, :-2] - 4 * w[1:-1, 1:-1]
    ln = lam_next[s]
    lam[s] = ln + r * lapw
    if kappa_bar is not None:
        kappa_bar[s] += r * ln * _lap(u, i0, i1, j0, j1)
    if f_bar is not None:
        f_bar[s] += dt * ln


#: Bits of the adjoint kernels' ``grads`` argument (``HEAT_KAPPA_BAR``, ``HEAT_F_BAR`` in heat.cu).
KAPPA_BAR, F_BAR = 1, 2


def grads(u, kappa_bar, f_bar):
    """The ``grads`` bit mask for the cotangents given (not ``None``); ``kappa_bar`` needs ``u``."""
    if kappa_bar is not None and u is None:
        raise ValueError("u (the state u^n) is needed to accumulate kappa_bar, got None")
    return (KAPPA_BAR if kappa_bar is not None else 0) | (F_BAR if f_bar is not None else 0)


def halo_length(u, side):
    """Number of cells in a halo row/column of padded ``u`` for ``side``."""
    nx, ny = u.shape[0] - 2, u.shape[1] - 2
    return ny if side in (NORTH, SOUTH) else nx


def _edge(u, side, ghost):
    """View of the halo row/column (interior index range) of ``u``."""
    nx, ny = u.shape[0] - 2, u.shape[1] - 2
    if side == NORTH:
        return u[0 if ghost else 1, 1 : ny + 1]
    if side == SOUTH:
        return u[nx + 1 if ghost else nx, 1 : ny + 1]
    if side == WEST:
        return u[1 : nx + 1, 0 if ghost else 1]
    if side == EAST:
        return u[1 : nx + 1, ny + 1 if ghost else ny]
    raise ValueError(f"side must be 0..3, got {side!r}")


def pack(u, buf, side, ghost):
    """Copy a boundary (``ghost=0``) or ghost (``ghost=1``) row/column into ``buf``.

    Parameters
    ----------
    u : array, shape (nx+2, ny+2)
        Source field.
    buf : array, 1-D
        Destination; its first ``ny`` (north/south) or ``nx`` (west/east)
        entries are written.
    side : int
        0 north (row 1 / 0), 1 south (row nx / nx+1), 2 west (col 1 / 0),
        3 east (col ny / ny+1).
    ghost : int
        1 for the ghost row/column, 0 for the owned boundary one.
    """
    e = _edge(u, side, ghost)
    buf[: e.shape[0]] = e


def wrap(u, wrap_i, wrap_j):
    """Fill the ghost rows (``wrap_i``) and columns (``wrap_j``) of a patch that is its own
    neighbour along that axis from its opposite boundary rows and columns, interior extent:
    what a halo exchange with itself writes.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.arange(20.0).reshape(4, 5)
    >>> wrap(u, True, False)
    >>> u[0, 1:-1].tolist() == u[2, 1:-1].tolist() and u[3, 1:-1].tolist() == u[1, 1:-1].tolist()
    True
    """
    sides = ((NORTH, SOUTH) if wrap_i else ()) + ((WEST, EAST) if wrap_j else ())
    for side in sides:
        _edge(u, side, 1)[...] = _edge(u, side ^ 1, 0)


def unpack(u, buf, side, ghost, add):
    """Write (``add=0``) or add (``add=1``) ``buf`` into a row/column of ``u``.

    Parameters
    ----------
    u : array, shape (nx+2, ny+2)
        Destination field, modified in place.
    buf : array, 1-D
        Source; its first ``ny`` or ``nx`` entries are used.
    side, ghost : int
        As in :func:`pack`.
    add : int
        Non-zero to accumulate instead of assign.
    """
    e = _edge(u, side, ghost)
    if add:
        e += buf[: e.shape[0]]
    else:
        e[...] = buf[: e.shape[0]]
