"""``objective_grad`` and ``reinforce_objective_grad`` near and beyond the overflow of ``w**gamma``.

The derivative is ``r w**gamma = r exp(gamma l)``. The references are exact: Python's
``decimal`` at 60 digits, clipped to the dtype's largest float where the exact value exceeds it
(the documented saturation), and central finite differences of :func:`objective` in float64.
"""

from __future__ import annotations

import decimal
import math
import warnings

import numpy as np
import pytest
from _helpers import to_numpy

from isreshape_core import (
    objective,
    objective_grad,
    reinforce_objective,
    reinforce_objective_grad,
)

GAMMAS = (0.0, 0.5, 1.0)
DTYPES = (np.float32, np.float64)

#: Log weights around each dtype's overflow threshold (log max: 88.72 and 709.78) and far
#: beyond it, and some ordinary ones.
LOG_W = {
    np.float32: [-1e30, -200.0, -1.5, 0.0, 2.0, 80.0, 88.0, 88.72, 88.75, 89.0, 100.0, 150.0,
                 177.0, 178.0, 190.0, 400.0, 1e4, 3e38],
    np.float64: [-1e300, -800.0, -1.5, 0.0, 2.0, 700.0, 709.0, 709.78, 709.8, 710.0, 800.0,
                 1000.0, 1419.0, 1420.0, 1450.0, 3000.0, 1e5, 1.7e308],
}  # fmt: skip
#: Rewards with zeros, both signs and magnitudes that bring an overflowing ``w**gamma`` back in
#: range (``1e-10 e^100`` fits float32), subnormals included.
REWARDS = {
    np.float32: [0.0, 1.0, -1.0, 2.5, -3e5, 1e-10, -1e-30, 1e-38, 2e-45, 3e38],
    np.float64: [0.0, 1.0, -1.0, 2.5, -3e5, 1e-10, -1e-200, 1e-308, 1e-320, 1.7e308],
}


def exact_grad(l: np.ndarray, r: np.ndarray, gamma: float, dtype, n: int = 1) -> np.ndarray:
    """``r exp(gamma l) / n`` exactly (``decimal``), clipped to ``+-finfo(dtype).max``, rounded
    once.

    ``gamma * l`` is exact in the dtype for these gammas (a product by 0, 1/2 or 1)."""
    top = decimal.Decimal(float(np.finfo(dtype).max))
    out = np.empty(l.shape, dtype=np.float64)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        for i, (li, ri) in enumerate(zip(l.ravel().tolist(), r.ravel().tolist(), strict=True)):
            x = gamma * li
            if ri == 0.0 or x == -math.inf:
                out.flat[i] = 0.0
                continue
            # The exponent of the exact value, to skip exp() of numbers beyond decimal's range.
            log10_abs = math.log10(abs(ri)) + x / math.log(10.0)
            if log10_abs > 400:
                value = top.copy_sign(decimal.Decimal(ri))
            else:
                value = decimal.Decimal(ri) * decimal.Decimal(x).exp() / n
                value = max(-top, min(top, value))
            out.flat[i] = float(value)
    return out.astype(dtype)


