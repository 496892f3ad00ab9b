"""Tests of isreshape_core/loss.py: the value against a loop-by-loop reference, the gradient
against finite differences, gamma against brute-force bisections and the Pareto rules run on
arviz-stats, shards against the whole."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    assert_shards_match_whole,
    brute_gamma,
    loop_log_weights,
    make_batch,
    reference_gamma_psis,
    reference_gamma_tail,
    reference_loss,
    run_sharded,
    to_numpy,
)

from isreshape_core import LOSS_AGG_MODES, is_reshape_loss_and_grad

LEVELS = ("sequence", "geometric", "token")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_value_matches_loops(xp, level, mode):
    logp, logq, rewards, mask = make_batch(1, per_token_rewards=(mode == "token-mean"))
    for gamma in (0.0, 0.5, 1.0):
        loss, _, _ = is_reshape_loss_and_grad(
            xp.asarray(logp),
            xp.asarray(logq),
            xp.asarray(rewards),
            xp.asarray(mask),
            gamma=gamma,
            level=level,
            loss_agg_mode=mode,
        )
        want = reference_loss(logp, logq, rewards, mask, gamma, level, mode)
        np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("per_token", [False, True])
def test_padding_may_hold_anything(xp, level, per_token):
    """NaN and infinities outside the mask (log-probabilities, per-token rewards, the reward of
    a sequence without a valid token) change nothing: the loss is the loops' loss of the clean
    batch, and every padded token gets exactly 0."""
    logp, logq, rewards, mask = make_batch(3, per_token_rewards=per_token)
    mask[2] = False  # a sequence without a valid token: it adds 0 to a sum divided by B
    keep = np.arange(len(mask)) != 2
    want = reference_loss(logp[keep], logq[keep], rewards[keep], mask[keep], 0.5, level,
                          "seq-mean-token-sum") * (keep.sum() / len(keep))  # fmt: skip
    dirty_p, dirty_q, dirty_r = logp.copy(), logq.copy(), rewards.copy()
    dirty_p[~mask], dirty_q[~mask] = np.nan, np.inf
    if per_token:
        dirty_r[~mask] = np.nan
    else:
        dirty_r[2] = np.nan
    loss, grad, _ = is_reshape_loss_and_grad(
        xp.asarray(dirty_p), xp.asarray(dirty_q), xp.asarray(dirty_r), xp.asarray(mask),
        gamma=0.5, level=level, loss_agg_mode="seq-mean-token-sum",
    )  # fmt: skip
    np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-12, atol=1e-14)
    assert np.all(to_numpy(grad)[~mask] == 0.0)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_gradient_matches_finite_differences(xp, level, form):
    logp, logq, rewards, mask = make_batch(2)
    for gamma in (0.0, 0.5, 1.0):
        for mode in ("token-mean", "seq-mean-token-mean"):
            _, grad, _ = is_reshape_loss_and_grad(
                xp.asarray(logp),
                xp.asarray(logq),
                xp.asarray(rewards),
                xp.asarray(mask),
                gamma=gamma,
                level=level,
                loss_agg_mode=mode,
                form="objective",
            )
            _, grad_form, _ = is_reshape_loss_and_grad(
                xp.asarray(logp),
                xp.asarray(logq),
                xp.asarray(rewards),
                xp.asarray(mask),
                gamma=gamma,
                level=level,
                loss_agg_mode=mode,
                form=form,
            )
            # Both forms have the same gradient (the REINFORCE weights are constants).
            np.testing.assert_allclose(to_numpy(grad_form), to_numpy(grad), rtol=1e-12)
            fd = np.zeros_like(logp)
            h = 1e-6
            for b in range(logp.shape[0]):
                for t in range(logp.shape[1]):
                    up, down = logp.copy(), logp.copy()
                    up[b, t] += h
                    down[b, t] -= h
                    fd[b, t] = (
                        reference_loss(up, logq, rewards, mask, gamma, level, mode)
                        - reference_loss(down, logq, rewards, mask, gamma, level, mode)
                    ) / (2 * h)
            np.testing.assert_allclose(to_numpy(grad), fd, rtol=1e-6, atol=1e-9)


def test_adaptive_gamma_and_metrics(xp):
    logp, logq, rewards, mask = make_batch(3, B=64, T=8)
    logq = logq + np.random.default_rng(0).standard_t(3, (64, 8)) * 0.5
    for level in LEVELS:
        loss, _, metrics = is_reshape_loss_and_grad(
            xp.asarray(logp),
            xp.asarray(logq),
            xp.asarray(rewards),
            xp.asarray(mask),
            gamma="ess",
            level=level,
        )
        l = loop_log_weights(logp, logq, mask, level=level)
        unit_mask = mask if level == "token" else mask.any(axis=1)
        flat = l.reshape(-1)[unit_mask.reshape(-1)]
        g = float(to_numpy(metrics["gamma"]))
        assert abs(g - brute_gamma(flat, 0.3)) < 1e-9
        w = np.exp(g * (flat - flat.max()))
        np.testing.assert_allclose(
            to_numpy(metrics["ess_ratio"]), w.sum() ** 2 / (w**2).sum() / flat.size, rtol=1e-10
        )
        np.testing.assert_allclose(to_numpy(metrics["sigma2"]), np.var(flat, ddof=1), rtol=1e-10)
        w1 = np.exp(flat - flat.max())
        np.testing.assert_allclose(to_numpy(metrics["max_weight"]), w1.max() / w1.sum())
        assert to_numpy(metrics["ess_ratio"]) >= 0.3 * (1 - 1e-12)
        want = reference_loss(logp, logq, rewards, mask, g, level, "token-mean")
        np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-10)


def test_per_group_gamma(xp):
    logp, logq, rewards, mask = make_batch(4, B=12, T=3)
    logq = logq + np.random.default_rng(1).normal(0, 1.0, (12, 3))
    _, _, metrics = is_reshape_loss_and_grad(
        xp.asarray(logp),
        xp.asarray(logq),
        xp.asarray(rewards),
        xp.asarray(mask),
        group_size=4,
        level="sequence",
    )
    l = loop_log_weights(logp, logq, mask).reshape(3, 4)
    gammas = [brute_gamma(row, 0.3) for row in l]
    assert min(gammas) < 1.0  # the constraint binds in a group
    np.testing.assert_allclose(to_numpy(metrics["gamma"]), np.mean(gammas), rtol=0, atol=1e-9)


@pytest.mark.parametrize("group_size", [None, 2])
def test_shards_equal_the_whole_batch(group_size):
    logp, logq, rewards, mask = make_batch(5, B=8, T=6)
    logq = logq + np.random.default_rng(2).normal(0, 1.0, (8, 6))
    kwargs = {"level": "token", "group_size": group_size, "loss_agg_mode": "seq-mean-token-mean"}
    loss, grad, metrics = is_reshape_loss_and_grad(logp, logq, rewards, mask, **kwargs)
    cuts = [2, 6]
    shards = list(
        zip(*(np.split(a, cuts, axis=0) for a in (logp, logq, rewards, mask)), strict=True)
    )

    def step(shard, reducer):
        return is_reshape_loss_and_grad(*shard, reducer=reducer, **kwargs)

    assert_shards_match_whole(run_sharded(step, shards), loss, grad, metrics)


@pytest.mark.parametrize("gamma", ["ess", 0.5])
def test_shards_on_different_eager_paths_equal_the_whole_batch(gamma):
    """A shard with a zero-weight token (the guarded units, clipped ones counted) beside shards
    of plain units: every shard makes the same collectives and gets the whole batch's loss."""
    logp, logq, rewards, mask = make_batch(7, B=9, T=5)
    logq = logq + np.random.default_rng(3).normal(0, 1.0, (9, 5))
    logp[1, 0], mask[1, 0] = -np.inf, True  # in the first shard only
    kwargs = {"gamma": gamma, "level": "sequence"}
    loss, grad, metrics = is_reshape_loss_and_grad(logp, logq, rewards, mask, **kwargs)
    parts = (np.split(a, [3, 6], axis=0) for a in (logp, logq, rewards, mask))
    shards = list(zip(*parts, strict=True))

    def step(shard, reducer):
        return is_reshape_loss_and_grad(*shard, reducer=reducer, **kwargs)

    assert_shards_match_whole(run_sharded(step, shards), loss, grad, metrics)


