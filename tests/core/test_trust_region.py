"""Tests of isreshape_core/trust_region.py (decoupled PPO with an ESS-controlled behaviour
correction, and the ESS-chosen truncation cap): against Python loops over tokens, brute-force
bisection on Python sums, and central finite differences, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import brute_force_ess, to_numpy

import isreshape_core as isr


def brute_force_cap(l: np.ndarray, rho_min: float) -> float:
    """The largest log cap t with ESS(min(w, e^t))/n >= rho_min, by bisection on Python sums."""
    l = [float(x) for x in l]

    def ratio(t):
        top = min(max(l), t)
        v = [math.exp(min(x, t) - top) for x in l]
        return brute_force_ess(np.array(v)) / len(l)

    if ratio(max(l)) >= rho_min:
        return max(l)
    lo, hi = min(l), max(l)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ratio(mid) >= rho_min else (lo, mid)
    return lo


@pytest.mark.parametrize("rho_min", [0.2, 0.5, 0.9])
def test_ess_truncation_cap_is_the_largest_feasible_cap(xp, rho_min):
    l = np.random.default_rng(3).normal(0.0, 2.0, 300)
    t = to_numpy(isr.ess_truncation_cap(xp.asarray(l), rho_min))
    want = brute_force_cap(l, rho_min)
    assert l.min() < want < l.max()  # a truncation, not a bound
    np.testing.assert_allclose(t, want, atol=1e-9)
    v = np.minimum(np.exp(l), np.exp(t))
    assert brute_force_ess(v) / l.size >= rho_min * (1 - 1e-9)
    v_more = np.minimum(np.exp(l), np.exp(t + 1e-6))
    assert brute_force_ess(v_more) / l.size < rho_min  # the largest such cap


def test_ess_truncation_cap_untruncated_when_feasible_masked_and_sharded(xp):
    l = np.array([0.0, 0.1, -0.1, 0.05, 50.0])
    mask = np.array([True, True, True, True, False])
    t = isr.ess_truncation_cap(xp.asarray(l), 0.5, mask=xp.asarray(mask))
    np.testing.assert_allclose(to_numpy(t), 0.1)  # max of the valid ones: no truncation
    # a huge weight does not overflow and is truncated
    t2 = to_numpy(isr.ess_truncation_cap(xp.asarray(np.array([0.0, 0.0, 0.0, 800.0])), 0.9))
    np.testing.assert_allclose(np.exp(t2), 1.9533, rtol=1e-4)
    rows = np.random.default_rng(5).normal(0.0, 1.5, (3, 40))  # one cap per row
    caps = to_numpy(isr.ess_truncation_cap(xp.asarray(rows), 0.4))
    np.testing.assert_allclose(caps, [brute_force_cap(r, 0.4) for r in rows], atol=1e-9)


def reference_decoupled(lp, lprox, lq, adv, mask, behaviour, gamma, cap, low, high, level):
    """Loss by Python loops over tokens (token-mean aggregation), b and clip per unit."""
    B, T = lp.shape
    n_valid = mask.sum()
    total = 0.0
    for b in range(B):
        n = mask[b].sum()
        if level != "token" and n == 0:
            continue
        for t in range(T):
            if not mask[b, t]:
                continue
            if level == "token":
                u, v = lp[b, t] - lprox[b, t], lprox[b, t] - lq[b, t]
            else:
                u = sum(lp[b, s] - lprox[b, s] for s in range(T) if mask[b, s])
                v = sum(lprox[b, s] - lq[b, s] for s in range(T) if mask[b, s])
                if level == "geometric":
                    u, v = u / n, v / n
            if behaviour == "tempered":
                w = math.exp(gamma * v)
            elif behaviour == "truncated":
                w = min(math.exp(v), cap)
            else:
                w = 1.0
            rho = math.exp(max(min(u, 20.0), -20.0))
            a = adv[b, t]
            loss = max(-a * rho, -a * min(max(rho, 1 - low), 1 + high))
            total += w * loss / n_valid
    return total


def make(seed=0, B=4, T=5, spread=0.4):
    rng = np.random.default_rng(seed)
    lq = np.log(rng.dirichlet(np.ones(6), (B, T))[..., 0])
    lprox = lq + rng.normal(0, 1.0, (B, T))
    lp = lprox + rng.normal(0, spread, (B, T))
    adv = rng.normal(0, 1, (B, T))
    mask = rng.random((B, T)) < 0.8
    mask[0] = True
    return lp, lprox, lq, adv, mask


@pytest.mark.parametrize("level", ["token", "geometric", "sequence"])
@pytest.mark.parametrize("behaviour", ["tempered", "truncated", "none"])
def test_decoupled_ppo_value_and_gradient(xp, level, behaviour):
    lp, lprox, lq, adv, mask = make(1)
    kw = dict(behaviour=behaviour, gamma=0.6, cap=1.5, clip_ratio_low=0.2, clip_ratio_high=0.28)
    args = [xp.asarray(x) for x in (lp, lprox, lq, adv, mask)]
    loss, grad, metrics = isr.decoupled_ppo_loss_and_grad(*args, level=level, **kw)
    want = reference_decoupled(lp, lprox, lq, adv, mask, behaviour, 0.6, 1.5, 0.2, 0.28, level)
    np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-10)
    g = to_numpy(grad)
    assert np.all(g[~mask] == 0.0)
    eps = 1e-6
    fd = np.zeros_like(lp)
    for b, t in zip(*np.nonzero(mask), strict=True):
        up, dn = lp.copy(), lp.copy()
        up[b, t] += eps
        dn[b, t] -= eps
        f = [reference_decoupled(x, lprox, lq, adv, mask, behaviour, 0.6, 1.5, 0.2, 0.28, level)
             for x in (up, dn)]  # fmt: skip
        fd[b, t] = (f[0] - f[1]) / (2 * eps)
    np.testing.assert_allclose(g, fd, atol=1e-6)
    assert 0.0 <= to_numpy(metrics["clip_fraction"]) < 1.0
    if level == "token":  # some tokens clipped, so the clip branch is exercised
        assert to_numpy(metrics["clip_fraction"]) > 0.0


def test_decoupled_ppo_ess_gamma_and_cap_meet_rho_min(xp):
    lp, lprox, lq, adv, mask = make(2, B=16, T=8)
    lprox = lq + np.random.default_rng(9).normal(0, 2.0, lq.shape)  # heavy behaviour weights
    args = [xp.asarray(x) for x in (lp, lprox, lq, adv, mask)]
    _, _, m = isr.decoupled_ppo_loss_and_grad(*args, behaviour="tempered", gamma="ess")
    v = (lprox - lq)[mask]
    gamma = to_numpy(m["behaviour_gamma"])
    g_step, _ = isr.step_gamma(v, 0.3)
    np.testing.assert_allclose(gamma, g_step[0], atol=1e-9)
    assert 0 < gamma < 1
    np.testing.assert_allclose(to_numpy(m["ess_ratio"]), 0.3, atol=1e-6)
    _, _, m2 = isr.decoupled_ppo_loss_and_grad(*args, behaviour="truncated", cap="ess")
    np.testing.assert_allclose(to_numpy(m2["behaviour_log_cap"]), brute_force_cap(v, 0.3),
                               atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(to_numpy(m2["ess_ratio"]), 0.3, atol=1e-6)
    np.testing.assert_allclose(to_numpy(m2["ess_ratio_at_1"]), brute_force_ess(np.exp(v)) / v.size)


def test_decoupled_ppo_fresh_batch_is_tempered_is_pg_and_finite(xp):
    lp, _, lq, adv, mask = make(3)
    args = [xp.asarray(x) for x in (lp, lp, lq, adv, mask)]
    loss, grad, _ = isr.decoupled_ppo_loss_and_grad(*args, gamma=0.5, level="token")
    n = mask.sum()
    want = np.where(mask, -np.exp(0.5 * (lp - lq)) * adv / n, 0.0)
    np.testing.assert_allclose(to_numpy(grad), want, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(loss), want.sum(), rtol=1e-12)
    big = lq.copy()
    big[0, 0] = -300.0  # behaviour weight e^300 at gamma 1, and ratios beyond the clamp
    args = [xp.asarray(x) for x in (lp + 0.0, lp - 30.0 * mask, big, adv, mask)]
    loss, grad, _ = isr.decoupled_ppo_loss_and_grad(*args, gamma=1.0)
    assert np.isfinite(to_numpy(loss)) and np.all(np.isfinite(to_numpy(grad)))


def test_decoupled_ppo_argument_errors(xp):
    lp, lprox, lq, adv, _ = make(4)
    args = [xp.asarray(x) for x in (lp, lprox, lq, adv)]
    with pytest.raises(ValueError, match="behaviour"):
        isr.decoupled_ppo_loss_and_grad(*args, behaviour="clip")
    with pytest.raises(ValueError, match="cap"):
        isr.decoupled_ppo_loss_and_grad(*args, behaviour="truncated", cap=0.0)
    with pytest.raises(ValueError, match="same shape"):
        isr.decoupled_ppo_loss_and_grad(args[0], args[1][:, :2], args[2], args[3])
    with pytest.raises(TypeError, match="advantages"):
        isr.decoupled_ppo_loss_and_grad(args[0], args[1], args[2], None)


@pytest.mark.parametrize("behaviour", ["tempered", "truncated"])
@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_decoupled_ppo_sharded_equals_the_whole_batch(behaviour, loss_agg_mode):
    from test_reducer import run_sharded

    lp, lprox, lq, adv, mask = make(6, B=9, T=6)
    lprox = lq + np.random.default_rng(7).normal(0, 2.0, lq.shape)
    kw = dict(behaviour=behaviour, loss_agg_mode=loss_agg_mode)
    loss, grad, metrics = isr.decoupled_ppo_loss_and_grad(lp, lprox, lq, adv, mask, **kw)
    rows = np.split(np.arange(9), [2, 6])  # uneven shards of rows

    def shard(ix, reducer):
        return isr.decoupled_ppo_loss_and_grad(
            lp[ix], lprox[ix], lq[ix], adv[ix], mask[ix], reducer=reducer, **kw
        )

    results = run_sharded(shard, rows)
    for ix, (s_loss, s_grad, s_metrics) in zip(rows, results, strict=True):
        np.testing.assert_allclose(s_loss, loss, rtol=1e-10)
        np.testing.assert_allclose(s_grad, grad[ix], rtol=1e-10, atol=1e-15)
        for name, value in metrics.items():
            np.testing.assert_allclose(s_metrics[name], value, rtol=1e-9, err_msg=name)
