"""Serial tests of the 3-D heat step's NumPy reference (gpumpiad.heat.stencil3d).

* step and adjoint match independent loops on every sub-box;
* the adjoint is the exact transpose of the linearised step (dot-product test, explicit
  Jacobian), and in gather form on patches whose ghosts hold the neighbours' values it is the
  adjoint of the whole grid;
* the kappa, f and u cotangents match finite differences.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpumpiad.heat import stencil3d

I = stencil3d.interior


def _fields(rng, shape, count, dtype=np.float64):
    nx, ny, nz = shape
    return [rng.standard_normal((nx + 2, ny + 2, nz + 2)).astype(dtype) for _ in range(count)]


def _interior_only(a):
    b = np.zeros_like(a)
    b[I] = a[I]
    return b


def _boxes(rng, shape, count=4):
    nx, ny, nz = shape
    boxes = [(1, nx + 1, 1, ny + 1, 1, nz + 1), (1, nx + 1, 1, 1, 1, nz + 1)]  # full, empty
    for _ in range(count):
        box = []
        for n in shape:
            lo = int(rng.integers(1, n + 2))
            box += [lo, int(rng.integers(lo, n + 2))]
        boxes.append(tuple(box))
    return boxes


def _cells(box):
    i0, i1, j0, j1, k0, k1 = box
    return [(i, j, k) for i in range(i0, i1) for j in range(j0, j1) for k in range(k0, k1)]


def _lap_at(a, i, j, k):
    return (a[i + 1, j, k] + a[i - 1, j, k] + a[i, j + 1, k] + a[i, j - 1, k]
            + a[i, j, k + 1] + a[i, j, k - 1] - 6 * a[i, j, k])


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (1, 4, 3), (3, 2, 4)])
def test_reference_matches_loops(shape):
    rng = np.random.default_rng(11)
    r, dt = 0.13, 0.017
    for box in _boxes(rng, shape):
        u, kappa, f, lam_next, kb0, fb0 = _fields(rng, shape, 6)
        sentinel = np.full_like(u, 7.5)

        got = sentinel.copy()
        stencil3d.step(u, kappa, f, got, r, dt, *box)
        want = sentinel.copy()
        for c in _cells(box):
            want[c] = u[c] + r * kappa[c] * _lap_at(u, *c) + dt * f[c]
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)

        lam, kb, fb = sentinel.copy(), kb0.copy(), fb0.copy()
        stencil3d.adjoint(lam_next, kappa, u, lam, kb, fb, r, dt, *box)
        lam_w, kb_w, fb_w = sentinel.copy(), kb0.copy(), fb0.copy()
        w = kappa * lam_next
        for c in _cells(box):
            lam_w[c] = lam_next[c] + r * _lap_at(w, *c)
            kb_w[c] += r * lam_next[c] * _lap_at(u, *c)
            fb_w[c] += dt * lam_next[c]
        np.testing.assert_allclose(lam, lam_w, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(kb, kb_w, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(fb, fb_w, rtol=1e-14, atol=1e-14)


def test_the_default_box_is_the_interior_and_only_the_asked_cotangents_are_written():
    rng = np.random.default_rng(12)
    shape = (3, 4, 2)
    u, kappa, f, lam_next = _fields(rng, shape, 4)
    full = (1, 4, 1, 5, 1, 3)
    a, b = np.zeros_like(u), np.zeros_like(u)
    stencil3d.step(u, kappa, f, a, 0.1, 0.01)
    stencil3d.step(u, kappa, f, b, 0.1, 0.01, *full)
    assert np.array_equal(a, b) and (a[I] != 0).all()
    lam, lam_only, kb = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
    stencil3d.adjoint(lam_next, kappa, u, lam, kb, None, 0.1, 0.01)
    stencil3d.adjoint(lam_next, kappa, None, lam_only, None, None, 0.1, 0.01)
    assert np.array_equal(lam, lam_only)
    with pytest.raises(ValueError, match="u .* is needed to accumulate kappa_bar"):
        stencil3d.adjoint(lam_next, kappa, None, lam, kb, None, 0.1, 0.01)


def test_a_bad_box_or_shape_names_the_bound_and_the_value():
    u = np.zeros((5, 4, 3))
    with pytest.raises(ValueError, match=r"need 1 <= k0 <= k1 <= 2 \(n \+ 1 along axis 2\), "
                                         r"got k0=1, k1=3"):
        stencil3d.step(u, u, u, u.copy(), 0.1, 0.1, 1, 4, 1, 3, 1, 3)
    with pytest.raises(ValueError, match=r"need 1 <= i0 <= i1 <= 4 .*got i0=0, i1=4"):
        stencil3d.adjoint(u, u, u, u.copy(), None, None, 0.1, 0.1, i0=0)
    with pytest.raises(ValueError, match=r"padded 3-D array .*got shape \(5, 4\)"):
        stencil3d.step(u[..., 0], u, u, u, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"nx, ny, nz >= 1, got shape \(5, 2, 3\)"):
        stencil3d.step(u[:, :2], u, u, u, 0.1, 0.1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 2), (6, 5, 7)])
def test_adjoint_dot_product(shape):
    rng = np.random.default_rng(13)
    r, dt = 0.11, 0.01
    u, kappa, f = _fields(rng, shape, 3)
    # Tangents on interior cells only (ghost u fixed); cotangent w with zero ghosts.
    du, dk, df, w = (_interior_only(a) for a in _fields(rng, shape, 4))

    zero = np.zeros_like(u)
    ju = np.zeros_like(u)
    stencil3d.step(du, kappa, zero, ju, r, dt)
    lap_u = np.zeros_like(u)
    lap_u[I] = stencil3d._lap(u, 1, shape[0] + 1, 1, shape[1] + 1, 1, shape[2] + 1)
    jv = ju[I] + r * dk[I] * lap_u[I] + dt * df[I]

    lam, kb, fb = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
    stencil3d.adjoint(w, kappa, u, lam, kb, fb, r, dt)

    def dot(a, b):
        return float(np.dot(a.ravel(), b.ravel()))

    pairs = [(dot(jv, w[I]), dot(du[I], lam[I]) + dot(dk[I], kb[I]) + dot(df[I], fb[I])),
             (dot(ju[I], w[I]), dot(du[I], lam[I])),
             (dot(r * dk[I] * lap_u[I], w[I]), dot(dk[I], kb[I])),
             (dot(dt * df[I], w[I]), dot(df[I], fb[I]))]
    for lhs, rhs in pairs:
        assert abs(lhs - rhs) <= 1e-13 * abs(lhs), (lhs, rhs)


def test_adjoint_is_the_transpose_of_the_explicit_jacobian():
    rng = np.random.default_rng(14)
    shape = (2, 3, 2)
    r, dt = 0.17, 0.02
    u, kappa, f, w = _fields(rng, shape, 4)
    w = _interior_only(w)
    cells = _cells((1, 3, 1, 4, 1, 3))
    jacobian = np.zeros((len(cells), len(cells)))
    zero = np.zeros_like(u)
    for column, c in enumerate(cells):
        e = np.zeros_like(u)
        e[c] = 1.0
        out = np.zeros_like(u)
        stencil3d.step(e, kappa, zero, out, r, dt)
        jacobian[:, column] = out[I].ravel()
    lam = np.zeros_like(u)
    stencil3d.adjoint(w, kappa, None, lam, None, None, r, dt)
    np.testing.assert_allclose(lam[I].ravel(), jacobian.T @ w[I].ravel(), rtol=1e-13,
                               atol=1e-14)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_form_on_two_patches_is_the_adjoint_of_the_whole_grid(axis):
    """Each patch's adjoint, with its lam_next and kappa ghosts holding the neighbour's values
    (zero lam_next on the physical boundary), gives the whole grid's adjoint cells."""
    rng = np.random.default_rng(15 + axis)
    shape = (5, 4, 3)
    r, dt = 0.09, 0.03
    u, kappa, lam_next = _fields(rng, shape, 3)
    lam_next = _interior_only(lam_next)
    want = [np.zeros_like(u) for _ in range(3)]
    stencil3d.adjoint(lam_next, kappa, u, *want, r, dt)

    got = [np.zeros_like(u) for _ in range(3)]
    n = shape[axis]
    for lo, hi in ((1, n // 2 + 1), (n // 2 + 1, n + 1)):     # interior cells [lo, hi)
        padded = [slice(None)] * 3
        padded[axis] = slice(lo - 1, hi + 1)
        cut = tuple(padded)
        patch = [a[cut].copy() for a in (u, kappa, lam_next)]
        out = [np.zeros_like(patch[0]) for _ in range(3)]
        stencil3d.adjoint(patch[2], patch[1], patch[0], *out, r, dt)
        inner = [slice(1, -1)] * 3
        inner[axis] = slice(lo, hi)
        for g, o in zip(got, out):
            g[tuple(inner)] = o[I]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-15, atol=1e-15)


def test_cotangents_match_finite_differences():
    rng = np.random.default_rng(16)
    shape = (2, 3, 2)
    r, dt = 0.15, 0.04
    u, kappa, f, w = _fields(rng, shape, 4)
    w = _interior_only(w)

    def objective(u, kappa, f):
        out = np.zeros_like(u)
        stencil3d.step(u, kappa, f, out, r, dt)
        return float(np.sum(out[I] * w[I]))

    lam, kb, fb = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
    stencil3d.adjoint(w, kappa, u, lam, kb, fb, r, dt)
    eps = 1e-3
    for which, bar in ((0, lam), (1, kb), (2, fb)):
        for c in _cells((1, 3, 1, 4, 1, 3)):
            plus = [a.copy() for a in (u, kappa, f)]
            minus = [a.copy() for a in (u, kappa, f)]
            plus[which][c] += eps
            minus[which][c] -= eps
            fd = (objective(*plus) - objective(*minus)) / (2 * eps)
            assert abs(fd - bar[c]) <= 1e-9 * max(abs(bar[c]), 1.0), (which, c, fd, bar[c])


def test_float32_stays_float32_and_agrees_with_float64():
    rng = np.random.default_rng(17)
    shape = (3, 2, 4)
    u, kappa, f, lam_next = _fields(rng, shape, 4)
    results = {}
    for dtype in (np.float32, np.float64):
        a = [x.astype(dtype) for x in (u, kappa, f, lam_next)]
        out, lam, kb, fb = (np.zeros_like(a[0]) for _ in range(4))
        stencil3d.step(a[0], a[1], a[2], out, 0.1, 0.01)
        stencil3d.adjoint(a[3], a[1], a[0], lam, kb, fb, 0.1, 0.01)
        assert all(x.dtype == dtype for x in (out, lam, kb, fb))
        results[dtype] = (out, lam, kb, fb)
    for single, double in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(single, double, rtol=1e-5, atol=1e-5)
