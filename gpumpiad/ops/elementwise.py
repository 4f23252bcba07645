"""Elementwise arithmetic and functions; each forward followed by its VJPs."""
from __future__ import annotations

import numpy

from ..backend import get_array_module
from ..primitive import primitive, shape_of, unbroadcast
from ..tensor import Tensor


def _xp(*args):
    for a in args:
        if type(a).__module__.startswith("cupy"):
            return get_array_module(a)
    return numpy


# Forwards are NumPy's own functions: they hand CuPy arrays to CuPy (__array_ufunc__ and
# __array_function__), so one definition serves both backends.
add = primitive(numpy.add, name="add")
add.defvjp(lambda g, ans, x, y: unbroadcast(g, shape_of(x)),
           lambda g, ans, x, y: unbroadcast(g, shape_of(y)))

subtract = primitive(numpy.subtract, name="subtract")
subtract.defvjp(lambda g, ans, x, y: unbroadcast(g, shape_of(x)),
                lambda g, ans, x, y: unbroadcast(-g, shape_of(y)))

multiply = primitive(numpy.multiply, name="multiply")
multiply.defvjp(lambda g, ans, x, y: unbroadcast(g * y, shape_of(x)),
                lambda g, ans, x, y: unbroadcast(g * x, shape_of(y)))

divide = primitive(numpy.true_divide, name="divide")
divide.defvjp(lambda g, ans, x, y: unbroadcast(g / y, shape_of(x)),
              lambda g, ans, x, y: unbroadcast(-g * ans / y, shape_of(y)))

negative = primitive(numpy.negative, name="negative")
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

exp = primitive(numpy.exp, name="exp")
exp.defvjp(lambda g, ans, x: g * ans)

log = primitive(numpy.log, name="log")
log.defvjp(lambda g, ans, x: g / x)

sqrt = primitive(numpy.sqrt, name="sqrt")
sqrt.defvjp(lambda g, ans, x: g * 0.5 / ans)

sin = primitive(numpy.sin, name="sin")
sin.defvjp(lambda g, ans, x: g * numpy.cos(x))

cos = primitive(numpy.cos, name="cos")
cos.defvjp(lambda g, ans, x: -g * numpy.sin(x))

tanh = primitive(numpy.tanh, name="tanh")
tanh.defvjp(lambda g, ans, x: g * (1 - ans * ans))

abs = primitive(numpy.abs, name="abs")
abs.defvjp(lambda g, ans, x: g * numpy.sign(x))

# Ties send the cotangent to the first argument.
maximum = primitive(numpy.maximum, name="maximum")
maximum.defvjp(lambda g, ans, x, y: unbroadcast(g * (x >= y), shape_of(x)),
               lambda g, ans, x, y: unbroadcast(g * (x < y), shape_of(y)))

minimum = primitive(numpy.minimum, name="minimum")
minimum.defvjp(lambda g, ans, x, y: unbroadcast(g * (x <= y), shape_of(x)),
               lambda g, ans, x, y: unbroadcast(g * (x > y), shape_of(y)))

where = primitive(numpy.where, name="where")
where.defvjp(None,
             lambda g, ans, c, x, y: unbroadcast(numpy.where(c, g, 0), shape_of(x)),
             lambda g, ans, c, x, y: unbroadcast(numpy.where(c, 0, g), shape_of(y)))

less = primitive(numpy.less, name="less")
less_equal = primitive(numpy.less_equal, name="less_equal")
greater = primitive(numpy.greater, name="greater")
greater_equal = primitive(numpy.greater_equal, name="greater_equal")
for _cmp in (less, less_equal, greater, greater_equal):
    _cmp.defvjp()


def _operator(prim, reflected):
    call = prim.__call__
    if reflected:
        def method(self, other):
            return call(other, self)
    else:
        def method(self, other):
            return call(self, other)
    return method


for _dunder, _prim in (("add", add), ("sub", subtract), ("mul", multiply),
                       ("truediv", divide), ("pow", power)):
    setattr(Tensor, f"__{_dunder}__", _operator(_prim, False))
    setattr(Tensor, f"__r{_dunder}__", _operator(_prim, True))
for _dunder, _prim in (("lt", less), ("le", less_equal), ("gt", greater),
                       ("ge", greater_equal)):
    setattr(Tensor, f"__{_dunder}__", _operator(_prim, False))
