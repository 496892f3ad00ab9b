"""CPU tests of isreshape_cupy: the fused path's math with the kernels' NumPy mirrors, the generic
path on every installed backend, the gradient against finite differences and torch autograd.

Nothing here needs CuPy or a GPU: the fused path (``_fused_loss_and_grad``) runs with
``reference_row_stats`` / ``reference_token_grad`` in place of the CUDA kernels, so the
only part left to ``test_cupy_gpu.py`` is the CUDA compilation and launch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    arviz_psis,
    brute_gamma,
    brute_ratio,
    loop_log_weights,
    make_batch,
    reference_gamma_psis,
    reference_gamma_tail,
    to_numpy,
)
from _kernel_mirrors import reference_row_stats, reference_token_grad
from hypothesis import given
from hypothesis import strategies as st

from isreshape_core import GAMMA_METHODS
from isreshape_cupy import is_reshape_loss_and_grad
from isreshape_cupy.loss import _fused_loss_and_grad

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
FUSED_LEVELS = ("sequence", "geometric")


def fused_cpu(logp, logq, rewards, mask=None, **options):
    """The adapter's fused path on NumPy arrays, with the kernels' NumPy mirrors."""
    full = dict(
        gamma="ess",
        rho_min=0.3,
        level="sequence",
        loss_agg_mode="token-mean",
        form="objective",
        group_size=None,
        loss_scale_factor=None,
    )
    full.update(options)
    return _fused_loss_and_grad(
        logp,
        logq,
        rewards,
        mask,
        row_stats=reference_row_stats,
        token_grad=reference_token_grad,
        **full,
    )


def loop_loss(logp, logq, rewards, mask, gamma, level, mode, form="objective", scale=None):
    """The loss with gamma fixed, by explicit Python loops over sequences and tokens."""
    B, T = logp.shape
    r = rewards if rewards.ndim == 2 else np.repeat(rewards[:, None], T, axis=1)
    n_total = int(mask.sum())
    total = 0.0
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        if not valid:
            continue
        seq_l = sum(logp[b, t] - logq[b, t] for t in valid)
        seq_logp = sum(logp[b, t] for t in valid)
        if level == "geometric":
            seq_l, seq_logp = seq_l / len(valid), seq_logp / len(valid)
        h = seq_l if gamma == 0 else math.expm1(gamma * seq_l) / gamma
        if form == "reinforce":
            h = math.exp(gamma * seq_l) * seq_logp
        for t in valid:
            term = -r[b, t] * h
            if mode == "token-mean":
                total += term / n_total
            elif mode == "seq-mean-token-sum":
                total += term / B
            elif mode == "seq-mean-token-mean":
                total += term / (len(valid) * B)
            else:
                total += term / (T if scale is None else scale)
    return total


def finite_difference_grad(fn, logp, eps=1e-6):
    """Central differences of ``fn(logp)`` entry by entry."""
    grad = np.zeros_like(logp)
    for idx in np.ndindex(*logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (fn(up) - fn(down)) / (2 * eps)
    return grad


# --------------------------------------------------------------------------------------------
# The kernels' NumPy mirrors against token-by-token loops.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometric", [False, True])
def test_reference_row_stats_matches_loops(geometric):
    logp, logq, rewards, mask = make_batch(3, B=5, T=7, per_token_rewards=True)
    mask[4] = False  # a row without a valid token
    # Garbage under the mask must be ignored: NaN, +inf.
    logp = np.where(mask, logp, np.nan)
    logq = np.where(mask, logq, np.inf)
    rewards = np.where(mask, rewards, np.nan)
    logp[0, 0] = -np.inf  # weight 0: a valid -inf log weight, not an error
    logq[1, 0] = np.nan  # counted as bad
    rewards[2, 0] = np.inf  # counted as bad
    out = reference_row_stats(logp, logq, rewards, mask, geometric)
    for b in range(5):
        valid = [t for t in range(7) if mask[b, t]]
        n = len(valid)
        sum_l = sum(float(logp[b, t]) - float(logq[b, t]) for t in valid)
        sum_lp = sum(float(logp[b, t]) for t in valid)
        sum_r = sum(float(rewards[b, t]) for t in valid)
        if geometric and n:
            sum_l, sum_lp = sum_l / n, sum_lp / n
        bad_l = sum(
            1
            for t in valid
            if math.isnan(logp[b, t] - logq[b, t]) or logp[b, t] - logq[b, t] == math.inf
        )
        bad_r = sum(1 for t in valid if not math.isfinite(rewards[b, t]))
        got = {k: float(v[b]) for k, v in out.items()}
        assert got["n_tok"] == n
        assert got["bad_l"] == bad_l
        assert got["bad_r"] == bad_r
        for key, want in (("unit_l", sum_l), ("unit_logp", sum_lp), ("sum_r", sum_r)):
            if math.isnan(want):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(want, rel=1e-13, abs=1e-13), key
    assert out["bad_l"][1] == 1 and out["bad_r"][2] == 1 and out["unit_l"][0] == -np.inf
    assert out["n_tok"][4] == 0 and out["unit_l"][4] == 0.0


def test_reference_row_stats_broadcasts_rewards_and_mask():
    logp, logq, rewards, _ = make_batch(4, B=3, T=4)
    out = reference_row_stats(logp, logq, rewards[:, None], np.ones((1, 1), bool), False)
    np.testing.assert_allclose(out["sum_r"], 4 * rewards, rtol=1e-14)
    np.testing.assert_allclose(out["unit_l"], (logp - logq).sum(axis=1), rtol=1e-13)
    np.testing.assert_array_equal(out["n_tok"], [4.0, 4.0, 4.0])


def test_reference_token_grad_matches_loops():
    rng = np.random.default_rng(5)
    mask = rng.uniform(size=(4, 6)) < 0.6
    scale = rng.normal(size=(4, 1))
    got = reference_token_grad(mask, scale, (4, 6))
    for b in range(4):
        for t in range(6):
            assert got[b, t] == (scale[b, 0] if mask[b, t] else 0.0)


# --------------------------------------------------------------------------------------------
# The fused path's value and gradient.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", FUSED_LEVELS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_fused_value_matches_loops(level, mode, form):
    logp, logq, rewards, mask = make_batch(1, per_token_rewards=(mode == "token-mean"))
    for gamma in (0.0, 0.37, 1.0):
        loss, _, metrics = fused_cpu(
            logp, logq, rewards, mask, gamma=gamma, level=level, loss_agg_mode=mode, form=form
        )
        want = loop_loss(logp, logq, rewards, mask, gamma, level, mode, form)
        np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-14)
        assert float(metrics["gamma"]) == gamma


@pytest.mark.parametrize("level", FUSED_LEVELS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_fused_gradient_matches_finite_differences(level, mode, form):
    """gamma held at the value the adaptive rule picked, as the loss's gradient does."""
    logp, logq, rewards, mask = make_batch(2, B=5, T=4, per_token_rewards=True, spread=2.0)
    _, grad, metrics = fused_cpu(
        logp, logq, rewards, mask, level=level, loss_agg_mode=mode, form=form
    )
    g = float(metrics["gamma"])
    assert 0.0 < g < 1.0  # the ESS constraint binds: gamma is a non-trivial constant here

    def objective_value(x):
        return loop_loss(x, logq, rewards, mask, g, level, mode, form)

    # The surrogate's gradient treats w^gamma as a constant: differentiate logp in log pi only.
    def reinforce_value(x):
        B, T = x.shape
        r = rewards
        total = 0.0
        n_total = int(mask.sum())
        for b in range(B):
            valid = [t for t in range(T) if mask[b, t]]
            seq_l = sum(logp[b, t] - logq[b, t] for t in valid)
            seq_x = sum(x[b, t] for t in valid)
            if level == "geometric":
                seq_l, seq_x = seq_l / len(valid), seq_x / len(valid)
            for t in valid:
                term = -r[b, t] * math.exp(g * seq_l) * seq_x
                total += {
                    "token-mean": term / n_total,
                    "seq-mean-token-sum": term / B,
                    "seq-mean-token-mean": term / (len(valid) * B),
                    "seq-mean-token-sum-norm": term / T,
                }[mode]
        return total

    value = objective_value if form == "objective" else reinforce_value
    want = finite_difference_grad(value, logp)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)
    assert np.all(grad[~mask] == 0.0)


