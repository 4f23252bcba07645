"""Elementwise arithmetic and functions; each forward followed by its VJPs."""
from __future__ import annotations

import numpy

from ..backend import get_array_module
from ..primitive import primitive, shape_of, unbroadcast


def _xp(*args):
    for a in args:
        if type(a).__module__.startswith("cupy"):
            return get_array_module(a)
    return numpy


def _fwd(name):
    on_host = getattr(numpy, name)

    def forward(*args):
        xp = _xp(*args)
        return on_host(*args) if xp is numpy else getattr(xp, name)(*args)
    forward.__name__ = name
    return forward


add = primitive(_fwd("add"), name="add")
add.defvjp(lambda g, ans, x, y: unbroadcast(g, shape_of(x)),
           lambda g, ans, x, y: unbroadcast(g, shape_of(y)))

subtract = primitive(_fwd("subtract"), name="subtract")
subtract.defvjp(lambda g, ans, x, y: unbroadcast(g, shape_of(x)),
                lambda g, ans, x, y: unbroadcast(-g, shape_of(y)))

multiply = primitive(_fwd("multiply"), name="multiply")
multiply.defvjp(lambda g, ans, x, y: unbroadcast(g * y, shape_of(x)),
                lambda g, ans, x, y: unbroadcast(g * x, shape_of(y)))

divide = primitive(_fwd("true_divide"), name="divide")
divide.defvjp(lambda g, ans, x, y: unbroadcast(g / y, shape_of(x)),
              lambda g, ans, x, y: unbroadcast(-g * ans / y, shape_of(y)))

negative = primitive(_fwd("negative"), name="negative")
negative.defvjp(lambda g, ans, x: -g)


def _power(x, y):
    return _xp(x, y).power(x, y)


def _power_vjp_base(g, ans, x, y):
    xp = _xp(x, y)
    # y * x**(y-1), written so that a zero exponent gives an exact zero even where x == 0.
    dx = xp.where(xp.asarray(y) == 0, 0, y * xp.power(x, xp.where(xp.asarray(y) == 0, 1, y) - 1))
    return unbroadcast(g * dx, shape_of(x))


def _power_vjp_exponent(g, ans, x, y):
    xp = _xp(x, y)
    safe = xp.where(xp.asarray(x) > 0, x, 1)
    return unbroadcast(g * ans * xp.log(safe), shape_of(y))


power = primitive(_power, name="power")
power.defvjp(_power_vjp_base, _power_vjp_exponent)

exp = primitive(_fwd("exp"), name="exp")
exp.defvjp(lambda g, ans, x: g * ans)

log = primitive(_fwd("log"), name="log")
log.defvjp(lambda g, ans, x: g / x)

sqrt = primitive(_fwd("sqrt"), name="sqrt")
sqrt.defvjp(lambda g, ans, x: g * 0.5 / ans)

sin = primitive(_fwd("sin"), name="sin")
sin.defvjp(lambda g, ans, x: g * _xp(x).cos(x))

cos = primitive(_fwd("cos"), name="cos")
cos.defvjp(lambda g, ans, x: -g * _xp(x).sin(x))

tanh = primitive(_fwd("tanh"), name="tanh")
tanh.defvjp(lambda g, ans, x: g * (1 - ans * ans))

abs = primitive(_fwd("abs"), name="abs")
abs.defvjp(lambda g, ans, x: g * _xp(x).sign(x))

# Ties send the cotangent to the first argument.
maximum = primitive(_fwd("maximum"), name="maximum")
maximum.defvjp(lambda g, ans, x, y: unbroadcast(g * (x >= y), shape_of(x)),
               lambda g, ans, x, y: unbroadcast(g * (x < y), shape_of(y)))

minimum = primitive(_fwd("minimum"), name="minimum")
minimum.defvjp(lambda g, ans, x, y: unbroadcast(g * (x <= y), shape_of(x)),
               lambda g, ans, x, y: unbroadcast(g * (x > y), shape_of(y)))

where = primitive(_fwd("where"), name="where")
where.defvjp(None,
             lambda g, ans, c, x, y: unbroadcast(_xp(g).where(c, g, 0), shape_of(x)),
             lambda g, ans, c, x, y: unbroadcast(_xp(g).where(c, 0, g), shape_of(y)))

less = primitive(_fwd("less"), name="less")
less_equal = primitive(_fwd("less_equal"), name="less_equal")
greater = primitive(_fwd("greater"), name="greater")
greater_equal = primitive(_fwd("greater_equal"), name="greater_equal")
for _cmp in (less, less_equal, greater, greater_equal):
    _cmp.defvjp()
