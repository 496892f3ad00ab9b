"""Tests of isreshape_core/lognormal.py against numerical integration over the normal density,
Monte Carlo and a scalar optimiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import to_numpy
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, optimize, stats

from isreshape_core._lognormal import (
    lognormal_ess_ratio,
    lognormal_second_moment,
    lognormal_variance,
)


def quad_moment(sigma2: float, power: float) -> float:
    """E[w**power] for log w ~ N(-sigma2/2, sigma2), by quadrature against the normal density."""
    if sigma2 == 0.0:
        return 1.0
    sd = math.sqrt(sigma2)
    dist = stats.norm(loc=-sigma2 / 2.0, scale=sd)
    lo, hi = dist.ppf(1e-15) - 10 * abs(power) * sigma2, dist.ppf(1 - 1e-15) + 10 * power * sigma2
    val, _ = integrate.quad(lambda x: math.exp(power * x) * dist.pdf(x), lo, hi, limit=200)
    return val


def quad_variance(sigma2: float, gamma: float) -> float:
    """Var(w**gamma) by quadrature of (w**gamma - E[w**gamma])**2."""
    if sigma2 == 0.0:
        return 0.0
    m1 = quad_moment(sigma2, gamma)
    sd = math.sqrt(sigma2)
    dist = stats.norm(loc=-sigma2 / 2.0, scale=sd)
    lo, hi = dist.ppf(1e-15), dist.ppf(1 - 1e-15) + 20 * gamma * sigma2
    val, _ = integrate.quad(
        lambda x: (math.exp(gamma * x) - m1) ** 2 * dist.pdf(x), lo, hi, limit=200
    )
    return val


SIGMA2 = np.array([0.0, 0.1, 1.0, 3.0])
GAMMA = np.array([0.0, 0.25, 0.6, 1.0])


@pytest.fixture(scope="module")
def quad_tables():
    second = np.array([[quad_moment(s, 2 * g) for g in GAMMA] for s in SIGMA2])
    first = np.array([[quad_moment(s, g) for g in GAMMA] for s in SIGMA2])
    var = np.array([[quad_variance(s, g) for g in GAMMA] for s in SIGMA2])
    return first, second, var


def test_second_moment_matches_quadrature_broadcast(xp, quad_tables):
    _, second, _ = quad_tables
    got = to_numpy(lognormal_second_moment(xp.asarray(SIGMA2[:, None]), xp.asarray(GAMMA)))
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, second, rtol=1e-8)


def test_ess_ratio_matches_quadrature(xp, quad_tables):
    first, second, _ = quad_tables
    got = to_numpy(lognormal_ess_ratio(xp.asarray(SIGMA2[:, None]), xp.asarray(GAMMA)))
    np.testing.assert_allclose(got, first**2 / second, rtol=1e-8)


def test_variance_matches_quadrature(xp, quad_tables):
    _, _, var = quad_tables
    got = to_numpy(lognormal_variance(xp.asarray(SIGMA2[:, None]), xp.asarray(GAMMA)))
    np.testing.assert_allclose(got, var, rtol=1e-7, atol=1e-12)


def test_python_numbers_give_python_floats():
    assert isinstance(lognormal_second_moment(1.0, 0.5), float)
    assert isinstance(lognormal_ess_ratio(2, 1), float)
    assert isinstance(lognormal_variance(np.float64(2.0), np.float32(0.5)), float)
    assert lognormal_ess_ratio(2.0, 0.5) == pytest.approx(math.exp(-0.5), rel=1e-15)
    assert lognormal_variance(1.0, 0.0) == 0.0
    assert lognormal_variance(1.0, 1.0) == pytest.approx(math.e - 1.0, rel=1e-14)


def test_second_moment_minimum_is_at_one_quarter():
    for s2 in (0.5, 2.0, 10.0):
        res = optimize.minimize_scalar(
            lambda g, s2=s2: lognormal_second_moment(s2, g),
            bounds=(0.0, 1.0),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert res.x == pytest.approx(0.25, abs=1e-6)
        assert res.fun == pytest.approx(math.exp(-s2 / 8.0), rel=1e-12)


def test_second_moment_grid_argmin_and_variance_smallest_at_zero(xp):
    grid = np.linspace(0.0, 1.0, 401)
    v2 = to_numpy(lognormal_second_moment(3.0, xp.asarray(grid)))
    assert grid[np.argmin(v2)] == 0.25
    assert np.all(np.diff(v2[grid >= 0.25]) > 0)
    var = to_numpy(lognormal_variance(3.0, xp.asarray(grid)))
    assert var[0] == 0.0 and np.all(var[1:] > 0)
    # the variance is smallest at gamma = 0 and, at this sigma2, increasing on [0, 1]
    assert np.all(np.diff(var) > 0)


@given(
    sigma2=st.floats(0.0, 50.0),
    gamma=st.floats(0.0, 1.0),
)
def test_moment_identities(xp, sigma2, gamma):
    s = xp.asarray(sigma2)
    second = to_numpy(lognormal_second_moment(s, gamma))
    var = to_numpy(lognormal_variance(s, gamma))
    ratio = to_numpy(lognormal_ess_ratio(s, gamma))
    first_sq = math.exp(sigma2 * gamma * (gamma - 1.0))  # E[w**gamma]**2, closed form
    # Var = E[w^2g] - E[w^g]^2 and ESS/n = E[w^g]^2 / E[w^2g]
    np.testing.assert_allclose(var + first_sq, second, rtol=1e-12)
    np.testing.assert_allclose(ratio, first_sq / second, rtol=1e-12)
    assert 0.0 < ratio <= 1.0 and var >= 0.0
    # the relative variance Var / E[w^g]^2 = exp(sigma2 g^2) - 1
    # (atol: XLA on CPU flushes subnormal results to zero)
    np.testing.assert_allclose(
        var / first_sq, math.expm1(sigma2 * gamma**2), rtol=1e-10, atol=1e-300
    )


def test_monte_carlo_agreement():
    rng = np.random.default_rng(12345)
    sigma2, gamma, n = 0.8, 0.7, 400_000
    l = rng.normal(-sigma2 / 2, math.sqrt(sigma2), n)
    wg = np.exp(gamma * l)
    mc_ess_ratio = wg.sum() ** 2 / (wg**2).sum() / n
    assert lognormal_ess_ratio(sigma2, gamma) == pytest.approx(mc_ess_ratio, rel=5e-3)
    assert lognormal_second_moment(sigma2, gamma) == pytest.approx(np.mean(wg**2), rel=1e-2)
    assert lognormal_variance(sigma2, gamma) == pytest.approx(np.var(wg), rel=2e-2)


def test_large_sigma2_overflows_to_inf_without_nan(xp):
    s = xp.asarray(np.array([2000.0, 4000.0]))
    second = to_numpy(lognormal_second_moment(s, 1.0))
    assert np.all(np.isposinf(second))
    # Var(w^0.5) = exp(-sigma2/4) * expm1(sigma2/4) = -expm1(-sigma2/4) -> 1, no 0 * inf
    var = to_numpy(lognormal_variance(s, 0.5))
    np.testing.assert_allclose(var, 1.0, rtol=1e-15)
    var1 = to_numpy(lognormal_variance(s, 1.0))
    assert np.all(np.isposinf(var1))
    assert lognormal_second_moment(2000.0, 1.0) == math.inf
    assert lognormal_variance(4000.0, 0.5) == 1.0


def test_variance_of_large_sigma2_is_not_monotone():
    # documented: beyond sigma2 ~ 24.8 the variance dips below gamma = 1/4 (closed form check)
    grid = np.linspace(0.0, 1.0, 2001)[1:]
    for s2, monotone in ((20.0, True), (100.0, False)):
        got = np.asarray(lognormal_variance(np.asarray(s2), grid))
        want = np.exp(s2 * grid * (grid - 1.0)) * np.expm1(s2 * grid**2)
        np.testing.assert_allclose(got, want, rtol=1e-10)
        assert bool(np.all(np.diff(np.log(got)) > 0)) is monotone


def test_float32_and_float16_compute_in_float32(xp):
    s32 = xp.asarray(np.array([1.0, 2.0]), dtype=xp.float32)
    out = lognormal_second_moment(s32, 0.5)
    assert out.dtype == xp.float32
    np.testing.assert_allclose(to_numpy(out), [1.0, 1.0], rtol=1e-6)
    out = lognormal_ess_ratio(s32, xp.asarray(np.array([0.5, 1.0])))
    assert out.dtype == xp.float64  # float64 gamma promotes
    np.testing.assert_allclose(to_numpy(out), np.exp(-np.array([0.25, 2.0])), rtol=1e-6)
    h = np.asarray([1.0, 0.5], dtype=np.float16)
    var = lognormal_variance(h, 1.0)
    assert var.dtype == np.float32
    # sigma2 = 1 and 0.5 are exact in float16: e^0 (e^1 - 1) and e^0 (e^0.5 - 1), float32 ulps.
    np.testing.assert_allclose(var, np.expm1([1.0, 0.5]), rtol=1e-6)


@pytest.mark.parametrize("fn", [lognormal_ess_ratio, lognormal_second_moment, lognormal_variance])
def test_validation(xp, fn):
    with pytest.raises(ValueError, match="sigma2"):
        fn(-1.0, 0.5)
    with pytest.raises(ValueError, match="sigma2"):
        fn(float("nan"), 0.5)
    with pytest.raises(ValueError, match="sigma2"):
        fn(xp.asarray(np.array([1.0, -0.5])), 0.5)
    with pytest.raises(ValueError, match="gamma"):
        fn(1.0, 1.5)
    with pytest.raises(ValueError, match="gamma"):
        fn(xp.asarray(np.array([1.0])), xp.asarray(np.array([-0.1])))
    with pytest.raises(TypeError, match="sigma2"):
        fn("1.0", 0.5)
    with pytest.raises(TypeError, match="sigma2"):
        fn(True, 0.5)


def test_under_jax_jit():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    @jax.jit
    def f(s, g):
        return (
            lognormal_ess_ratio(s, g),
            lognormal_second_moment(s, g),
            lognormal_variance(s, g),
        )

    s, g = np.array([0.5, 2.0, 3000.0]), np.array([0.3, 0.25, 0.5])
    ratio, second, var = f(jnp.asarray(s), jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(ratio), np.exp(-s * g**2), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(second), np.exp(s * g * (2 * g - 1)), rtol=1e-12)
    want_var = np.exp(s[:2] * g[:2] * (g[:2] - 1)) * np.expm1(s[:2] * g[:2] ** 2)
    want_var = np.append(want_var, 1.0)  # exp(-750) * expm1(750) = -expm1(-750)
    np.testing.assert_allclose(np.asarray(var), want_var, rtol=1e-12)
