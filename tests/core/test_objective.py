"""Tests for ``isreshape_core.objective`` (DESIGN.md section 3 item 1).

Every expected value comes from an independent computation: closed forms, plain Python/NumPy
sums with ``math`` functions, or central finite differences of the value.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from _helpers import to_numpy
from hypothesis import given
from hypothesis import strategies as st

from isreshape_core import (
    objective,
    objective_grad,
    reinforce_objective,
    reinforce_objective_grad,
)

GAMMAS = (0.0, 1e-8, 0.3, 0.5, 1.0)


def boxcox_ref(l: float, r: float, g: float) -> float:
    """One term ``r (w**g - 1) / g`` in Python floats (``r l`` at ``g = 0``); ``math.expm1``
    keeps the digits that ``exp(g l) - 1`` loses at small ``g l``."""
    if r == 0:
        return 0.0
    if g == 0:
        return r * l
    return r * math.expm1(g * l) / g


def sample(seed: int, shape: tuple, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal(shape), rng.normal(0.3, 1.0, shape)


def fd_grad(f, l: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function ``f`` of a 1-D array, in numpy."""
    out = np.empty_like(l)
    for i in range(l.size):
        up, dn = l.copy(), l.copy()
        up[i] += h
        dn[i] -= h
        out[i] = (f(up) - f(dn)) / (2 * h)
    return out


# --- values against closed forms ----------------------------------------------------------------


def test_gamma_one_is_mean_r_w_minus_one(xp):
    l, r = sample(0, (7,))
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), 1.0))
    np.testing.assert_allclose(got, np.mean(r * (np.exp(l) - 1.0)), rtol=1e-13)


def test_gamma_zero_is_mean_r_l(xp):
    l, r = sample(1, (7,))
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), 0.0))
    np.testing.assert_allclose(got, np.mean(r * l), rtol=1e-13)


@pytest.mark.parametrize("gamma", [0.1, 0.3, 0.5, 0.9, 1.0])
def test_equals_seed_form(xp, gamma):
    # Seed section 2.5: L = (E[w^g r] - E[r]) / g for g > 0.
    l, r = sample(2, (9,))
    seed_form = (np.mean(np.exp(l) ** gamma * r) - np.mean(r)) / gamma
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), gamma))
    np.testing.assert_allclose(got, seed_form, rtol=1e-12)


def test_reductions_and_elementwise_terms(xp):
    l, r = sample(3, (6,))
    gamma = 0.4
    terms = np.array([boxcox_ref(a, b, gamma) for a, b in zip(l, r, strict=True)])
    L, R = xp.asarray(l), xp.asarray(r)
    np.testing.assert_allclose(to_numpy(objective(L, R, gamma, reduction="none")), terms, 1e-13)
    np.testing.assert_allclose(to_numpy(objective(L, R, gamma, reduction="sum")), terms.sum())
    np.testing.assert_allclose(to_numpy(objective(L, R, gamma)), terms.mean(), rtol=1e-13)


def test_continuity_at_gamma_zero(xp):
    l, r = sample(4, (8,), scale=3.0)
    L, R = xp.asarray(l), xp.asarray(r)
    at_zero = to_numpy(objective(L, R, 0.0, reduction="none"))
    near = to_numpy(objective(L, R, 1e-10, reduction="none"))
    # |expm1(g l)/g - l| = g l^2 / 2 + O(g^2): below 1e-8 here.
    np.testing.assert_allclose(near, at_zero, rtol=0, atol=1e-8)
    np.testing.assert_allclose(at_zero, r * l, rtol=1e-14)


@given(
    l=st.lists(st.floats(-6, 6), min_size=1, max_size=6),
    data=st.data(),
    gamma=st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_subnormal=False)),
)
def test_matches_python_sum(xp, l, data, gamma):
    r = data.draw(st.lists(st.floats(-3, 3), min_size=len(l), max_size=len(l)))
    L, R = xp.asarray(np.array(l)), xp.asarray(np.array(r))
    want = sum(boxcox_ref(a, b, gamma) for a, b in zip(l, r, strict=True)) / len(l)
    got = float(to_numpy(objective(L, R, gamma)))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-14)
    grad = to_numpy(objective_grad(L, R, gamma, reduction="sum"))
    want_grad = [b * math.exp(gamma * a) for a, b in zip(l, r, strict=True)]
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-300)


