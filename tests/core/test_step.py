"""Tests of isreshape_core/step.py (gamma for a whole optimizer step), of the loss with a
precomputed gamma array, and of ``tempered_weights``: against brute-force bisection on the ESS,
loops over units, and the loss with the same gamma as a number."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    assert_shards_match_whole,
    brute_force_ess,
    make_batch,
    reference_loss,
    run_sharded,
    to_numpy,
)

import isreshape_core as isr
from isreshape_core import is_reshape_loss_and_grad


def brute_force_gamma(l: np.ndarray, rho_min: float, steps: int = 200) -> float:
    """The largest gamma in [0, 1] with Kish ESS(w^gamma)/n >= rho_min, by bisection on Python
    sums (ESS(gamma)/n decreases in gamma)."""
    l = np.asarray(l, dtype=np.float64)

    def ratio(g):
        return brute_force_ess(np.exp(g * (l - l.max()))) / l.size

    if ratio(1.0) >= rho_min:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ratio(mid) >= rho_min else (lo, mid)
    return lo


def heavy_log_weights(n=512, seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(0.0, scale, n)


def test_step_gamma_is_the_largest_feasible_gamma_of_the_whole_step(xp):
    l = heavy_log_weights()
    gamma, metrics = isr.step_gamma(xp.asarray(l), 0.3)
    g = to_numpy(gamma)
    assert g.shape == (512,) and np.all(g == g[0])
    want = brute_force_gamma(l, 0.3)
    assert 0.0 < want < 1.0  # the search is not at a bound
    np.testing.assert_allclose(g[0], want, atol=1e-9)
    w = np.exp(want * (l - l.max()))
    np.testing.assert_allclose(to_numpy(metrics["ess_ratio"]), brute_force_ess(w) / 512, rtol=1e-8)
    np.testing.assert_allclose(
        to_numpy(metrics["ess_ratio_pooled"]), to_numpy(metrics["ess_ratio"])
    )
    np.testing.assert_allclose(to_numpy(metrics["gamma"]), want, atol=1e-9)
    np.testing.assert_allclose(to_numpy(metrics["sigma2"]), np.var(l, ddof=1), rtol=1e-10)
    w1 = np.exp(l - l.max())
    np.testing.assert_allclose(to_numpy(metrics["max_weight"]), w1.max() / w1.sum(), rtol=1e-10)


def test_step_gamma_per_group_by_index_not_by_position(xp):
    rng = np.random.default_rng(1)
    n, G = 240, 6
    ids = rng.permutation(np.arange(n) % G)  # groups scattered over the step
    scales = np.array([0.3, 1.0, 2.0, 3.0, 0.1, 1.5])
    l = rng.normal(0.0, 1.0, n) * scales[ids]
    gamma, metrics = isr.step_gamma(xp.asarray(l), 0.3, group_ids=xp.asarray(ids), num_groups=G)
    g = to_numpy(gamma)
    want = np.array([brute_force_gamma(l[ids == k], 0.3) for k in range(G)])
    np.testing.assert_allclose(g, want[ids], atol=1e-9)
    np.testing.assert_allclose(to_numpy(metrics["gamma"]), want.mean(), atol=1e-9)
    ratios = [brute_force_ess(np.exp(want[k] * l[ids == k])) / np.sum(ids == k) for k in range(G)]
    np.testing.assert_allclose(to_numpy(metrics["ess_ratio"]), np.mean(ratios), rtol=1e-8)
    pooled = brute_force_ess(np.exp(g * l - np.max(g * l))) / n
    np.testing.assert_allclose(to_numpy(metrics["ess_ratio_pooled"]), pooled, rtol=1e-8)
    # Reordering the units (as a load balancer or a shuffle does) reorders the gammas only.
    perm = rng.permutation(n)
    g_perm, _ = isr.step_gamma(
        xp.asarray(l[perm]), 0.3, group_ids=xp.asarray(ids[perm]), num_groups=G
    )
    np.testing.assert_allclose(to_numpy(g_perm), g[perm], rtol=1e-12)  # sums reordered


def test_step_gamma_mask_removes_units():
    l = heavy_log_weights(300, seed=2)
    keep = np.random.default_rng(3).random(300) < 0.7
    poisoned = np.where(keep, l, 50.0)  # masked units hold a weight that would dominate
    gamma, metrics = isr.step_gamma(poisoned, 0.3, mask=keep)
    np.testing.assert_allclose(gamma, brute_force_gamma(l[keep], 0.3), atol=1e-9)
    _, ref_metrics = isr.step_gamma(l[keep], 0.3)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("grouped", [False, True])
def test_step_gamma_over_shards_equals_one_process(grouped):
    rng = np.random.default_rng(4)
    n, G = 96, 4
    l = rng.normal(0.0, 2.0, n)
    ids = rng.integers(0, G, n)  # every group spread over every shard
    mask = rng.random(n) < 0.9
    kwargs = {"group_ids": ids, "num_groups": G} if grouped else {}
    whole_g, whole_m = isr.step_gamma(l, 0.3, mask=mask, **kwargs)
    cuts = [30, 71]
    parts = [np.split(a, cuts) for a in (l, ids, mask)]

    def step(shard, reducer):
        sl, sids, smask = shard
        extra = {"group_ids": sids, "num_groups": G} if grouped else {}
        return isr.step_gamma(sl, 0.3, mask=smask, reducer=reducer, **extra)

    results = run_sharded(step, list(zip(*parts, strict=True)))
    np.testing.assert_allclose(np.concatenate([g for g, _ in results]), whole_g, atol=1e-12)
    for _, metrics in results:
        for name, value in whole_m.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-12, err_msg=name)


def test_step_gamma_pareto_methods_report_k_hat():
    l = np.random.default_rng(5).standard_t(2, 400)
    gamma, metrics = isr.step_gamma(l, 0.3, method="psis")
    np.testing.assert_allclose(gamma, isr.select_gamma(l, 0.3, method="psis"))
    np.testing.assert_allclose(metrics["k_hat"], isr.gamma_psis(l, 0.3)[1])
    with pytest.raises(ValueError, match="whole sample on one process"):
        isr.step_gamma(l, 0.3, method="psis", reducer=object())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"group_ids": np.zeros(8, dtype=np.int64)}, TypeError, "needs num_groups"),
        ({"num_groups": 2}, TypeError, "without group_ids"),
        ({"group_ids": np.full(8, 2), "num_groups": 2}, ValueError, r"lie in \[0, num_groups\)"),
        ({"group_ids": np.zeros(8), "num_groups": 1}, TypeError, "integer dtype"),
        ({"group_ids": np.zeros(7, dtype=int), "num_groups": 1}, ValueError, "one group index"),
        ({"group_ids": np.zeros(8, dtype=int), "num_groups": 0}, ValueError, "positive int"),
        ({"method": "median"}, ValueError, "method must be one of"),
        ({"rho_min": 0.0}, ValueError, "rho_min"),
    ],
)
def test_step_gamma_errors(kwargs, error, message):
    kwargs = {"rho_min": 0.3, **kwargs}
    with pytest.raises(error, match=message):
        isr.step_gamma(np.zeros(8), **kwargs)


def test_step_gamma_rejects_two_dimensional_weights():
    with pytest.raises(ValueError, match="1-d array of unit log weights"):
        isr.step_gamma(np.zeros((2, 4)), 0.3)


# --- the loss with a precomputed gamma -----------------------------------------------------


@pytest.mark.parametrize("level", ["sequence", "geometric", "token"])
def test_array_gamma_gives_the_same_loss_as_the_number(xp, level):
    logp, logq, rewards, mask = make_batch(7, B=6, T=5)
    args = [xp.asarray(a) for a in (logp, logq, rewards, mask)]
    by_number = is_reshape_loss_and_grad(*args, gamma=0.37, level=level)
    shapes = [(), (6,)] + ([(6, 5)] if level == "token" else [])
    for shape in shapes:
        gamma = xp.asarray(np.full(shape, 0.37))
        loss, grad, metrics = is_reshape_loss_and_grad(*args, gamma=gamma, level=level)
        np.testing.assert_array_equal(to_numpy(loss), to_numpy(by_number[0]))
        np.testing.assert_array_equal(to_numpy(grad), to_numpy(by_number[1]))
        for name, value in by_number[2].items():
            np.testing.assert_allclose(to_numpy(metrics[name]), to_numpy(value), rtol=1e-14)


def per_sequence_reference(logp, logq, rewards, mask, gammas, level, mode):
    """The loss with one gamma per sequence: the fixed-gamma loop of test_loss, row by row,
    with the row's share of the aggregation normaliser."""
    total = 0.0
    for b, g in enumerate(gammas):
        # Every other row's rewards set to 0 leaves row b's terms with the batch's normaliser.
        r = np.zeros_like(rewards)
        r[b] = rewards[b]
        total += reference_loss(logp, logq, r, mask, float(g), level, mode)
    return total


