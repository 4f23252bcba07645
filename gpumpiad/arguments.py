"""Argument checks shared by the public entry points.

An integer argument (a rank, root, tag, color, count) is any ``int`` or NumPy integer —
everything with ``__index__`` — but not a ``bool`` and not a float, however whole.

Examples
--------
>>> import numpy as np
>>> from gpumpiad.arguments import as_int
>>> as_int(np.int64(3), "root", rank=0, low=0, high=4)
3
>>> as_int(2.5, "root", rank=0)
Traceback (most recent call last):
...
ValueError: rank 0: root must be an int, got 2.5 (float)
"""
from __future__ import annotations

import operator

import numpy as np


def is_int(value) -> bool:
    """Whether ``value`` is an integer argument: an int or NumPy integer, not a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_int(value, name, rank, low=None, high=None, error=ValueError):
    """``value`` as a Python ``int`` in ``[low, high)``; otherwise ``error`` naming ``rank``, the
    argument ``name``, what it must be and the value."""
    if not is_int(value):
        span = f" in [{low}, {high})" if low is not None and high is not None else ""
        raise error(f"rank {rank}: {name} must be an int{span}, got {value!r} "
                        f"({type(value).__name__})")
    value = operator.index(value)
    if (low is not None and value < low) or (high is not None and value >= high):
        span = (f"in [{low}, {high})" if low is not None and high is not None
                else f">= {low}" if low is not None else f"< {high}")
        raise error(f"rank {rank}: {name} must be an int {span}, got {value}")
    return value