# --- derivatives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_matches_finite_differences(xp, gamma, reduction):
    l, r = sample(5, (6,))
    R = xp.asarray(r)

    def f(lv):
        return float(to_numpy(objective(xp.asarray(lv), R, gamma, reduction=reduction)))

    want = fd_grad(f, l)
    got = to_numpy(objective_grad(xp.asarray(l), R, gamma, reduction=reduction))
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_grad_of_each_term(xp, gamma):
    l, r = sample(6, (5,))
    R = xp.asarray(r)
    got = to_numpy(objective_grad(xp.asarray(l), R, gamma, reduction="none"))
    h = 1e-6
    up = to_numpy(objective(xp.asarray(l + h), R, gamma, reduction="none"))
    dn = to_numpy(objective(xp.asarray(l - h), R, gamma, reduction="none"))
    np.testing.assert_allclose(got, (up - dn) / (2 * h), rtol=1e-7, atol=1e-9)


def test_grad_at_gamma_zero_counts_only_finite_samples(xp):
    l = np.array([0.7, -np.inf, -2.0, 3.0])
    r = np.array([1.0, 5.0, -2.0, 0.0])
    got = to_numpy(objective_grad(xp.asarray(l), xp.asarray(r), 0.0, reduction="sum"))
    np.testing.assert_array_equal(got, [1.0, 0.0, -2.0, 0.0])  # w^0 = 1, 0^0 = 0 here


@pytest.mark.parametrize("gamma", GAMMAS)
def test_reinforce_grad_wrt_logp_equals_objective_grad_wrt_l(xp, gamma):
    # l = logp - logq, so d l / d logp = 1. REINFORCE holds w^gamma fixed (the adapters'
    # stop-gradient): perturb logp only. The objective: perturb logp, l moves with it.
    rng = np.random.default_rng(7)
    logq = rng.normal(-2.0, 0.5, 5)
    logp = logq + rng.normal(0.0, 0.7, 5)
    r = rng.normal(0.0, 1.0, 5)
    R, L = xp.asarray(r), xp.asarray(logp - logq)

    def f_reinforce(lp):
        return float(to_numpy(reinforce_objective(L, xp.asarray(lp), R, gamma)))

    def f_objective(lp):
        return float(to_numpy(objective(xp.asarray(lp - logq), R, gamma)))

    fd_reinforce = fd_grad(f_reinforce, logp)
    fd_objective = fd_grad(f_objective, logp)
    np.testing.assert_allclose(fd_reinforce, fd_objective, rtol=1e-7, atol=1e-9)
    got = to_numpy(reinforce_objective_grad(L, xp.asarray(logp), R, gamma))
    np.testing.assert_allclose(got, fd_objective, rtol=1e-7, atol=1e-9)


def test_reinforce_value(xp):
    rng = np.random.default_rng(8)
    l, logp, r = rng.normal(size=6), -rng.exponential(size=6), rng.normal(size=6)
    gamma = 0.35
    want = np.mean(np.exp(l) ** gamma * r * logp)
    got = to_numpy(reinforce_objective(xp.asarray(l), xp.asarray(logp), xp.asarray(r), gamma))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    terms = to_numpy(
        reinforce_objective(xp.asarray(l), xp.asarray(logp), xp.asarray(r), gamma, reduction="none")
    )
    np.testing.assert_allclose(terms, np.exp(l) ** gamma * r * logp, rtol=1e-13)


def test_reinforce_zero_factors(xp):
    # w = 0 with logp = -inf, and r = 0 with logp = -inf: both terms are 0, not NaN.
    l = np.array([-np.inf, 0.5, 0.2])
    logp = np.array([-np.inf, -np.inf, -1.0])
    r = np.array([1.0, 0.0, 2.0])
    for gamma in (0.0, 0.5):
        got = to_numpy(
            reinforce_objective(
                xp.asarray(l), xp.asarray(logp), xp.asarray(r), gamma, reduction="none"
            )
        )
        np.testing.assert_array_equal(got, [0.0, 0.0, 2.0 * math.exp(gamma * 0.2) * -1.0])


