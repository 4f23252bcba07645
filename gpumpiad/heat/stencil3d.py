"""Array-slicing reference of the 3-D explicit heat step (7-point stencil) and its adjoint.

The 3-D counterpart of :mod:`gpumpiad.heat.stencil`, with the same conventions: works unchanged
on NumPy and CuPy arrays; every field is a C-contiguous ``(nx+2, ny+2, nz+2)`` padded array whose
outer layer holds ghost cells; the compute functions only write the interior sub-box
``[i0, i1) x [j0, j1) x [k0, k1)`` (``1 <= i0 <= i1 <= nx+1``, likewise for ``j`` and ``k``;
by default the whole interior) of their outputs. The Laplacian numerator sums the neighbours
in the order ``+x, -x, +y, -y, +z, -z`` and then subtracts ``6u``.

Examples
--------
>>> import numpy as np
>>> from gpumpiad.heat import stencil3d
>>> u = np.zeros((4, 3, 5)); u[2, 1, 2] = 1.0          # one hot cell, nx, ny, nz = 2, 1, 3
>>> kappa, f, u_new = np.ones_like(u), np.zeros_like(u), np.zeros_like(u)
>>> stencil3d.step(u, kappa, f, u_new, 0.125, 0.01)
>>> float(u_new[2, 1, 2]), float(u_new[1, 1, 2]), float(u_new[2, 1, 3])
(0.25, 0.125, 0.125)
"""

from __future__ import annotations

from .stencil import grads

__all__ = ["interior", "step", "adjoint", "wrap", "check_box"]

#: Index of the interior cells of a padded array.
interior = (slice(1, -1), slice(1, -1), slice(1, -1))


