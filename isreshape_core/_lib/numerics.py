"""Log-space arithmetic without overflow, NaN or floating-point warnings.

Shift by the row maximum, log-sum-exp, sums that cannot overflow in a partial sum, capped
exponentials, ``log|x|``, and the variance of log weights taken on scaled deviations.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
from array_api_compat import is_array_api_strict_namespace, is_numpy_namespace

from .dtypes import log_max
from .namespace import Array, Namespace
from .reduce import Reducer, reduce_max, reduce_sum

__all__ = [
    "exp_capped",
    "expm1_capped",
    "floored_shift",
    "log_abs",
    "log_variance_stats",
    "logsumexp",
    "power_of_two_below",
    "quiet_overflow",
    "safe_sum",
    "scaled_deviations",
    "scaled_square",
    "scaled_sum",
    "shift_by_max",
    "shift_floor",
    "shift_from_max",
    "tempered_log_weights",
]


def tempered_log_weights(xp: Namespace, log_w: Array, gamma: Array) -> Array:
    """``gamma * log_w`` with ``-inf`` kept at ``-inf`` for every gamma, ``gamma = 0`` included.

    A sample of weight 0 (or a masked one) never counts: ``0**0`` is not 1 here.
    """
    zero_weight = log_w == -xp.inf
    # Multiply a finite stand-in: 0 * -inf would be NaN (and a warning in numpy).
    return xp.where(zero_weight, -xp.inf, gamma * xp.where(zero_weight, 0.0, log_w))


def exp_capped(xp: Namespace, x: Array) -> Array:
    """``exp(x)``, ``+inf`` where it overflows, without numpy's overflow warning."""
    big = x > log_max(xp, x.dtype)
    return xp.where(big, xp.inf, xp.exp(xp.where(big, 0.0, x)))


def expm1_capped(xp: Namespace, x: Array) -> Array:
    """``expm1(x)``, ``+inf`` where it overflows, without numpy's overflow warning."""
    big = x > log_max(xp, x.dtype)
    return xp.where(big, xp.inf, xp.expm1(xp.where(big, 0.0, x)))


def log_abs(xp: Namespace, x: Array) -> Array:
    """``log|x|`` with ``-inf`` at ``x = 0`` and no divide-by-zero warning."""
    nonzero = x != 0
    return xp.where(nonzero, xp.log(xp.abs(xp.where(nonzero, x, 1.0))), -xp.inf)


def shift_by_max(
    xp: Namespace, x: Array, axis: int, reducer: Reducer | None = None
) -> tuple[Array, Array]:
    """``(x - max, max)`` along ``axis`` (keepdims; over all shards), ``max`` 0 for a row
    without a finite entry. Statistics that are invariant to a constant shift of the log
    weights take their input relative to the max first, so that the shift costs no digits
    (``1e15 + l`` rounds ``l`` to 0.125, but every later step is exact relative to the max)."""
    return shift_from_max(xp, x, reduce_max(xp, x, axis, reducer, keepdims=True))


def shift_from_max(xp: Namespace, x: Array, top: Array) -> tuple[Array, Array]:
    """:func:`shift_by_max` given the row maximum ``top`` (keepdims), for callers that take it
    in one reduction with other statistics."""
    top = xp.where(xp.isfinite(top), top, 0.0)
    return xp.where(x == -xp.inf, -xp.inf, floored_shift(xp, x, top)), top


def shift_floor(xp: Namespace, dtype: Any) -> float:
    """The floor of :func:`floored_shift`, ``-max_float * 2^-20`` in ``dtype``."""
    return -float(xp.finfo(dtype).max) * 2.0**-20