# --- masks, batches, per-row gamma ---------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.6])
def test_mask_equals_unpadded(xp, gamma):
    rng = np.random.default_rng(9)
    l, r = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    pad_l = np.concatenate([l, rng.normal(size=(2, 3)) * 5], axis=1)
    pad_r = np.concatenate([r, rng.normal(size=(2, 3))], axis=1)
    mask = np.concatenate([np.ones((2, 4), bool), np.zeros((2, 3), bool)], axis=1)
    # Move the padding into the middle so that it is not only a trailing block.
    perm = [0, 4, 1, 5, 2, 6, 3]
    pad_l, pad_r, mask = pad_l[:, perm], pad_r[:, perm], mask[:, perm]
    M = xp.asarray(mask)
    for red in ("mean", "sum"):
        want = np.array(
            [sum(boxcox_ref(a, b, gamma) for a, b in zip(l[i], r[i], strict=True)) for i in (0, 1)]
        )
        if red == "mean":
            want = want / 4
        got = objective(xp.asarray(pad_l), xp.asarray(pad_r), gamma, mask=M, reduction=red)
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-13)
        g = to_numpy(
            objective_grad(xp.asarray(pad_l), xp.asarray(pad_r), gamma, mask=M, reduction=red)
        )
        want_g = r * np.exp(gamma * l) / (4 if red == "mean" else 1)
        np.testing.assert_allclose(g[:, [0, 2, 4, 6]], want_g, rtol=1e-13)
        assert np.all(g[~mask] == 0)
    terms = to_numpy(
        objective(xp.asarray(pad_l), xp.asarray(pad_r), gamma, mask=M, reduction="none")
    )
    assert np.all(terms[~mask] == 0)


def test_fully_masked_row_is_zero(xp):
    l, r = sample(10, (2, 3))
    mask = np.array([[True, True, False], [False, False, False]])
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), 0.5, mask=xp.asarray(mask)))
    assert got[1] == 0.0
    np.testing.assert_allclose(got[0], np.mean(r[0, :2] * np.expm1(0.5 * l[0, :2]) / 0.5))
    g = to_numpy(objective_grad(xp.asarray(l), xp.asarray(r), 0.5, mask=xp.asarray(mask)))
    np.testing.assert_array_equal(g[1], 0.0)


def test_per_row_gamma(xp):
    # One gamma per GRPO group, log_w of shape (groups, G).
    l, r = sample(11, (3, 5))
    gammas = np.array([0.0, 0.25, 1.0])
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), xp.asarray(gammas)))
    want = [
        np.mean([boxcox_ref(a, b, g) for a, b in zip(l[i], r[i], strict=True)])
        for i, g in enumerate(gammas)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    grad = to_numpy(objective_grad(xp.asarray(l), xp.asarray(r), xp.asarray(gammas)))
    np.testing.assert_allclose(grad, r * np.exp(gammas[:, None] * l) / 5, rtol=1e-13)


def test_batched_axis_matches_row_by_row(xp):
    # axis=1 of a (2, 4, 3) array, rewards broadcast over the last axis, gamma per (2, 3) row.
    rng = np.random.default_rng(12)
    l = rng.normal(size=(2, 4, 3))
    r = rng.normal(size=(2, 4, 1))
    gam = rng.uniform(size=(2, 3))
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), xp.asarray(gam), axis=1))
    got_g = to_numpy(objective_grad(xp.asarray(l), xp.asarray(r), xp.asarray(gam), axis=1))
    assert got.shape == (2, 3) and got_g.shape == (2, 4, 3)
    for i in range(2):
        for k in range(3):
            col = [boxcox_ref(l[i, j, k], r[i, j, 0], gam[i, k]) for j in range(4)]
            assert got[i, k] == pytest.approx(sum(col) / 4, rel=1e-12)
            for j in range(4):
                want = r[i, j, 0] * math.exp(gam[i, k] * l[i, j, k]) / 4
                assert got_g[i, j, k] == pytest.approx(want, rel=1e-12)


# --- limits and extreme values -------------------------------------------------------------------


def test_minus_inf_and_zero_reward_limits(xp):
    l = xp.asarray(np.array([-np.inf, -np.inf, -np.inf, 0.5]))
    r = xp.asarray(np.array([0.0, 2.0, -3.0, 1.0]))
    got = to_numpy(objective(l, r, 0.5, reduction="none"))
    np.testing.assert_allclose(got, [0.0, -2.0 / 0.5, 3.0 / 0.5, math.expm1(0.25) / 0.5])
    got0 = to_numpy(objective(l, r, 0.0, reduction="none"))
    np.testing.assert_array_equal(got0, [0.0, -np.inf, np.inf, 0.5])
    grad = to_numpy(objective_grad(l, r, 0.0, reduction="none"))
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0, 1.0])
    # r = 0 where l = -inf at gamma = 0 contributes 0 to the mean: no 0 * inf NaN.
    l2 = xp.asarray(np.array([-np.inf, 0.5]))
    r2 = xp.asarray(np.array([0.0, 1.0]))
    assert float(to_numpy(objective(l2, r2, 0.0))) == pytest.approx(0.25)