def test_sequence_level_inputs_and_half_precision():
    logp, logq, rewards, _ = make_batch(6)
    loss1, grad1, _ = is_reshape_loss_and_grad(logp[:, 0], logq[:, 0], rewards, gamma=0.5)
    want = np.mean(-rewards * np.expm1(0.5 * (logp[:, 0] - logq[:, 0])) / 0.5)
    np.testing.assert_allclose(loss1, want, rtol=1e-12)
    assert grad1.shape == (6,)
    logq = logq + np.random.default_rng(16).normal(0.0, 2.0, logq.shape)
    lp16, lq16 = logp.astype(np.float16), logq.astype(np.float16)
    loss16, grad16, metrics16 = is_reshape_loss_and_grad(
        lp16, lq16, rewards, gamma="ess", rho_min=0.5
    )
    assert loss16.dtype == np.float32 and grad16.dtype == np.float32
    # Against float64 on the same (rounded) inputs: the sums and the gamma search run in float32
    # (eps 1.2e-7); measured 1e-6 relative for gamma and the loss, 4e-6 for the gradient.
    lp, lq = lp16.astype(np.float64), lq16.astype(np.float64)
    mask = np.ones(lp.shape, bool)
    g = brute_gamma(loop_log_weights(lp, lq), 0.5)
    assert 0.0 < g < 1.0
    np.testing.assert_allclose(float(metrics16["gamma"]), g, rtol=1e-5)
    want = reference_loss(lp, lq, rewards, mask, g, "sequence", "token-mean")
    np.testing.assert_allclose(float(loss16), want, rtol=2e-5)
    _, grad64, _ = is_reshape_loss_and_grad(lp, lq, rewards, gamma=g)
    np.testing.assert_allclose(grad16, grad64, rtol=5e-5)


