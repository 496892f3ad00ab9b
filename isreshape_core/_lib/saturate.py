"""Products with an exponential, ``a * exp(x)``, that saturate at the largest finite float.

The rule the objective's gradients follow: the plain product wherever it is representable, and
``sign(a) * max_float`` (reported as capped) where it is not, with no overflow on the way, so no
floating-point warning and no ``inf * 0 = NaN``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .dtypes import log_max
from .namespace import Array, Namespace

__all__ = [
    "ExpFactors",
    "divide_or_inf",
    "exp_factors",
    "times_exp",
    "times_factors",
    "times_or_inf",
]

#: ``exp(x)`` is taken in up to this many equal factors: a power of 2, so that ``x / k`` is exact.
_MAX_PIECES = 4


class ExpFactors(NamedTuple):
    """``exp(x)`` as ``pieces`` equal factors ``e`` (1, 2 or 4), and ``bound``: a ``|value|``
    up to it times ``e`` cannot overflow. From :func:`exp_factors`, for :func:`times_factors`."""

    e: Array
    pieces: Array
    bound: Array


def exp_factors(xp: Namespace, x: Array) -> ExpFactors:
    """The factors of ``exp(x)``: one (``exp(x)`` itself) where it is a normal float, two
    ``exp(x / 2)`` where it over- or underflows, four ``exp(x / 4)`` beyond twice the limit
    (halving is exact). Beyond four times the limit every nonzero product is out of range
    anyway: the factor is held at the limit, finite."""
    info = xp.finfo(x.dtype)  # dtype metadata, not data: safe under tracing
    top, eps, cap = float(info.max), float(info.eps), log_max(xp, x.dtype)
    low = math.log(float(info.smallest_normal))  # exp(x) is subnormal below it
    one = xp.ones_like(x)
    fits_1 = (x <= cap) & (x >= low)
    fits_2 = (x <= 2.0 * cap) & (x >= 2.0 * low)
    pieces = xp.where(fits_1, one, xp.where(fits_2, 2.0 * one, float(_MAX_PIECES) * one))
    e = xp.exp(xp.minimum(x / pieces, cap))
    grows = e > 1.0
    # |acc| <= bound guarantees |acc * e| < max_float: the bound is rounded down by 4 eps.
    bound = xp.where(grows, top / xp.where(grows, e, 1.0) * (1.0 - 4.0 * eps), xp.inf)
    return ExpFactors(e, pieces, bound)


def times_factors(xp: Namespace, a: Array, f: ExpFactors) -> tuple[Array, Array]:
    """``(a * exp(x), capped)`` from ``f = exp_factors(xp, x)``: see :func:`times_exp`."""
    top = float(xp.finfo(f.e.dtype).max)
    acc, capped = a, xp.zeros_like(f.bound > 0)
    for step in range(_MAX_PIECES):  # a fixed number of steps, not a loop over data
        use = f.pieces > step
        fits = xp.abs(acc) <= f.bound
        capped = capped | (use & ~fits)
        acc = acc * xp.where(use & fits, f.e, 1.0)  # times 1: exact
    full = xp.full_like(acc, top)
    return xp.where(capped, xp.where(a > 0, full, -full), acc), capped


def times_exp(xp: Namespace, a: Array, x: Array) -> tuple[Array, Array]:
    """``(a * exp(x), capped)`` elementwise, finite for finite ``a`` and ``x < +inf``.

    Where ``exp(x)`` is a normal float and the product fits the dtype, the value is the plain
    ``a * exp(x)``, bit for bit. Where ``exp(x)`` alone overflows (a small ``|a|``) or is
    subnormal (a large ``|a|``) but the product is in range, it is ``a * e * e`` with
    ``e = exp(x / 2)`` (four factors ``exp(x / 4)`` beyond twice the limit): within 2 (4) ulp of
    the exact value instead of ``inf`` or a product that lost its digits to underflow. Where
    the product is out of range the value is ``sign(a) * finfo.max`` and ``capped`` is True;
    so is a product within about 2 ulp below ``finfo.max`` (a multiplication is taken only
    where it provably cannot overflow). ``a = 0`` gives 0, ``x = -inf`` gives ``0 * sign(a)``;
    NaN in either gives NaN or a capped entry (callers mark traced bad inputs themselves).
    """
    return times_factors(xp, a, exp_factors(xp, x))


def times_or_inf(xp: Namespace, a: Array, b: Array) -> Array:
    """``a * b``, ``+-inf`` (the sign of the product) where it overflows, without the warning.

    The plain product, bit for bit, wherever it provably fits (``|a| <= max / |b|``, rounded
    down); products within about 2 ulp below ``finfo.max`` count as overflowing. ``0 * inf``
    is NaN, as in IEEE arithmetic: callers replace the zero factors they define first.
    """
    info = xp.finfo(b.dtype)
    top, eps = float(info.max), float(info.eps)
    big = xp.abs(b) > 1.0
    bound = xp.where(big, top / xp.where(big, xp.abs(b), 1.0) * (1.0 - 4.0 * eps), xp.inf)
    fits = xp.abs(a) <= bound
    product = xp.where(fits, a, 0.0) * xp.where(fits, b, 0.0)
    inf = xp.full_like(product, xp.inf)
    return xp.where(fits, product, xp.where((a > 0) == (b > 0), inf, -inf))


def divide_or_inf(xp: Namespace, a: Array, d: Array) -> Array:
    """``a / d`` for ``0 < d <= 1``, ``+-inf`` (the sign of ``a``) where it overflows, without
    the warning; the plain quotient, bit for bit, wherever it provably fits."""
    info = xp.finfo(d.dtype)
    fits = xp.abs(a) <= float(info.max) * d * (1.0 - 4.0 * float(info.eps))
    quotient = xp.where(fits, a, 0.0) / xp.where(fits, d, 1.0)
    inf = xp.full_like(quotient, xp.inf)
    return xp.where(fits, quotient, xp.where(a > 0, inf, -inf))