def test_extreme_log_weights(xp):
    """Finite log weights of ``+-1e4``: every value and every gradient is finite.

    The derivative ``r w**gamma = exp(3000)`` is out of range, so it saturates at the largest
    float, with the sign of ``r``: the documented rule of :func:`objective_grad` (for every
    finite input the gradient is finite), the same as the objective's own term here. An
    earlier contract returned ``+inf`` for it, which an optimizer step turns into NaN.
    """
    l = xp.asarray(np.array([-1e4, 1e4, -1e4]))
    r = xp.asarray(np.array([2.0, 1.0, -1.0]))
    got = to_numpy(objective(l, r, 0.3, reduction="none"))
    np.testing.assert_allclose(got[[0, 2]], [-2.0 / 0.3, 1.0 / 0.3], rtol=1e-14)
    # exp(3000) is out of range: the term saturates at the largest float (finite input)
    assert got[1] == np.finfo(np.float64).max
    small = to_numpy(objective(l, r, 0.01, reduction="none"))
    np.testing.assert_allclose(small[1], math.expm1(100.0) / 0.01, rtol=1e-13)
    np.testing.assert_allclose(
        small[[0, 2]], [2 * math.expm1(-100) / 0.01, -math.expm1(-100) / 0.01]
    )
    zero = to_numpy(objective(l, r, 0.0, reduction="none"))
    np.testing.assert_array_equal(zero, [-2e4, 1e4, 1e4])
    grad = to_numpy(objective_grad(l, r, 0.3, reduction="none"))
    assert grad[1] == np.finfo(np.float64).max and grad[0] == 0.0 and grad[2] == 0.0
    neg = to_numpy(objective_grad(l, -r, 0.3, reduction="none"))
    assert neg[1] == -np.finfo(np.float64).max
    tiny = to_numpy(objective(l, r, 1e-8, reduction="none"))
    np.testing.assert_allclose(
        tiny,
        [2 * math.expm1(-1e-4) / 1e-8, math.expm1(1e-4) / 1e-8, -math.expm1(-1e-4) / 1e-8],
        rtol=1e-14,
    )