@pytest.mark.parametrize("level", ["sequence", "geometric", "token"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_per_sequence_gamma_matches_loops_and_finite_differences(xp, level, mode):
    logp, logq, rewards, mask = make_batch(8, B=5, T=4)
    gammas = np.array([0.0, 0.25, 0.5, 0.9, 1.0])
    args = [xp.asarray(a) for a in (logp, logq, rewards, mask)]
    loss, grad, _ = is_reshape_loss_and_grad(
        *args, gamma=xp.asarray(gammas), level=level, loss_agg_mode=mode
    )
    want = per_sequence_reference(logp, logq, rewards, mask, gammas, level, mode)
    np.testing.assert_allclose(to_numpy(loss), want, rtol=1e-12)
    eps = 1e-6
    fd = np.zeros_like(logp)
    for b, t in zip(*np.nonzero(mask), strict=True):
        up, down = logp.copy(), logp.copy()
        up[b, t] += eps
        down[b, t] -= eps
        plus = per_sequence_reference(up, logq, rewards, mask, gammas, level, mode)
        minus = per_sequence_reference(down, logq, rewards, mask, gammas, level, mode)
        fd[b, t] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(to_numpy(grad), fd, atol=1e-7)
    assert np.all(to_numpy(grad)[~mask] == 0.0)


def test_step_gamma_reaches_every_micro_batch():
    """The step's gamma, sliced per micro-batch, gives every micro-batch the same gamma; the sum
    of the micro-batch losses (global normaliser) is the loss of the whole step."""
    logp, logq, rewards, mask = make_batch(9, B=16, T=6)
    logq = logq + np.random.default_rng(9).normal(0, 1.5, logq.shape)
    l = isr.log_weights(logp, logq, mask)
    gamma, step_metrics = isr.step_gamma(l, 0.3, mask=mask.any(axis=1))
    whole = is_reshape_loss_and_grad(
        logp, logq, rewards, mask, gamma=gamma, loss_agg_mode="seq-mean-token-sum"
    )
    total = 0.0
    for rows in np.split(np.arange(16), 4):
        loss, _, metrics = is_reshape_loss_and_grad(
            logp[rows],
            logq[rows],
            rewards[rows],
            mask[rows],
            gamma=gamma[rows],
            loss_agg_mode="seq-mean-token-sum",
        )
        np.testing.assert_allclose(metrics["gamma"], step_metrics["gamma"], rtol=1e-14)
        total += loss * len(rows) / 16
    np.testing.assert_allclose(total, whole[0], rtol=1e-12)
    assert step_metrics["ess_ratio_pooled"] >= 0.3 * (1 - 1e-12)


def test_array_gamma_over_shards_reports_the_whole_batch():
    logp, logq, rewards, mask = make_batch(10, B=8, T=5)
    gammas = np.linspace(0.2, 0.9, 8)
    kwargs = {"level": "sequence", "loss_agg_mode": "token-mean"}
    loss, grad, metrics = is_reshape_loss_and_grad(
        logp, logq, rewards, mask, gamma=gammas, **kwargs
    )
    valid = mask.any(axis=1)
    np.testing.assert_allclose(metrics["gamma"], gammas[valid].mean(), rtol=1e-14)
    shards = list(
        zip(*(np.split(a, [3]) for a in (logp, logq, rewards, mask, gammas)), strict=True)
    )

    def step(shard, reducer):
        *data, g = shard
        return is_reshape_loss_and_grad(*data, gamma=g, reducer=reducer, **kwargs)

    assert_shards_match_whole(run_sharded(step, shards), loss, grad, metrics)


@pytest.mark.parametrize(
    ("gamma", "kwargs", "error", "message"),
    [
        (np.full(3, 0.5), {}, ValueError, r"shape \(\) or \(B,\)"),
        (np.full((6, 5), 0.5), {}, ValueError, r"for level='sequence'"),
        (np.array([0.5, 1.5, 0, 0, 0, 0]), {}, ValueError, r"gamma must lie in \[0, 1\]"),
        (np.array([0.5, np.nan, 0, 0, 0, 0]), {}, ValueError, r"gamma must lie in \[0, 1\]"),
        (np.full(6, 0.5), {"group_size": 2}, ValueError, "pass group_size=None"),
        (np.full(6, 1), {}, TypeError, "real floating dtype"),
        (1.5, {}, ValueError, r"gamma must lie in \[0, 1\]"),
    ],
)
def test_array_gamma_errors(gamma, kwargs, error, message):
    logp, logq, rewards, mask = make_batch(11, B=6, T=5)
    with pytest.raises(error, match=message):
        is_reshape_loss_and_grad(logp, logq, rewards, mask, gamma=gamma, **kwargs)


def test_array_gamma_of_another_library_is_an_error():
    torch = pytest.importorskip("torch")
    logp, logq, rewards, mask = make_batch(12, B=6, T=5)
    with pytest.raises(TypeError, match="array of logp's library"):
        is_reshape_loss_and_grad(
            logp, logq, rewards, mask, gamma=torch.full((6,), 0.5, dtype=torch.float64)
        )


# --- tempered weights ----------------------------------------------------------------------


def test_tempered_weights_match_exp_and_stay_finite(xp):
    l = np.array([[0.0, -1.0, 3.0, -np.inf], [2.0, 0.5, -0.25, 1.0]])
    g = np.array([[0.5], [1.0]])
    mask = np.array([[True, True, True, True], [True, False, True, True]])
    out = to_numpy(isr.tempered_weights(xp.asarray(l), xp.asarray(g), mask=xp.asarray(mask)))
    want = np.array(
        [
            [math.exp(0.5 * v) if v > -np.inf else 0.0 for v in l[0]],
            [math.exp(v) if m else 0.0 for v, m in zip(l[1], mask[1], strict=True)],
        ]
    )
    np.testing.assert_allclose(out, want, rtol=1e-15)
    big = to_numpy(isr.tempered_weights(xp.asarray(np.array([1e4, 700.0])), 1.0))
    assert np.all(np.isfinite(big)) and big[0] > 1e307
    np.testing.assert_allclose(big[1], math.exp(700.0), rtol=1e-15)


def test_tempered_weights_float32_cap_and_errors():
    out = isr.tempered_weights(np.array([100.0, 88.0, -5.0], dtype=np.float32), 1.0)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1:], np.exp(np.array([88.0, -5.0], dtype=np.float32)))
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        isr.tempered_weights(np.zeros(3), 2.0)
    with pytest.raises(ValueError, match="NaN or"):
        isr.tempered_weights(np.array([0.0, np.nan]), 0.5)