def grid(dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every log weight with every reward, as two 1-D arrays of the dtype."""
    l, r = np.meshgrid(np.array(LOG_W[dtype], dtype), np.array(REWARDS[dtype], dtype))
    return l.ravel(), r.ravel()


def ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``|got - want|`` in units of the last place of ``want`` (of the smallest normal for 0)."""
    dtype = want.dtype
    tiny = np.finfo(dtype).tiny
    # spacing(max) itself overflows: the ulp just below it is the same.
    below_top = np.nextafter(np.finfo(dtype).max, np.zeros((), dtype))
    spacing = np.spacing(np.clip(np.abs(want), tiny, below_top).astype(dtype))
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return diff / spacing.astype(np.float64)


def subnormal_entries(xp, dtype, r: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Entries to leave out where the backend flushes subnormals to 0 (XLA on CPU does): a
    subnormal reward or exact value. Empty where subnormals are kept (numpy, torch)."""
    tiny = np.finfo(dtype).smallest_normal
    half = xp.asarray(np.array([tiny / 2], dtype))
    if to_numpy(half * xp.asarray(np.array([1.0], dtype)))[0] != 0:
        return np.zeros(r.shape, bool)
    return (np.abs(r) < tiny) | (np.abs(want) < tiny)


def exp_error(xp, dtype) -> float:
    """The largest error of the backend's own ``exp`` in ulp, on arguments up to ``log max``:
    the core cannot be more exact than the ``exp`` it calls (XLA's float32 exp is off by up to
    about 5 ulp near the top, numpy's by at most 1)."""
    log_top = math.log(float(np.finfo(dtype).max))
    x = np.linspace(-80.0, log_top - 1e-3, 4001).astype(dtype)
    got = to_numpy(xp.exp(xp.asarray(x)))
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        want = np.array([float(decimal.Decimal(v).exp()) for v in x.tolist()]).astype(dtype)
    return float(np.max(ulps(got, want)))


def call_quietly(xp, fn):
    """``fn()`` with every warning an error (numpy's overflow and invalid warnings included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_grad_is_finite_and_exact_or_saturated(xp, dtype, gamma):
    l, r = grid(dtype)
    got = to_numpy(
        call_quietly(xp, lambda: objective_grad(xp.asarray(l), xp.asarray(r), gamma,
                                                reduction="none"))
    )  # fmt: skip
    assert got.dtype == dtype
    assert np.all(np.isfinite(got)), l[~np.isfinite(got)]
    want = exact_grad(l, r, gamma, dtype)
    top = np.finfo(dtype).max
    flushed = subnormal_entries(xp, dtype, r, want)  # the backend's, not ours
    out_of_range = np.abs(want) == top
    saturated = out_of_range & ~flushed
    np.testing.assert_array_equal(got[saturated], want[saturated])  # saturated, signed
    err = np.where(flushed, 0.0, ulps(got, want))
    x = (gamma * l).astype(np.float64)
    log_tiny = math.log(float(np.finfo(dtype).smallest_normal))
    w_fits = (x < math.log(float(top)) - 1e-3) & (x > log_tiny)  # w**gamma a normal float
    e = exp_error(xp, dtype)
    # Where w**gamma and the product fit: the plain product, within the backend's exp and the
    # rounding of the product (1.5 ulp with numpy's exp).
    fits = w_fits & ~out_of_range
    assert np.all(err[fits] <= e + 1.0), (l[fits], r[fits], err[fits])
    # Where only w**gamma overflows (or underflows): up to four factors exp(gamma l / 4), a few
    # roundings more (4 ulp with numpy's exp), never a saturation (nor a product that lost
    # its digits to a subnormal w**gamma).
    small = ~w_fits & ~out_of_range
    assert np.all(err[small] <= 4.0 * (e + 0.5)), (l[small], r[small], err[small])
    if gamma > 0:
        assert np.any(small), "the grid must hold products that fit where w**gamma overflows"
    np.testing.assert_array_equal(got[r == 0], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_grad_is_the_plain_product_bit_for_bit_where_nothing_overflows(xp, dtype, gamma):
    l, r = grid(dtype)
    x = gamma * l
    log_top = math.log(float(np.finfo(dtype).max))
    with np.errstate(divide="ignore"):  # the test's own log|0| only
        log_abs_r = np.log(np.abs(r.astype(np.float64)))
    log_tiny = math.log(float(np.finfo(dtype).smallest_normal))
    safe = (x < log_top - 1.0) & (x > log_tiny + 1.0) & (log_abs_r + x < log_top - 1.0)
    X, R = xp.asarray(np.where(safe, x, 0.0).astype(dtype)), xp.asarray(r)
    plain = to_numpy(R * xp.exp(X))  # the same backend's exp, no overflow by construction
    got = to_numpy(objective_grad(xp.asarray(l), R, gamma, reduction="none"))
    np.testing.assert_array_equal(got[safe], plain[safe])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions_saturate_after_the_mean(xp, dtype, reduction):
    """``"mean"`` divides by ``n`` before saturating: ``r w / n`` can be in range where
    ``r w`` is not (``e^88.8 / 4`` fits float32, ``e^88.8`` does not)."""
    top = float(np.finfo(dtype).max)
    near = 88.8 if dtype == np.float32 else 709.9
    l = np.array([[near, near + 0.5, 0.3, -np.inf], [near + 5.0, 1.0, -2.0, 0.0]], dtype)
    r = np.array([[1.0, -1.0, 2.0, 3.0], [1.0, 0.0, -1.0, 1.0]], dtype)
    got = to_numpy(call_quietly(xp, lambda: objective_grad(xp.asarray(l), xp.asarray(r), 1.0,
                                                             reduction=reduction)))  # fmt: skip
    want = exact_grad(l, r, 1.0, dtype, n=4 if reduction == "mean" else 1)
    assert np.all(np.isfinite(got))
    assert np.all(ulps(got, want) <= 4.0 * (exp_error(xp, dtype) + 0.5)), (got, want)
    if reduction == "mean":
        assert abs(got[0, 0]) < top and abs(got[0, 1]) < top  # in range after the mean
    assert got[1, 0] == top


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grad_is_monotone_through_the_threshold(xp, dtype, sign):
    log_top = math.log(float(np.finfo(dtype).max))
    l = np.linspace(log_top - 3.0, log_top + 3.0, 2001).astype(dtype)
    r = np.full(l.shape, sign, dtype)
    got = to_numpy(call_quietly(xp, lambda: objective_grad(xp.asarray(l), xp.asarray(r), 1.0,
                                                             reduction="none")))  # fmt: skip
    assert np.all(np.isfinite(got))
    assert np.all(np.diff(sign * got) >= 0)
    assert sign * got[-1] == np.finfo(dtype).max and sign * got[0] < np.finfo(dtype).max


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_grad_matches_finite_differences_of_objective_near_overflow(xp, gamma):
    """float64 log weights whose ``w**gamma`` is within ``e^9`` of the largest float."""
    r = np.array([1.0, -0.5, 2.0, 1e-3])
    l = np.array([700.0, 705.5, 699.0, 709.0]) / gamma
    h = 1e-5

    def f(lv):
        return to_numpy(objective(xp.asarray(lv), xp.asarray(r), gamma, reduction="none"))

    fd = (f(l + h) - f(l - h)) / (2 * h)
    got = to_numpy(objective_grad(xp.asarray(l), xp.asarray(r), gamma, reduction="none"))
    assert np.all(np.isfinite(fd)) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, fd, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reinforce_grad_saturates_like_objective_grad(xp, dtype):
    l, r = grid(dtype)
    logp = np.where(l > 0, -0.5, -l).astype(dtype)  # any finite logp: it does not enter
    got = to_numpy(
        call_quietly(xp, lambda: reinforce_objective_grad(
            xp.asarray(l), xp.asarray(logp), xp.asarray(r), 1.0, reduction="none"))
    )  # fmt: skip
    want = to_numpy(objective_grad(xp.asarray(l), xp.asarray(r), 1.0, reduction="none"))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, want)


def test_grad_saturates_under_jax_jit():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    l, r = grid(np.float32)
    fn = jax.jit(lambda a, b: objective_grad(a, b, 1.0, reduction="none"))
    got = np.asarray(fn(jax.numpy.asarray(l), jax.numpy.asarray(r)))
    assert np.all(np.isfinite(got))
    want = exact_grad(l, r, 1.0, np.float32)
    flushed = subnormal_entries(jax.numpy, np.float32, r, want)
    tol = 4.0 * (exp_error(jax.numpy, np.float32) + 0.5)
    assert np.all(ulps(got, want)[~flushed] <= tol)


def test_grad_saturates_under_torch_compile():
    torch = pytest.importorskip("torch")
    l, r = grid(np.float32)
    fn = torch.compile(lambda a, b: objective_grad(a, b, 1.0, reduction="none"), fullgraph=True)
    got = to_numpy(fn(torch.asarray(l), torch.asarray(r)))
    assert np.all(np.isfinite(got))
    want = exact_grad(l, r, 1.0, np.float32)
    import array_api_compat.torch as xp

    assert np.all(ulps(got, want) <= 4.0 * (exp_error(xp, np.float32) + 0.5))


def exact_terms(l: np.ndarray, r: np.ndarray, gamma: float, dtype, logp=None) -> np.ndarray:
    """The terms of :func:`objective` (``r expm1(gamma l) / gamma``, ``r l`` at 0), or of
    :func:`reinforce_objective` with ``logp`` (``r exp(gamma l) logp``), exactly (``decimal``),
    clipped to ``+-finfo(dtype).max``."""
    top = decimal.Decimal(float(np.finfo(dtype).max))
    out = np.empty(l.shape, dtype=np.float64)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        for i, (li, ri) in enumerate(zip(l.tolist(), r.tolist(), strict=True)):
            D, x = decimal.Decimal, gamma * li
            if logp is not None:
                factor = D(float(logp[i]))
            elif gamma == 0:
                factor = D(li)
            else:
                factor = None
            if ri == 0.0 or (factor is not None and factor == 0):
                out[i] = 0.0
                continue
            log10 = math.log10(abs(ri)) + 1.0  # of the exact value, an upper estimate
            if logp is not None:
                log10 += x / math.log(10.0) + math.log10(abs(float(logp[i])))
            elif gamma == 0:
                log10 += math.log10(abs(li))
            else:
                log10 += max(x, 0.0) / math.log(10.0) - math.log10(gamma)
            if log10 > 400:
                value = top.copy_sign(D(ri) * (factor if factor is not None else 1))
            elif logp is not None:
                value = D(ri) * (D(x).exp() if gamma > 0 else 1) * factor
            elif gamma == 0:
                value = D(ri) * factor
            else:
                value = D(ri) * (D(x).exp() - 1) / D(gamma)
            out[i] = float(max(-top, min(top, value)))
    return out.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_values_are_finite_close_and_saturated(xp, dtype, gamma, form):
    """Every term of the objective and of the REINFORCE form is finite without a warning: the
    plain formula where it fits, taken from its logarithm where only a factor overflows (a
    relative error of about ``|log term| eps``), ``+-finfo.max`` where it is out of range."""
    l, r = grid(dtype)
    keep = l > -1e29  # l = -1e30 at gamma = 0: r l itself is the (representable) term
    logp = np.where(l > 0, -0.5, -3.0).astype(dtype) if form == "reinforce" else None
    if form == "reinforce":
        fn = lambda: reinforce_objective(  # noqa: E731
            xp.asarray(l), xp.asarray(logp), xp.asarray(r), gamma, reduction="none"
        )
    else:
        fn = lambda: objective(xp.asarray(l), xp.asarray(r), gamma, reduction="none")  # noqa: E731
    got = to_numpy(call_quietly(xp, fn))
    assert np.all(np.isfinite(got))
    want = exact_terms(l, r, gamma, dtype, logp)
    flushed = subnormal_entries(xp, dtype, r, want)
    if form == "reinforce":  # and the factor r w**gamma, flushed before it meets logp
        flushed |= subnormal_entries(xp, dtype, r, exact_grad(l, r, gamma, dtype))
    top = np.finfo(dtype).max
    saturated = (np.abs(want) == top) & ~flushed
    np.testing.assert_array_equal(got[saturated], want[saturated])
    eps = float(np.finfo(dtype).eps)
    # From logarithms, the error is eps times the size of the logs of the factors, which can
    # cancel in the sum (1e-300 * e^700): |log r| + |gamma l| + |log logp| bounds it.
    with np.errstate(divide="ignore"):  # the test's own log|0| only
        log_size = np.abs(np.log(np.abs(r.astype(np.float64)))) + np.abs(gamma * l)
        if logp is not None:
            log_size += np.abs(np.log(np.abs(logp.astype(np.float64))))
    rel = np.abs(got.astype(np.float64) - want) / np.maximum(
        np.abs(want.astype(np.float64)), 1e-300
    )
    check = keep & ~flushed & ~saturated & (np.abs(want) > np.finfo(dtype).smallest_normal)
    bound = 4.0 * eps * (log_size + 16.0)
    assert np.all(rel[check] <= bound[check]), (l[check], r[check], rel[check] / eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sums_saturate_at_the_largest_float(xp, dtype, reduction):
    """A mean or sum out of range is ``+-finfo.max`` exactly (the rule of the gradient), and a
    sum of terms that overflow but cancel is formed in log space: finite, and accurate to
    about eps times the largest term only (here the remainder ``2 expm1(0.5)`` is below it)."""
    big = 100.0 if dtype == np.float32 else 800.0
    l = np.array([[big, big, 0.5], [big, big, 0.5]], dtype)
    r = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 2.0]], dtype)
    got = to_numpy(call_quietly(xp, lambda: objective(xp.asarray(l), xp.asarray(r), 1.0,
                                                        reduction=reduction)))  # fmt: skip
    assert got[0] == np.finfo(dtype).max
    assert np.isfinite(got[1]) and abs(got[1]) <= 2.0 * math.expm1(0.5)
