"""Tests of isreshape_core/ess.py against brute-force sums."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import brute_force_ess, to_numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import isreshape_core as isr

finite_logs = st.floats(-30.0, 30.0, allow_nan=False, allow_infinity=False)


def log_weight_arrays(min_n=1, max_n=40):
    return hnp.arrays(np.float64, st.integers(min_n, max_n), elements=finite_logs)


def brute_tempered(l, gamma):
    """w**gamma by plain numpy in float64, with -inf weight 0 at every gamma."""
    l = np.asarray(l, dtype=np.float64)
    finite = np.isfinite(l)
    shift = l[finite].max() if finite.any() else 0.0
    out = np.zeros_like(l)
    out[finite] = np.exp(gamma * (l[finite] - shift))
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_ess_matches_brute_force(xp, gamma):
    rng = np.random.default_rng(0)
    for l in (rng.normal(0, 2, 50), rng.standard_t(3, 200) * 3, np.array([4.0, -1.0, 0.5])):
        got = to_numpy(isr.ess(xp.asarray(l), gamma))
        want = brute_force_ess(brute_tempered(l, gamma))
        np.testing.assert_allclose(got, want, rtol=1e-12)
        ratio = to_numpy(isr.ess_ratio(xp.asarray(l), gamma))
        np.testing.assert_allclose(ratio, want / l.size, rtol=1e-12)


def test_ess_batched_over_axes_with_per_row_gamma(xp):
    rng = np.random.default_rng(1)
    l = rng.normal(0, 1.5, size=(3, 17, 4))
    gamma = np.array([[0.1, 0.5, 0.9, 1.0]] * 3)  # batch shape (3, 4) for axis=1
    got = to_numpy(isr.ess(xp.asarray(l), xp.asarray(gamma), axis=1))
    want = np.array(
        [
            [brute_force_ess(brute_tempered(l[i, :, j], gamma[i, j])) for j in range(4)]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    got0 = to_numpy(isr.ess(xp.asarray(l[:, :, 0]), 1.0, axis=0))
    want0 = [brute_force_ess(brute_tempered(l[:, k, 0], 1.0)) for k in range(17)]
    np.testing.assert_allclose(got0, want0, rtol=1e-12)


def test_neg_inf_log_weights_are_weight_zero_at_every_gamma(xp):
    l = np.array([0.0, -np.inf, 1.0, -np.inf, 2.0])
    for gamma in (0.0, 0.5, 1.0):
        got = to_numpy(isr.ess(xp.asarray(l), gamma))
        assert np.isfinite(got)
        np.testing.assert_allclose(got, brute_force_ess(brute_tempered(l, gamma)), rtol=1e-12)
    # gamma = 0: three positive weights count, the two zero weights do not (0**0 is not 1).
    assert to_numpy(isr.ess(xp.asarray(l), 0.0)) == 3.0
    np.testing.assert_allclose(to_numpy(isr.ess_ratio(xp.asarray(l), 0.0)), 3 / 5)


def test_fully_masked_and_all_zero_rows_give_zero_not_nan(xp):
    l = np.array([[0.1, 0.2, 0.3], [-np.inf, -np.inf, -np.inf]])
    mask = np.array([[False, False, False], [True, True, True]])
    for gamma in (0.0, 1.0):
        got = to_numpy(isr.ess(xp.asarray(l), gamma, mask=xp.asarray(mask)))
        np.testing.assert_array_equal(got, [0.0, 0.0])
        ratio = to_numpy(isr.ess_ratio(xp.asarray(l), gamma, mask=xp.asarray(mask)))
        np.testing.assert_array_equal(ratio, [0.0, 0.0])


def test_mask_equals_dropping_the_samples(xp):
    rng = np.random.default_rng(2)
    l = rng.normal(0, 2, size=(4, 30))
    mask = rng.random((4, 30)) < 0.7
    got = to_numpy(isr.ess(xp.asarray(l), 0.6, mask=xp.asarray(mask)))
    want = [brute_force_ess(brute_tempered(l[i][mask[i]], 0.6)) for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    ratio = to_numpy(isr.ess_ratio(xp.asarray(l), 0.6, mask=xp.asarray(mask)))
    np.testing.assert_allclose(ratio, np.array(want) / mask.sum(axis=1), rtol=1e-12)


def test_extreme_inputs(xp):
    # +-1e4: exp(1e4) overflows, the log-space computation does not.
    l = np.array([1e4, 0.0, -1e4])
    np.testing.assert_allclose(to_numpy(isr.ess(xp.asarray(l))), 1.0)
    # gamma small enough that the weights are moderate: brute force in shifted space agrees.
    got = to_numpy(isr.ess(xp.asarray(l), 1e-4))
    np.testing.assert_allclose(got, brute_force_ess(brute_tempered(l, 1e-4)), rtol=1e-12)
    # A single dominant weight gives ESS 1.
    l = np.zeros(1000)
    l[3] = 60.0
    np.testing.assert_allclose(to_numpy(isr.ess(xp.asarray(l))), 1.0, rtol=1e-12)
    # n = 1 and n = 2.
    assert to_numpy(isr.ess(xp.asarray(np.array([5.0])))) == 1.0
    l2 = np.array([0.0, np.log(3.0)])
    np.testing.assert_allclose(to_numpy(isr.ess(xp.asarray(l2))), 16 / 10, rtol=1e-12)


@given(log_weight_arrays(), st.floats(0, 1), st.floats(-500, 500))
def test_ess_bounds_and_shift_invariance(xp, l, gamma, shift):
    e = to_numpy(isr.ess(xp.asarray(l), gamma))
    assert 1.0 <= e <= l.size
    shifted = to_numpy(isr.ess(xp.asarray(l + shift), gamma))
    np.testing.assert_allclose(shifted, e, rtol=1e-9)


def test_ess_of_near_equal_weights_is_clipped_to_n(xp):
    # Weights equal to 1e-9: s1^2 / s2 rounds above n in about a third of the rows; the ESS
    # must still be at most n (and the ratio at most 1), and equal n to rounding.
    rng = np.random.default_rng(12)
    for n in (7, 64, 1000):
        l = rng.normal(0.0, 1e-9, size=(200, n))
        for gamma in (0.5, 1.0):
            e = to_numpy(isr.ess(xp.asarray(l), gamma))
            assert np.all(e <= n) and np.all(e >= 1.0), (n, e.max() - n)
            np.testing.assert_allclose(e, n, rtol=1e-12)
            ratio = to_numpy(isr.ess_ratio(xp.asarray(l), gamma))
            assert np.all(ratio <= 1.0)
        r = np.ones(n)
        g = to_numpy(isr.gradient_ess(xp.asarray(l), xp.asarray(r), 1.0))
        assert np.all(g <= n)


@given(
    st.sampled_from([1, 7, 40]),  # few shapes: JAX compiles every operation once per shape
    st.floats(-30, 30),
    st.floats(1e-12, 1e-6),
    st.integers(0, 2**32 - 1),
    st.floats(0, 1),
)
def test_ess_bounds_on_near_equal_weights(xp, n, base, scale, seed, gamma):
    l = base + scale * np.random.default_rng(seed).normal(size=n)
    e = to_numpy(isr.ess(xp.asarray(l), gamma))
    assert 1.0 <= e <= n
    np.testing.assert_allclose(e, n, rtol=1e-9)


@given(log_weight_arrays(min_n=2), st.floats(0, 1), st.floats(0, 1))
def test_ess_is_non_increasing_in_gamma(xp, l, g1, g2):
    lo, hi = min(g1, g2), max(g1, g2)
    e_lo = to_numpy(isr.ess(xp.asarray(l), lo))
    e_hi = to_numpy(isr.ess(xp.asarray(l), hi))
    assert e_hi <= e_lo * (1 + 1e-10)


@given(log_weight_arrays(min_n=1, max_n=20), st.integers(0, 7), st.floats(0, 1))
def test_padding_plus_mask_equals_no_padding(xp, l, pad, gamma):
    padded = np.concatenate([l, np.full(pad, 123.0)])
    mask = np.concatenate([np.ones(l.size, bool), np.zeros(pad, bool)])
    got = to_numpy(isr.ess_ratio(xp.asarray(padded), gamma, mask=xp.asarray(mask)))
    want = to_numpy(isr.ess_ratio(xp.asarray(l), gamma))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gradient_ess_matches_brute_force(xp):
    rng = np.random.default_rng(3)
    l = rng.normal(0, 1, 40)
    r = rng.normal(0, 1, 40)
    r[::5] = 0.0
    for gamma in (0.0, 0.4, 1.0):
        got = to_numpy(isr.gradient_ess(xp.asarray(l), xp.asarray(r), gamma))
        want = brute_force_ess(brute_tempered(l, gamma) * np.abs(r))
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gradient_ess_batched_masked_matches_loops(xp):
    # Rows along axis 1 of a (3, 30, 2) batch, per-row gamma, per-sample rewards with zeros,
    # a mask, -inf weights, and a row whose every unmasked sample has r = 0 (ESS_grad 0).
    rng = np.random.default_rng(13)
    l = rng.normal(0, 1.5, size=(3, 30, 2))
    l[0, ::4, 1] = -np.inf
    r = rng.normal(0, 1, size=(3, 30, 2))
    r[:, ::3, :] = 0.0
    mask = rng.random((3, 30, 2)) < 0.75
    r[2, :, 0] = np.where(mask[2, :, 0], 0.0, r[2, :, 0])
    gamma = np.array([[0.0, 0.3], [0.7, 1.0], [0.5, 0.2]])
    got = to_numpy(
        isr.gradient_ess(
            xp.asarray(l), xp.asarray(r), xp.asarray(gamma), axis=1, mask=xp.asarray(mask)
        )
    )
    want = np.zeros((3, 2))
    for i in range(3):
        for j in range(2):
            keep = mask[i, :, j]
            w = brute_tempered(l[i, keep, j], gamma[i, j]) * np.abs(r[i, keep, j])
            want[i, j] = brute_force_ess(w)
    assert want[2, 0] == 0.0
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # Rewards broadcast along the batch: one reward vector for every row.
    rows = rng.normal(0, 1, size=(4, 25))
    r1 = rng.normal(0, 1, 25)
    got = to_numpy(isr.gradient_ess(xp.asarray(rows), xp.asarray(r1), 0.6))
    want = [brute_force_ess(brute_tempered(row, 0.6) * np.abs(r1)) for row in rows]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_half_precision_inputs_compute_in_float32(xp):
    name = xp.__name__
    rng = np.random.default_rng(4)
    l = rng.normal(0, 1, 256)
    if "torch" in name:
        import torch

        low = torch.tensor(l, dtype=torch.bfloat16)
        l_rounded = low.double().numpy()
    elif "jax" in name:
        low = xp.asarray(l, dtype=xp.float16)
        l_rounded = np.asarray(low, dtype=np.float64)
    elif "strict" in name:
        low = xp.asarray(l, dtype=xp.float32)
        l_rounded = l.astype(np.float32).astype(np.float64)
    else:
        low = l.astype(np.float16)
        l_rounded = low.astype(np.float64)
    got = isr.ess(low, 0.7)
    assert got.dtype == xp.float32
    want = brute_force_ess(brute_tempered(l_rounded, 0.7))
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_w": np.array([0.0, np.nan])}, "NaN or \\+inf"),
        ({"log_w": np.array([0.0, np.inf])}, "NaN or \\+inf"),
        ({"log_w": np.zeros((3, 0))}, "no samples"),
        ({"log_w": np.zeros(3), "gamma": 1.5}, "gamma must lie in"),
        ({"log_w": np.zeros(3), "gamma": -0.1}, "gamma must lie in"),
        ({"log_w": np.zeros(3), "axis": 2}, "axis=2 is out of range"),
        ({"log_w": np.zeros((2, 3)), "mask": np.ones((3, 3), bool)}, "mask of shape"),
    ],
)
def test_bad_input_errors_name_the_argument(xp, kwargs, message):
    kwargs = dict(kwargs)
    log_w = xp.asarray(kwargs.pop("log_w"))
    if "mask" in kwargs:
        kwargs["mask"] = xp.asarray(kwargs["mask"])
    gamma = kwargs.pop("gamma", 1.0)
    with pytest.raises(ValueError, match=message):
        isr.ess(log_w, gamma, **kwargs)


def test_non_boolean_mask_is_rejected(xp):
    with pytest.raises(TypeError, match="mask must have a boolean dtype"):
        isr.ess(xp.asarray(np.zeros(3)), mask=xp.asarray(np.ones(3)))


def test_nan_at_masked_position_is_ignored(xp):
    l = np.array([0.0, 1.0, np.nan])
    mask = np.array([True, True, False])
    got = to_numpy(isr.ess(xp.asarray(l), mask=xp.asarray(mask)))
    np.testing.assert_allclose(got, brute_force_ess(brute_tempered(l[:2], 1.0)))
