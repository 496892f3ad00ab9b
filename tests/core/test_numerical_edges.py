"""Extreme and bad inputs of the core (issue 14): each test is a defect seen on an earlier
version, with the value computed independently (a shifted or scaled input, a closed form)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from _helpers import to_numpy

import isreshape_core as isr

OFFSETS = (1e12, 1e15, -1e15)


def _shifted_pair(xp, offset):
    """``y = x + offset`` and ``y - max(y)`` (exact: nearby floats subtract exactly)."""
    x = np.random.default_rng(3).standard_t(4, size=(2, 64)) * 2.0
    y = x + offset
    return xp.asarray(y), xp.asarray(y - y.max(axis=-1, keepdims=True))


@pytest.mark.parametrize("offset", OFFSETS)
def test_shift_invariant_statistics_are_exact_at_large_offsets(xp, offset):
    y, z = _shifted_pair(xp, offset)
    pairs = {
        "renyi 2": lambda l: isr.renyi_divergence(l, 2.0),
        "renyi 0.7": lambda l: isr.renyi_divergence(l, 0.7),
        "renyi 1": lambda l: isr.renyi_divergence(l, 1.0),
        "renyi inf": lambda l: isr.renyi_divergence(l, math.inf),
        "gamma_ess": lambda l: isr.gamma_ess(l, 0.3),
        "gamma_closed_form": lambda l: isr.gamma_closed_form(l, 0.3),
        "ess": lambda l: isr.ess(l, 0.3),
        "ess_ratio": lambda l: isr.ess_ratio(l, 0.7),
        "max_weight": lambda l: isr.diagnose(l).max_weight,
        "sigma2": lambda l: isr.diagnose(l).sigma2,
        "step max_weight": lambda l: isr.step_gamma(l[0, ...], 0.3)[1]["max_weight"],
        "step gamma": lambda l: isr.step_gamma(l[1, ...], 0.3)[0],
    }
    for name, fn in pairs.items():
        np.testing.assert_allclose(
            to_numpy(fn(y)), to_numpy(fn(z)), rtol=1e-12, atol=1e-13, err_msg=name
        )


@pytest.mark.parametrize("offset", OFFSETS)
def test_log_mean_tempered_weight_is_exact_relative_to_the_max(xp, offset):
    y, z = _shifted_pair(xp, offset)
    top = np.max(to_numpy(y), axis=-1)
    got = to_numpy(isr.log_mean_tempered_weight(y, 0.3))
    want = 0.3 * top + to_numpy(isr.log_mean_tempered_weight(z, 0.3))
    # Only the result's own rounding: half an ulp of a number near 0.3 * offset, twice.
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * np.spacing(abs(0.3 * offset)))


def test_renyi_across_a_span_of_1e300(xp):
    l = xp.asarray([1e300, -1e300])
    # softmax(l) = (1, 0): D_2(p || uniform) = log(n sum p^2) = log 2, as for (0, -inf).
    np.testing.assert_allclose(to_numpy(isr.renyi_divergence(l, 2.0)), math.log(2), rtol=1e-15)
    np.testing.assert_allclose(to_numpy(isr.renyi_divergence(l, 0.5)), math.log(2), rtol=1e-14)


def test_moments_and_gamma_at_1e300_are_finite_and_warning_free(xp):
    values = np.array([1e300, -1e300, 0.0, 5.0, 3e299])
    l = xp.asarray(values)
    scaled = values / 1e300  # the moments' ratios are scale-free
    dev = scaled - scaled.mean()
    m2, m3, m4 = (np.mean(dev**p) for p in (2, 3, 4))
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        report = isr.diagnose(l)
        gamma = isr.select_gamma(l, 0.3)
        closed = isr.gamma_closed_form(l, 0.3)
    np.testing.assert_allclose(to_numpy(report.skewness), m3 / m2**1.5, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(report.excess_kurtosis), m4 / m2**2 - 3, rtol=1e-12)
    assert to_numpy(report.sigma2) == np.inf  # Var(l) ~ 5e599 is out of range, honestly
    assert np.isfinite(to_numpy(gamma)) and np.isfinite(to_numpy(closed))


def test_diagnose_gamma_honours_the_mask(xp):
    l = xp.asarray([0.0, 1.0, 2.0, 3.0, 9.0, 9.0])
    mask = xp.asarray([True, True, True, True, False, False])
    for rho in (0.5, 0.7, 0.9):
        report = isr.diagnose(l, rho, mask=mask)
        want = to_numpy(isr.select_gamma(xp.asarray([0.0, 1.0, 2.0, 3.0]), rho))
        np.testing.assert_allclose(to_numpy(report.gamma), want, rtol=1e-12)
        np.testing.assert_allclose(
            to_numpy(report.ess_ratio_at_gamma),
            to_numpy(isr.ess_ratio(l, report.gamma, mask=mask)),
            rtol=1e-12,
        )


@pytest.mark.parametrize("size", [30, 100, 300, 5000])
def test_psis_nan_gives_the_nan_message(xp, size):
    l = np.random.default_rng(0).normal(size=(2, size))
    l[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        isr.psis(xp.asarray(l))


def test_psis_grid_point_at_theta_zero_takes_the_profile_limit(xp):
    # The reproduction: one Zhang-Stephens grid point rounds to exactly theta = 0.
    row = np.concatenate(
        [-1 - np.arange(31) * 1e-3, [0.0], np.log1p([0.5, 1, 1.5, 2, 2.5, 3, 4, 5])]
    )
    k0 = to_numpy(isr.psis(xp.asarray(row))[1])
    k1 = to_numpy(isr.psis(xp.asarray(row + 0.1))[1])
    np.testing.assert_allclose(k0, k1, rtol=1e-12)
    np.testing.assert_allclose(k0, 0.0816, atol=5e-5)


def test_psis_first_quartile_at_the_tail_minimum_is_not_fitted(xp):
    # S = 100: a tail of M = 20; its 5 smallest values are tied above the cutoff, so the
    # first quartile x* (the 5th exceedance) equals the smallest: loo >= 2.10 gives k = inf.
    rng = np.random.default_rng(1)
    row = np.concatenate([rng.normal(-5.0, 0.1, 80), np.zeros(5), np.linspace(0.5, 3.0, 15)])
    rng.shuffle(row)
    smoothed, k = isr.psis(xp.asarray(row))
    assert to_numpy(k) == np.inf
    unsmoothed = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
    np.testing.assert_allclose(to_numpy(smoothed), unsmoothed, rtol=1e-12, atol=1e-12)
    # One value fewer tied: x* is above the minimum and the tail is fitted.
    row2 = np.concatenate([rng.normal(-5.0, 0.1, 80), np.zeros(4), np.linspace(0.5, 3.0, 16)])
    assert np.isfinite(to_numpy(isr.psis(xp.asarray(row2))[1]))


def test_refused_dtypes_name_the_argument(xp):
    ints = xp.asarray([100000000 + i for i in range(32)])
    bools = xp.asarray([True, False, True, True])
    for fn in (isr.ess, lambda l: isr.psis(l), lambda l: isr.select_gamma(l)):
        for bad in (ints, bools):
            with pytest.raises(TypeError, match="log_w must have a real floating dtype"):
                fn(bad)
    lp = xp.asarray([[0, 1]])
    with pytest.raises(TypeError, match="logp must have a real floating dtype"):
        isr.log_weights(lp, xp.asarray([[0.0, 1.0]]))
    # The exact float64 computation is one conversion away (float32 would see ties: ESS 32).
    w = np.exp(np.arange(32.0) - 31.0)
    floats = xp.astype(ints, xp.float64)
    np.testing.assert_allclose(to_numpy(isr.ess(floats)), w.sum() ** 2 / (w**2).sum(), rtol=1e-12)


def test_logq_plus_inf_at_a_valid_token_is_refused(xp):
    logp = xp.asarray([[-1.0, -2.0, -1.0]])
    logq = xp.asarray([[-1.0, math.inf, -1.0]])
    with pytest.raises(ValueError, match="logq contains \\+inf"):
        isr.log_weights(logp, logq)
    # Masked, it is padding and is ignored.
    mask = xp.asarray([[True, False, True]])
    np.testing.assert_allclose(to_numpy(isr.log_weights(logp, logq, mask)), [0.0])


def test_gamma_bounds_arrays_are_checked(xp):
    l = xp.asarray(np.random.default_rng(0).normal(size=(2, 50)))
    with pytest.raises(ValueError, match="gamma_min exceeds gamma_max"):
        isr.gamma_ess(l, gamma_min=xp.asarray([0.1, 0.8]), gamma_max=xp.asarray([0.5, 0.2]))
    with pytest.raises(ValueError, match="gamma_min exceeds gamma_max"):
        isr.select_gamma(l, method="closed_form", gamma_min=0.6, gamma_max=xp.asarray([0.5, 1.0]))


def test_error_messages_name_the_argument(xp):
    l = xp.asarray(np.random.default_rng(0).normal(size=50))
    with pytest.raises(TypeError, match="method must be a method name"):
        isr.select_gamma(l, method=xp.asarray(0.5))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        isr.ess(l, mask=[True] * 50)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        isr.log_weights(xp.asarray([[0.0]]), xp.asarray([[0.0]]), [[True]])
    with pytest.raises(TypeError, match="log_w must be an array"):
        isr.ess([0.0, 1.0])


# --------------------------------------------------------------------------------------------
# Traced code cannot raise: NaN in gives NaN where it belongs, never a plausible finite value.


def _traced_functions():
    return {
        "ess": lambda l: isr.ess(l, 0.7),
        "ess_ratio": lambda l: isr.ess_ratio(l, 0.4),
        "gradient_ess": lambda l: isr.gradient_ess(l, l * 0 + 1.0, 0.5),
        "gamma_ess": lambda l: isr.gamma_ess(l, 0.3),
        "gamma_closed_form": lambda l: isr.gamma_closed_form(l, 0.3),
        "select_gamma": lambda l: isr.select_gamma(l, 0.3),
        "renyi": lambda l: isr.renyi_divergence(l, 2.0),
        "log_mean_tempered_weight": lambda l: isr.log_mean_tempered_weight(l, 0.5),
        "psis_k": lambda l: isr.psis(l)[1],
        "psis_smoothed": lambda l: isr.psis(l)[0],
        "gamma_psis": lambda l: isr.gamma_psis(l, 0.3)[0],
        "gamma_tail": lambda l: isr.gamma_tail(l)[0],
        "objective": lambda l: isr.objective(l, l * 0 + 1.0, 0.5),
        "objective_r0": lambda l: isr.objective(l, l * 0, 0.5),
        "objective_grad": lambda l: isr.objective_grad(l, l * 0 + 1.0, 0.5),
        "diagnose_gamma": lambda l: isr.diagnose(l).gamma,
        "diagnose_code": lambda l: isr.diagnose(l).verdict_code,
    }


def _traced_input():
    l = np.random.default_rng(2).normal(0.0, 1.0, size=(3, 40))
    l[1, 4] = np.nan
    l[2, 9] = np.inf
    return l


def _check_traced(name, traced, eager_clean):
    traced = np.asarray(traced)
    if name == "objective_grad":  # elementwise: NaN exactly at the bad samples
        bad = ~np.isfinite(_traced_input())
        assert np.all(np.isnan(traced[bad])) and np.all(np.isfinite(traced[~bad]))
        np.testing.assert_allclose(traced[0], eager_clean[0], rtol=1e-10)
        return
    if name == "diagnose_code":
        assert list(traced[1:]) == [5, 5] and traced[0] == eager_clean[0]
        return
    assert np.all(np.isnan(traced[1:])), (name, traced)
    np.testing.assert_allclose(traced[0], eager_clean[0], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", list(_traced_functions()))
def test_jax_jit_nan_in_nan_out(name):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    fn = _traced_functions()[name]
    l = _traced_input()
    clean = np.asarray(fn(jnp.asarray(l[:1])))
    _check_traced(name, jax.jit(fn)(jnp.asarray(l)), clean)


@pytest.mark.parametrize(
    "name", ["gamma_ess", "gamma_closed_form", "renyi", "psis_k", "objective_r0", "diagnose_code"]
)
def test_torch_compile_nan_in_nan_out(name):
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    fn = _traced_functions()[name]
    l = _traced_input()
    clean = fn(torch.tensor(l[:1])).numpy()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    _check_traced(name, compiled(torch.tensor(l)).numpy(), clean)


def test_traced_nan_parameters_give_nan_gamma():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    l = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64)))
    for fn in (
        lambda rho: isr.gamma_ess(l, rho),
        lambda rho: isr.gamma_closed_form(l, rho),
        lambda rho: isr.select_gamma(l, rho, method="ess"),
        lambda g: isr.gamma_ess(l, 0.3, gamma_max=g),
    ):
        assert np.all(np.isnan(np.asarray(jax.jit(fn)(jnp.asarray(math.nan)))))
        assert np.all(np.isfinite(np.asarray(jax.jit(fn)(jnp.asarray(0.5)))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_safe_sum_is_the_plain_sum_or_the_exact_sum_in_range(xp, dtype):
    """safe_sum: bit for bit the plain sum wherever that is finite; where a partial sum
    overflows but the sum is in range, the exact sum (math.fsum, to rounding); +-inf with the
    sign of the exact sum where it is out of range; -inf and NaN terms give -inf and NaN; no
    floating-point warning."""
    from isreshape_core._lib.namespace import namespace
    from isreshape_core._lib.numerics import safe_sum

    big = float(np.finfo(dtype).max) / 3
    rows = [
        [1.5, -2.25, 3.0, 0.125, 7.0, 0.5, -1.0],  # ordinary: the plain sum
        [big, big, big, big, -big, -big, -big],  # partial sums overflow, the sum (big) does not
        [big, big, big, big, big, 1.0, 2.0],  # out of range: +inf
        [-big, -big, -big, -big, -big, 1.0, 2.0],  # out of range: -inf
        [big, big, big, 1.0, 1.0, 1.0, -np.inf],  # -inf
        [1.0, np.nan, 2.0, 3.0, 4.0, 5.0, 6.0],  # NaN
        [big, 1.0, -big, 2.0, 0.5, 0.25, 0.125],  # huge terms whose plain sum is finite: plain
    ]
    x = np.asarray(rows, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr = xp.asarray(x)
        got = to_numpy(safe_sum(namespace(arr), arr, axis=-1))
        with np.errstate(all="ignore"):
            plain = to_numpy(xp.sum(arr, axis=-1))  # the backend's own order of the terms
    np.testing.assert_array_equal(got[[0, 6]], plain[[0, 6]])
    exact = math.fsum(float(v) / 8 for v in x[1]) * 8  # fsum's own partial sums would overflow
    np.testing.assert_allclose(got[1], exact, rtol=1e-6)
    assert got[2] == np.inf and got[3] == -np.inf and got[4] == -np.inf
    assert np.isnan(got[5])
