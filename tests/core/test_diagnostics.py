"""Tests of isreshape_core/diagnostics.py against scipy.stats and brute-force ESS."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _helpers import arviz_psis, brute_force_ess, to_numpy
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
    # Student-t(3) log weights of scale 0.5: sigma^2 ~ 0.75, excess kurtosis far above 3.
    l = rng.standard_t(3, 2000) * 0.5
    assert np.var(l) < 2 and stats.kurtosis(l) > 6
    d = isr.diagnose(xp.asarray(l), 0.3)
    text = str(d)
    assert "verdict: heavy_tail" in text
    for label in ("sigma^2", "excess kurtosis", "gamma (exact ESS)", "gamma (closed form)"):
        assert label in text
    assert "verdict: refresh" not in text
    many = isr.diagnose(xp.asarray(rng.normal(size=(12, 50))))
    assert "12 rows" in str(many) and "..." in str(many)


def _heavy(rng, n, scale):
    """Normal(0, scale^2) draws with 1% of them at +-8 scale: excess kurtosis about 55."""
    x = rng.normal(0.0, scale, n)
    x[::100] = 8.0 * scale * np.where(np.arange(x[::100].size) % 2, 1.0, -1.0)
    return x


def test_verdict_precedence_on_rows_that_trigger_two_conditions(xp):
    # Precedence: empty > severe > refresh > heavy tail > ok. The first three rows each meet two
    # of the conditions (checked here with NumPy/SciPy on the finite log weights), and must get
    # the verdict of the higher one. Shape (5, 4096), as in the test above (one JAX compile).
    rng = np.random.default_rng(4)
    n = 4096
    quarter = np.arange(n) < n // 4  # 1/4 positive weights: ESS(0)/n = 0.25 < rho_min
    rows = {
        "severe": np.where(quarter, rng.normal(0.0, 4.0, n), -np.inf),  # and sigma^2 = 16
        "severe ": np.where(quarter, _heavy(rng, n, 0.5), -np.inf),  # and heavy tail
        "refresh": _heavy(rng, n, 4.0),  # sigma^2 > 10 and heavy tail
        "empty": np.full(n, -np.inf),
        "heavy_tail": _heavy(rng, n, 0.5),  # heavy tail alone
    }
    names = [name.strip() for name in rows]
    l = np.stack(list(rows.values()))
    finite = [row[np.isfinite(row)] for row in l[:3]]
    assert np.var(finite[0], ddof=1) > 12 and np.mean(np.isfinite(l[0])) == 0.25
    assert stats.kurtosis(finite[1]) > 10 and np.var(finite[1], ddof=1) < 10
    assert np.mean(np.isfinite(l[1])) == 0.25
    assert np.var(finite[2], ddof=1) > 12 and stats.kurtosis(finite[2]) > 10
    d = isr.diagnose(xp.asarray(l), 0.3)
    assert d.verdicts == names
    np.testing.assert_array_equal(to_numpy(d.verdict_code), [3, 3, 2, 4, 1])


def test_k_hat_verdicts_readings(xp):
    # The four readings at and around their boundaries: good up to the threshold, usable with
    # smoothing up to 0.7, unreliable above, not estimable at inf.
    # On weights whose k_hat (from arviz-stats) lies in each band, for S = 50 (threshold
    # 1 - 1/log10(50) = 0.411): log-Pareto draws of shape about 0.6 and 1.5, and constant rows.
    # Shape (12, 50), as in the test above (one JAX compile).
    rng = np.random.default_rng(14)
    draws = np.stack([rng.exponential(0.6, 50) for _ in range(6)] + [rng.exponential(1.5, 50)])
    l = np.concatenate([draws[[0, 3, 6, 1, 2, 4, 5]], np.zeros((5, 50))])
    _, k_ref = arviz_psis(l[:7])
    threshold = 1 - 1 / np.log10(50)
    assert max(k_ref[[0, 3, 4]]) < threshold < min(k_ref[[1, 5]]) < 0.7 < min(k_ref[[2, 6]])
    d = isr.diagnose(xp.asarray(l), 0.3)
    assert d.k_threshold == pytest.approx(threshold)
    good, usable, unreliable, none = "good", "usable with smoothing", "unreliable", "not estimable"
    readings = [good, usable, unreliable, good, good, usable, unreliable] + [none] * 5
    assert d.k_hat_verdicts == readings
    text = str(d)  # the first 8 rows are printed
    for reading in (good, usable, unreliable, none):
        assert f"(k_hat: {reading})" in text
    # At and around the boundaries: the threshold itself is good, 0.7 itself usable.
    k = np.array([0.2, 0.5, 0.5000001, 0.7, 0.7000001, 3.0, np.inf])
    probe = dataclasses.replace(d, k_hat=xp.asarray(k), k_threshold=0.5)
    assert probe.k_hat_verdicts == ["good", "good"] + ["usable with smoothing"] * 2 + [
        "unreliable",
        "unreliable",
        "not estimable",
    ]


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
