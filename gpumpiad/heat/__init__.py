"""The 2-D heat equation on a patch decomposition: :class:`Grid` and the differentiable
:func:`solve`; the kernels live in :mod:`~gpumpiad.heat.stencil`, :mod:`~gpumpiad.heat.hostkernels`
and :mod:`gpumpiad.cuda_kernels`."""
from .grid import Grid
from .solver import recompute_steps, solve

__all__ = ["Grid", "recompute_steps", "solve"]
