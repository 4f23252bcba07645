"""Elementwise arithmetic and functions; each forward followed by its VJPs."""
from __future__ import annotations

import numpy

from ..backend import get_array_module
from ..primitive import primitive, shape_of, unbroadcast
from ..tensor import Tensor
from ..transport import pooled


def _xp(*args):
    for a in args:
        if type(a).__module__.startswith("cupy"):
            return get_array_module(a)
    return numpy


# Forwards are NumPy's own functions: they hand CuPy arrays to CuPy (__array_ufunc__ and
# __array_function__), so one definition serves both backends. Large NumPy results, and the
# products of the multiply, divide, exp and log rules, go to the results' pool (pooled).
_mul = pooled(numpy.multiply)
_div = pooled(numpy.true_divide)

add = primitive(pooled(numpy.add), name="add", reads_args=False)
add.defvjp(lambda g, ans, x, y: unbroadcast(g, shape_of(x)),
           lambda g, ans, x, y: unbroadcast(g, shape_of(y)))

subtract = primitive(pooled(numpy.subtract), name="subtract", reads_args=False)
subtract.defvjp(lambda g, ans, x, y: unbroadcast(g, shape_of(x)),
                lambda g, ans, x, y: unbroadcast(-g, shape_of(y)))

multiply = primitive(_mul, name="multiply")
multiply.defvjp(lambda g, ans, x, y: unbroadcast(_mul(g, y), shape_of(x)),
                lambda g, ans, x, y: unbroadcast(_mul(g, x), shape_of(y)))

divide = primitive(_div, name="divide")
divide.defvjp(lambda g, ans, x, y: unbroadcast(_div(g, y), shape_of(x)),
              lambda g, ans, x, y: unbroadcast(-g * ans / y, shape_of(y)))

negative = primitive(pooled(numpy.negative), name="negative")
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

exp = primitive(pooled(numpy.exp), name="exp")
exp.defvjp(lambda g, ans, x: _mul(g, ans))

log = primitive(pooled(numpy.log), name="log")
log.defvjp(lambda g, ans, x: _div(g, x))

sqrt = primitive(pooled(numpy.sqrt), name="sqrt")
sqrt.defvjp(lambda g, ans, x: g * 0.5 / ans)

sin = primitive(pooled(numpy.sin), name="sin")
sin.defvjp(lambda g, ans, x: g * numpy.cos(x))

cos = primitive(pooled(numpy.cos), name="cos")
cos.defvjp(lambda g, ans, x: -g * numpy.sin(x))

tanh = primitive(pooled(numpy.tanh), name="tanh")
tanh.defvjp(lambda g, ans, x: g * (1 - ans * ans))

abs = primitive(pooled(numpy.abs), name="abs")
abs.defvjp(lambda g, ans, x: g * numpy.sign(x))

# Ties send the cotangent to the first argument.
maximum = primitive(pooled(numpy.maximum), name="maximum")
maximum.defvjp(lambda g, ans, x, y: unbroadcast(g * (x >= y), shape_of(x)),
               lambda g, ans, x, y: unbroadcast(g * (x < y), shape_of(y)))

minimum = primitive(pooled(numpy.minimum), name="minimum")
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
