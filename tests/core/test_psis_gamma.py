"""Tests for isreshape_core.psis_gamma: PSIS gamma, tail rule, combined rule (DESIGN.md 3.6).

References: arviz-stats' ``psislw`` for smoothed weights and ``k_hat`` (independent of our PSIS),
brute-force Kish ESS with Python sums (``_helpers.brute_force_ess``).
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    brute_force_ess,
    brute_gamma,
    get_namespace,
    reference_gamma_psis,
    reference_gamma_tail,
    to_numpy,
)

from isreshape_core._psis_gamma import gamma_combined, gamma_psis, gamma_tail

SHAPE = (3, 400)  # one shape for most tests: JAX eager compiles once per shape


def arviz_psislw(log_w: np.ndarray):
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    smoothed, k_hat = array_stats.psislw(-np.asarray(log_w), axis=-1)
    return np.asarray(smoothed), np.asarray(k_hat)


def ess_ratio_brute(log_w: np.ndarray, gamma: float) -> float:
    z = gamma * (log_w - log_w.max())
    return brute_force_ess(np.exp(z)) / log_w.size


def mixed_rows(seed: int = 0) -> np.ndarray:
    """A light tail, a moderate one and a very heavy one (k_hat > 0.7)."""
    rng = np.random.default_rng(seed)
    n = SHAPE[1]
    return np.stack(
        # the third: log of Pareto(0.8) weights, k = 1.25
        [rng.normal(0.0, 1.0, n), rng.normal(0.0, 2.0, n), rng.exponential(1.25, n)]
    )


def test_gamma_psis_meets_rho_min_on_smoothed_weights(xp):
    log_w = mixed_rows()
    smoothed_ref, k_ref = arviz_psislw(log_w)
    gamma, k_hat, fallback_used = (to_numpy(a) for a in gamma_psis(xp.asarray(log_w), 0.3))
    np.testing.assert_allclose(k_hat, k_ref, atol=1e-10)
    np.testing.assert_array_equal(fallback_used, k_ref > 0.7)
    assert not fallback_used[0] and not fallback_used[1] and fallback_used[2]
    for i in (0, 1):
        assert ess_ratio_brute(smoothed_ref[i], gamma[i]) >= 0.3 - 1e-12
        if gamma[i] < 1.0:  # the largest such gamma
            assert ess_ratio_brute(smoothed_ref[i], gamma[i] + 1e-4) < 0.3


def test_gamma_psis_fallback_on_a_very_heavy_tail(xp):
    # Log-Pareto weights with k = 1.25 and k = 2: both far above 0.7. At rho_min = 0.5 the raw
    # weights' ESS gamma is above the fallback 0.3 in row 1 (gamma = 0.3) and below it in row 2
    # (gamma = the raw ESS gamma, which differs from the smoothed weights' ESS gamma there).
    rng = np.random.default_rng(6)
    n = SHAPE[1]
    log_w = np.stack([rng.normal(0.0, 1.0, n), rng.exponential(1.25, n), rng.exponential(2.0, n)])
    gamma, k_hat, used = (to_numpy(a) for a in gamma_psis(xp.asarray(log_w), 0.5, fallback=0.3))
    np.testing.assert_array_equal(used, [False, True, True])
    raw = [brute_gamma(row, 0.5) for row in log_w]
    smoothed_ref, _ = arviz_psislw(log_w)
    assert raw[1] > 0.3 > raw[2] + 0.05
    assert brute_gamma(smoothed_ref[2], 0.5) > raw[2] + 0.02  # the smoothed one is not it
    assert gamma[1] == 0.3
    assert abs(gamma[2] - raw[2]) < 1e-9
    # Row 0 (k_hat 0.38) takes the smoothed weights' ESS gamma, which differs from the raw one.
    assert abs(gamma[0] - brute_gamma(smoothed_ref[0], 0.5)) < 1e-9
    assert abs(raw[0] - brute_gamma(smoothed_ref[0], 0.5)) > 1e-3
    for i in range(3):
        want, k_want = reference_gamma_psis(log_w[i], 0.5)
        assert abs(gamma[i] - want) < 1e-9 and k_hat[i] == pytest.approx(k_want, abs=1e-10)


def test_gamma_psis_small_samples_and_threshold(xp):
    # S < 25 (a GRPO group of 20): no k_hat; not flagged as heavy; the exact ESS gamma of the
    # raw weights, by brute-force bisection.
    log_w = np.random.default_rng(2).normal(0.0, 2.0, size=(2, 20))
    gamma, k_hat, used = (to_numpy(a) for a in gamma_psis(xp.asarray(log_w)))
    assert not np.any(used) and np.all(np.isposinf(k_hat))
    for row, g in zip(log_w, gamma, strict=True):
        assert ess_ratio_brute(row, g) >= 0.3 - 1e-12
        assert ess_ratio_brute(row, g + 1e-6) < 0.3
    # On-policy rows (all log weights equal): no tail to fit, and gamma = 1.
    gamma, k_hat, used = (to_numpy(a) for a in gamma_psis(xp.asarray(np.zeros((1, 400)))))
    assert gamma[0] == 1.0 and np.isposinf(k_hat[0]) and not used[0]
    # k_threshold=None: min(1 - 1/log10(S), 0.7) = 0.616 for S = 400.
    log_w = mixed_rows(3)
    _, k_ref = arviz_psislw(log_w)
    _, _, used = gamma_psis(xp.asarray(log_w), k_threshold=None)
    np.testing.assert_array_equal(to_numpy(used), k_ref > 1 - 1 / np.log10(SHAPE[1]))


def test_gamma_tail_meets_k_target(xp):
    rng = np.random.default_rng(4)
    n = SHAPE[1]
    log_w = np.stack([rng.normal(0.0, 0.5, n), rng.exponential(1.0, n), rng.exponential(1.25, n)])
    _, k_ref = arviz_psislw(log_w)
    gamma, k_hat, k_gamma = (to_numpy(a) for a in gamma_tail(xp.asarray(log_w), k_target=0.5))
    np.testing.assert_allclose(k_hat, k_ref, atol=1e-10)
    assert k_ref[0] <= 0.5 and gamma[0] == 1.0  # light tail: gamma = 1
    assert np.all(gamma[1:] < 1.0) and np.all(gamma > 0.0)
    for i in range(3):  # re-estimated independently on w**gamma
        _, k_tempered = arviz_psislw(gamma[i] * log_w[i])
        assert float(k_tempered) <= 0.5 + 1e-10
        assert k_gamma[i] == pytest.approx(float(k_tempered), abs=1e-10)


def test_gamma_tail_bounds_and_degenerate_rows(xp):
    # No tail can be fitted (S < 25; or a constant, on-policy row): no limit, gamma_max.
    for log_w in (np.random.default_rng(5).normal(size=(2, 20)), np.zeros((2, 400))):
        gamma, k_hat, k_gamma = (
            to_numpy(a) for a in gamma_tail(xp.asarray(log_w), gamma_min=0.1, gamma_max=0.9)
        )
        np.testing.assert_allclose(gamma, 0.9)
        assert np.all(np.isposinf(k_hat)) and np.all(np.isposinf(k_gamma))
    rng = np.random.default_rng(6)
    log_w = np.stack([rng.normal(0.0, 0.5, SHAPE[1]), 3.0 * rng.standard_t(2.0, SHAPE[1])])
    gamma = to_numpy(gamma_tail(xp.asarray(log_w), gamma_max=0.4)[0])
    assert gamma[0] == pytest.approx(0.4) and gamma[1] <= 0.4
    # Log weights with a Student-t(2) tail: k_hat(w**gamma) tends to k_hat(l) ~ 0.5 as gamma -> 0,
    # so k_target = 0.3 cannot be met; the rule returns gamma_min (documented).
    gamma, _, k_gamma = (to_numpy(a) for a in gamma_tail(xp.asarray(log_w), k_target=0.3))
    _, k_ref = arviz_psislw(0.05 * log_w[1])
    assert float(k_ref) > 0.3 and gamma[1] == 0.0 and np.isposinf(k_gamma[1])


def test_gamma_combined_against_independent_rules(xp):
    # The smaller of a brute-force bisection of the ESS and the tail rule run on arviz-stats'
    # k_hat: rows where either one binds (light tail: neither; moderate: the ESS; heavy: tail).
    log_w = mixed_rows(7)
    gamma, k_hat = (to_numpy(a) for a in gamma_combined(xp.asarray(log_w), 0.3, k_target=0.5))
    _, k_ref = arviz_psislw(log_w)
    np.testing.assert_allclose(k_hat, k_ref, atol=1e-10)
    ess_side = [brute_gamma(row, 0.3) for row in log_w]
    tail_side = [reference_gamma_tail(row, 0.5)[0] for row in log_w]
    np.testing.assert_allclose(gamma, np.minimum(ess_side, tail_side), rtol=0, atol=1e-9)
    assert tail_side[2] < ess_side[2] and ess_side[1] < tail_side[1]


def test_select_gamma_pareto_methods_against_independent_rules(xp):
    # Every branch: a light row (smoothed ESS gamma; tail rule 1), a moderate one, a very heavy
    # one (PSIS fallback; tail rule below 1), with bounds, and rows too short for a tail fit.
    from isreshape_core import select_gamma

    log_w = mixed_rows(12)
    _, k_ref = arviz_psislw(log_w)
    assert k_ref[0] < 0.5 and k_ref[2] > 0.7
    x = xp.asarray(log_w)
    psis_g = to_numpy(select_gamma(x, 0.3, method="psis", gamma_max=0.95))
    tail_g = to_numpy(select_gamma(x, method="tail", gamma_min=0.05, k_target=0.6))
    comb_g = to_numpy(select_gamma(x, 0.4, method="combined"))
    for i, row in enumerate(log_w):
        want, _ = reference_gamma_psis(np.asarray(row), 0.3)
        assert abs(psis_g[i] - min(want, 0.95)) < 1e-9, i
        want_tail, _ = reference_gamma_tail(row, 0.6, gamma_min=0.05)
        assert abs(tail_g[i] - want_tail) < 1e-9, i
        want_comb = min(brute_gamma(row, 0.4), reference_gamma_tail(row, 0.5)[0])
        assert abs(comb_g[i] - want_comb) < 1e-9, i
    assert tail_g[0] == 1.0 and tail_g[2] < 1.0 and psis_g[0] == 0.95
    short = np.random.default_rng(13).normal(0.0, 2.0, size=(2, 20))  # S < 25: no k_hat
    for method, rho in (("psis", 0.3), ("combined", 0.3)):
        got = to_numpy(select_gamma(xp.asarray(short), rho, method=method))
        np.testing.assert_allclose(got, [brute_gamma(r, rho) for r in short], atol=1e-9)
    got = to_numpy(select_gamma(xp.asarray(short), method="tail", gamma_max=0.7))
    np.testing.assert_array_equal(got, [0.7, 0.7])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: gamma_psis(x, 0.0), ValueError, "rho_min"),
        (lambda x: gamma_psis(x, fallback=1.5), ValueError, "fallback"),
        (lambda x: gamma_psis(x, fallback=0.1, gamma_min=0.2), ValueError, "fallback"),
        (lambda x: gamma_psis(x, k_threshold=-0.1), ValueError, "k_threshold"),
        (lambda x: gamma_psis(x, gamma_min=0.8, gamma_max=0.2), ValueError, "gamma_min"),
        (lambda x: gamma_tail(x, k_target=0.0), ValueError, "k_target"),
        (lambda x: gamma_tail(x, k_target="0.5"), TypeError, "k_target"),
        (lambda x: gamma_tail(x, max_iter=-1), ValueError, "max_iter"),
        (lambda x: gamma_tail(x, r_eff=0.0), ValueError, "r_eff"),
        (lambda x: gamma_combined(x, 1.5), ValueError, "rho_min"),
    ],
)
def test_validation(xp, call, error, match):
    with pytest.raises(error, match=match):
        call(xp.asarray(np.zeros((2, 30))))


def test_rejects_nan(xp):
    log_w = np.zeros((2, 30))
    log_w[0, 0] = np.nan
    for fn in (gamma_psis, gamma_tail, gamma_combined):
        with pytest.raises(ValueError, match="NaN"):
            fn(xp.asarray(log_w))


def test_same_result_under_jax_jit():
    pytest.importorskip("jax")
    import jax

    xp = get_namespace("jax")
    x = xp.asarray(mixed_rows(8))
    for fn in (gamma_psis, gamma_tail, gamma_combined):
        eager = fn(x)
        traced = jax.jit(fn)(x)
        for a, b in zip(eager, traced, strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-12)


def test_masked_samples_are_zero_weights_for_psis_and_left_out_of_the_ess(xp):
    rng = np.random.default_rng(11)
    log_w = rng.normal(0.0, 1.5, size=(2, 300))
    mask = rng.random((2, 300)) < 0.8
    garbage = xp.asarray(np.where(mask, log_w, 50.0))  # masked values must not matter
    zeroed = np.where(mask, log_w, -np.inf)
    m = xp.asarray(mask)
    # combined: the ESS of the valid samples meets rho_min (brute force).
    gamma = to_numpy(gamma_combined(garbage, 0.3, mask=m)[0])
    for i in range(2):
        assert ess_ratio_brute(log_w[i][mask[i]], gamma[i]) >= 0.3 - 1e-12
    # psis: the ESS of arviz-stats' smoothed valid weights meets rho_min.
    gamma, k_hat, _ = (to_numpy(a) for a in gamma_psis(garbage, 0.3, mask=m))
    smoothed_ref, k_ref = arviz_psislw(zeroed)
    np.testing.assert_allclose(k_hat, k_ref, atol=1e-10)
    for i in range(2):
        assert ess_ratio_brute(smoothed_ref[i][mask[i]], gamma[i]) >= 0.3 - 1e-12
    # tail: the same as zero weights in place of the masked samples.
    got = to_numpy(gamma_tail(garbage, mask=m)[0])
    np.testing.assert_allclose(got, to_numpy(gamma_tail(xp.asarray(zeroed))[0]))
    want = [reference_gamma_tail(row)[0] for row in zeroed]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
