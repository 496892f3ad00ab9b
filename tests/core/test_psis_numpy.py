"""Tests for isreshape_core._psis_numpy, the NumPy kernel of ``psis`` (DESIGN.md 3, item 5).

NumPy only (the kernel runs only on NumPy float64). References: arviz-stats' ``psislw``, the
portable path of ``psis`` (``psis._psis_rows``, which the kernel must reproduce) and brute-force
sums of ``math.log1p`` in Python (``math.fsum``). Every loop and fallback of the kernel is
exercised: the block sizes are shrunk so that inputs of a few thousand draws span several
blocks, and the thresholds of the fallbacks are moved so that ordinary rows take them.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as xp_numpy
import numpy as np
import pytest
from _helpers import available_backends
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from isreshape_core import _psis_numpy
from isreshape_core._psis import _gpd_fit, _psis_rows, psis, psis_tail_length

# The kernel is NumPy's alone: run it once, in the session whose backend is NumPy.
pytestmark = pytest.mark.skipif(
    "numpy" not in available_backends(), reason="the NumPy kernel runs in the numpy session"
)


def arviz_psislw(log_w: np.ndarray):
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    smoothed, k_hat = array_stats.psislw(-np.asarray(log_w), axis=-1)
    return np.asarray(smoothed), np.asarray(k_hat)


def portable(log_w: np.ndarray):
    """The array-API path of ``psis`` on the same rows, run on array-api-strict.

    On NumPy the portable path hands its Pareto fit to the kernel's; array-api-strict keeps
    every step of it independent of the kernel.
    """
    xps = pytest.importorskip("array_api_strict")
    rows = xps.asarray(np.array(log_w, dtype=np.float64))
    out, k_hat = _psis_rows(xps, rows, psis_tail_length(rows.shape[-1]))
    return np.asarray(out), np.asarray(k_hat)


def kernel(log_w: np.ndarray):
    """The kernel with the portable path completing the rows it leaves, as ``psis`` does."""
    rows = np.array(log_w, dtype=np.float64)
    out, k_hat, redo = _psis_numpy.psis_rows(rows, psis_tail_length(rows.shape[-1]))
    if redo is not None and redo.any():
        out[redo], k_hat[redo] = _psis_rows(xp_numpy, rows[redo], psis_tail_length(rows.shape[-1]))
    return out, k_hat


def assert_same_rows(actual, expected, atol: float) -> None:
    """Equal ``-inf`` patterns; finite values equal as sorted rows (tied draws may swap)."""
    (out, k_hat), (ref, k_ref) = actual, expected
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    np.testing.assert_allclose(np.sort(out, axis=-1), np.sort(ref, axis=-1), rtol=0, atol=atol)
    np.testing.assert_allclose(k_hat, k_ref, rtol=0, atol=atol)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows (and of 1000 columns), so that every loop runs several times."""
    monkeypatch.setattr(_psis_numpy, "_SELECT_BLOCK", 9000)
    monkeypatch.setattr(_psis_numpy, "_BLOCK", 1000)
    monkeypatch.setattr(_psis_numpy, "_GRID_BLOCK", 5000)


@pytest.mark.parametrize(
    "shape",
    [
        (5, 120),  # sorted rows (S < 8 (M + 1))
        (7, 3000),  # block-max bound, two chunks of maxima, several blocks of rows
        (2, 20000),  # four chunks of maxima; rows longer than a block of columns
        (1, 300000),  # more than 2048 block maxima: one partition; sums over column blocks
    ],
)
def test_matches_arviz_stats_in_every_block_layout(small_blocks, shape):
    log_w = np.random.default_rng(sum(shape)).standard_t(4, size=shape)
    expected = arviz_psislw(log_w)
    got = kernel(log_w)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=1e-10)