@pytest.mark.parametrize("level", FUSED_LEVELS)
@pytest.mark.parametrize("gamma", [*GAMMA_METHODS, 0.0, 0.5])
@pytest.mark.parametrize("group_size", [None, 3])
def test_fused_matches_generic_path(level, gamma, group_size):
    """Same numbers as the core's path on the (B, T) arrays: loss, gradient, every metric."""
    logp, logq, rewards, mask = make_batch(7, B=12, T=6, spread=0.8)
    mask[5] = False  # an empty response
    for mode in LOSS_AGG_MODES:
        opts = dict(gamma=gamma, level=level, loss_agg_mode=mode, group_size=group_size)
        loss_f, grad_f, met_f = fused_cpu(logp, logq, rewards, mask, **opts)
        loss_g, grad_g, met_g = is_reshape_loss_and_grad(logp, logq, rewards, mask, **opts)
        np.testing.assert_allclose(loss_f, loss_g, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(grad_f, grad_g, rtol=1e-12, atol=1e-15)
        assert set(met_f) == set(met_g)
        for key in met_g:
            np.testing.assert_allclose(met_f[key], met_g[key], rtol=1e-12, atol=1e-14)


def _reference_gamma(method, l, valid, rho):
    """gamma of one row of unit log weights by brute force / arviz-stats (no isreshape code)."""
    if method == "ess":
        return brute_gamma(l, rho, mask=valid)
    if method == "closed_form":
        return min(math.sqrt(-math.log(rho) / np.var(l[valid], ddof=1)), 1.0)
    if method == "psis":
        return reference_gamma_psis(l, rho, mask=valid)[0]
    tail = reference_gamma_tail(np.where(valid, l, -np.inf))[0]
    return tail if method == "tail" else min(brute_gamma(l, rho, mask=valid), tail)


@pytest.mark.parametrize("level", FUSED_LEVELS)
@pytest.mark.parametrize(("group_size", "methods"), [(None, GAMMA_METHODS), (30, ("ess", "psis"))])
def test_fused_gamma_and_metrics_match_independent_references(level, group_size, methods):
    """The fused path's gamma and metrics against loops, brute-force bisections and arviz-stats
    (the core path shares the fused path's argument checks and gamma code)."""
    logp, logq, rewards, mask = make_batch(19, B=60, T=4, spread=1.0)
    logq[::7] -= np.random.default_rng(20).exponential(2.0, (9, 4))  # a heavier right tail
    mask[5] = False  # an empty response: a zero weight for PSIS, left out of every ESS
    l = loop_log_weights(logp, logq, mask, level=level)
    valid = mask.any(axis=1)
    groups = [slice(0, 60)] if group_size is None else [slice(0, 30), slice(30, 60)]
    for method in methods:
        loss, _, metrics = fused_cpu(
            logp, logq, rewards, mask, gamma=method, level=level, group_size=group_size
        )
        gammas = [_reference_gamma(method, l[g], valid[g], 0.3) for g in groups]
        np.testing.assert_allclose(metrics["gamma"], np.mean(gammas), rtol=0, atol=1e-9)
        fixed = np.repeat(gammas, 60 // len(groups))
        ratio = [brute_ratio(l[g], gm, mask=valid[g]) for g, gm in zip(groups, gammas, strict=True)]
        np.testing.assert_allclose(metrics["ess_ratio"], np.mean(ratio), rtol=1e-7)
        at_1 = [brute_ratio(l[g], 1.0, mask=valid[g]) for g in groups]
        np.testing.assert_allclose(metrics["ess_ratio_at_1"], np.mean(at_1), rtol=1e-10)
        var = [np.var(l[g][valid[g]], ddof=1) for g in groups]
        np.testing.assert_allclose(metrics["sigma2"], np.mean(var), rtol=1e-10)
        w = [np.exp(l[g][valid[g]] - l[g][valid[g]].max()) for g in groups]
        np.testing.assert_allclose(metrics["max_weight"], max(x.max() / x.sum() for x in w))
        if method in ("psis", "tail", "combined"):
            k = [float(arviz_psis(np.where(valid[g], l[g], -np.inf))[1]) for g in groups]
            np.testing.assert_allclose(metrics["k_hat"], max(k), rtol=1e-10)
        # The loss at the chosen gamma, one gamma per group, by loops.
        want = 0.0
        for b in range(60):
            if valid[b]:
                h = math.expm1(fixed[b] * l[b]) / fixed[b] if fixed[b] > 0 else l[b]
                want -= rewards[b] * h * mask[b].sum() / mask.sum()
        np.testing.assert_allclose(loss, want, rtol=1e-7)
    assert metrics["gamma"] < 1.0


@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 6),
    T=st.integers(1, 6),
    spread=st.floats(0.0, 3.0),
    per_token=st.booleans(),
    level=st.sampled_from(FUSED_LEVELS),
    form=st.sampled_from(["objective", "reinforce"]),
)
def test_fused_matches_generic_property(seed, B, T, spread, per_token, level, form):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.01, 1.0, (B, T)))
    logq = logp + rng.normal(0, spread, (B, T)) if spread > 0 else logp.copy()
    mask = rng.uniform(size=(B, T)) < 0.7
    rewards = rng.normal(0, 1, (B, T) if per_token else B)
    opts = dict(level=level, form=form, loss_agg_mode="seq-mean-token-mean")
    loss_f, grad_f, met_f = fused_cpu(logp, logq, rewards, mask, **opts)
    loss_g, grad_g, met_g = is_reshape_loss_and_grad(logp, logq, rewards, mask, **opts)
    np.testing.assert_allclose(loss_f, loss_g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_f, grad_g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(met_f["gamma"], met_g["gamma"], rtol=1e-10, atol=1e-12)
    assert np.all(np.isfinite(grad_f)) and np.isfinite(loss_f)


def test_fused_one_d_inputs_and_no_mask():
    """(B,) log-probabilities: one token per sequence; no mask keeps every token."""
    logp, logq, rewards, _ = make_batch(9, B=6, T=1)
    loss_f, grad_f, _ = fused_cpu(logp[:, 0], logq[:, 0], rewards, gamma=0.5)
    assert grad_f.shape == (6,)
    want = loop_loss(logp, logq, rewards, np.ones((6, 1), bool), 0.5, "sequence", "token-mean")
    np.testing.assert_allclose(loss_f, want, rtol=1e-12)
    # d/dlogp_b of -(1/B) sum r_b expm1(g l_b)/g is -(1/B) r_b exp(g l_b).
    l = logp[:, 0] - logq[:, 0]
    np.testing.assert_allclose(grad_f, -rewards * np.exp(0.5 * l) / 6, rtol=1e-12)


def test_fused_half_precision_is_computed_in_float32():
    logp, logq, rewards, mask = make_batch(11, B=8, T=6)
    loss64, grad64, _ = fused_cpu(logp, logq, rewards, mask, gamma=0.5)
    h = np.float16
    loss16, grad16, _ = fused_cpu(
        logp.astype(h), logq.astype(h), rewards.astype(h), mask, gamma=0.5
    )
    assert grad16.dtype == np.float32 and np.asarray(loss16).dtype == np.float32
    # float16 inputs round each log-probability by up to 2**-11 relative.
    np.testing.assert_allclose(loss16, loss64, rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(grad16, grad64, rtol=1e-2, atol=1e-3)


def test_fused_sum_norm_scale_factor():
    logp, logq, rewards, mask = make_batch(12)
    opts = dict(gamma=0.25, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=3.0)
    loss, _, _ = fused_cpu(logp, logq, rewards, mask, **opts)
    want = loop_loss(logp, logq, rewards, mask, 0.25, "sequence", "sum-norm", scale=3.0)
    np.testing.assert_allclose(loss, want, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Errors, with the core's messages.
# --------------------------------------------------------------------------------------------


def test_fused_rejects_nan_log_weights_and_rewards():
    logp, logq, rewards, mask = make_batch(13, per_token_rewards=True)
    bad = logp.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="logp - logq contains NaN"):
        fused_cpu(bad, logq, rewards, mask)
    bad_r = rewards.copy()
    bad_r[0, 0] = np.inf
    with pytest.raises(ValueError, match="rewards contain NaN or inf"):
        fused_cpu(logp, logq, bad_r, mask)
    # Masked-out garbage is ignored, as in the core.
    mask[1, :] = False
    bad[0, 0] = logp[0, 0]
    bad[1, :] = np.nan
    loss, grad, _ = fused_cpu(bad, logq, rewards, mask, gamma=0.5)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(rewards=None), TypeError, "rewards are required"),
        (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode must be one of"),
        (dict(form="ppo"), ValueError, "form must be one of"),
        (dict(gamma="newton"), ValueError, "gamma must be one of"),
        (dict(gamma=True), TypeError, "gamma must be a method name"),
        (dict(rho_min=0.0), ValueError, "rho_min must lie in"),
        (dict(group_size=4), ValueError, "group_size must be a positive int"),
        (dict(logq=np.zeros((6, 4))), ValueError, "logp and logq must have the same shape"),
        (dict(rewards=np.zeros(5)), ValueError, "rewards must have shape"),
    ],
)
def test_fused_argument_errors(kwargs, exc, match):
    logp, logq, rewards, mask = make_batch(14)
    args = dict(logp=logp, logq=logq, rewards=rewards, mask=mask)
    options = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(exc, match=match):
        fused_cpu(args["logp"], args["logq"], args["rewards"], args["mask"], **options)


