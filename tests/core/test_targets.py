"""Tests of isreshape_core/targets.py against scipy optimisers, finite differences and plain
numpy computations in probability space."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import to_numpy
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize

from isreshape_core import (
    bias,
    mse,
    mse_optimal_gamma,
    stationary_log_probs,
    target_log_probs,
)

# --------------------------------------------------------------------------------------------
# independent references: plain numpy / Python in probability space, one row at a time
# --------------------------------------------------------------------------------------------


def ref_target(mu, r, gamma, tau):
    """p_gamma ∝ (mu r)**(1-gamma) exp(gamma r / tau); Python's 0.0**0.0 == 1 is the gamma = 1
    limit, 0.0**x == 0 for x > 0."""
    u = np.array(
        [
            (m * ri) ** (1.0 - gamma) * math.exp(gamma * ri / tau)
            for m, ri in zip(mu, r, strict=True)
        ]
    )
    return u / u.sum()


def ref_stationary(mu, r, gamma):
    """mu r**(1/(1-gamma)) (rewards scaled by their max on the support), or the argmax set."""
    mu, r = np.asarray(mu, float), np.asarray(r, float)
    on = mu > 0
    rmax = r[on].max()
    if gamma == 1.0:
        u = np.where(on & (r == rmax), mu, 0.0)
    else:
        u = np.zeros_like(mu)
        u[on] = mu[on] * (r[on] / rmax) ** (1.0 / (1.0 - gamma))
    return u / u.sum()


def ref_bias(mu, r, gamma, tau):
    p1 = ref_target(mu, r, 1.0, tau)
    pg = ref_target(mu, r, gamma, tau)
    if np.any(pg == 0):
        return math.inf
    return float(np.sum(p1 * np.log(p1 / pg)))


def ref_mse(mu, r, gamma, tau, sigma2, n):
    return ref_bias(mu, r, gamma, tau) ** 2 + math.exp(sigma2 * gamma * (2 * gamma - 1)) / n


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def random_problem(seed, k=5, r_low=0.5, r_high=1.5):
    rng = np.random.default_rng(seed)
    mu = rng.dirichlet(np.full(k, 2.0))
    r = rng.uniform(r_low, r_high, k)
    return mu, r


def to_probs(logp):
    return np.exp(to_numpy(logp))


# --------------------------------------------------------------------------------------------
# the maximiser of the loss (stationary_log_probs) and the geometric target
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 0.95])
def test_stationary_is_the_maximiser_of_the_loss(xp, gamma):
    mu, r = random_problem(1)

    def neg_loss(z):
        pi = softmax(z)
        ratio = pi / mu
        if gamma == 0.0:
            value = np.sum(mu * r * np.log(ratio))
        else:
            value = np.sum(mu * r * (ratio**gamma - 1.0) / gamma)
        grad_pi = r * ratio ** (gamma - 1.0)  # d L / d pi
        grad_z = pi * (grad_pi - pi @ grad_pi)  # softmax Jacobian
        return -value, -grad_z

    res = optimize.minimize(
        neg_loss, np.zeros_like(mu), jac=True, method="BFGS", options={"gtol": 1e-12}
    )
    best = softmax(res.x)
    got = to_probs(stationary_log_probs(xp.asarray(np.log(mu)), xp.asarray(r), gamma))
    np.testing.assert_allclose(got, best, atol=1e-6)
    target = to_probs(target_log_probs(xp.asarray(np.log(mu)), xp.asarray(r), gamma, 1.0))
    if gamma == 0.0:
        np.testing.assert_allclose(target, best, atol=1e-6)  # both are mu r / Z0
    else:
        assert np.max(np.abs(target - best)) > 1e-2  # the seed's p_gamma is not the maximiser
        assert neg_loss(np.log(target))[0] > res.fun + 1e-6


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_target_minimises_the_kl_combination(xp, gamma):
    """Seed Theorem 4.2: p_gamma = argmin (1-g) KL(p||p0) + g KL(p||p1)."""
    mu, r = random_problem(2, k=5, r_low=0.2, r_high=3.0)
    tau = 0.8
    log_p0 = np.log(mu * r / np.sum(mu * r))
    log_p1 = r / tau - np.log(np.sum(np.exp(r / tau)))
    c = (1.0 - gamma) * log_p0 + gamma * log_p1

    def objective(z):
        p = softmax(z)
        logp = np.log(p)
        value = np.sum(p * (logp - c))  # (1-g) KL(p||p0) + g KL(p||p1)
        g = logp + 1.0 - c
        return value, p * (g - p @ g)

    res = optimize.minimize(
        objective, np.zeros_like(mu), jac=True, method="BFGS", options={"gtol": 1e-12}
    )
    got = to_probs(target_log_probs(xp.asarray(np.log(mu)), xp.asarray(r), gamma, tau))
    np.testing.assert_allclose(got, softmax(res.x), atol=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.4, 0.999, 1.0 - 1e-12, 1.0])
def test_closed_forms_with_zero_reward_and_zero_mass(xp, gamma):
    mu = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
    r = np.array([1.0, 0.0, 2.0, 0.7, 3.0])
    with np.errstate(divide="ignore"):
        logq = np.log(mu)
    lq, rr = xp.asarray(logq), xp.asarray(r)
    got_t = to_numpy(target_log_probs(lq, rr, gamma, 0.5))
    np.testing.assert_allclose(np.exp(got_t), ref_target(mu, r, gamma, 0.5), atol=1e-12)
    got_s = to_numpy(stationary_log_probs(lq, rr, gamma))
    np.testing.assert_allclose(np.exp(got_s), ref_stationary(mu, r, gamma), atol=1e-12)
    assert not np.any(np.isnan(got_t)) and not np.any(np.isnan(got_s))
    # probability-0 outcomes are exactly -inf
    if gamma < 1.0:
        assert np.all(np.isneginf(got_t[[1, 4]]))
    else:
        assert np.all(np.isfinite(got_t))  # log softmax(r / tau): mu and r = 0 drop out
    assert np.all(np.isneginf(got_s[[1, 4]]))


def test_stationary_is_stable_as_gamma_tends_to_one(xp):
    mu = np.array([0.5, 0.3, 0.2])
    r = np.array([800.0, 799.2, 10.0])  # r**(1/(1-gamma)) overflows any float
    lq, rr = xp.asarray(np.log(mu)), xp.asarray(r)
    for gamma in (0.99, 0.9999, 1.0 - 1e-9):
        got = to_probs(stationary_log_probs(lq, rr, gamma))
        e = 1.0 / (1.0 - gamma)
        # relative weights by hand: mu_i (r_i / r_0)**e, computed through log1p for precision
        rel = mu * np.exp(e * np.log1p((r - r[0]) / r[0]))
        np.testing.assert_allclose(got, rel / rel.sum(), rtol=1e-6, atol=1e-300)
    np.testing.assert_array_equal(to_probs(stationary_log_probs(lq, rr, 1.0)), [1.0, 0.0, 0.0])
    # ties at the maximum share in proportion to mu at gamma = 1 and in the limit
    r_tie = xp.asarray(np.array([2.0, 2.0, 1.0]))
    for gamma in (1.0 - 1e-12, 1.0):
        got = to_probs(stationary_log_probs(lq, r_tie, gamma))
        np.testing.assert_allclose(got, [0.625, 0.375, 0.0], atol=1e-12)


def test_target_keeps_precision_for_large_rewards_over_tau(xp):
    mu = np.array([0.25, 0.75])
    r = np.array([1e6, 1e6])  # equal rewards: r / tau cancels, p_gamma ∝ mu**(1-g) r**(1-g)
    got = to_probs(target_log_probs(xp.asarray(np.log(mu)), xp.asarray(r), 0.5, 1e-3))
    want = np.sqrt(mu) / np.sqrt(mu).sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# bias
# --------------------------------------------------------------------------------------------

# K fixed at 5 so that JAX compiles its eager kernels once (a new shape recompiles each op)
problems = st.tuples(
    st.lists(st.floats(0.05, 1.0), min_size=5, max_size=5),
    st.lists(st.floats(0.05, 5.0), min_size=5, max_size=5),
)


@given(problem=problems, tau=st.floats(0.2, 5.0), g1=st.floats(0, 1), g2=st.floats(0, 1))
def test_bias_matches_reference_and_is_non_increasing(xp, problem, tau, g1, g2):
    mu = np.array(problem[0])
    mu = mu / mu.sum()
    r = np.array(problem[1])
    lo, hi = min(g1, g2), max(g1, g2)
    lq = xp.asarray(np.log(np.stack([mu, mu])))
    rr = xp.asarray(np.stack([r, r]))
    got = to_numpy(bias(lq, rr, xp.asarray(np.array([lo, hi])), tau))
    want = [ref_bias(mu, r, lo, tau), ref_bias(mu, r, hi, tau)]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-13)
    assert got[0] >= got[1] - 1e-13
    assert got[1] >= 0.0


def test_bias_is_strictly_decreasing_to_zero_when_p0_differs_from_p1(xp):
    mu, r = random_problem(3, k=5)
    grid = np.linspace(0.0, 1.0, 11)
    lq = xp.asarray(np.log(np.tile(mu, (grid.size, 1))))
    rr = xp.asarray(np.tile(r, (grid.size, 1)))
    got = to_numpy(bias(lq, rr, xp.asarray(grid), 0.5))
    assert np.all(np.diff(got) < 0)
    assert got[-1] == 0.0
    np.testing.assert_allclose(got, [ref_bias(mu, r, g, 0.5) for g in grid], rtol=1e-9)


def test_bias_is_zero_when_p0_equals_p1(xp):
    r = np.array([0.5, 1.0, 2.0, 3.0])
    tau = 0.7
    mu = np.exp(r / tau) / r  # then mu r ∝ exp(r / tau): p0 = p1 = p_gamma
    mu /= mu.sum()
    got = to_numpy(bias(xp.asarray(np.log(mu)), xp.asarray(r), xp.asarray(0.3), tau))
    assert abs(got) < 1e-14


@pytest.mark.parametrize("zero", ["reward", "mu", "all_rewards", "all_mu"])
def test_bias_is_infinite_below_one_with_zero_mass(xp, zero):
    mu = np.array([0.4, 0.3, 0.3])
    r = np.array([1.0, 2.0, 0.5])
    if zero == "reward":
        r[1] = 0.0
    elif zero == "mu":
        mu = np.array([0.5, 0.0, 0.5])
    elif zero == "all_rewards":
        r[:] = 0.0
    else:
        mu = np.zeros(3)
    with np.errstate(divide="ignore"):
        logq = np.log(mu)
    grid = np.array([0.0, 0.5, 0.999999, 1.0 - 1e-12, 1.0])
    lq = xp.asarray(np.tile(logq, (grid.size, 1)))
    rr = xp.asarray(np.tile(r, (grid.size, 1)))
    got = to_numpy(bias(lq, rr, xp.asarray(grid), 1.0))
    assert np.all(np.isposinf(got[:-1]))
    assert got[-1] == 0.0
    got_mse = to_numpy(mse(lq, rr, xp.asarray(grid), 1.0, 1.0, 10.0))
    assert np.all(np.isposinf(got_mse[:-1]))
    np.testing.assert_allclose(got_mse[-1], math.e / 10.0, rtol=1e-14)


@pytest.mark.parametrize("gamma", [0.05, 0.4, 0.8])
def test_bias_derivative_matches_expectation_of_log_ratio(xp, gamma):
    """d/dgamma KL(p1 || p_gamma) = E_{p_gamma}[h] - E_{p1}[h], h = log p1/p0 (DESIGN item 9)."""
    mu, r = random_problem(4, k=5, r_low=0.2, r_high=2.0)
    tau = 0.6
    eps = 1e-5
    lq = xp.asarray(np.log(np.stack([mu, mu])))
    rr = xp.asarray(np.stack([r, r]))
    lo_hi = to_numpy(bias(lq, rr, xp.asarray(np.array([gamma - eps, gamma + eps])), tau))
    fd = (lo_hi[1] - lo_hi[0]) / (2 * eps)
    p0 = mu * r / np.sum(mu * r)
    p1 = ref_target(mu, r, 1.0, tau)
    h = np.log(p1 / p0)
    want = ref_target(mu, r, gamma, tau) @ h - p1 @ h
    assert want < 0
    np.testing.assert_allclose(fd, want, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# MSE and its minimiser
# --------------------------------------------------------------------------------------------


def test_mse_matches_closed_form_per_row(xp):
    rng = np.random.default_rng(5)
    mu = rng.dirichlet(np.ones(4), size=3)
    r = rng.uniform(0.1, 2.0, (3, 4))
    gamma, tau = np.array([0.0, 0.35, 0.9]), np.array([0.5, 1.0, 2.0])
    sigma2, n = np.array([0.5, 2.0, 4.0]), np.array([10.0, 100.0, 1000.0])
    got = to_numpy(mse(*(xp.asarray(a) for a in (np.log(mu), r, gamma, tau, sigma2, n))))
    want = [ref_mse(mu[i], r[i], gamma[i], tau[i], sigma2[i], n[i]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_mse_optimal_gamma_matches_brute_force_grid_search(xp):
    rng = np.random.default_rng(6)
    b, k = 6, 5
    mu = rng.dirichlet(np.ones(k), size=b)
    r = rng.uniform(0.1, 3.0, (b, k))
    tau = rng.uniform(0.3, 2.0, b)
    sigma2 = rng.uniform(0.1, 5.0, b)
    n = rng.choice([8.0, 64.0, 512.0], b)
    got = to_numpy(mse_optimal_gamma(*(xp.asarray(a) for a in (np.log(mu), r, tau, sigma2, n))))
    grid = [i / 100 for i in range(101)]
    for i in range(b):
        values = [ref_mse(mu[i], r[i], g, tau[i], sigma2[i], n[i]) for g in grid]
        best = grid[int(np.argmin(values))]
        chosen = ref_mse(mu[i], r[i], got[i], tau[i], sigma2[i], n[i])
        assert got[i] == pytest.approx(best, abs=1e-12) or chosen <= min(values) + 1e-14
    assert len(set(np.round(got, 6))) > 1  # the rows do not all pick the same gamma


def test_mse_optimal_gamma_custom_grid_and_axis_zero(xp):
    rng = np.random.default_rng(7)
    mu = rng.dirichlet(np.ones(4), size=3).T  # outcomes along axis 0
    r = rng.uniform(0.1, 3.0, (4, 3))
    grid = [0.9, 0.1, 0.5, 0.3]
    got = to_numpy(
        mse_optimal_gamma(xp.asarray(np.log(mu)), xp.asarray(r), 1.0, 2.0, 50, gammas=grid, axis=0)
    )
    for j in range(3):
        values = [ref_mse(mu[:, j], r[:, j], g, 1.0, 2.0, 50) for g in grid]
        assert got[j] == grid[int(np.argmin(values))]


def test_mse_optimal_gamma_with_infinite_bias(xp):
    logq = xp.asarray(np.log(np.array([[0.5, 0.5, 1e-3], [0.3, 0.3, 0.4]])))
    r = xp.asarray(np.array([[1.0, 0.0, 2.0], [1.0, 2.0, 0.5]]))
    got = to_numpy(mse_optimal_gamma(logq, r, 1.0, 1.0, 10.0))
    assert got[0] == 1.0  # the only finite MSE on the default grid
    got = to_numpy(mse_optimal_gamma(logq, r, 1.0, 1.0, 10.0, gammas=xp.asarray([0.2, 0.6])))
    assert got[0] == 0.6  # documented: every grid point infinite -> the largest gamma


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, -1])
def test_batched_equals_row_by_row(xp, axis):
    rng = np.random.default_rng(8)
    rows, k = 4, 5
    mu = rng.dirichlet(np.ones(k), size=rows)
    r = rng.uniform(0.0, 2.0, (rows, k))
    r[1, 2] = 0.0
    gamma = np.array([0.0, 0.5, 0.9, 1.0])
    tau = np.array([0.5, 1.0, 1.5, 2.0])
    logq, rew = np.log(mu), r
    if axis == 0:
        logq, rew = logq.T, rew.T
    args = (xp.asarray(logq), xp.asarray(rew), xp.asarray(gamma))
    t = to_probs(target_log_probs(*args, xp.asarray(tau), axis=axis))
    s = to_probs(stationary_log_probs(*args, axis=axis))
    bb = to_numpy(bias(*args, xp.asarray(tau), axis=axis))
    mm = to_numpy(mse(*args, xp.asarray(tau), 2.0, 30.0, axis=axis))
    if axis == 0:
        t, s = t.T, s.T
    for i in range(rows):
        np.testing.assert_allclose(t[i], ref_target(mu[i], r[i], gamma[i], tau[i]), atol=1e-12)
        np.testing.assert_allclose(s[i], ref_stationary(mu[i], r[i], gamma[i]), atol=1e-12)
        np.testing.assert_allclose(bb[i], ref_bias(mu[i], r[i], gamma[i], tau[i]), rtol=1e-10)
        want = ref_mse(mu[i], r[i], gamma[i], tau[i], 2.0, 30.0)
        np.testing.assert_allclose(mm[i], want, rtol=1e-10)


def test_three_dimensional_batch_with_middle_axis(xp):
    rng = np.random.default_rng(9)
    mu = rng.dirichlet(np.ones(3), size=(2, 4))  # (2, 4, 3): outcomes last
    r = rng.uniform(0.1, 2.0, (2, 4, 3))
    gamma = np.array([[0.2, 0.7], [0.4, 1.0]])  # batch shape (2, 2) once outcomes are axis 1
    logq = np.moveaxis(np.log(mu[:, :2]), 2, 1)  # (2, 3, 2), outcomes along axis 1
    rew = np.moveaxis(r[:, :2], 2, 1)
    got = to_probs(
        stationary_log_probs(xp.asarray(logq), xp.asarray(rew), xp.asarray(gamma), axis=1)
    )
    got_b = to_numpy(bias(xp.asarray(logq), xp.asarray(rew), xp.asarray(gamma), 0.8, axis=1))
    assert got.shape == (2, 3, 2) and got_b.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            want = ref_stationary(mu[i, j], r[i, j], gamma[i, j])
            np.testing.assert_allclose(got[i, :, j], want, atol=1e-12)
            np.testing.assert_allclose(got_b[i, j], ref_bias(mu[i, j], r[i, j], gamma[i, j], 0.8))


def test_float32_inputs_compute_in_float32(xp):
    mu, r = random_problem(10, k=4)
    lq = xp.asarray(np.log(mu), dtype=xp.float32)
    rr = xp.asarray(r, dtype=xp.float32)
    out = target_log_probs(lq, rr, 0.5, 1.0)
    assert out.dtype == xp.float32
    np.testing.assert_allclose(to_probs(out), ref_target(mu, r, 0.5, 1.0), atol=1e-6)
    out = stationary_log_probs(lq, xp.asarray(r), 0.5)
    assert out.dtype == xp.float64  # float64 rewards promote


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_validation_errors(xp):
    lq = xp.asarray(np.log(np.array([0.5, 0.3, 0.2])))
    r = xp.asarray(np.array([1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="rewards"):
        target_log_probs(lq, xp.asarray(np.array([1.0, -2.0, 0.5])), 0.5, 1.0)
    with pytest.raises(ValueError, match="rewards"):
        bias(lq, xp.asarray(np.array([1.0, np.nan, 0.5])), 0.5, 1.0)
    with pytest.raises(ValueError, match="tau"):
        target_log_probs(lq, r, 0.5, 0.0)
    with pytest.raises(ValueError, match="tau"):
        bias(lq, r, 0.5, xp.asarray(-1.0))
    with pytest.raises(ValueError, match="gamma"):
        stationary_log_probs(lq, r, 1.2)
    with pytest.raises(ValueError, match="gamma"):
        bias(lq, r, xp.asarray(np.array(-0.1)), 1.0)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        stationary_log_probs(lq, xp.asarray(np.array([1.0, 2.0])), 0.5)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="logq"):
            target_log_probs(xp.asarray(np.array([0.0, bad, -1.0])), r, 0.5, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        target_log_probs(lq, r, xp.asarray(np.array([0.1, 0.2])), 1.0)  # batch shape is ()
    lq2 = xp.asarray(np.log(np.full((3, 4), 0.25)))
    with pytest.raises(ValueError, match="tau"):
        bias(lq2, xp.asarray(np.ones((3, 4))), 0.5, xp.asarray(np.ones(4)))  # batch is (3,)
    with pytest.raises(ValueError, match="sigma2"):
        mse(lq, r, 0.5, 1.0, -1.0, 10)
    with pytest.raises(ValueError, match="n "):
        mse(lq, r, 0.5, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="gammas"):
        mse_optimal_gamma(lq, r, 1.0, 1.0, 10, gammas=[0.5, 1.5])
    with pytest.raises(ValueError, match="gammas"):
        mse_optimal_gamma(lq, r, 1.0, 1.0, 10, gammas=[])
    with pytest.raises(TypeError, match="logq"):
        target_log_probs([0.0, -1.0], r, 0.5, 1.0)
    with pytest.raises(ValueError, match="axis"):
        bias(lq, r, 0.5, 1.0, axis=1)


def test_rows_without_mass_raise_for_the_distributions(xp):
    lq = xp.asarray(np.log(np.array([[0.5, 0.5], [0.5, 0.5]])))
    r = xp.asarray(np.array([[1.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="rewards > 0"):
        target_log_probs(lq, r, 0.5, 1.0)
    with pytest.raises(ValueError, match="rewards > 0"):
        stationary_log_probs(lq, r, 0.5)
    # at gamma = 1 both are defined: softmax(r / tau), and mu on the argmax set (all of it)
    got = to_probs(target_log_probs(lq, r, xp.asarray(np.array([0.5, 1.0])), 1.0))
    np.testing.assert_allclose(got[1], [0.5, 0.5], atol=1e-15)
    got = to_probs(stationary_log_probs(lq, r, xp.asarray(np.array([0.5, 1.0]))))
    np.testing.assert_allclose(got[1], [0.5, 0.5], atol=1e-15)
    with pytest.raises(ValueError, match="logq > -inf"):
        stationary_log_probs(xp.asarray(np.array([-np.inf, -np.inf])), r[0, ...], 1.0)


# --------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------


def _fixture_inputs():
    rng = np.random.default_rng(11)
    mu = rng.dirichlet(np.ones(5), size=3)
    r = rng.uniform(0.0, 2.0, (3, 5))
    r[0, 1] = 0.0
    return np.log(mu), r, np.array([0.0, 0.6, 1.0]), mu


def test_under_jax_jit_with_traced_gamma():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    logq, r, gamma, mu = _fixture_inputs()

    @jax.jit
    def f(lq, rr, g):
        return (
            target_log_probs(lq, rr, g, 0.7),
            stationary_log_probs(lq, rr, g),
            bias(lq, rr, g, 0.7),
            mse(lq, rr, g, 0.7, 2.0, 40.0),
            mse_optimal_gamma(lq, rr, 0.7, 2.0, 40.0),
        )

    t, s, b, m, best = f(jnp.asarray(logq), jnp.asarray(r), jnp.asarray(gamma))
    for i in range(3):
        np.testing.assert_allclose(np.exp(t[i]), ref_target(mu[i], r[i], gamma[i], 0.7), atol=1e-12)
        np.testing.assert_allclose(np.exp(s[i]), ref_stationary(mu[i], r[i], gamma[i]), atol=1e-12)
        np.testing.assert_allclose(b[i], ref_bias(mu[i], r[i], gamma[i], 0.7), rtol=1e-10)
        np.testing.assert_allclose(m[i], ref_mse(mu[i], r[i], gamma[i], 0.7, 2.0, 40.0))
    assert float(best[0]) == 1.0  # row 0 has a zero reward: only gamma = 1 has finite MSE
    # a row without mass comes back as -inf under tracing instead of raising
    dead = f(jnp.asarray(logq), jnp.asarray(np.zeros_like(r)), jnp.asarray(gamma))
    assert np.all(np.isneginf(np.asarray(dead[1][:2])))


def test_under_torch_compile_fullgraph():
    torch = pytest.importorskip("torch")
    logq, r, gamma, mu = _fixture_inputs()

    def f(lq, rr, g):
        return stationary_log_probs(lq, rr, g), bias(lq, rr, g, 0.7)

    compiled = torch.compile(f, fullgraph=True)
    s, b = compiled(torch.asarray(logq), torch.asarray(r), torch.asarray(gamma))
    for i in range(3):
        np.testing.assert_allclose(
            np.exp(s[i].numpy()), ref_stationary(mu[i], r[i], gamma[i]), atol=1e-12
        )
        np.testing.assert_allclose(b[i].item(), ref_bias(mu[i], r[i], gamma[i], 0.7), rtol=1e-10)