def test_default_blocks_match_arviz_stats_on_a_large_batch():
    # The benchmark's (1000, 4000) in miniature: 200 rows span two blocks of rows.
    log_w = np.random.default_rng(1).normal(0.0, 1.0, (200, 4000))
    expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(log_w)
    np.testing.assert_allclose(smoothed, expected[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(k_hat, expected[1], rtol=0, atol=1e-10)


def mixed_rows(n: int, seed: int) -> np.ndarray:
    """Ordinary rows between rows the kernel leaves to the portable path."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 1.0, (8, n))
    m = psis_tail_length(n)
    top = np.sort(rows[1])
    rows[1][np.isin(rows[1], top[-m : -m + 2])] = top[-m - 1]  # ties at the cutoff
    rows[3] = -np.inf  # no positive weight
    rows[5, m // 2 :] = -np.inf  # fewer than M + 1 positive weights
    rows[6, :m] = 6.0  # a tail of equal values above the rest: no fit, k_hat = inf
    return rows


@pytest.mark.parametrize("n", [200, 3000])
def test_rows_left_to_the_portable_path_and_the_rest_agree_with_it(small_blocks, n):
    rows = mixed_rows(n, seed=n)
    out, k_hat, redo = _psis_numpy.psis_rows(rows.copy(), psis_tail_length(n))
    np.testing.assert_array_equal(redo, [False, True, False, True, False, True, False, False])
    ref = portable(rows)
    keep = ~redo
    assert_same_rows((out[keep], k_hat[keep]), (ref[0][keep], ref[1][keep]), atol=1e-12)
    assert np.isposinf(k_hat[6])
    assert_same_rows(kernel(rows), ref, atol=1e-12)


def test_direct_sums_and_shifted_exponentials_agree(monkeypatch):
    # Move the thresholds so that every row sums its body directly and every block of rows
    # subtracts the max before exponentiating: the alternative routes of the normalisation.
    log_w = np.random.default_rng(3).standard_t(3, (6, 3000))
    fast = kernel(log_w)
    monkeypatch.setattr(_psis_numpy, "_DIRECT_BELOW", 2.0)
    monkeypatch.setattr(_psis_numpy, "_DIRECT_SHIFT", 1.0)
    monkeypatch.setattr(_psis_numpy, "_DIRECT_EXP", 0.0)
    slow = kernel(log_w)
    np.testing.assert_allclose(slow[0], fast[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(slow[1], fast[1])
    expected = arviz_psislw(log_w)
    np.testing.assert_allclose(slow[0], expected[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("scale", [1.0, 4.0, 15.0])
def test_a_tail_holding_almost_all_the_mass(scale):
    # A few enormous weights, or log weights of standard deviation 4 or 15 (k_hat 1 to 5): the
    # draws below the cutoff hold less than 1/16 of the mass, so their sum is taken directly,
    # not as the total less the tail.
    rng = np.random.default_rng(4)
    log_w = rng.normal(0.0, scale, (3, 2000))
    if scale == 1.0:
        log_w[:, :100] += 30.0
    with np.errstate(all="ignore"):
        expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(log_w)
    np.testing.assert_allclose(smoothed, expected[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(k_hat, expected[1], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# the Zhang-Stephens grid


def brute_grid(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    pairs = zip(x, theta, strict=True)
    return np.array([[math.fsum(math.log1p(-t * v) for v in row) for t in th] for row, th in pairs])


def grid_log_sums(*args):
    """``_grid_log_sums`` as the kernel calls it, with NumPy's floating-point warnings off."""
    with np.errstate(all="ignore"):
        return _psis_numpy._grid_log_sums(*args)


def grid_inputs(x: np.ndarray):
    tail_len = x.shape[-1]
    star = int(tail_len / 4 + 0.5) - 1
    x_star, x_max = x[:, star : star + 1], x[:, -1:]
    neg_spread = _psis_numpy._grid_coefficients(30 + int(tail_len**0.5))[2]
    theta = neg_spread / (3.0 * x_star) + 1.0 / x_max
    return x, x_star, x_max, theta


def test_grid_sums_match_brute_force_including_theta_near_zero_and_overflow():
    rng = np.random.default_rng(6)
    tail_len = 45  # padded to 48 terms
    x = np.sort(rng.exponential(1.0, (4, tail_len)), axis=-1)
    star = int(tail_len / 4 + 0.5) - 1
    # Row 1: x_max = 3 x*/c_j for a grid point j, so that theta_j is 0 up to rounding (the
    # product would lose the sum's relative accuracy there); j is the first grid point whose
    # x_max stays above the other draws (c_j decreases with j).
    spread = _psis_numpy._grid_coefficients(30 + int(tail_len**0.5))[0]
    j = int(np.argmax(spread <= 3.0 * x[1, star] / x[1, -2]))
    x[1, -1] = 3.0 * x[1, star] / spread[j]
    # Row 2: the tail spans 200 orders of magnitude: products of 8 terms overflow.
    x[2] = np.logspace(-200.0, 0.0, tail_len)
    x_in, x_star, x_max, theta = grid_inputs(x)
    assert np.min(np.abs(theta[1] * x_max[1])) < 1e-12
    got = grid_log_sums(x_in, x_star, x_max, theta)
    assert np.all(np.isfinite(got))
    expected = brute_grid(x, theta)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13 * tail_len)
    # The near-zero grid point is recomputed term by term: its sum keeps its relative accuracy.
    j = np.argmin(np.abs(theta[1]))
    assert abs(got[1, j] - expected[1, j]) <= 1e-12 * abs(expected[1, j])


@given(
    x=arrays(np.float64, (3, 20), elements=st.floats(1e-6, 1e3)),
)
def test_grid_sums_property(x):
    x = np.sort(x, axis=-1)
    x_in, x_star, x_max, theta = grid_inputs(x)
    got = grid_log_sums(x_in, x_star, x_max, theta)
    expected = brute_grid(x, theta)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12 * x.shape[-1])