def test_large_log_ratios_in_bfloat16_do_not_overflow():
    torch = pytest.importorskip("torch")
    logp = torch.full((4, 3), -1.0, dtype=torch.bfloat16)
    logq = torch.tensor([[-81.0] * 3, [79.0] * 3, [-1.0] * 3, [-1.0] * 3], dtype=torch.bfloat16)
    loss, grad, metrics = is_reshape_loss_and_grad(
        logp, logq, torch.ones(4), gamma="ess", level="token"
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert metrics["gamma"].dtype == torch.float32
    # Token log weights 80 (x3), -80 (x3), 0 (x6), exact in bfloat16: float64 references.
    l = np.array([80.0] * 3 + [-80.0] * 3 + [0.0] * 6)
    g = brute_gamma(l, 0.3)
    assert 0.0 < g < 0.1
    # float32 gamma (measured 2e-6 relative); e^(80 gamma) amplifies it: 5e-6 in the loss, 7e-6
    # in the gradient.
    np.testing.assert_allclose(float(metrics["gamma"]), g, rtol=1e-5)
    want = -np.mean(np.expm1(g * l) / g)
    np.testing.assert_allclose(float(loss), want, rtol=5e-5)
    np.testing.assert_allclose(grad.numpy().reshape(-1), -np.exp(g * l) / 12, rtol=5e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rewards": None}, TypeError, "rewards are required"),
        ({"rewards": np.zeros(5)}, ValueError, "rewards must have shape"),
        ({"logq": np.zeros((6, 4))}, ValueError, "same shape"),
        ({"group_size": 4}, ValueError, "group_size must be a positive int dividing"),
        ({"loss_agg_mode": "mean"}, ValueError, "loss_agg_mode must be one of"),
        ({"level": "seq"}, ValueError, "level must be one of"),
        ({"form": "ppo"}, ValueError, "form must be one of"),
        ({"gamma": "bisection"}, ValueError, "gamma must be one of"),
        ({"gamma": 1.5}, ValueError, "gamma must lie in"),
        ({"rho_min": 0.0}, ValueError, "rho_min"),
    ],
)
def test_errors(kwargs, error, message):
    logp, logq, rewards, mask = make_batch(7)
    args = {"logp": logp, "logq": logq, "rewards": rewards, "mask": mask}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        is_reshape_loss_and_grad(**args)