@pytest.mark.parametrize("gamma", [0.0, 0.37, 1.0, "ess", "closed_form"])
def test_loss_metrics_agree_with_the_public_statistics(xp, gamma):
    """The loss's weight metrics against independent float64 sums over the unit weights, and its
    ess_ratio equal to ess_ratio() of the same weights at the chosen gamma (one shift by the max:
    the same exponents as gamma_ess, so the chosen gamma meets rho_min in the reported metric)."""
    logp, logq, rewards, mask = make_batch(11, B=9, T=6)
    args = [xp.asarray(a) for a in (logp, logq, rewards, mask)]
    _, _, metrics = is_reshape_loss_and_grad(*args, gamma=gamma, rho_min=0.6)
    l = np.where(mask, logp - logq, 0.0).sum(axis=-1)
    g = float(to_numpy(metrics["gamma"]))
    w = np.exp(l - l.max())
    np.testing.assert_allclose(to_numpy(metrics["sigma2"]), np.var(l, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(metrics["max_weight"]), w.max() / w.sum(), rtol=1e-12)
    at_1 = brute_force_ess(w) / l.size
    np.testing.assert_allclose(to_numpy(metrics["ess_ratio_at_1"]), at_1, rtol=1e-12)
    public = isr.ess_ratio(xp.asarray(l), g)
    np.testing.assert_allclose(to_numpy(metrics["ess_ratio"]), to_numpy(public), rtol=1e-15)
    if gamma == "ess" and g < 1.0:
        assert to_numpy(metrics["ess_ratio"]) >= 0.6


@pytest.mark.parametrize("gamma", [0.37, "ess", "precomputed"])
@pytest.mark.parametrize("group_size", [None, 4])
def test_token_metrics_of_many_units_agree_with_float64_sums(xp, gamma, group_size):
    """Beyond the few units whose exponents the metrics stack (here 8192 tokens; the exponents
    at gamma and at 1 one by one, the squares as dot products), the metrics against Python
    sums over each group's token weights, averaged over the groups as the loss reports them."""
    if group_size is not None and gamma == "precomputed":
        pytest.skip("a precomputed gamma is not combined with group_size")
    logp, logq, rewards, mask = make_batch(5, B=8, T=1024, spread=0.4)
    args = [xp.asarray(a) for a in (logp, logq, rewards, mask)]
    given = (
        xp.asarray(np.linspace(0.2, 0.9, 8 * 1024).reshape(8, 1024))
        if gamma == "precomputed"
        else gamma
    )
    _, _, metrics = is_reshape_loss_and_grad(
        *args, gamma=given, level="token", group_size=group_size
    )
    l = np.where(mask, logp - logq, 0.0)
    rows = 1 if group_size is None else 8 // group_size
    unit_g = np.broadcast_to(np.linspace(0.2, 0.9, 8 * 1024).reshape(8, 1024), l.shape)
    want = {k: [] for k in ("ess_ratio", "ess_ratio_at_1", "sigma2", "max_weight", "gamma")}
    for row in range(rows):
        part = slice(row * 8 // rows, (row + 1) * 8 // rows)
        valid = mask[part]
        lv = l[part][valid]
        if gamma == "precomputed":
            g = unit_g[part][valid]
        else:
            g = float(to_numpy(metrics["gamma"])) if rows == 1 else None
            if g is None:  # per group: the group's own gamma, chosen as for the whole batch
                g = _group_gamma(lv, gamma)
        w_g, w_1 = np.exp(g * (lv - lv.max())), np.exp(lv - lv.max())
        want["ess_ratio"].append(brute_force_ess(w_g) / lv.size)
        want["ess_ratio_at_1"].append(brute_force_ess(w_1) / lv.size)
        want["sigma2"].append(np.var(lv, ddof=1))
        want["max_weight"].append(w_1.max() / sum(float(v) for v in w_1))
        want["gamma"].append(np.mean(g))
    for name, values in want.items():
        reduce = max if name == "max_weight" else np.mean
        got = to_numpy(metrics[name])
        np.testing.assert_allclose(got, reduce(values), rtol=1e-9, err_msg=name)


def _group_gamma(l: np.ndarray, gamma):
    """A group's gamma as the loss chooses it: the fixed number, or the ESS search's."""
    return gamma if isinstance(gamma, float) else brute_force_gamma(l, 0.3)


@pytest.mark.parametrize("spread", [1e3, 1e15, 1e18, 1e19, 3e19, 1e30])
def test_loss_sigma2_is_inf_only_where_the_variance_exceeds_float32(xp, spread):
    """Float32 unit log weights of every spread: sigma2 against the float64 variance (finite
    and within float32 rounding, or +inf exactly where the variance exceeds float32)."""
    l = np.array([0.0, -spread, -0.5 * spread, 0.25 * spread], dtype=np.float32)
    args = [xp.asarray(a) for a in (l, np.zeros(4, np.float32), np.ones(4, np.float32))]
    _, _, metrics = is_reshape_loss_and_grad(*args, gamma=0.5)
    want = np.var(l.astype(np.float64), ddof=1)
    got = float(to_numpy(metrics["sigma2"]))
    if want > np.finfo(np.float32).max:
        assert got == np.inf
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spread", [0.4, 1.3])  # gamma_max passes the test, or the search runs
@pytest.mark.parametrize("gamma_max", [1.0, 0.7])
def test_search_sums_give_the_metrics_of_the_metrics_pass(
    xp, monkeypatch, dtype, spread, gamma_max
):
    """The token-level default search hands the metrics Kish's sums at the gamma and at 1
    where its passes tested both (``gamma_max = 1``), and the metrics skip their own pass over
    the weights: the metrics are that pass's to rounding (the loss and gradient bit for bit),
    and ``ess_ratio`` is the independent :func:`isreshape_core.ess_ratio` at the gamma."""
    import isreshape_core._loss as loss_module
    import isreshape_core._step as step_module
    from isreshape_core._gamma import Searched

    logp, logq, rewards, mask = make_batch(9, B=8, T=1024, spread=spread)
    args = [xp.asarray(a.astype(dtype) if a.dtype != bool else a) for a in (logp, logq, rewards)]
    args.append(xp.asarray(mask))
    options = {"level": "token", "gamma_max": gamma_max}
    passes, original = [], step_module._tempered_sums
    monkeypatch.setattr(step_module, "_tempered_sums", lambda *a: passes.append(1) or original(*a))
    loss, grad, metrics = is_reshape_loss_and_grad(*args, **options)
    reused = not passes
    assert reused == (gamma_max == 1.0)
    search = loss_module.ess_gamma_of_shifted
    monkeypatch.setattr(loss_module, "ess_gamma_of_shifted", lambda *a: Searched(search(*a).gamma))
    loss_p, grad_p, own = is_reshape_loss_and_grad(*args, **options)
    assert passes  # the metrics' own pass
    np.testing.assert_array_equal(to_numpy(loss_p), to_numpy(loss))
    np.testing.assert_array_equal(to_numpy(grad_p), to_numpy(grad))
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    for name in ("gamma", "ess_ratio", "ess_ratio_at_1", "max_weight", "sigma2"):
        np.testing.assert_allclose(
            to_numpy(metrics[name]), to_numpy(own[name]), rtol=rtol, err_msg=name
        )
    l = np.where(mask, logp - logq, -np.inf)[mask]
    want = isr.ess_ratio(l, float(to_numpy(metrics["gamma"])))
    np.testing.assert_allclose(to_numpy(metrics["ess_ratio"]), want, rtol=rtol)
    assert float(to_numpy(metrics["gamma"])) < (1.0 if spread > 1 else 1.1)