def test_dispatch_errors():
    logp, logq, rewards, mask = make_batch(15)
    with pytest.raises(TypeError, match="fused=True needs CuPy arrays"):
        is_reshape_loss_and_grad(logp, logq, rewards, mask, fused=True)
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        is_reshape_loss_and_grad(logp, logq, rewards, mask, fused="yes")
    with pytest.raises(ValueError, match="level must be one of"):
        is_reshape_loss_and_grad(logp, logq, rewards, mask, level="word")


# --------------------------------------------------------------------------------------------
# The generic path on every backend, and agreement with torch autograd.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["sequence", "geometric", "token"])
def test_generic_path_matches_loops_on_every_backend(xp, level):
    logp, logq, rewards, mask = make_batch(16)
    loss, grad, _ = is_reshape_loss_and_grad(
        xp.asarray(logp), xp.asarray(logq), xp.asarray(rewards), xp.asarray(mask), gamma=0.5,
        level=level, loss_agg_mode="seq-mean-token-sum",
    )  # fmt: skip
    if level != "token":
        want = loop_loss(logp, logq, rewards, mask, 0.5, level, "seq-mean-token-sum")
        np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-12)
    else:  # one unit per token: -(1/B) sum_bt m r_b expm1(g l_bt)/g
        l = np.where(mask, logp - logq, 0.0)
        want = -np.sum(np.where(mask, rewards[:, None] * np.expm1(0.5 * l) / 0.5, 0.0)) / 6
        np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-12)
    assert to_numpy(grad).shape == logp.shape


