"""Tests for isreshape_core.psis: PSIS smoothing and the Pareto k_hat (DESIGN.md 3, item 5).

References are independent of the code under test: arviz-stats' ``psislw`` (the Python reference
the design names), closed forms (Pareto tails, the k threshold) and plain NumPy/SciPy sums.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import get_namespace, to_numpy
from array_api_compat import is_numpy_namespace
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import logsumexp as np_logsumexp

from isreshape_core._psis import _psis_rows, pareto_k_threshold, psis, psis_tail_length


def arviz_psislw(log_w: np.ndarray, axis: int = -1, r_eff: float = 1.0):
    """arviz-stats' PSIS on log *weights*: it takes log-likelihoods and smooths their negation."""
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    smoothed, k_hat = array_stats.psislw(-np.asarray(log_w), r_eff=r_eff, axis=axis)
    # arviz-stats moves the sample axis to the end; put it back.
    return np.moveaxis(np.asarray(smoothed), -1, axis), np.asarray(k_hat)


def sample_log_w(kind: str, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0.0, 1.2, size=shape)
    if kind == "student_t":
        return rng.standard_t(4, size=shape)
    if kind == "log_student_t":
        return np.log(np.abs(rng.standard_t(2, size=shape)))
    raise ValueError(kind)


def assert_log_close(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Equal ``-inf`` patterns and finite entries within ``atol``."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=atol)


def normalised(log_w: np.ndarray, axis: int = -1) -> np.ndarray:
    return log_w - np_logsumexp(log_w, axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------
# agreement with arviz-stats


@pytest.mark.parametrize("kind", ["normal", "student_t", "log_student_t"])
@pytest.mark.parametrize("n", [50, 200, 4000])
def test_matches_arviz_stats(xp, kind, n):
    log_w = sample_log_w(kind, (3, n), seed=n)
    expected, k_expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(xp.asarray(log_w))
    assert tuple(k_hat.shape) == (3,)
    assert_log_close(to_numpy(smoothed), expected, atol=1e-10)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-10)


def test_matches_arviz_stats_batched_axis_and_r_eff(xp):
    log_w = sample_log_w("student_t", (3, 200, 2), seed=7)
    expected, k_expected = arviz_psislw(log_w, axis=1, r_eff=0.7)
    smoothed, k_hat = psis(xp.asarray(log_w), axis=1, r_eff=0.7)
    assert tuple(k_hat.shape) == (3, 2)
    assert_log_close(to_numpy(smoothed), expected, atol=1e-10)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("n", "r_eff", "tail"), [(300, 0.7, 60), (200, 1.2, 38)])
def test_r_eff_where_n_and_n_times_r_eff_disagree(xp, n, r_eff, tail):
    # The tail length branches on n * r_eff > 225: at n = 300, r_eff = 0.7, n > 225 but
    # n * r_eff = 210, so M = floor(300 / 5) = 60 (not floor(3 sqrt(300 / 0.7)) = 62); at
    # n = 200, r_eff = 1.2, n * r_eff = 240, so M = floor(3 sqrt(200 / 1.2)) = 38 (not 40).
    assert psis_tail_length(n, r_eff) == tail
    log_w = sample_log_w("student_t", (3, n), seed=n + 1)
    expected, k_expected = arviz_psislw(log_w, r_eff=r_eff)
    smoothed, k_hat = psis(xp.asarray(log_w), r_eff=r_eff)
    assert_log_close(to_numpy(smoothed), expected, atol=1e-10)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-10)


