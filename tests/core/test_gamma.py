"""Tests of isreshape_core/gamma.py: the closed form against its formula, gamma_ess against a
brute-force bisection on brute-force ESS values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from _helpers import brute_force_ess, to_numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import isreshape_core as isr


def brute_ratio(l, gamma, r=None):
    """ESS(gamma)/n with float64 numpy and plain Python sums; -inf is weight 0."""
    l = np.asarray(l, dtype=np.float64)
    finite = np.isfinite(l)
    w = np.zeros_like(l)
    if finite.any():
        w[finite] = np.exp(gamma * (l[finite] - l[finite].max()))
    if r is not None:
        w = w * np.abs(r)
    return brute_force_ess(w) / l.size


def brute_gamma(l, rho, lo=0.0, hi=1.0, iters=200):
    """The largest gamma in [lo, hi] with ESS/n >= rho, by plain bisection."""
    if brute_ratio(l, hi) >= rho:
        return hi
    if brute_ratio(l, lo) < rho:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if brute_ratio(l, mid) >= rho:
            lo = mid
        else:
            hi = mid
    return lo


def test_closed_form_matches_formula(xp):
    rng = np.random.default_rng(0)
    l = rng.normal(0, 1.7, size=(3, 300))
    got = to_numpy(isr.gamma_closed_form(xp.asarray(l), 0.3))
    want = np.minimum(np.sqrt(-np.log(0.3) / np.var(l, axis=1, ddof=1)), 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    got = to_numpy(isr.gamma_closed_form(xp.asarray(l), 0.3, gamma_min=0.5, gamma_max=0.52))
    np.testing.assert_allclose(got, np.clip(want, 0.5, 0.52), rtol=1e-12)


def test_closed_form_degenerate_rows_get_gamma_max(xp):
    l = np.array([[0.3, 0.3, 0.3], [1.0, -np.inf, -np.inf], [0.0, 2.0, 5.0]])
    mask = np.array([[True] * 3, [True] * 3, [False] * 3])
    got = to_numpy(isr.gamma_closed_form(xp.asarray(l), 0.3, mask=xp.asarray(mask), gamma_max=0.8))
    np.testing.assert_array_equal(got, [0.8, 0.8, 0.8])
    one = to_numpy(isr.gamma_closed_form(xp.asarray(np.array([2.0])), 0.3))
    assert one == 1.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_closed_form_of_log_weights_spread_over_the_whole_range(xp, dtype):
    """Log weights near the largest float beside ordinary ones: the variance is huge (+inf where
    it overflows) and the closed form tempers to gamma_min, on every backend. Their scale is a
    power of 2 whose reciprocal is subnormal at the top of the range, which XLA's CPU flushed to
    0 in a division by it (variance 0, gamma_max)."""
    top = float(np.finfo(dtype).max) * 0.89
    l = xp.asarray(np.array([[top, 1.066, -np.inf], [top, -top / 3, 0.5]], dtype=dtype))
    np.testing.assert_array_equal(to_numpy(isr.gamma_closed_form(l, 0.3)), [0.0, 0.0])
    got = to_numpy(isr.gamma_closed_form(l, 0.3, gamma_min=0.25))
    np.testing.assert_array_equal(got, [0.25, 0.25])


@pytest.mark.parametrize("rho", [0.05, 0.3, 0.8])
def test_gamma_ess_matches_brute_force_bisection(xp, rho):
    rng = np.random.default_rng(1)
    cases = [
        rng.normal(0, 2.0, 512),
        rng.standard_t(3, 4096) * 2.0,
        np.where(rng.random(300) < 0.1, rng.normal(5, 1, 300), rng.normal(0, 1, 300)),
        rng.standard_cauchy(64) * 3,
    ]
    for l in cases:
        got = float(to_numpy(isr.gamma_ess(xp.asarray(l), rho)))
        want = brute_gamma(l, rho)
        assert brute_ratio(l, got) >= rho * (1 - 1e-12)
        assert abs(got - want) < 1e-9, (got, want)


@given(
    hnp.arrays(np.float64, st.integers(2, 60), elements=st.floats(-15, 15)),
    st.floats(0.01, 1.0),
)
def test_gamma_ess_is_feasible_and_largest(xp, l, rho):
    g = float(to_numpy(isr.gamma_ess(xp.asarray(l), rho)))
    if brute_ratio(l, 1.0) >= rho * (1 + 1e-12):
        assert g == 1.0  # gamma_max is feasible: it is the largest
    if brute_ratio(l, 0.0) < rho * (1 - 1e-12):
        assert g == 0.0  # even gamma_min misses the target: gamma_min
    if brute_ratio(l, 0.0) >= rho:
        assert brute_ratio(l, g) >= rho * (1 - 1e-12)
    if g < 1.0:
        # Largest: a little more gamma misses the target (tolerance of the bisection bracket).
        assert brute_ratio(l, min(g + 1e-6, 1.0)) < rho * (1 + 1e-12)


@given(
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-10, 10)),
    st.integers(1, 6),
    st.floats(0.05, 0.95),
)
def test_gamma_ess_padding_plus_mask_equals_no_padding(xp, l, pad, rho):
    padded = np.concatenate([l, np.full(pad, -7.0)])
    mask = np.concatenate([np.ones(l.size, bool), np.zeros(pad, bool)])
    got = to_numpy(isr.gamma_ess(xp.asarray(padded), rho, mask=xp.asarray(mask)))
    want = to_numpy(isr.gamma_ess(xp.asarray(l), rho))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    got = to_numpy(isr.gamma_closed_form(xp.asarray(padded), rho, mask=xp.asarray(mask)))
    want = to_numpy(isr.gamma_closed_form(xp.asarray(l), rho))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_gamma_ess_edge_rows(xp):
    l = np.array(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],  # equal weights: gamma_max
            [3.0, -np.inf, -np.inf, -np.inf, -np.inf],  # ESS/n = 1/5 at every gamma: infeasible
            [-np.inf] * 5,  # no positive weight: gamma_max
            [1.0, 2.0, 3.0, 4.0, 5.0],  # fully masked below: gamma_max
        ]
    )
    mask = np.ones_like(l, dtype=bool)
    mask[3] = False
    got = to_numpy(
        isr.gamma_ess(xp.asarray(l), 0.3, mask=xp.asarray(mask), gamma_min=0.1, gamma_max=0.9)
    )
    np.testing.assert_allclose(got, [0.9, 0.1, 0.9, 0.9])
    assert not np.isnan(got).any()
    # n = 1 and n = 2
    assert float(to_numpy(isr.gamma_ess(xp.asarray(np.array([4.0])), 0.9))) == 1.0
    l2 = np.array([0.0, 5.0])
    got2 = float(to_numpy(isr.gamma_ess(xp.asarray(l2), 0.9)))
    # ESS/n for two weights 1, t = e^{5g}: (1+t)^2 / (2 (1+t^2)) = 0.9 <=> 0.8 t^2 - 2 t + 0.8 = 0
    t = (2 + math.sqrt(4 - 4 * 0.8 * 0.8)) / (2 * 0.8)
    np.testing.assert_allclose(got2, math.log(t) / 5, atol=1e-9)


def test_gamma_ess_extreme_log_weights(xp):
    l = np.array([1e4, 0.0, -1e4, 5.0, 2.0])
    g = float(to_numpy(isr.gamma_ess(xp.asarray(l), 0.3)))
    assert np.isfinite(g)
    assert abs(g - brute_gamma(l, 0.3)) < 1e-9


@pytest.mark.parametrize("scale, shift", [(1.0, 0.0), (30.0, 1000.0)])
def test_gamma_ess_meets_rho_min_exactly_as_ess_ratio_recomputes_it(xp, scale, shift):
    # Heavy-tailed rows with large |l|: the search used to test feasibility on g (l - max l),
    # which can round differently from the g l - max(g l) of ess_ratio; two rows of experiment 2
    # (Student-t(3), n = 512) then came out 1 ulp below rho_min.
    l = np.random.default_rng(1512).standard_t(3, (400, 512)) * scale + shift
    x = xp.asarray(l)
    gamma = isr.gamma_ess(x, 0.3)
    achieved = to_numpy(isr.ess_ratio(x, gamma))
    assert np.all(achieved >= 0.3), np.sort(achieved)[:3] - 0.3


def test_gamma_ess_batched_per_group_equals_rows(xp):
    rng = np.random.default_rng(5)
    l = rng.normal(0, 2, size=(6, 8))  # 6 GRPO groups of 8 responses
    got = to_numpy(isr.gamma_ess(xp.asarray(l), 0.3))
    want = [brute_gamma(row, 0.3) for row in l]
    np.testing.assert_allclose(got, want, atol=1e-9)
    got_t = to_numpy(isr.gamma_ess(xp.asarray(l.T), 0.3, axis=0))
    np.testing.assert_allclose(got_t, want, atol=1e-9)
    # One batch-wide gamma from the same function: flatten the group axis.
    whole = float(to_numpy(isr.gamma_ess(xp.asarray(l.reshape(-1)), 0.3)))
    assert abs(whole - brute_gamma(l.reshape(-1), 0.3)) < 1e-9


def test_gamma_ess_array_bounds_act_like_a_schedule(xp):
    rng = np.random.default_rng(6)
    l = rng.normal(0, 0.2, size=(2, 100))  # small variance: the unconstrained gamma is 1
    bound = np.array([0.3, 0.6])
    got = to_numpy(isr.gamma_ess(xp.asarray(l), 0.3, gamma_max=xp.asarray(bound)))
    np.testing.assert_allclose(got, bound)


def test_gradient_ess_option(xp):
    rng = np.random.default_rng(7)
    l = rng.normal(0, 2, 200)
    r = (rng.random(200) < 0.15).astype(float)  # sparse binary rewards: ESS_grad(0)/n = 0.15
    g = float(to_numpy(isr.gamma_ess(xp.asarray(l), 0.3, rewards=xp.asarray(r))))
    base = brute_ratio(l, 0.0, r)
    assert brute_ratio(l, g, r) >= 0.3 * base * (1 - 1e-12)
    # The largest feasible gamma: on a grid of 1000 points above it, none meets the target.
    grid = np.linspace(g, 1.0, 1001)[1:]
    assert max(brute_ratio(l, t, r) for t in grid) < 0.3 * base
    assert brute_ratio(l, g + 1e-7, r) < 0.3 * base
    assert abs(g - brute_gamma_rewards(l, r, 0.3)) < 1e-9
    # Kish's ESS with the same rho and these sparse rewards would be infeasible at gamma = 0.
    assert base < 0.3


def brute_gamma_rewards(l, r, rho, mask=None):
    """The largest gamma with ESS_grad(gamma) >= rho ESS_grad(0), by bisection (monotone here)."""
    base = brute_ratio_masked(l, 0.0, r, mask)
    lo, hi = 0.0, 1.0
    if brute_ratio_masked(l, hi, r, mask) >= rho * base:
        return hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if brute_ratio_masked(l, mid, r, mask) >= rho * base:
            lo = mid
        else:
            hi = mid
    return lo


def brute_ratio_masked(l, gamma, r, mask):
    keep = np.ones(l.shape, bool) if mask is None else mask
    return brute_ratio(l[keep], gamma, r[keep])


def test_gradient_ess_option_batched_and_masked(xp):
    # Rows of different spread, signed rewards with zeros, a mask whose masked entries hold
    # garbage: each row's gamma is the largest feasible one for its unmasked samples.
    rng = np.random.default_rng(17)
    l = rng.normal(0, 1, (4, 120)) * np.array([[0.5], [1.5], [2.5], [4.0]])
    r = rng.normal(0, 1, (4, 120)) * (rng.random((4, 120)) < 0.4)
    mask = rng.random((4, 120)) < 0.8
    garbage_l = np.where(mask, l, 40.0)
    garbage_r = np.where(mask, r, 1e6)
    got = to_numpy(
        isr.gamma_ess(
            xp.asarray(garbage_l), 0.5, rewards=xp.asarray(garbage_r), mask=xp.asarray(mask)
        )
    )
    for i in range(4):
        keep = mask[i]
        want = brute_gamma_rewards(l[i], r[i], 0.5, keep)
        assert abs(got[i] - want) < 1e-9, i
        base = brute_ratio(l[i][keep], 0.0, r[i][keep])
        grid = np.linspace(got[i], 1.0, 201)[1:] if got[i] < 1.0 else []
        assert all(brute_ratio(l[i][keep], t, r[i][keep]) < 0.5 * base for t in grid), i
    assert got[0] == 1.0 and np.all(got[1:] < 1.0)


def test_select_gamma_dispatch(xp):
    rng = np.random.default_rng(8)
    l = xp.asarray(rng.standard_t(3, size=(2, 256)))
    np.testing.assert_array_equal(
        to_numpy(isr.select_gamma(l, 0.3)), to_numpy(isr.gamma_ess(l, 0.3))
    )
    np.testing.assert_array_equal(
        to_numpy(isr.select_gamma(l, 0.3, method="closed_form")),
        to_numpy(isr.gamma_closed_form(l, 0.3)),
    )
    np.testing.assert_array_equal(to_numpy(isr.select_gamma(l, method=0.25)), [0.25, 0.25])
    np.testing.assert_array_equal(
        to_numpy(isr.select_gamma(l, method=0.75, gamma_max=0.5)), [0.5, 0.5]
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rho_min": 0.0}, ValueError, "rho_min must lie in \\(0, 1\\]"),
        ({"rho_min": 1.5}, ValueError, "rho_min must lie in \\(0, 1\\]"),
        ({"gamma_min": 0.6, "gamma_max": 0.5}, ValueError, "gamma_min=0.6 exceeds"),
        ({"gamma_max": 1.2}, ValueError, "gamma_max must lie in"),
        ({"method": "bisect"}, ValueError, "method must be one of"),
        ({"method": 1.5}, ValueError, "method must lie in"),
        ({"max_iter": -1}, ValueError, "max_iter must be"),
    ],
)
def test_select_gamma_bad_arguments(xp, kwargs, error, message):
    l = xp.asarray(np.zeros(4))
    kwargs = dict(kwargs)
    rho = kwargs.pop("rho_min", 0.3)
    with pytest.raises(error, match=message):
        isr.select_gamma(l, rho, **kwargs)


def test_float32_in_float32_out(xp):
    l32 = np.random.default_rng(9).normal(0, 2, 300).astype(np.float32)
    l = xp.asarray(l32)
    l64 = l32.astype(np.float64)  # the float32 values, exactly
    want = {
        "ess": brute_gamma(l64, 0.3),
        "closed_form": min(math.sqrt(-math.log(0.3) / np.var(l64, ddof=1)), 1.0),
    }
    for method in ("ess", "closed_form"):
        got = isr.select_gamma(l, method=method)
        assert got.dtype == xp.float32
        # float32 sums over 300 terms: a few float32 ulps of gamma (2**-24 ~ 6e-8 relative).
        np.testing.assert_allclose(to_numpy(got), want[method], rtol=2e-5)


def _end_decided_batches(rng, n=100):
    """Rows whose gamma is decided by the ends (gamma_max meets rho_min; or a gamma_min of 0.5
    misses it), alone and mixed with a row that needs the search, with their gamma_min; at
    ``n = 100`` small enough for the grid, at 800 (2400 samples or more) for Newton."""
    fresh = rng.normal(0.0, 0.05, (3, n))  # ESS(1)/n near 1: gamma_max
    stale = rng.normal(0.0, 6.0, (2, n))  # ESS(0.5)/n far below 0.3: gamma_min
    middle = rng.normal(0.0, 1.5, (1, n))  # gamma strictly inside (0.5, 1)
    lo = np.array([0.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    return {
        "fresh": (fresh, lo[:3]),
        "fresh and stale": (np.concatenate([fresh, stale]), lo[:5]),
        "mixed": (np.concatenate([fresh, stale, middle]), lo),
    }


@pytest.mark.parametrize("search", ["grid", "newton"])
@pytest.mark.parametrize("with_rewards", [False, True])
def test_eager_exit_by_the_ends_changes_nothing(xp, monkeypatch, search, with_rewards):
    """Eagerly, the first pass ends the search where every row is decided by its ends, with
    the gamma of the traced code (which takes every step): the grid bit for bit, the host's
    Newton search (which tests no ``gamma_min`` it need not) to far below 1e-12."""
    import isreshape_core._ess_grid as grid_module
    import isreshape_core._gamma as gamma_module

    calls = []  # Newton steps, or grid passes
    newton = search == "newton"
    spied = (gamma_module, "_newton_step") if newton else (grid_module, "feasible_candidates")
    original = getattr(*spied)
    monkeypatch.setattr(*spied, lambda *a, **k: calls.append(1) or original(*a, **k))
    plan = grid_module.grid_plan

    def eager_plan(size, bits, traced):  # traced code's plan tests other candidates
        return plan(size, bits)

    rng = np.random.default_rng(3)
    for kind, (l, lo) in _end_decided_batches(rng, 800 if newton else 100).items():
        assert (grid_module.grid_plan(l.size, 64) is None) == newton
        kw = {"gamma_min": xp.asarray(lo)}
        if with_rewards:
            kw["rewards"] = xp.asarray(rng.uniform(0.5, 2.0, l.shape))
        calls.clear()
        fast = to_numpy(isr.gamma_ess(xp.asarray(l), 0.3, **kw))
        steps = len(calls)
        with monkeypatch.context() as m:  # the code traced inputs take: no test at hi first
            m.setattr(grid_module, "eager_all", lambda xp, x: False)
            m.setattr(gamma_module, "is_concrete", lambda x: False)
            m.setattr(gamma_module, "grid_plan", eager_plan)
            full = to_numpy(isr.gamma_ess(xp.asarray(l), 0.3, **kw))
        if newton:
            np.testing.assert_allclose(fast, full, rtol=0, atol=1e-13)
        else:
            np.testing.assert_array_equal(fast, full)
        if kind != "mixed":
            np.testing.assert_array_equal(fast, np.where(lo == 0.0, 1.0, 0.5))
        if kind == "fresh":
            assert steps == (0 if newton else 1)  # no Newton step; the grid's first pass
        elif kind == "fresh and stale":
            # Newton: the step from gamma_max, a Newton point below it that fails, then
            # gamma_min = 0.5 itself, which fails too (the traced code takes 12 steps).
            assert steps == (3 if newton else 1)
        else:
            assert steps <= (21 if newton else grid_module.grid_plan(l.size, 64)[1])  # 1 + 20
        if kind == "mixed" and not with_rewards:
            assert abs(fast[-1] - brute_gamma(l[-1], 0.3, 0.5, 1.0)) < 1e-9


def _newton_steps_and_gamma(xp, monkeypatch, l, traced=False, **kw):
    """``(steps, gamma)`` of ``gamma_ess(l, 0.3, **kw)`` (``l`` too large for the grid),
    eagerly or on the path traced inputs take (12 steps)."""
    import isreshape_core._gamma as gamma_module

    calls = []
    original = gamma_module._newton_step
    with monkeypatch.context() as m:
        m.setattr(
            gamma_module, "_newton_step", lambda *a, **k: calls.append(1) or original(*a, **k)
        )
        if traced:
            m.setattr(gamma_module, "is_concrete", lambda x: False)
        g = to_numpy(isr.gamma_ess(xp.asarray(l), 0.3, **kw))
    return len(calls), g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_rewards", [False, True])
def test_eager_newton_ends_at_the_test_resolution(xp, monkeypatch, dtype, with_rewards):
    """Eagerly the Newton search keeps its bookkeeping on the host and stops once every row's
    bracket (a tested feasible end, a tested infeasible one) is within the resolution of the
    test itself: in fewer steps than the traced code's 12 in most float32 rows, with the traced
    gamma's value to that resolution, in rows inside the bracket and in rows decided by the
    ends, and within rounding of a brute-force bisection (which the gamma passes)."""
    # float32: the sums round at about 1e-7, which the ESS slope magnifies in gamma, by a
    # factor that depends on the CPU's SIMD width (up to 16 ulps of gamma seen).
    tol = 2e-6 if dtype == np.float32 else 1e-13
    ended_early = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        inside = rng.normal(0.0, 1.2, (1, 2100))  # gamma strictly inside (0, 1)
        fresh = rng.normal(0.0, 0.05, (1, 2100))  # gamma_max
        stale = rng.normal(0.0, 6.0, (1, 2100))  # gamma_min = 0.5 misses the target
        for l, lo in ((inside, [0.0]), (np.concatenate([inside, fresh, stale]), [0, 0, 0.5])):
            l = l.astype(dtype)
            kw = {"gamma_min": xp.asarray(np.asarray(lo, dtype=dtype))}
            if with_rewards:
                kw["rewards"] = xp.asarray(rng.uniform(0.5, 2.0, l.shape).astype(dtype))
            steps, fast = _newton_steps_and_gamma(xp, monkeypatch, l, **kw)
            full_steps, full = _newton_steps_and_gamma(xp, monkeypatch, l, traced=True, **kw)
            assert fast.dtype == dtype and full_steps == 12
            np.testing.assert_allclose(fast, full, rtol=0, atol=tol)
            ended_early += steps <= 12  # the step from gamma_max and at most 11 more
            if len(lo) == 3:
                assert fast[1] == 1.0 and fast[2] == 0.5
            if not with_rewards:
                l64 = l[0].astype(np.float64)
                assert abs(fast[0] - brute_gamma(l64, 0.3)) < tol
                assert brute_ratio(l64, float(fast[0])) >= 0.3 * (1.0 - 64 * np.finfo(dtype).eps)
    # Out of 20: float32 brackets reach the resolution within a few steps; float64 ones, of
    # a few ulps, in about 10 (8 to 12).
    assert ended_early >= (15 if dtype == np.float32 else 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_weights_as_the_floor_give_the_same_gamma(xp, dtype):
    """The grid may hold zero weights as the floor of ``floored_shift`` instead of adding an
    offset of -inf in every pass (the loss's default search does): the gamma is bit for bit
    that of ``gamma_ess``, also where the bounds are so small that the floor would not vanish
    and the offset is kept."""
    from isreshape_core import _gamma
    from isreshape_core._gamma import shifted_log_weights

    rng = np.random.default_rng(5)
    vanished = []
    for case in range(40):
        n = int(rng.choice([7, 60, 500]))
        l = rng.normal(0.0, rng.uniform(0.3, 3.0), n).astype(dtype)
        l[rng.random(n) < 0.2] = -np.inf  # zero weights (invalid units)
        if case % 10 == 0:
            l[:] = -np.inf  # none positive: gamma_max
        tiny = 1e-30 if dtype == np.float32 else 1e-300
        bounds = [(0.0, 1.0), (0.25, 1.0), (0.0, 0.6), (0.0, tiny), (tiny / 1e3, tiny)][case % 5]
        lw = xp.asarray(l)
        # The zero weights are masked units: the target counts the positive weights only.
        valid = xp.asarray(np.isfinite(l))
        want = isr.gamma_ess(lw, 0.3, mask=valid, gamma_min=bounds[0], gamma_max=bounds[1])
        shifted = shifted_log_weights(xp, lw, -1, None)
        prepared = {
            "l": lw,
            "d": shifted.d,
            "floored": shifted.floored,
            "finite": shifted.finite,
            "n": shifted.count,
            "n_pos": shifted.count,
        }
        rho_bounds = {"rho_min": 0.3, "gamma_min": bounds[0], "gamma_max": bounds[1]}
        got = _gamma.ess_search(xp, prepared, rho_bounds, 0, None, None).gamma
        plan = _gamma.grid_plan(n, np.finfo(dtype).bits)
        vanished.append(_gamma._floor_vanishes(xp, shifted.d, rho_bounds, plan))
        assert to_numpy(got).tobytes() == to_numpy(want).tobytes(), (case, got, want)
    assert 20 <= sum(vanished) < len(vanished)  # both ways are taken


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floor_vanishes_only_where_every_positive_candidate_zeroes_it(xp, dtype):
    """``_floor_vanishes`` claims that ``exp(g floor)`` is 0 for the smallest positive
    candidate; where it says so, the dtype's exponential gives exactly 0 there, and it says no
    where the bounds make that candidate tiny."""
    from isreshape_core import _gamma

    d = xp.asarray(np.zeros(3, dtype=dtype))
    floor = -float(np.finfo(dtype).max) * 2.0**-20
    for k, passes in ((512, 3), (512, 6), (16, 12)):
        for lo, hi in ((0.0, 1.0), (0.0, 1e-20), (1e-25, 1.0), (0.0, 1e-40), (1e-300, 1.0)):
            if hi < float(np.finfo(dtype).tiny) * 1e3 and dtype == np.float32:
                continue
            vanishes = _gamma._floor_vanishes(
                xp, d, {"gamma_min": lo, "gamma_max": hi}, (k, passes)
            )
            smallest = lo if lo > 0 else hi / float(k) ** (passes + 1)
            value = np.exp(np.asarray(smallest * floor, dtype=dtype))
            if vanishes:
                assert value == 0.0, (k, passes, lo, hi)
    assert _gamma._floor_vanishes(xp, d, {"gamma_min": 0.0, "gamma_max": 1.0}, (512, 3))
    assert not _gamma._floor_vanishes(xp, d, {"gamma_min": 1e-300, "gamma_max": 1.0}, (512, 3))


def test_eager_step_closes_the_bracket_at_its_ends():
    """The host's Newton step: where ``F`` at ``x`` has the sign the test denies, the next
    point is the test's resolution inside ``x``'s end; where an infeasible ``x`` puts the root
    below an untested ``gamma_min``, ``gamma_min`` itself (a tested one: the midpoint); a
    Newton point inside the bracket is kept."""
    from isreshape_core._gamma import _eager_step, _newton_candidate

    def step(feasible, log_excess_2, untested=True, lo=0.4, hi=0.6):
        f = lambda v: np.asarray([v], dtype=np.float64)  # noqa: E731
        terms = (np.asarray([feasible]), f(log_excess_2), f(-2.0))
        state = (f(0.5), f(lo), f(hi), f(0.1))
        return _eager_step(terms, state, f(1e-6), np.asarray([untested]))

    # Feasible x, F < 0 by its rounding (the Newton point lies below x = lo): just above lo.
    x, lo, hi, _ = step(True, 1e-9)
    assert lo[0] == 0.5 and x[0] == 0.5 + 1e-6
    # Infeasible x, F > 0 (the Newton point lies above x = hi): just below hi.
    x, lo, hi, _ = step(False, -1e-9)
    assert hi[0] == 0.5 and x[0] == 0.5 - 1e-6
    # Infeasible x, the Newton point below lo: lo itself while untested, else the midpoint.
    assert step(False, 10.0)[0][0] == 0.4
    assert step(False, 10.0, untested=False)[0][0] == 0.45
    # A Newton point inside the bracket, which halves the step: kept.
    x = step(False, 0.01, lo=0.0)[0]
    want = _newton_candidate(np, np.asarray([0.01]), np.asarray([-2.0]), np.asarray([0.5]))
    assert 0.0 < x[0] < 0.5 and x[0] == want[0]


def test_eager_search_out_of_passes_tests_points_just_below_the_iterate():
    """Where the host's Newton search runs out of passes, its gamma is the largest of ``lo``
    and of the points ``x (1 - 2^-j)`` that pass the test, enumerated here with float64
    sums."""
    from isreshape_core._ess_grid import polish_factors
    from isreshape_core._gamma import _HOST, _eager_iterations

    l = np.random.default_rng(11).normal(0.0, 1.2, 500)
    d = l - l.max()

    def at(g):
        e = np.exp(np.asarray(g, dtype=np.float64)[..., None] * d)
        s = np.stack([e.sum(-1), (e * e).sum(-1)])
        return s, np.stack([(e * d).sum(-1), (e * e * d).sum(-1)])

    needed = np.asarray(0.3 * l.size)
    root = brute_gamma(l, 0.3)
    x, lo = np.asarray(root * (1.0 + 2.0**-30)), np.asarray(0.5)  # just above the root
    state = (x, lo, np.asarray(1.0), np.asarray(0.25))
    got, sums = _eager_iterations(_HOST, at, state, needed, 0, False)
    np.testing.assert_allclose(sums, at(np.asarray(got))[0], rtol=1e-15)  # the pass's at got
    points = [float(x) * f for f in polish_factors(np, np.float64)]
    passing = [g for g in points if brute_ratio(l, g) * l.size >= float(needed)]
    assert passing and got == max([float(lo), *passing])
    assert abs(got - root) < 1e-6


def test_aim_margin_is_the_squared_error_of_the_last_prediction():
    """The host aims its next point ``4 k s^2`` past the predicted root, ``k`` the last
    prediction's error over its squared step; the overshoot where ``k`` is unknown (no last
    prediction, or one within the resolution); always within ``[0.4 near, s]``."""
    from isreshape_core._gamma import _OVERSHOOT, _aim_margin

    f = lambda *v: np.asarray(v, dtype=np.float64)  # noqa: E731
    root, x, near = f(0.5, 0.5, 0.5), f(0.49, 0.4, 0.5 - 1e-9), f(1e-7, 1e-7, 1e-7)
    # Last prediction 0.4999 from a step of 0.1: k = 1e-4 / 1e-2 = 1e-2.
    previous = (f(0.4999, 0.4999, 0.4999), f(0.1, 1e-8, 0.1))
    got = _aim_margin(root, x, near, previous)
    np.testing.assert_allclose(got[0], 4.0 * 1e-2 * 0.01**2, rtol=1e-9)  # 4e-6
    np.testing.assert_allclose(got[1], _OVERSHOOT * 0.1, rtol=1e-9)  # last step below near
    assert got[2] == 0.4e-7  # 4 k s^2 = 4e-20, raised to 0.4 near
    np.testing.assert_allclose(_aim_margin(root, x, near, None), [2e-4, 2e-3, 4e-8], rtol=1e-9)
    # A prediction far worse than its step (k s^2 > s): at most the step.
    assert _aim_margin(f(0.5), f(0.4), f(1e-7), (f(0.9), f(0.1)))[0] == np.float64(0.5) - 0.4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aimed_point_closes_the_bracket_near_the_root(dtype):
    """The host's next point: past the predicted root by the margin on the side the test did
    not take; where the root is predicted within the resolution of ``x``, the farthest float
    on that side within it, so that a failed (or passed) test there closes the bracket."""
    from isreshape_core._gamma import _aim_margin, _aimed_point

    x = np.asarray([0.9, 0.9, 0.9, 0.9], dtype=dtype)
    near = np.asarray(3.3 * np.spacing(x[0]), dtype=dtype)  # 3.3 ulps: reach 3 ulps
    feasible = np.asarray([True, False, True, False])
    step = 10.0 * float(near)
    root = np.asarray([0.9 + step, 0.9 - step, 0.9 + 0.1 * float(near), 0.9 - 0.1 * float(near)])
    got = _aimed_point(root, x, feasible, near, None)
    assert got.dtype == dtype
    margin = _aim_margin(root, x, near, None)
    np.testing.assert_allclose(got[:2], (root + np.where(feasible, margin, -margin))[:2], rtol=0,
                               atol=float(np.spacing(x[0])))  # fmt: skip
    ulps = (got[2:] - x[2:]) / np.spacing(x[2:])
    np.testing.assert_array_equal(ulps, [3.0, -3.0])
    assert np.all(np.abs(got[2:] - x[2:]) <= near)


def _eager_passes(xp, monkeypatch, l):
    """``(passes, gamma)`` of the eager search of ``gamma_ess(l, 0.3)``."""
    import isreshape_core._gamma as gamma_module

    passes, original = [], gamma_module._host_pass

    def counted(*args):
        at = original(*args)
        return lambda g: passes.append(1) or at(g)

    with monkeypatch.context() as m:
        m.setattr(gamma_module, "_host_pass", counted)
        gamma = to_numpy(isr.gamma_ess(xp.asarray(l), 0.3))
    return len(passes), gamma


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eager_newton_aimed_by_its_error_takes_fewer_passes(xp, monkeypatch, dtype):
    """Aiming each point past the root by the Newton error seen so far, instead of 2% of the
    step, ends the eager search in fewer passes on log-normal and heavy-tailed batches (in
    float64 never more, and a third fewer in all; in float32 not more in all), with the gamma
    of the brute-force bisection to the test's resolution; on
    80k float32 log weights from Normal(0, 1.2^2), like the benchmark's stale token-level
    batch, at most 6 passes (5 here on NumPy and torch; 7 with the traced search's overshoot)."""
    import isreshape_core._gamma as gamma_module

    rng = np.random.default_rng(8)
    batches = [rng.normal(0.0, s, 3000) for s in (0.9, 1.2, 1.5, 2.0, 2.5, 3.0)]
    batches += [rng.standard_t(df, 3000) * sc for df in (2.5, 3.0, 6.0) for sc in (0.6, 1.0)]
    tol = 2e-6 if dtype == np.float32 else 1e-12
    aimed, overshoot = [], []
    for l in batches:
        l = l.astype(dtype)
        passes, gamma = _eager_passes(xp, monkeypatch, l)
        with monkeypatch.context() as m:  # every point 2% of its step past the root
            m.setattr(gamma_module, "_aim_margin", lambda r, x, near, previous: 0.02 * abs(r - x))
            before, _ = _eager_passes(xp, monkeypatch, l)
        aimed.append(passes)
        overshoot.append(before)
        assert abs(gamma[()] - brute_gamma(l.astype(np.float64), 0.3)) < tol
    aimed, overshoot = np.array(aimed), np.array(overshoot)
    if dtype == np.float64:  # 92 against 136 passes here
        assert np.all(aimed <= overshoot) and aimed.sum() < 0.8 * overshoot.sum()
    else:  # float32 ends at the test's rounding after a few passes either way (76 against 80)
        assert aimed.sum() <= overshoot.sum(), (aimed, overshoot)
    if dtype == np.float32:
        stale = np.random.default_rng(1).normal(0.0, 1.2, 80_456).astype(dtype)
        assert _eager_passes(xp, monkeypatch, stale)[0] <= 6  # 7 before (numpy, torch)


def test_eager_step_with_a_flat_slope_bisects_without_a_warning():
    """A slope so flat that the Newton step overflows float32 (on the host, as on a device)
    is rejected by the bracket, without NumPy's overflow warning: the midpoint comes next."""
    from isreshape_core._gamma import _eager_step

    f = lambda v: np.asarray([v], dtype=np.float32)  # noqa: E731
    terms = (np.asarray([False]), f(7.0), f(-1e-38))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, lo, hi, _ = _eager_step(
            terms, (f(0.5), f(0.0), f(1.0), f(0.5)), f(1e-6), np.asarray([False])
        )
    assert (lo[0], hi[0], x[0]) == (0.0, 0.5, 0.25)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lowest", [-5.0, -30.0])  # twice it above the exponent floor, or not
def test_eager_passes_take_the_floor_only_where_an_exponent_can_reach_it(
    xp, monkeypatch, dtype, lowest
):
    """On one row, the eager Newton search's passes (on the positive weights, gathered once)
    drop the max with the exponent floor where twice the lowest positive log weight (relative
    to the max) is above the floor (no candidate g <= 1 can go below it), and keep it
    otherwise; the gamma is the brute-force bisection's either way."""
    import isreshape_core._gamma as gamma_module
    from isreshape_core._ess_grid import exponent_floor

    rng = np.random.default_rng(4)
    l = rng.normal(0.0, 1.3, 3000)
    l = l - l.max()
    l[7] = lowest  # the lowest weight, relative to the max at 0
    l[8] = -np.inf  # a zero weight: no pass reads it
    l = l.astype(dtype)
    floored, original = [], gamma_module.weight_matrix

    def recording(*args):
        floored.append(args[-1] if len(args) > 6 else True)
        return original(*args)

    monkeypatch.setattr(gamma_module, "weight_matrix", recording)
    g = float(to_numpy(isr.gamma_ess(xp.asarray(l), 0.3)))
    below = 2.0 * lowest < exponent_floor(np, dtype)
    assert floored == [below]  # one weight matrix for every pass
    tol = 2e-6 if dtype == np.float32 else 1e-12
    assert abs(g - brute_gamma(l.astype(np.float64), 0.3)) < tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_rewards", [False, True])
def test_eager_search_without_a_positive_weight_is_gamma_max(xp, dtype, with_rewards):
    """One row of only zero weights, beyond the grid's size (the eager Newton search): no
    information, so gamma_max, without a pass over an empty gather and without a warning
    (the package's RuntimeWarnings are errors in this suite)."""
    from isreshape_core._ess_grid import grid_plan

    n = 5000
    assert grid_plan(n, np.finfo(dtype).bits) is None
    l = xp.asarray(np.full(n, -np.inf, dtype=dtype))
    kw = {"rewards": xp.asarray(np.ones(n, dtype=dtype))} if with_rewards else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = to_numpy(isr.gamma_ess(l, 0.3, gamma_max=0.7, **kw))
    assert got == np.asarray(0.7, dtype=dtype)