def check_box(shape, i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """The interior sub-box ``(i0, i1, j0, j1, k0, k1)`` of a padded array of ``shape``
    (``None``: up to the last interior cell), validated."""
    if len(shape) != 3 or min(shape) < 3:
        raise ValueError(f"expected a padded 3-D array of shape (nx+2, ny+2, nz+2) with "
                         f"nx, ny, nz >= 1, got shape {tuple(shape)}")
    box = []
    for axis, (name, lo, hi) in enumerate((("i", i0, i1), ("j", j0, j1), ("k", k0, k1))):
        n = shape[axis] - 2
        lo, hi = int(lo), n + 1 if hi is None else int(hi)
        if not 1 <= lo <= hi <= n + 1:
            raise ValueError(f"need 1 <= {name}0 <= {name}1 <= {n + 1} (n + 1 along axis "
                             f"{axis}), got {name}0={lo}, {name}1={hi}")
        box += [lo, hi]
    return tuple(box)


def _lap(a, i0, i1, j0, j1, k0, k1):
    """7-point Laplacian numerator of ``a`` on ``[i0, i1) x [j0, j1) x [k0, k1)``."""
    i, j, k = slice(i0, i1), slice(j0, j1), slice(k0, k1)
    return (
        a[i0 + 1 : i1 + 1, j, k]
        + a[i0 - 1 : i1 - 1, j, k]
        + a[i, j0 + 1 : j1 + 1, k]
        + a[i, j0 - 1 : j1 - 1, k]
        + a[i, j, k0 + 1 : k1 + 1]
        + a[i, j, k0 - 1 : k1 - 1]
        - 6 * a[i, j, k]
    )


def step(u, kappa, f, u_new, r, dt, i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """Forward explicit Euler step of the 3-D heat equation on an interior sub-box.

    ``u_new = u + r*kappa*lap(u) + dt*f`` on ``[i0, i1) x [j0, j1) x [k0, k1)``, with
    ``lap(u)`` the sum of the six face neighbours minus ``6u``.

    Parameters
    ----------
    u, kappa, f : array, shape (nx+2, ny+2, nz+2)
        State (ghosts filled), diffusivity, source.
    u_new : array, shape (nx+2, ny+2, nz+2)
        Output; only the sub-box is written.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1, k0, k1 : int, optional
        Half-open interior sub-box; by default the whole interior.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.ones((3, 3, 3))                        # one cell, its six ghosts equal to it
    >>> out = np.zeros_like(u)
    >>> step(u, np.ones_like(u), np.ones_like(u), out, 0.1, 0.5)
    >>> float(out[1, 1, 1])
    1.5
    """
    i0, i1, j0, j1, k0, k1 = check_box(u.shape, i0, i1, j0, j1, k0, k1)
    r = u.dtype.type(r)
    dt = u.dtype.type(dt)
    s = (slice(i0, i1), slice(j0, j1), slice(k0, k1))
    u_new[s] = u[s] + r * kappa[s] * _lap(u, i0, i1, j0, j1, k0, k1) + dt * f[s]


def adjoint(lam_next, kappa, u, lam, kappa_bar, f_bar, r, dt,
            i0=1, i1=None, j0=1, j1=None, k0=1, k1=None):
    """Fused adjoint of :func:`step` (gather form) on a sub-box.

    ``lam = lam_next + r*lap(kappa*lam_next)``,
    ``kappa_bar += r*lam_next*lap(u)``, ``f_bar += dt*lam_next``.

    Parameters
    ----------
    lam_next : array, shape (nx+2, ny+2, nz+2)
        Cotangent of ``u^{n+1}``, ghosts included (zero on the physical boundary, the
        neighbour's cotangent across a patch boundary).
    kappa, u : array, shape (nx+2, ny+2, nz+2)
        Diffusivity (ghosts filled like ``lam_next``'s) and the state ``u^n`` (ghosts filled).
        ``u`` is read only for ``kappa_bar`` and may be ``None`` without it.
    lam : array, shape (nx+2, ny+2, nz+2)
        Output cotangent of ``u^n``; only the sub-box is written.
    kappa_bar, f_bar : array, shape (nx+2, ny+2, nz+2), or None
        Accumulated (``+=``) on the sub-box; ``None``: not computed.
    r, dt : float
        ``dt / h**2`` and the time step.
    i0, i1, j0, j1, k0, k1 : int, optional
        Half-open interior sub-box; by default the whole interior.

    Notes
    -----
    With ``w = kappa * lam_next``, the step's transpose sends ``r*w`` of each cell to its six
    neighbours and ``-6r*w`` to itself; gathered at the receiving cell this is
    ``r*lap(w)``, the Laplacian being symmetric. The part that lands on a ghost cell is the
    neighbouring patch's own gathered term, which is why ``lam_next`` and ``kappa`` need their
    ghosts filled rather than the result sent back.

    Examples
    --------
    >>> import numpy as np
    >>> shape = (4, 3, 3)                              # two cells along x
    >>> lam_next = np.zeros(shape); lam_next[1, 1, 1] = 1.0
    >>> lam, f_bar = np.zeros(shape), np.zeros(shape)
    >>> adjoint(lam_next, np.ones(shape), None, lam, None, f_bar, 0.125, 0.5)
    >>> float(lam[1, 1, 1]), float(lam[2, 1, 1]), float(f_bar[1, 1, 1])
    (0.25, 0.125, 0.5)
    """
    i0, i1, j0, j1, k0, k1 = check_box(lam.shape, i0, i1, j0, j1, k0, k1)
    grads(u, kappa_bar, f_bar)
    r = lam.dtype.type(r)
    dt = lam.dtype.type(dt)
    s = (slice(i0, i1), slice(j0, j1), slice(k0, k1))
    # w = kappa*lam_next on the box grown by one cell (edges and corners unused).
    win = (slice(i0 - 1, i1 + 1), slice(j0 - 1, j1 + 1), slice(k0 - 1, k1 + 1))
    w = kappa[win] * lam_next[win]
    c = (slice(1, -1), slice(1, -1), slice(1, -1))
    lapw = (w[2:, 1:-1, 1:-1] + w[:-2, 1:-1, 1:-1] + w[1:-1, 2:, 1:-1] + w[1:-1, :-2, 1:-1]
            + w[1:-1, 1:-1, 2:] + w[1:-1, 1:-1, :-2] - 6 * w[c])
    ln = lam_next[s]
    lam[s] = ln + r * lapw
    if kappa_bar is not None:
        kappa_bar[s] += r * ln * _lap(u, i0, i1, j0, j1, k0, k1)
    if f_bar is not None:
        f_bar[s] += dt * ln


def wrap_faces(shape, flags):
    """``(ghost, boundary)`` index pairs of the faces :func:`wrap` fills, interior extent: for
    each flagged axis, the face at 0 from the one at ``n``, the face at ``n + 1`` from 1 (any
    number of axes)."""
    pairs = []
    for axis, on in enumerate(flags):
        if on:
            for ghost, boundary in ((0, shape[axis] - 2), (shape[axis] - 1, 1)):
                index = [slice(1, -1)] * len(shape)
                index[axis] = ghost
                source = list(index)
                source[axis] = boundary
                pairs.append((tuple(index), tuple(source)))
    return pairs


def wrap(u, wrap_i, wrap_j, wrap_k):
    """Fill the ghost faces of a patch that is its own neighbour along each flagged axis from
    its opposite boundary faces, interior extent: what a halo exchange with itself writes.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.arange(60.0).reshape(3, 4, 5)
    >>> wrap(u, False, False, True)
    >>> bool((u[1:-1, 1:-1, 0] == u[1:-1, 1:-1, 3]).all())
    True
    """
    for ghost, boundary in wrap_faces(u.shape, (wrap_i, wrap_j, wrap_k)):
        u[ghost] = u[boundary]