def test_portable_path_puts_values_back_in_place_on_many_rows(xp):
    # The array-API path (argpartition + indexed update on NumPy and JAX, a full sort undone by
    # argsort elsewhere), called directly so that it runs in the NumPy session too: every row's
    # smoothed tail must land at the positions of its draws, compared position by position
    # (continuous draws: no ties) with arviz-stats.
    log_w = np.concatenate(
        [sample_log_w("student_t", (24, 300), seed=23), sample_log_w("normal", (24, 300), 29)]
    )
    expected, k_expected = arviz_psislw(log_w)
    out, k_hat = _psis_rows(xp, xp.asarray(log_w), psis_tail_length(300))
    np.testing.assert_allclose(to_numpy(out), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-10)
    if not is_numpy_namespace(xp):
        return  # elsewhere float32 takes the path above (test_float32_input_computes_in_float32)
    # On NumPy float32 takes the portable path through psis itself (the kernel is float64 only).
    out32, k32 = psis(xp.asarray(log_w, dtype=xp.float32))
    np.testing.assert_allclose(to_numpy(out32), expected, rtol=0, atol=2e-4)
    np.testing.assert_allclose(to_numpy(k32), k_expected, rtol=0, atol=2e-3)


def test_neg_inf_entries_are_weight_zero_and_the_rest_smoothed(xp):
    log_w = sample_log_w("normal", (3, 200), seed=3)
    log_w[0, ::7] = -np.inf
    log_w[1, :5] = -np.inf
    expected, k_expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(xp.asarray(log_w))
    smoothed = to_numpy(smoothed)
    assert np.all(np.isneginf(smoothed) == np.isneginf(log_w))
    assert_log_close(smoothed, expected, atol=1e-10)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-10)


def test_ties_at_the_cutoff(xp):
    log_w = sample_log_w("normal", (3, 200), seed=11)
    m = psis_tail_length(200)
    for row in log_w:
        order = np.sort(row)
        # The cutoff (the (M+1)-th largest) and the two smallest tail values become equal.
        row[np.isin(row, order[-m : -m + 2])] = order[-m - 1]
    expected, k_expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(xp.asarray(log_w))
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-10)
    # Which of the tied draws gets which value is unspecified: compare the sorted values.
    np.testing.assert_allclose(np.sort(to_numpy(smoothed)), np.sort(expected), rtol=0, atol=1e-10)


