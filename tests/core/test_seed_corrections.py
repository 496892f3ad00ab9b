"""Each correction that DESIGN.md section 3 makes to the seed, shown by a test.

The closed-form gamma (seed Theorem 8.1) assumes log-normal weights; these tests measure what it
delivers when they are not, against the exact ESS gamma, on batches of 4096 samples, with the ESS
ratio recomputed independently in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

import isreshape_core as isr


def ratio_rows(l, gamma):
    """ESS(gamma)/n of each row, by plain numpy (an independent computation)."""
    z = gamma[:, None] * (l - l.max(axis=1, keepdims=True))
    w = np.exp(z)
    return w.sum(1) ** 2 / (w**2).sum(1) / l.shape[1]


def batches(kind, rows=60, n=4096, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        return rng.normal(0.0, 1.5, size=(rows, n))
    if kind == "student_t3":
        return rng.standard_t(3, size=(rows, n))
    if kind == "cluster":  # 10% of the samples in a high-weight cluster
        hot = rng.random((rows, n)) < 0.1
        return np.where(hot, rng.normal(3.0, 0.5, (rows, n)), rng.normal(0.0, 0.5, (rows, n)))
    raise ValueError(kind)


def test_closed_form_fails_on_student_t3_and_exact_gamma_does_not():
    l = batches("student_t3")
    closed = ratio_rows(l, np.asarray(isr.gamma_closed_form(l, 0.3)))
    exact = ratio_rows(l, np.asarray(isr.gamma_ess(l, 0.3)))
    # DESIGN.md 3, item 3: ESS/n < 0.001 for Student-t(3) log weights at n = 4096.
    assert np.median(closed) < 0.001
    assert (closed < 0.3).all()
    assert (exact >= 0.3 * (1 - 1e-12)).all()


def test_closed_form_misses_with_a_high_weight_cluster():
    l = batches("cluster")
    closed = ratio_rows(l, np.asarray(isr.gamma_closed_form(l, 0.3)))
    exact = ratio_rows(l, np.asarray(isr.gamma_ess(l, 0.3)))
    # DESIGN.md 3, item 3 measured 0.14-0.15 for a 10% cluster.
    assert 0.1 < np.median(closed) < 0.2
    assert (exact >= 0.3 * (1 - 1e-12)).all()


def test_closed_form_misses_often_even_for_log_normal_weights():
    l = batches("lognormal", rows=200, n=512, seed=1)
    closed = ratio_rows(l, np.asarray(isr.gamma_closed_form(l, 0.3)))
    exact = ratio_rows(l, np.asarray(isr.gamma_ess(l, 0.3)))
    # Right on average (the model is true here) but a large share of batches fall below target.
    assert 0.28 < np.median(closed) < 0.4
    assert np.mean(closed < 0.3) > 0.15
    assert (exact >= 0.3 * (1 - 1e-12)).all()


@pytest.mark.parametrize("seed", range(3))
def test_no_gamma_clamp_needed_exact_gamma_can_be_small(seed):
    # The seed clamps gamma >= 0.1 to hide the 1/gamma problem; the exact ESS gamma goes below
    # 0.1 when the weights demand it, and the ESS ratio there is still on target.
    l = np.random.default_rng(seed).standard_t(2, size=(1, 4096)) * 4.0
    gamma = np.asarray(isr.gamma_ess(l, 0.3))
    assert gamma[0] < 0.1
    assert ratio_rows(l, gamma)[0] >= 0.3 * (1 - 1e-12)


def fisher_rao_path_length(logq, rewards, tau, grid=2001):
    """Fisher-Rao length of gamma -> p_gamma on [0, 1]: the integral of sqrt(Var_{p_gamma}(h)),
    h = d log p_gamma / d gamma + const = log p_1 - log p_0 (trapezoid rule on a fine grid)."""
    gammas = np.linspace(0.0, 1.0, grid)
    logp = np.asarray(
        isr.target_log_probs(
            np.broadcast_to(logq, (grid, logq.size)),
            np.broadcast_to(rewards, (grid, rewards.size)),
            gammas,
            tau,
        )
    )
    h = logp[-1] - logp[0]
    p = np.exp(logp)
    mean = (p * h).sum(1)
    speed = np.sqrt(np.maximum((p * h**2).sum(1) - mean**2, 0.0))
    return float(np.sum(0.5 * (speed[1:] + speed[:-1]) * np.diff(gammas))), np.exp(logp[[0, -1]])


def test_geometric_path_is_the_e_geodesic_not_the_fisher_rao_geodesic():
    # Seed Proposition 4.3 calls p_gamma the Fisher-Rao geodesic (the shortest path). Its
    # Fisher-Rao length exceeds the Fisher-Rao distance 2 arccos(sum sqrt(p0 p1)) for K >= 3.
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(40):
        k = int(rng.integers(3, 8))
        logq = np.log(rng.dirichlet(np.ones(k)))
        rewards = rng.uniform(0.1, 3.0, k)
        length, (p0, p1) = fisher_rao_path_length(logq, rewards, tau=0.5)
        distance = 2.0 * np.arccos(np.clip(np.sum(np.sqrt(p0 * p1)), -1.0, 1.0))
        ratios.append(length / distance)
    ratios = np.array(ratios)
    assert (ratios > 1.0 + 1e-6).all()
    # DESIGN.md 3 measured up to 1.21x (median 1.05x on its ensemble; 1.007x on this one).
    assert ratios.max() > 1.05


def test_second_moment_is_not_the_variance():
    # Seed Theorem 5.3 treats E[w^(2 gamma)] as the variance. Monte Carlo under the seed's model
    # l ~ N(-sigma2/2, sigma2): the second moment is smallest near gamma = 1/4, the variance at 0.
    sigma2 = 2.0
    rng = np.random.default_rng(1)
    l = rng.normal(-sigma2 / 2, np.sqrt(sigma2), 400_000)
    gammas = np.linspace(0, 1, 41)
    second = np.array([np.mean(np.exp(2 * g * l)) for g in gammas])
    variance = np.array([np.var(np.exp(g * l)) for g in gammas])
    assert abs(gammas[np.argmin(second)] - 0.25) <= 0.025
    assert gammas[np.argmin(variance)] == 0.0
    np.testing.assert_allclose(isr.lognormal_second_moment(sigma2, gammas), second, rtol=0.05)
    np.testing.assert_allclose(
        isr.lognormal_variance(sigma2, gammas), variance, rtol=0.1, atol=1e-3
    )
