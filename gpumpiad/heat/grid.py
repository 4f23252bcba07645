"""The heat solver's patch decomposition: :class:`gpumpiad.Grid`, the same class.

A 2-D grid's sides are (north, south, west, east) = (-x, +x, -y, +y), the order of
:attr:`Grid.neighbours` and :attr:`Grid.physical`.

Examples
--------
>>> import gpumpiad as gm
>>> gm.heat.Grid is gm.Grid
True
"""
from __future__ import annotations

from ..grid import EAST, NORTH, SOUTH, WEST, Grid, check_grid, split_sizes

__all__ = ["EAST", "Grid", "NORTH", "SOUTH", "WEST", "check_grid", "split_sizes"]
