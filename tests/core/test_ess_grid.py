"""Tests of isreshape_core/_ess_grid.py: the candidate-grid search of gamma_ess against a
brute-force bisection, against the Newton search, and its plan and operator count."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import to_numpy

import isreshape_core as isr
from isreshape_core._ess_grid import GRID_ELEMENTS, TRACED_GRID_ELEMENTS, grid_plan


def bisection_gamma(l, rho, r=None, iters=200):
    """The largest gamma in [0, 1] with Kish's (or the gradient) ESS >= rho times its value at
    gamma 0, by bisection on float64 NumPy sums."""
    l = np.asarray(l, dtype=np.float64)
    a = np.ones_like(l) if r is None else np.abs(r)

    def ess(g):
        e = np.exp(g * (l - l.max())) * a
        return e.sum() ** 2 / (e * e).sum()

    target = rho * ess(0.0)
    if ess(1.0) >= target:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess(mid) >= target else (lo, mid)
    return lo


def batches(seed, count):
    """Log weights of mixed shapes and tails: normal, Student-t(3), log-Pareto."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.choice([4, 16, 64, 256, 2048]))
        s = rng.uniform(0.3, 8.0)
        kind = i % 3
        if kind == 0:
            l = rng.normal(0.0, s, n)
        elif kind == 1:
            l = rng.standard_t(3, n) * s
        else:
            l = np.log(rng.pareto(rng.uniform(0.6, 3.0), n) + 1e-3) * s
        yield l, float(rng.uniform(0.05, 0.9)), (rng.normal(size=n) if i % 4 == 0 else None)


def test_grid_gamma_equals_bisection(xp):
    for l, rho, r in batches(0, 40):
        rewards = None if r is None else xp.asarray(r)
        got = float(to_numpy(isr.gamma_ess(xp.asarray(l), rho, rewards=rewards)))
        assert abs(got - bisection_gamma(l, rho, r)) < 1e-12, (l.size, rho)


def test_grid_and_newton_searches_agree(xp):
    # A sharded batch takes the Newton search: both must give the same gamma.
    for l, rho, r in batches(1, 40):
        rewards = None if r is None else xp.asarray(r)
        grid = isr.gamma_ess(xp.asarray(l), rho, rewards=rewards)
        newton = isr.gamma_ess(xp.asarray(l), rho, rewards=rewards, max_iter=12)
        assert abs(float(to_numpy(grid)) - float(to_numpy(newton))) < 1e-12


def test_grid_gamma_is_feasible_and_tight(xp):
    for l, rho, _ in batches(2, 30):
        g = float(to_numpy(isr.gamma_ess(xp.asarray(l), rho)))
        assert float(to_numpy(isr.ess_ratio(xp.asarray(l), g))) >= rho
        if g < 1.0:
            assert float(to_numpy(isr.ess_ratio(xp.asarray(l), g + 1e-9))) < rho


def test_grid_rows_axis_and_bounds(xp):
    rng = np.random.default_rng(3)
    l = rng.normal(0.0, 2.5, (6, 40))
    lo = np.linspace(0.0, 0.3, 6)
    hi = np.linspace(0.5, 1.0, 6)
    got = to_numpy(
        isr.gamma_ess(
            xp.asarray(l.T), 0.3, axis=0, gamma_min=xp.asarray(lo), gamma_max=xp.asarray(hi)
        )
    )
    for i in range(6):
        want = min(max(bisection_gamma(l[i], 0.3), lo[i]), hi[i])
        assert abs(got[i] - want) < 1e-12


def test_grid_float32_within_rounding():
    l = np.random.default_rng(4).standard_t(3, 64) * 2.0
    g32 = isr.gamma_ess(l.astype(np.float32), 0.3)
    assert g32.dtype == np.float32
    assert abs(float(g32) - bisection_gamma(l.astype(np.float32), 0.3)) < 4e-7


