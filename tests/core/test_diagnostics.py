"""Tests of isreshape_core/diagnostics.py against scipy.stats and brute-force ESS."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import brute_force_ess, to_numpy
from scipy import stats

import isreshape_core as isr


def brute_ratio(l, gamma):
    w = np.exp(gamma * (l - l.max()))
    return brute_force_ess(w) / l.size


def test_fields_match_independent_computations(xp):
    rng = np.random.default_rng(0)
    l = np.stack([rng.normal(0, 0.7, 800), rng.standard_t(3, 800) * 1.5])
    d = isr.diagnose(xp.asarray(l), 0.3)
    np.testing.assert_array_equal(to_numpy(d.n), [800, 800])
    np.testing.assert_allclose(to_numpy(d.sigma2), np.var(l, axis=1, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(to_numpy(d.skewness), stats.skew(l, axis=1), rtol=1e-8)
    np.testing.assert_allclose(to_numpy(d.excess_kurtosis), stats.kurtosis(l, axis=1), rtol=1e-8)
    w = np.exp(l - l.max(axis=1, keepdims=True))
    np.testing.assert_allclose(to_numpy(d.max_weight), w.max(1) / w.sum(1), rtol=1e-10)
    np.testing.assert_allclose(
        to_numpy(d.ess_ratio_at_1), [brute_ratio(row, 1.0) for row in l], rtol=1e-10
    )
    gamma = to_numpy(d.gamma)
    at_gamma = [brute_ratio(row, g) for row, g in zip(l, gamma, strict=True)]
    np.testing.assert_allclose(to_numpy(d.ess_ratio_at_gamma), at_gamma, rtol=1e-10)
    assert min(at_gamma) >= 0.3 * (1 - 1e-12)
    closed = np.minimum(np.sqrt(-np.log(0.3) / np.var(l, axis=1, ddof=1)), 1.0)
    np.testing.assert_allclose(to_numpy(d.gamma_closed_form), closed, rtol=1e-10)
    at_closed = [brute_ratio(row, g) for row, g in zip(l, closed, strict=True)]
    np.testing.assert_allclose(to_numpy(d.ess_ratio_at_closed_form), at_closed, rtol=1e-10)
    if d.shapiro_p is not None:
        np.testing.assert_allclose(d.shapiro_p, stats.shapiro(l, axis=1).pvalue, rtol=1e-6)
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    _, k_ref = array_stats.psislw(-l, axis=-1)  # arviz-stats smooths negated log-likelihoods
    np.testing.assert_allclose(to_numpy(d.k_hat), k_ref, rtol=1e-8)
    assert d.k_threshold == pytest.approx(min(1 - 1 / np.log10(800), 0.7))
    assert d.k_hat_verdicts[0] == "good" and d.k_hat_verdicts[1] != "good"


def test_verdicts_on_constructed_batches(xp):
    rng = np.random.default_rng(1)
    n = 4096
    rows = [
        rng.normal(0, 0.5, n),  # ok
        rng.standard_t(3, n) * 1.0,  # heavy tail: kurtosis > 3
        rng.normal(0, 4.0, n),  # sigma^2 = 16 > 10: refresh
        np.where(np.arange(n) < 3 * n // 4, -np.inf, 0.0),  # 3/4 zero weights: severe
        np.full(n, -np.inf),  # empty
    ]
    d = isr.diagnose(xp.asarray(np.stack(rows)), 0.3)
    assert d.verdicts == ["ok", "heavy_tail", "refresh", "severe", "empty"]
    gamma = to_numpy(d.gamma)
    assert np.isfinite(gamma).all()
    for name in ("sigma2", "skewness", "excess_kurtosis", "max_weight", "ess_ratio_at_gamma"):
        assert np.isfinite(to_numpy(getattr(d, name))).all(), name


def test_str_is_a_readable_table(xp):
    rng = np.random.default_rng(2)
    d = isr.diagnose(xp.asarray(rng.standard_t(3, 2000) * 2), 0.3)
    text = str(d)
    for label in ("sigma^2", "excess kurtosis", "gamma (exact ESS)", "gamma (closed form)"):
        assert label in text
    assert "verdict: heavy_tail" in text or "verdict: refresh" in text
    many = isr.diagnose(xp.asarray(rng.normal(size=(12, 50))))
    assert "12 rows" in str(many) and "..." in str(many)


def test_mask_and_axis(xp):
    rng = np.random.default_rng(3)
    l = rng.normal(0, 1.2, size=(50, 3))
    mask = rng.random((50, 3)) < 0.8
    d = isr.diagnose(xp.asarray(l), 0.3, axis=0, mask=xp.asarray(mask))
    for j in range(3):
        col = l[mask[:, j], j]
        assert to_numpy(d.n)[j] == col.size
        np.testing.assert_allclose(to_numpy(d.sigma2)[j], np.var(col, ddof=1), rtol=1e-10)
        np.testing.assert_allclose(to_numpy(d.ess_ratio_at_1)[j], brute_ratio(col, 1.0), rtol=1e-10)


def test_bad_rho(xp):
    with pytest.raises(ValueError, match="rho_min"):
        isr.diagnose(xp.asarray(np.zeros(5)), 0.0)
