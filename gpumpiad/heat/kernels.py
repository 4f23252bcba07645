"""Which build of the heat kernels (``step``, ``adjoint``, ``pack``, ``unpack``) runs on an array.

Environment
-----------
GPUMPIAD_HEAT_KERNELS : ``numpy`` | ``host``
    Kernels for NumPy arrays: the array-slicing reference (``numpy``) or the host build of
    ``kernels/heat.cu`` (``host``, the default when a C++ compiler is available).
"""
from __future__ import annotations

import os

from ..backend import is_device_array

__all__ = ["kernels_for"]

_KERNELS = ("numpy", "host", "cuda")


def kernels_for(array, backend=None):
    """The heat-kernel module (``step``, ``adjoint``, ``pack``, ``unpack``) for ``array``.

    Parameters
    ----------
    array : numpy.ndarray or cupy.ndarray
    backend : {"numpy", "host", "cuda"}, optional
        ``numpy``: :mod:`gpumpiad.heat.stencil` (NumPy or CuPy slicing); ``host``: the host build
        :mod:`gpumpiad.heat.hostkernels` (NumPy arrays); ``cuda``: :mod:`gpumpiad.heat.cudakernels`
        (CuPy arrays). Default: ``cuda`` for CuPy arrays; for NumPy arrays
        ``GPUMPIAD_HEAT_KERNELS`` if set, else ``host`` when it builds here, else ``numpy``.
    """
    device = is_device_array(array)
    choice = backend
    if choice is None and not device:
        choice = os.environ.get("GPUMPIAD_HEAT_KERNELS", "").strip().lower() or None
    if choice is not None and choice not in _KERNELS:
        source = "backend" if backend is not None else "GPUMPIAD_HEAT_KERNELS"
        raise ValueError(f"{source}: heat kernels must be one of {_KERNELS}, got {choice!r}")
    if choice is None:
        choice = "cuda" if device else "host"
        if choice == "host":
            from . import hostkernels
            if not hostkernels.available():
                choice = "numpy"
    if choice == "numpy":
        from . import stencil
        return stencil
    if (choice == "cuda") != device:
        raise ValueError(f"heat kernels {choice!r} cannot run on a "
                         f"{'CuPy' if device else 'NumPy'} array")
    if choice == "cuda":
        from . import cudakernels
        return cudakernels
    from . import hostkernels
    return hostkernels