def floored_shift(xp: Namespace, x: Array, top: Array) -> Array:
    """``max(x - top, floor)`` for ``x <= top`` (``top`` finite, or ``-inf`` with ``x``), with
    ``floor = -max_float * 2^-20``, finite and without a floating-point warning.

    Entries further below the max than the floor (a relative weight of ``exp(-3e32)`` in float32)
    are set to it: finite (a weight 0 for every gamma that matters, still a positive weight at
    gamma = 0), and sums of up to 2^20 of them cannot overflow. A ``-inf`` entry gives the floor
    too (callers mask it).
    """
    floor = shift_floor(xp, x.dtype)
    # x - top overflows (to -inf) only far below the floor, which the max then returns: the
    # overflow is exact here, so only NumPy's warning about it is silenced.
    with quiet_overflow(xp):
        return xp.maximum(x - top, floor)


def power_of_two_below(xp: Namespace, size: Array) -> Array:
    """The largest power of 2 at most ``size`` (``size > 0``; 1 where ``size`` is 0), at most
    ``2^(e - 1)`` for the dtype's largest exponent ``e``: dividing by it is exact and brings
    ``size`` into ``[1, 2)`` (``[1, 4)`` at the top of the range)."""
    # Two below the exponent limit, not one: 1 / 2^e is subnormal, and XLA computes a division
    # by a broadcast value as a product with its reciprocal, which its CPU flushes to 0. The
    # clamp also catches a log2 of a value near the largest float that rounds up to e + 1.
    top_exp = float(math.frexp(float(xp.finfo(size.dtype).max))[1] - 2)  # 126, 1022
    return xp.pow(2.0, xp.minimum(xp.floor(xp.log2(xp.where(size > 0, size, 1.0))), top_exp))


def safe_sum(xp: Namespace, x: Array, axis: int = -1) -> Array:
    """``sum(x, axis)`` without an intermediate overflow (``x``: finite, ``-inf`` or NaN).

    Two sums that read ``x`` together (one pass where a compiler fuses them): the plain one and
    that of ``x 2^-k``, with ``2^k`` at least the number of terms, which no partial sum can
    overflow. Where the plain sum is finite no partial sum overflowed (an infinite one stays
    infinite or NaN), and it is the result, bit for bit; elsewhere the scaled sum times ``2^k``
    (exact), or ``+-inf`` where that is out of range: ``+-inf`` only where the sum itself is out
    of range, never ``inf - inf = NaN`` from a partial sum. ``-inf`` and NaN terms give
    ``-inf`` and NaN either way.
    """
    if x.shape[axis] <= 1:
        return xp.sum(x, axis=axis)
    factor = _overflow_free_factor(x.shape[axis])
    fmax = float(xp.finfo(x.dtype).max)
    with quiet_overflow(xp):  # the plain sum may overflow, on purpose
        plain = xp.sum(x, axis=axis)
    scaled = scaled_sum(xp, x, axis)
    back_fits = xp.abs(scaled) <= fmax / factor  # the scaled sum, multiplied back, fits
    back = xp.where(back_fits, scaled, 0.0) * factor
    # Out of range: +-inf, as scaled * inf gives, with no overflow warning.
    back = xp.where(back_fits, back, xp.where(back_fits, 1.0, scaled) * xp.inf)
    return xp.where(xp.isfinite(plain), plain, back)


def scaled_sum(xp: Namespace, x: Array, axis: int = -1) -> Array:
    """``sum(x 2^-k, axis)`` with ``2^k`` at least the number of terms: no partial sum of
    finite terms overflows, so the result is finite exactly where every term is (and the same
    expression in :func:`safe_sum`, which a compiler computes once)."""
    return xp.sum(x * (1.0 / _overflow_free_factor(x.shape[axis])), axis=axis)


def _overflow_free_factor(n: int) -> float:
    """``2^k``, the least power of 2 at least ``n``."""
    return 2.0 ** math.ceil(math.log2(max(n, 1)))