def torch_reference(torch, logp, logq, rewards, mask, gamma, level, mode, form):
    """A plain torch-autograd loss with gamma a constant (no isreshape code)."""
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    lq = torch.tensor(logq, dtype=torch.float64)
    m = torch.tensor(mask)
    r = torch.tensor(rewards, dtype=torch.float64)
    B, T = lp.shape
    mf = m.double()
    n = mf.sum(-1)
    unit_l = (torch.where(m, lp - lq, 0.0)).sum(-1)
    unit_logp = torch.where(m, lp, 0.0).sum(-1)
    if level == "geometric":
        unit_l, unit_logp = unit_l / n.clamp(min=1), unit_logp / n.clamp(min=1)
    if form == "objective":
        h = unit_l if gamma == 0 else torch.expm1(gamma * unit_l) / gamma
    else:
        h = torch.exp(gamma * unit_l).detach() * unit_logp
    per_token = -(r[:, None] if r.ndim == 1 else r) * h[:, None] * mf
    if mode == "token-mean":
        loss = per_token.sum() / mf.sum()
    elif mode == "seq-mean-token-sum":
        loss = per_token.sum() / B
    elif mode == "seq-mean-token-mean":
        loss = (per_token.sum(-1) / n.clamp(min=1)).sum() / B
    else:
        loss = per_token.sum() / T
    loss.backward()
    return loss.detach().numpy(), lp.grad.numpy()