def test_many_ties_at_the_cutoff_leave_the_row_unsmoothed(xp):
    # More than a quarter of the tail equal to the cutoff: the Zhang-Stephens quartile x* is 0
    # (arviz-stats returns NaN there); the row is normalised only, k_hat = inf.
    rng = np.random.default_rng(5)
    parts = [rng.normal(-5.0, 1.0, (3, 150)), np.zeros((3, 30)), rng.uniform(1.0, 2.0, (3, 20))]
    log_w = np.concatenate(parts, axis=-1)
    assert psis_tail_length(200) == 40  # 20 zeros in the tail, the quartile x* is the 10th
    smoothed, k_hat = psis(xp.asarray(log_w))
    assert np.all(np.isposinf(to_numpy(k_hat)))
    np.testing.assert_allclose(to_numpy(smoothed), normalised(log_w), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# known tails and the threshold


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_pareto_tail_k_hat(xp, alpha):
    # w ~ Pareto(alpha) (x_m = 1) has a generalised Pareto tail of shape 1/alpha.
    rng = np.random.default_rng(int(alpha * 10))
    log_w = rng.exponential(1.0 / alpha, size=100_000)  # log of a Pareto(alpha) draw
    _, k_hat = psis(xp.asarray(log_w))
    assert abs(float(to_numpy(k_hat)) - 1.0 / alpha) < 0.1


def test_pareto_k_threshold_closed_form(xp):
    for n in (2, 10, 100, 1000, 10**6):
        assert pareto_k_threshold(n) == pytest.approx(min(1 - 1 / math.log10(n), 0.7), abs=1e-15)
    n = np.array([5.0, 25.0, 4000.0])
    got = to_numpy(pareto_k_threshold(xp.asarray(n)))
    np.testing.assert_allclose(got, [1 - 1 / math.log10(5), 1 - 1 / math.log10(25), 0.7])


@pytest.mark.parametrize("bad", [1, 0.5, 0, -3, float("nan"), float("inf")])
def test_pareto_k_threshold_rejects_bad_n(bad):
    with pytest.raises(ValueError, match="n must be"):
        pareto_k_threshold(bad)


def test_tail_length_formula():
    cases = [(24, 1.0), (25, 1.0), (225, 1.0), (226, 1.0), (4000, 1.0), (1000, 0.3)]
    cases += [(300, 0.7), (200, 1.2), (250, 0.9), (225, 1.001)]  # n > 225 != n r_eff > 225
    for n, r_eff in cases:
        expected = math.floor(3 * math.sqrt(n / r_eff)) if n * r_eff > 225 else n // 5
        assert psis_tail_length(n, r_eff) == expected


# --------------------------------------------------------------------------------------------
# degenerate rows: unsmoothed, normalised, k_hat = inf, never NaN


@pytest.mark.parametrize("n", [1, 2, 10, 24])
def test_too_few_draws_are_only_normalised(xp, n):
    log_w = sample_log_w("normal", (3, n), seed=n)
    smoothed, k_hat = psis(xp.asarray(log_w))
    np.testing.assert_allclose(to_numpy(smoothed), normalised(log_w), rtol=0, atol=1e-12)
    assert np.all(np.isposinf(to_numpy(k_hat)))


def test_equal_tail_is_left_unsmoothed_per_row(xp):
    rng = np.random.default_rng(2)
    good = rng.normal(size=200)
    flat = np.concatenate([rng.normal(-3.0, 1.0, 150), np.full(50, 1.5)])
    log_w = np.stack([good, flat, good[::-1]])
    smoothed, k_hat = psis(xp.asarray(log_w))
    smoothed, k_hat = to_numpy(smoothed), to_numpy(k_hat)
    expected_good, k_good = arviz_psislw(good)
    np.testing.assert_allclose(smoothed[0], expected_good, rtol=0, atol=1e-10)
    assert k_hat[0] == pytest.approx(float(k_good), abs=1e-10)
    assert math.isinf(k_hat[1]) and k_hat[2] == pytest.approx(k_hat[0], abs=1e-12)
    np.testing.assert_allclose(smoothed[1], normalised(flat), rtol=0, atol=1e-12)


def test_constant_rows(xp):
    log_w = np.full((3, 200), 3.0)
    smoothed, k_hat = psis(xp.asarray(log_w))
    np.testing.assert_allclose(to_numpy(smoothed), np.full((3, 200), -math.log(200)), atol=1e-12)
    assert np.all(np.isposinf(to_numpy(k_hat)))


def test_tail_with_zero_weights_and_all_zero_row(xp):
    log_w = np.full((3, 200), -np.inf)
    log_w[0, :10] = np.arange(10.0)  # 10 positive weights < M = 40: the tail holds -inf
    log_w[2] = np.linspace(-1.0, 1.0, 200)
    smoothed, k_hat = psis(xp.asarray(log_w))
    smoothed, k_hat = to_numpy(smoothed), to_numpy(k_hat)
    assert not np.any(np.isnan(smoothed))
    np.testing.assert_array_equal(np.isposinf(k_hat), [True, True, False])
    np.testing.assert_allclose(smoothed[0, :10], normalised(log_w[0, :10]), atol=1e-12)
    assert np.all(np.isneginf(smoothed[0, 10:]))
    assert np.all(np.isneginf(smoothed[1]))  # no positive weight: stays weight 0 everywhere


@pytest.mark.parametrize("shift", [-1500.0, 1500.0])
def test_huge_common_shift(xp, shift):
    log_w = sample_log_w("student_t", (3, 200), seed=13)
    expected, k_expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(xp.asarray(log_w + shift))
    assert np.all(np.isfinite(to_numpy(smoothed)))
    np.testing.assert_allclose(to_numpy(smoothed), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rejects_nan_and_pos_inf(xp, bad):
    log_w = np.zeros(50)
    log_w[3] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        psis(xp.asarray(log_w))


@pytest.mark.parametrize(
    ("r_eff", "error"),
    [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError)],
)
def test_rejects_bad_r_eff(xp, r_eff, error):
    with pytest.raises(error, match="r_eff"):
        psis(xp.asarray(np.zeros(50)), r_eff=r_eff)


def test_rejects_bad_axis_and_non_arrays(xp):
    with pytest.raises(ValueError, match="axis"):
        psis(xp.asarray(np.zeros((2, 50))), axis=2)
    with pytest.raises(TypeError):
        psis([0.0, 1.0])


def test_float32_input_computes_in_float32(xp):
    log_w = sample_log_w("normal", (3, 200), seed=17)
    expected, k_expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(xp.asarray(log_w, dtype=xp.float32))
    assert smoothed.dtype == xp.float32 and k_hat.dtype == xp.float32
    np.testing.assert_allclose(to_numpy(smoothed), expected, atol=2e-4)
    np.testing.assert_allclose(to_numpy(k_hat), k_expected, atol=2e-3)


# --------------------------------------------------------------------------------------------
# properties


@given(
    log_w=arrays(
        np.float64,
        # Few shapes: JAX compiles every operation once per shape in eager mode.
        st.sampled_from([(1, 25), (3, 50)]),
        # Dyadic values (multiples of 1/64), so that adding the shift is exact: a shift that
        # rounded two distinct values into a tie would change the tail legitimately.
        elements=st.integers(-1920, 1920).map(lambda i: i / 64.0),
    ),
    shift=st.integers(-12800, 12800).map(lambda i: i / 64.0),
)
def test_properties(xp, log_w, shift):
    smoothed, k_hat = psis(xp.asarray(log_w))
    smoothed, k_hat = to_numpy(smoothed), to_numpy(k_hat)
    assert not np.any(np.isnan(smoothed)) and not np.any(np.isnan(k_hat))
    # Normalised: the weights of each row sum to 1.
    np.testing.assert_allclose(np.exp(smoothed).sum(axis=-1), 1.0, rtol=1e-10)
    # Smoothing preserves the order of the draws: a larger draw never gets a smaller weight.
    # Tied draws may get different weights (where ties straddle the cutoff, some are smoothed).
    for row, raw in zip(smoothed, log_w, strict=True):
        shifted_raw = raw - raw.max()  # ties as seen after the shift
        levels = np.unique(shifted_raw)
        lowest = np.array([row[shifted_raw == v].min() for v in levels])
        highest = np.array([row[shifted_raw == v].max() for v in levels])
        assert np.all(lowest[1:] - highest[:-1] >= -1e-12)
    # Invariant to a common shift of the log weights.
    shifted, k_shifted = psis(xp.asarray(log_w + shift))
    np.testing.assert_allclose(to_numpy(shifted), smoothed, atol=1e-8)
    np.testing.assert_allclose(to_numpy(k_shifted), k_hat, atol=1e-8)


# --------------------------------------------------------------------------------------------
# traced execution


def test_same_result_under_jax_jit():
    pytest.importorskip("jax")
    import jax

    xp = get_namespace("jax")
    log_w = sample_log_w("student_t", (3, 200), seed=19)
    log_w[1, :4] = -np.inf
    eager, k_eager = psis(xp.asarray(log_w))
    traced, k_traced = jax.jit(lambda a: psis(a, r_eff=0.9))(xp.asarray(log_w))
    eager_r, k_eager_r = psis(xp.asarray(log_w), r_eff=0.9)
    assert_log_close(np.asarray(traced), np.asarray(eager_r), atol=1e-12)
    np.testing.assert_allclose(np.asarray(k_traced), np.asarray(k_eager_r), atol=1e-12)
    expected, k_expected = arviz_psislw(log_w)
    assert_log_close(np.asarray(eager), expected, atol=1e-10)
    np.testing.assert_allclose(np.asarray(k_eager), k_expected, atol=1e-10)
