"""Which build of the heat kernels (``step``, ``adjoint``, ``pack``, ``unpack``) runs on an array.

Environment
-----------
GPUMPIAD_HEAT_KERNELS : ``numpy`` | ``host``
    Kernels for NumPy arrays: the array-slicing reference (``numpy``) or the host build of
    ``kernels/heat.cu`` (``host``, the default when a C++ compiler is available).
"""
from __future__ import annotations

import os
from importlib import import_module

from ..backend import is_device_array

__all__ = ["kernels_for"]

_KERNELS = ("numpy", "host", "cuda")


def kernels_for(array, backend=None, ndim=2):
    """The heat-kernel module (``step``, ``adjoint``; in 2-D also ``pack``, ``unpack``) for
    ``array``.

    Parameters
    ----------
    array : numpy.ndarray or cupy.ndarray
    backend : {"numpy", "host", "cuda"}, optional
        ``numpy``: :mod:`gpumpiad.heat.stencil` (NumPy or CuPy slicing); ``host``: the host build
        :mod:`gpumpiad.heat.hostkernels` (NumPy arrays); ``cuda``: :mod:`gpumpiad.heat.cudakernels`
        (CuPy arrays). Default: ``cuda`` for CuPy arrays; for NumPy arrays
        ``GPUMPIAD_HEAT_KERNELS`` if set, else ``host`` when it builds here, else ``numpy``.
    ndim : {2, 3}
        The grid's dimension: 3 gives the 7-point kernels of ``kernels/heat3d.cu``
        (:mod:`~gpumpiad.heat.stencil3d`, :mod:`~gpumpiad.heat.hostkernels3d`,
        :mod:`~gpumpiad.heat.cudakernels3d`).

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.heat.kernels import kernels_for
    >>> kernels_for(np.zeros((4, 4, 4)), "numpy", ndim=3).__name__
    'gpumpiad.heat.stencil3d'
    """
    if ndim not in (2, 3):
        raise ValueError(f"heat kernels exist for 2 or 3 axes, got ndim={ndim!r}")
    return _module(_choice(array, backend, ndim), ndim)


_MODULES = {"numpy": (".stencil", ".stencil3d"), "host": (".hostkernels", ".hostkernels3d"),
            "cuda": (".cudakernels", ".cudakernels3d")}
_modules = {}


def _module(choice, ndim):
    """The kernels module of ``choice`` for ``ndim`` axes, imported on first use (every solve
    asks for one)."""
    module = _modules.get((choice, ndim))
    if module is None:
        module = _modules[choice, ndim] = import_module(_MODULES[choice][ndim - 2], __package__)
    return module


def _choice(array, backend, ndim):
    device = is_device_array(array)
    choice = backend
    if choice is None and not device:
        choice = os.environ.get("GPUMPIAD_HEAT_KERNELS", "").strip().lower() or None
    if choice is not None and choice not in _KERNELS:
        source = "backend" if backend is not None else "GPUMPIAD_HEAT_KERNELS"
        raise ValueError(f"{source}: heat kernels must be one of {_KERNELS}, got {choice!r}")
    if choice is None:
        choice = "cuda" if device else "host"
        if choice == "host" and not _module("host", ndim).available():
            choice = "numpy"
    if choice != "numpy" and (choice == "cuda") != device:
        raise ValueError(f"heat kernels {choice!r} cannot run on a "
                         f"{'CuPy' if device else 'NumPy'} array")
    return choice