def test_pareto_methods_report_k_hat():
    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    rng = np.random.default_rng(9)
    logp = np.log(rng.uniform(0.05, 1.0, (200, 3)))
    logq = logp + rng.standard_t(3, (200, 3))
    rewards = rng.normal(size=200)
    l = loop_log_weights(logp, logq)
    _, k_ref = array_stats.psislw(-l, axis=-1)
    want = {
        "psis": reference_gamma_psis(l, 0.3)[0],
        "tail": reference_gamma_tail(l)[0],
        "combined": min(brute_gamma(l, 0.3), reference_gamma_tail(l)[0]),
    }
    assert k_ref > 0.7 and want["psis"] == 0.3  # the PSIS fallback binds
    for method in ("psis", "tail", "combined"):
        _, _, metrics = is_reshape_loss_and_grad(logp, logq, rewards, gamma=method)
        np.testing.assert_allclose(metrics["k_hat"], k_ref, rtol=1e-10)
        np.testing.assert_allclose(metrics["gamma"], want[method], rtol=0, atol=1e-9)
    _, _, metrics = is_reshape_loss_and_grad(logp, logq, rewards, gamma="ess")
    assert "k_hat" not in metrics


@pytest.mark.parametrize("method", ["psis", "tail", "combined"])
def test_sharded_k_hat_is_the_whole_batch_worst_group(method):
    # Groups live on one shard each; every shard must report the whole batch's worst k_hat
    # (merged like max_weight), not the worst of its own groups.
    rng = np.random.default_rng(31)
    B, T, G = 8, 40, 4
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    logq = logp + rng.normal(0, 0.2, (B, T))
    logq[G:] = logp[G:] + rng.standard_t(1.5, (B - G, T)) * 0.8  # a heavy tail in group 2
    rewards = rng.normal(0, 1, B)
    kwargs = {"gamma": method, "group_size": 2, "level": "token"}
    _, _, whole = is_reshape_loss_and_grad(logp, logq, rewards, **kwargs)
    shards = [(logp[:G], logq[:G], rewards[:G]), (logp[G:], logq[G:], rewards[G:])]

    def step(shard, reducer):
        return is_reshape_loss_and_grad(*shard, reducer=reducer, **kwargs)[2]

    local = [is_reshape_loss_and_grad(*s, **kwargs)[2]["k_hat"] for s in shards]
    assert abs(float(local[0]) - float(local[1])) > 0.05  # the shards differ on their own
    for metrics in run_sharded(step, shards):
        for name in ("k_hat", "max_weight", "gamma", "ess_ratio"):
            np.testing.assert_allclose(metrics[name], whole[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("one_d", [False, True])
def test_unit_gradient_scatters_to_the_token_gradient(xp, level, one_d):
    """``gradient="units"``: the gradient per unit, which token_gradient scatters to exactly the
    ``gradient="tokens"`` array, and times a cotangent to its product on the valid tokens with
    an exact 0 on the masked ones (an infinite cotangent: tests/torch_adapter)."""
    from isreshape_core.extend import UnitGradient, token_gradient

    logp, logq, rewards, mask = make_batch(4, B=6, T=5)
    if one_d:
        logp, logq, mask = logp[:, 0], logq[:, 0], mask[:, 0]
    args = [xp.asarray(a) for a in (logp, logq, rewards, mask)]
    loss, grad, _ = is_reshape_loss_and_grad(*args, gamma=0.6, level=level)
    loss_u, by_unit, _ = is_reshape_loss_and_grad(*args, gamma=0.6, level=level, gradient="units")
    assert isinstance(by_unit, UnitGradient) and by_unit.level == level
    units = (mask.shape[0],) if level != "token" else (6, 1) if one_d else tuple(mask.shape)
    assert tuple(by_unit.unit_grad.shape) == units
    np.testing.assert_array_equal(to_numpy(loss_u), to_numpy(loss))
    # The scatter written out in NumPy: d l_u / d logp_bt is 1 on the unit's valid tokens
    # (1 / n_b at the geometric level) and 0 on masked ones.
    m = np.asarray(mask, dtype=bool)
    m2 = m.reshape(m.shape[0], -1)
    unit_grad = to_numpy(by_unit.unit_grad).reshape(m2.shape[0], -1)
    n_b = m2.sum(axis=1, keepdims=True)
    per_token = unit_grad / np.maximum(n_b, 1) if level == "geometric" else unit_grad
    expected = np.where(m2, np.broadcast_to(per_token, m2.shape), 0.0).reshape(m.shape)
    np.testing.assert_allclose(to_numpy(grad), expected, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(to_numpy(token_gradient(by_unit)), to_numpy(grad))
    for c in (-2.5, 3.0):
        scaled = to_numpy(token_gradient(by_unit, xp.asarray(c)))
        np.testing.assert_array_equal(scaled[~m], 0.0)
        np.testing.assert_allclose(scaled[m], c * to_numpy(grad)[m], rtol=1e-15)


def test_gradient_option_is_checked():
    logp, logq, rewards, mask = make_batch(4)
    with pytest.raises(ValueError, match="gradient must be one of"):
        is_reshape_loss_and_grad(logp, logq, rewards, mask, gradient="sequence")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("gamma", [0.4, "ess", "closed_form"])
@pytest.mark.parametrize("offset", [0.0, -3.0])  # some positive unit log weights, or none
def test_known_max_shift_is_the_masked_shift_bit_for_bit(xp, monkeypatch, level, gamma, offset):
    """Where the plain units' read finds the largest unit log weight positive (a valid unit's:
    invalid ones are 0), the metrics and the search shift by it without a masked copy, and
    beyond 4096 units mask by products with a 0/1 weight: loss, gradient and metrics equal, bit
    for bit, those of the masked shift and its wheres (the max dropped)."""
    import isreshape_core._loss as loss_module

    logp, logq, rewards, mask = make_batch(8, B=12, T=700, spread=0.5)
    args = [xp.asarray(a) for a in (logp, logq + (0.0 if offset == 0.0 else 3.0), rewards, mask)]
    kw = {"gamma": gamma, "level": level}
    fast = is_reshape_loss_and_grad(*args, **kw)
    original, seen = loss_module.token_units, []

    def without_max(*a, **k):
        units, n_bad = original(*a, **k)
        seen.append(units.top is not None)
        return units._replace(top=None), n_bad

    monkeypatch.setattr(loss_module, "token_units", without_max)
    masked = is_reshape_loss_and_grad(*args, **kw)
    assert seen == [offset == 0.0]  # a positive max is known; none when every unit is below 0
    for got, want in zip(fast[:2], masked[:2], strict=True):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    for name, value in masked[2].items():
        np.testing.assert_array_equal(to_numpy(fast[2][name]), to_numpy(value), err_msg=name)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("per_token", [False, True])
def test_unit_coefficients_are_zero_at_every_invalid_unit(xp, level, per_token):
    """The loss's unit stage takes ``coef`` as given, 0 at invalid units: the coefficients
    from masked rewards are exactly 0 there, also where the padding's rewards are NaN or inf
    (and an empty sequence's reward too), and finite elsewhere."""
    from isreshape_core._loss import aggregation_divisor, masked_rewards, unit_coefficients

    rng = np.random.default_rng(12)
    B, T = 5, 7
    mask = np.arange(T)[None, :] < np.array([7, 3, 0, 5, 1])[:, None]  # row 2 is empty
    r = rng.normal(size=(B, T) if per_token else (B, 1))
    if per_token:
        r[~mask] = np.nan
        r[0, :] = np.where(mask[0], r[0], np.inf)
    else:
        r[2, 0] = np.nan  # the empty sequence's reward
    m = xp.asarray(mask)
    n_tok = xp.asarray(mask.sum(axis=1).astype(np.float64))
    rows = n_tok > 0
    r_masked = masked_rewards(xp, xp.asarray(r), m, rows)
    divisor = aggregation_divisor(xp, n_tok, T, "token-mean", None, None)
    coef = to_numpy(unit_coefficients(xp, r_masked, n_tok, m, divisor, level))
    valid = mask if level == "token" else mask.any(axis=1)
    assert np.all(coef[~valid] == 0.0) and np.all(np.isfinite(coef))
    assert np.any(coef[valid] != 0.0)