@pytest.mark.parametrize("level", FUSED_LEVELS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_fused_matches_torch_autograd(level, mode, form):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    logp, logq, rewards, mask = make_batch(17, B=8, T=5, spread=0.7)
    loss, grad, metrics = fused_cpu(
        logp, logq, rewards, mask, level=level, loss_agg_mode=mode, form=form
    )
    t_loss, t_grad = torch_reference(
        torch, logp, logq, rewards, mask, float(metrics["gamma"]), level, mode, form
    )
    np.testing.assert_allclose(loss, t_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, t_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("level", FUSED_LEVELS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_fused_matches_torch_adapter(level, mode, form):
    torch = pytest.importorskip("torch")
    isreshape_torch = pytest.importorskip("isreshape_torch")
    torch.set_num_threads(1)
    logp, logq, rewards, mask = make_batch(18, B=8, T=5, spread=0.7, per_token_rewards=True)
    opts = dict(level=level, loss_agg_mode=mode, form=form)
    loss, grad, metrics = fused_cpu(logp, logq, rewards, mask, **opts)
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    t_loss, t_metrics = isreshape_torch.is_reshape_loss(
        lp, torch.tensor(logq), torch.tensor(rewards), torch.tensor(mask), **opts
    )
    t_loss.backward()
    np.testing.assert_allclose(loss, t_loss.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, lp.grad.numpy(), rtol=1e-12, atol=1e-14)
    for key in metrics:
        np.testing.assert_allclose(
            metrics[key], t_metrics[key].detach().numpy(), rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("level", FUSED_LEVELS)
def test_fused_precomputed_gamma_matches_generic_path(level):
    logp, logq, rewards, mask = make_batch(17, B=8, T=5, spread=0.8)
    gammas = np.linspace(0.0, 1.0, 8)
    for mode in LOSS_AGG_MODES:
        opts = dict(gamma=gammas, level=level, loss_agg_mode=mode)
        loss_f, grad_f, met_f = fused_cpu(logp, logq, rewards, mask, **opts)
        loss_g, grad_g, met_g = is_reshape_loss_and_grad(logp, logq, rewards, mask, **opts)
        by_rows = sum(
            is_reshape_loss_and_grad(
                logp,
                logq,
                np.where(np.arange(8) == b, rewards, 0.0),
                mask,
                gamma=float(gammas[b]),
                level=level,
                loss_agg_mode=mode,
            )[0]
            for b in range(8)
        )
        np.testing.assert_allclose(loss_f, by_rows, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(loss_g, by_rows, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(grad_f, grad_g, rtol=1e-12, atol=1e-15)
        for key in met_g:
            np.testing.assert_allclose(met_f[key], met_g[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("level", FUSED_LEVELS)
def test_fused_reinforce_value_stays_finite_where_its_product_overflows(level):
    # float32: w^gamma ~ e^80 per sequence times a summed log-probability of -4e3 overflows the
    # product w * logp; the core's unit-loss stage rescales it (log_scale > 0), finite and equal
    # to the generic path.
    B, T = 4, 8
    logp = np.full((B, T), -500.0, np.float32)
    shift = 10.0 if level == "sequence" else 85.0  # l = 80 (sum) or 85 (mean) per sequence
    logq = logp - np.float32(shift)
    logq[1] = logp[1] - np.float32(shift - 1.0)
    rewards = np.array([1.0, -0.5, 2.0, 1.0], np.float32)
    kw = {"gamma": 1.0, "level": level, "form": "reinforce", "loss_agg_mode": "seq-mean-token-sum"}
    loss, grad, metrics = fused_cpu(logp, logq, rewards, **kw)
    want, want_grad, want_metrics = is_reshape_loss_and_grad(logp, logq, rewards, fused=False, **kw)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_scale"], want_metrics["log_scale"], rtol=1e-5)
