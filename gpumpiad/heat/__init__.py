"""The 2-D heat equation on a patch decomposition: :class:`Grid` and the differentiable
:func:`solve`; the kernels live in :mod:`~gpumpiad.heat.stencil`, :mod:`~gpumpiad.heat.hostkernels`
and :mod:`gpumpiad.heat.cudakernels`."""
from .grid import Grid
from .solver import recompute_steps, set_buffer_cache, solve
from .state import load_state, save_state

__all__ = ["Grid", "load_state", "recompute_steps", "save_state", "set_buffer_cache", "solve"]
