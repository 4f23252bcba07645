"""Host implementations of the kernels in ``kernels/heat.cu`` and ``kernels/heat3d.cu`` for the
stream model, each with the exact cells it reads and writes (the 5- or 7-point cross, not its
bounding box), so that work on disjoint parts of one array on two streams is not a hazard and
overlapping work is."""
from __future__ import annotations

import numpy as np

import cupy
from gpumpiad.heat import stencil, stencil3d


def _raw(x):
    return x.view(np.ndarray) if isinstance(x, cupy.ndarray) else x


def _cross(a, i0, i1, j0, j1):
    return [a[i0:i1, j0 - 1:j1 + 1], a[i0 - 1:i1 + 1, j0:j1]]


def _step(args):
    u, kappa, f, u_new, nx, ny, r, dt, i0, i1, j0, j1 = args
    i0, i1, j0, j1 = int(i0), int(i1), int(j0), int(j1)
    s = (slice(i0, i1), slice(j0, j1))
    reads = _cross(u, i0, i1, j0, j1) + [kappa[s], f[s]]

    def run():
        stencil.step(_raw(u), _raw(kappa), _raw(f), _raw(u_new), r, dt, i0, i1, j0, j1)
    return reads, [u_new[s]], run


def _adjoint(args):
    lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, r, dt, i0, i1, j0, j1, mask = args
    i0, i1, j0, j1, mask = int(i0), int(i1), int(j0), int(j1), int(mask)
    s = (slice(i0, i1), slice(j0, j1))
    reads = _cross(lam_next, i0, i1, j0, j1) + _cross(kappa, i0, i1, j0, j1)
    writes = [lam[s]]
    kb = kappa_bar if mask & stencil.KAPPA_BAR else None
    fb = f_bar if mask & stencil.F_BAR else None
    if kb is not None:
        reads += _cross(u, i0, i1, j0, j1) + [kb[s]]
        writes.append(kb[s])
    if fb is not None:
        reads.append(fb[s])
        writes.append(fb[s])

    def run():
        stencil.adjoint(_raw(lam_next), _raw(kappa), None if kb is None else _raw(u), _raw(lam),
                        None if kb is None else _raw(kb), None if fb is None else _raw(fb),
                        r, dt, i0, i1, j0, j1)
    return reads, writes, run


def _pack(args):
    u, buf, nx, ny, side, ghost = args
    edge = stencil._edge(u, int(side), int(ghost))
    n = edge.shape[0]

    def run():
        stencil.pack(_raw(u), _raw(buf), int(side), int(ghost))
    return [edge], [buf[:n]], run


def _unpack(args):
    u, buf, nx, ny, side, ghost, add = args
    edge = stencil._edge(u, int(side), int(ghost))
    n = edge.shape[0]
    reads = [buf[:n]] + ([edge] if int(add) else [])

    def run():
        stencil.unpack(_raw(u), _raw(buf), int(side), int(ghost), int(add))
    return reads, [edge], run


def _wrap(args):
    u, nx, ny, wrap_i, wrap_j = args
    sides = ((0, 1) if int(wrap_i) else ()) + ((2, 3) if int(wrap_j) else ())
    reads = [stencil._edge(u, side ^ 1, 0) for side in sides]
    writes = [stencil._edge(u, side, 1) for side in sides]

    def run():
        stencil.wrap(_raw(u), int(wrap_i), int(wrap_j))
    return reads, writes, run


def _copy4(args):
    a, b, c, d, n = args

    def run():
        _raw(d)[...] = _raw(a) + _raw(b) + _raw(c)
    return [a, b, c], [d], run


def _cross3d(a, box):
    """The cells a 7-point stencil reads over ``box`` (i0, i1, j0, j1, k0, k1)."""
    i0, i1, j0, j1, k0, k1 = box
    return [a[i0 - 1:i1 + 1, j0:j1, k0:k1], a[i0:i1, j0 - 1:j1 + 1, k0:k1],
            a[i0:i1, j0:j1, k0 - 1:k1 + 1]]


def _step3d(args):
    u, kappa, f, u_new, nx, ny, nz, r, dt, *box = args
    box = tuple(map(int, box))
    s = np.s_[box[0]:box[1], box[2]:box[3], box[4]:box[5]]

    def run():
        stencil3d.step(_raw(u), _raw(kappa), _raw(f), _raw(u_new), r, dt, *box)
    return _cross3d(u, box) + [kappa[s], f[s]], [u_new[s]], run


def _adjoint3d(args):
    lam_next, kappa, u, lam, kappa_bar, f_bar, nx, ny, nz, r, dt, *box, mask = args
    box, mask = tuple(map(int, box)), int(mask)
    s = np.s_[box[0]:box[1], box[2]:box[3], box[4]:box[5]]
    reads = _cross3d(lam_next, box) + _cross3d(kappa, box)
    writes = [lam[s]]
    kb = kappa_bar if mask & stencil.KAPPA_BAR else None
    fb = f_bar if mask & stencil.F_BAR else None
    if kb is not None:
        reads += _cross3d(u, box) + [kb[s]]
        writes.append(kb[s])
    if fb is not None:
        reads.append(fb[s])
        writes.append(fb[s])

    def run():
        stencil3d.adjoint(_raw(lam_next), _raw(kappa), None if kb is None else _raw(u),
                          _raw(lam), None if kb is None else _raw(kb),
                          None if fb is None else _raw(fb), r, dt, *box)
    return reads, writes, run


def _wrap3d(args):
    u, nx, ny, nz, *flags = args
    faces = stencil3d.wrap_faces(u.shape, [int(f) for f in flags])

    def run():
        stencil3d.wrap(_raw(u), *(int(f) for f in flags))
    return [u[b] for _, b in faces], [u[g] for g, _ in faces], run


def register():
    """Put the heat kernels, every dtype, into ``cupy.KERNELS``."""
    for dtype in ("float32", "float64"):
        for op, handler in (("heat_step", _step), ("heat_adjoint", _adjoint),
                            ("halo_pack", _pack), ("halo_unpack", _unpack), ("halo_wrap", _wrap),
                            ("copy4", _copy4),
                            ("heat3d_step", _step3d), ("heat3d_adjoint", _adjoint3d),
                            ("heat3d_wrap", _wrap3d)):
            cupy.KERNELS[f"{op}_{dtype}"] = handler