@pytest.mark.parametrize("size", [1, 7, 64, 500, 2048])
@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("traced", [False, True])
def test_grid_plan_bounds_work_and_bracket(size, bits, traced):
    k, passes = grid_plan(size, bits, traced)
    budget = TRACED_GRID_ELEMENTS if traced else GRID_ELEMENTS
    assert 16 <= k <= 512 and (k * size <= budget or k == 16)
    # The first pass divides the bracket by k - 1, every later one by k.
    width = 1.0 / ((k - 1) * k ** (passes - 1))
    assert width <= 2.0 ** (-48 if bits == 64 else -24)
    # The fewest passes that do it: one pass fewer would leave the bracket too wide.
    assert (k - 1) * k ** (passes - 2) < 2.0 ** (48 if bits == 64 else 24)
    # Traced or not, the grid applies to the same sizes.
    assert grid_plan(GRID_ELEMENTS // 16 + 1, bits, traced) is None


def test_traced_plan_evaluates_fewer_exponentials():
    """A traced pass costs its exponentials: the traced plan does fewer in all (at 64 samples,
    5 passes of 32 candidates against 3 of 512)."""
    assert grid_plan(64, 32, traced=True) == (32, 5)
    assert grid_plan(64, 32) == (512, 3)
    for size in (1, 7, 64, 500, 2048):
        for bits in (32, 64):
            (k_t, p_t), (k_e, p_e) = grid_plan(size, bits, True), grid_plan(size, bits)
            assert k_t * p_t <= k_e * p_e


def test_grid_search_uses_few_operators():
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    l = torch.as_tensor(np.random.default_rng(5).normal(0.0, 2.0, 64), dtype=torch.float32)
    counts = {}
    for name, kw in (("grid", {}), ("newton", {"max_iter": 12})):
        with Count() as c:
            isr.gamma_ess(l, 0.3, **kw)
        counts[name] = c.n
    # Three passes of about 15 operators plus the set-up, against 14 rounds of about 60.
    assert counts["grid"] <= 140 and counts["grid"] * 5 < counts["newton"], counts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_offset", [False, True])
def test_weight_matrix_is_the_four_sums(xp, dtype, with_offset):
    """The eager search's pass: ``[[sum e, sum e d'], [sum e^2, sum e^2 d']]`` at a number and
    at candidates along leading axes, against float64 sums with the weights written out:
    ``e = exp(max(g d + offset - max, floor))`` (the max only where the offset moves it), and
    ``e^2`` its square, so that a weight below the floor counts as ``exp(floor)`` and its
    square."""
    from isreshape_core._ess_grid import exponent_floor, weight_matrix
    from isreshape_core._lib.namespace import namespace

    rng = np.random.default_rng(21)
    d = rng.normal(0.0, 1.5, (3, 400))
    d = d - d.max(axis=-1, keepdims=True)
    d[0, :5] = -3e4  # below the floor at every candidate > 0.01
    slope = np.maximum(d, -(2.0**16))
    offset = np.log(rng.uniform(0.2, 3.0, d.shape)) if with_offset else None
    floor = exponent_floor(np, dtype)

    def brute(g):
        z = g * d + (0.0 if offset is None else offset)
        if offset is not None:
            z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(np.maximum(z, floor))
        return np.stack(
            [
                np.stack([e.sum(-1), (e * slope).sum(-1)], -1),
                np.stack([(e * e).sum(-1), (e * e * slope).sum(-1)], -1),
            ],
            -2,
        )

    cast = lambda a: None if a is None else xp.asarray(a.astype(dtype))  # noqa: E731
    ns = namespace(cast(d))
    at = weight_matrix(ns, cast(d), cast(slope), cast(offset), None, with_offset)
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(to_numpy(at(0.7)), brute(0.7), rtol=rtol, atol=0)
    candidates = np.array([0.05, 0.5, 1.0])
    got = to_numpy(at(cast(candidates.reshape(3, 1, 1, 1) * np.ones((3, 3, 1, 1)))))
    want = np.stack([brute(g) for g in candidates])
    assert got.shape == (3, 3, 2, 2)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