def logsumexp(
    xp: Namespace, x: Array, axis: int, keepdims: bool = False, reducer: Reducer | None = None
) -> Array:
    """``log(sum(exp(x)))`` along ``axis`` (over all shards); ``-inf`` for an all-``-inf`` row."""
    shifted, m = shift_by_max(xp, x, axis, reducer)
    total = reduce_sum(xp, xp.exp(shifted), axis, reducer, keepdims=True)
    positive = total > 0
    # log(0) is taken on a dummy 1 so that numpy raises no divide-by-zero warning.
    out = xp.where(positive, xp.log(xp.where(positive, total, 1.0)) + m, -xp.inf)
    if not keepdims:
        out = xp.squeeze(out, axis=axis)
    return out


def scaled_deviations(
    xp: Namespace, l: Array, axis: int, reducer: Reducer | None = None
) -> tuple[Array, Array, Array]:
    """``(count, dev, scale)`` of the finite entries of ``l`` along ``axis``.

    ``dev = (l - mean) / scale`` (0 at ``-inf``), ``scale`` a power of 2 near ``max|l|``
    (keepdims), so that no moment of ``dev`` overflows, also for log weights near ``+-1e308``.
    The mean is taken of ``l / scale - max(l) / scale``: the power-of-2 scaling is exact and the
    difference of nearby values is too (Sterbenz), so a constant offset of ``l`` (even ``1e15``)
    does not cost the deviations any digits. One max and two sums over all shards.
    """
    finite = l > -xp.inf
    l0 = xp.where(finite, l, 0.0)
    big = xp.stack([xp.max(xp.abs(l0), axis=axis), xp.max(xp.where(finite, l, -xp.inf), axis=axis)])
    if reducer is not None:
        big = reducer.max(big)
    size, top = xp.expand_dims(big[0, ...], axis=axis), xp.expand_dims(big[1, ...], axis=axis)
    scale = power_of_two_below(xp, size)
    top = xp.where(xp.isfinite(top), top, 0.0)
    u = xp.where(finite, l0 / scale - top / scale, 0.0)  # in [-8, 0]
    count = reduce_sum(xp, xp.astype(finite, l.dtype), axis, reducer, keepdims=True)
    mean = reduce_sum(xp, u, axis, reducer, keepdims=True) / xp.where(count > 0, count, 1.0)
    dev = xp.where(finite, u - mean, 0.0)
    return count, dev, scale


def scaled_square(xp: Namespace, value: Array, scale: Array) -> Array:
    """``value * scale**2`` for ``value >= 0``, ``+inf`` where it overflows, without a warning."""
    positive = value > 0
    log_out = xp.log(xp.where(positive, value, 1.0)) + 2.0 * xp.log(scale)
    fits = ~positive | (log_out < log_max(xp, value.dtype) - 1e-4)
    safe = xp.where(fits, value, 0.0)
    return xp.where(fits, (safe * scale) * scale, xp.inf)


def log_variance_stats(
    xp: Namespace, l: Array, axis: int, reducer: Reducer | None = None
) -> tuple[Array, Array]:
    """(count, variance with ddof=1) of the finite entries of ``l`` along ``axis``.

    From :func:`scaled_deviations`: invariant to a constant offset of ``l`` and ``+inf`` (not a
    warning) where the variance itself exceeds the largest float.
    """
    count, dev, scale = scaled_deviations(xp, l, axis, reducer)
    var = reduce_sum(xp, dev * dev, axis, reducer, keepdims=True) / xp.where(
        count > 1, count - 1.0, 1.0
    )
    var = scaled_square(xp, var, scale)
    return xp.squeeze(count, axis=axis), xp.squeeze(var, axis=axis)


def quiet_overflow(xp: Namespace) -> contextlib.AbstractContextManager[Any]:
    """NumPy's floating-point warnings off (NumPy and array-api-strict; the other libraries do
    not warn), for a fast path that checks its results and discards them where any overflowed."""
    if is_numpy_namespace(xp) or is_array_api_strict_namespace(xp):
        return np.errstate(all="ignore")
    return contextlib.nullcontext()