def test_tail_fit_for_the_portable_path_equals_the_array_api_fit():
    # psis._gpd_fit hands NumPy float64 tails (the tail rule's tempered tails) to the kernel's
    # fit: compare it with the array-API fit run on array-api-strict.
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(9)
    tail = np.sort(rng.standard_t(4, (6, 40)), axis=-1) - 6.0
    cutoff = tail[:, :1] - rng.uniform(0.0, 0.5, (6, 1))
    tail[1, :3] = -np.inf  # zero weights in the tail: not fitted
    cutoff[1] = -np.inf
    tail[2] = -1.0  # an equal tail: not fitted
    tail[3, :15] = cutoff[3]  # ties at the cutoff over a quarter of the tail: x* = 0
    cutoff[4] = -np.inf  # M positive weights and nothing below: fitted with exp(c) = 0
    k_hat, sigma, exp_cut, ok = _gpd_fit(xp_numpy, tail, cutoff)
    ref = [np.asarray(a) for a in _gpd_fit(xps, xps.asarray(tail), xps.asarray(cutoff))]
    np.testing.assert_array_equal(ok[:, 0], [True, False, False, False, True, True])
    np.testing.assert_array_equal(ok, ref[3])
    np.testing.assert_allclose(k_hat[ok], ref[0][ok], rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma[ok], ref[1][ok], rtol=1e-12)
    np.testing.assert_array_equal(exp_cut, ref[2])
    assert np.all(np.isfinite(k_hat)) and np.all(np.isfinite(sigma))


# --------------------------------------------------------------------------------------------
# properties against the portable path


@given(
    log_w=arrays(
        np.float64,
        st.sampled_from([(3, 50), (2, 400)]),
        # Dyadic values, many ties: rows with ties at the cutoff go to the portable path.
        elements=st.integers(-640, 640).map(lambda i: i / 64.0),
    ),
)
def test_kernel_equals_the_portable_path(log_w):
    assert_same_rows(kernel(log_w), portable(log_w), atol=1e-10)


def test_non_contiguous_rows_and_psis_dispatch():
    log_w = np.random.default_rng(8).normal(0.0, 1.0, (400, 6))[:, ::2].T  # (3, 400) strided
    assert not log_w.flags.c_contiguous
    expected = arviz_psislw(log_w)
    smoothed, k_hat = psis(log_w)
    np.testing.assert_allclose(smoothed, expected[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(k_hat, expected[1], rtol=0, atol=1e-10)