def test_no_warnings_numpy():
    l = np.array([-np.inf, 800.0, -1e4, 0.0])
    r = np.array([1.0, 1.0, 0.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for gamma in (0.0, 1e-310, 1e-8, 1.0):
            objective(l, r, gamma, reduction="none")
            objective_grad(l, r, gamma, reduction="none")
            reinforce_objective(l, -np.abs(l), r, gamma, reduction="none")


def test_float32_and_half_inputs():
    l = np.array([0.1, -0.4, 100.0], dtype=np.float16)
    r = np.array([1.0, 2.0, 0.5], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = objective(l, r, 1.0, reduction="none")
    assert got.dtype == np.float32
    l32 = l.astype(np.float64)
    np.testing.assert_allclose(got[:2], r[:2] * np.expm1(l32[:2]), rtol=1e-6)
    assert got[2] == np.finfo(np.float32).max  # exp(100) overflows float32: saturated


def test_jax_jit_matches_eager():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    l, r = sample(13, (3, 4))
    gam = np.array([0.0, 0.5, 1.0])
    fn = jax.jit(lambda a, b, g: (objective(a, b, g), objective_grad(a, b, g)))
    val, grad = fn(jnp.asarray(l), jnp.asarray(r), jnp.asarray(gam))
    want = [
        np.mean([boxcox_ref(a, b, g) for a, b in zip(l[i], r[i], strict=True)])
        for i, g in enumerate(gam)
    ]
    np.testing.assert_allclose(np.asarray(val), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), r * np.exp(gam[:, None] * l) / 4, rtol=1e-12)


def test_torch_compile_fullgraph_matches_eager():
    torch = pytest.importorskip("torch")
    l, r = sample(14, (3, 4))
    gam = np.array([0.0, 0.5, 1.0])
    fn = torch.compile(
        lambda a, b, g: (objective(a, b, g), objective_grad(a, b, g)), fullgraph=True
    )
    as_t = lambda x: torch.asarray(x, dtype=torch.float64)  # noqa: E731
    val, grad = fn(as_t(l), as_t(r), as_t(gam))
    want = [
        np.mean([boxcox_ref(a, b, g) for a, b in zip(l[i], r[i], strict=True)])
        for i, g in enumerate(gam)
    ]
    np.testing.assert_allclose(to_numpy(val), want, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(grad), r * np.exp(gam[:, None] * l) / 4, rtol=1e-12)


# --- validation ---------------------------------------------------------------------------------


def test_validation(xp):
    l = xp.asarray(np.zeros((2, 3)))
    r = xp.asarray(np.ones((2, 3)))
    with pytest.raises(TypeError, match="rewards are required"):
        objective(l, None, 0.5)
    with pytest.raises(ValueError, match="rewards"):
        objective(l, xp.asarray(np.ones(4)), 0.5)
    with pytest.raises(ValueError, match="mask"):
        objective(l, r, 0.5, mask=xp.asarray(np.ones(4, bool)))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            objective(l, r, bad)
    with pytest.raises(ValueError, match="gamma"):
        objective(l, r, xp.asarray(np.array([0.1, 0.2, 0.3])))
    with pytest.raises(ValueError, match="gamma"):
        objective_grad(l, r, xp.asarray(np.array([0.1, 1.2])))
    with pytest.raises(ValueError, match="reduction"):
        objective(l, r, 0.5, reduction="avg")
    for bad in (np.nan, np.inf):
        lw = np.zeros((2, 3))
        lw[1, 1] = bad
        with pytest.raises(ValueError, match="log_w"):
            objective_grad(xp.asarray(lw), r, 0.5)
    with pytest.raises(ValueError, match="logp"):
        reinforce_objective(l, xp.asarray(np.zeros(3)), r, 0.5)
    with pytest.raises(ValueError, match="logp"):
        lp = np.zeros((2, 3))
        lp[0, 0] = np.nan
        reinforce_objective_grad(l, xp.asarray(lp), r, 0.5)


def test_nan_log_weight_under_mask_is_ignored(xp):
    l = np.array([0.3, np.nan, -0.2])
    r = np.array([1.0, 1.0, 2.0])
    mask = np.array([True, False, True])
    got = to_numpy(objective(xp.asarray(l), xp.asarray(r), 1.0, mask=xp.asarray(mask)))
    np.testing.assert_allclose(got, (math.expm1(0.3) + 2 * math.expm1(-0.2)) / 2, rtol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_terms_of_both_signs_that_overflow_stay_finite(xp, reduction):
    # float32 weights e^100 with rewards of both signs: e^100 - e^100 is inf - inf = NaN in the
    # plain sum; the value is formed in log space and saturates at the largest float instead.
    l = xp.asarray(np.array([100.0, 100.0, 99.0, 0.5], np.float32))
    r = xp.asarray(np.array([1.0, -1.0, 1.0, -2.0], np.float32))
    logp = xp.asarray(np.array([-1.0, -1.0, -2.0, -0.5], np.float32))
    top = float(np.finfo(np.float32).max)
    for value in (
        objective(l, r, 1.0, reduction=reduction),
        reinforce_objective(l, logp, r, 1.0, reduction=reduction),
    ):
        got = to_numpy(value)
        assert got.dtype == np.float32 and np.all(np.isfinite(got)), got
        assert np.all(np.abs(got) <= top)
    # The sign follows the exact value: sum = e^99 - 2 expm1(0.5) + (e^100 - e^100) > 0.
    if reduction != "none":
        assert to_numpy(objective(l, r, 1.0, reduction=reduction)) > 1e38
    # Nothing changes where the plain sum is representable.
    small = xp.asarray(np.array([0.3, -0.2, 1.5], np.float32))
    rs = xp.asarray(np.array([1.0, -1.0, 2.0], np.float32))
    want = np.array([1.0, -1.0, 2.0]) * np.expm1(0.5 * np.array([0.3, -0.2, 1.5])) / 0.5
    want = {"mean": want.mean(), "sum": want.sum(), "none": want}[reduction]
    np.testing.assert_allclose(to_numpy(objective(small, rs, 0.5, reduction=reduction)), want,
                               rtol=1e-6)  # fmt: skip
