"""Tests of ``isreshape demo`` and the bandit behind it (isreshape_cli.bandit, isreshape_cli.demo).

The training step is checked against a brute-force reference: the same draws, arms picked by a
per-sample ``searchsorted``, each method's batch surrogate written out term by term in Python, and
its gradient taken by central finite differences.
"""

from __future__ import annotations

import argparse
import io
import math

import numpy as np
import pytest

from isreshape_cli import bandit as B
from isreshape_cli.demo import parse_staleness, run_demo
from isreshape_cli.main import main

METHOD = {m.key: m for m in B.METHODS}


def _log_softmax(z):
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _kish(v):
    return sum(v) ** 2 / sum(x * x for x in v) / len(v)


def _bisect_gamma(l, rho=0.3):
    """Largest gamma in [0, 1] with Kish ESS(w^gamma)/n >= rho, by 80 bisection steps."""
    if _kish([math.exp(x) for x in l]) >= rho:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        m = max(l)
        if _kish([math.exp(mid * (x - m)) for x in l]) >= rho:
            lo = mid
        else:
            hi = mid
    return lo


def _reference_gamma(rule, l):
    if isinstance(rule, float):
        return rule
    if rule == "ess":
        return _bisect_gamma(l)
    if rule == "closed_form":
        var = np.var(l, ddof=1)
        return 1.0 if var == 0 else min(1.0, math.sqrt(-math.log(0.3) / var))
    if rule == "psis":  # fewer than 25 samples: no tail to fit, the exact ESS gamma of raw l
        return _bisect_gamma(l)
    raise AssertionError(rule)


def _reference_run(method, bandit, lr, steps, staleness, n_groups, group_size):
    """Brute force: per-sample loops, finite-difference gradients of the written-out surrogate."""
    n_ctx, n_arms = bandit.rewards.shape[1:]
    rewards = bandit.rewards[0]
    theta = bandit.init_logits[0].copy()
    rng = np.random.default_rng([bandit.seeds[0], 1])
    ctx_draws = rng.integers(0, n_ctx, (steps, n_groups))
    u_draws = rng.random((steps, n_groups * group_size))
    gammas = []
    for t in range(steps):
        if t == 0 or (staleness is not None and t % staleness == 0):
            mu = np.exp(_log_softmax(theta))
        xs, arms = [], []
        for i in range(n_groups * group_size):
            x = ctx_draws[t, i // group_size]
            cdf = np.cumsum(mu[x])
            xs.append(x)
            arms.append(min(int(np.searchsorted(cdf, u_draws[t, i] * cdf[-1])), n_arms - 1))
        r = np.array([rewards[x, a] for x, a in zip(xs, arms, strict=True)])
        adv = r - np.repeat(r.reshape(n_groups, group_size).mean(axis=1), group_size)
        signal = adv if method.signal == "advantage" else r

        def log_ratios(th, xs=xs, arms=arms, mu=mu):
            lp = _log_softmax(th)
            return np.array([lp[x, a] - math.log(mu[x, a]) for x, a in zip(xs, arms, strict=True)])

        l0 = log_ratios(theta)
        gamma = _reference_gamma(method.rule, list(l0)) if method.kind == "isreshape" else None
        gammas.append(gamma)
        w0 = np.exp(l0)

        def surrogate(th, gamma=gamma, w0=w0, signal=signal, adv=adv, log_ratios=log_ratios):
            l = log_ratios(th)
            total = 0.0
            for i in range(len(l)):
                w = math.exp(l[i])
                if method.kind == "isreshape":
                    g = gamma
                    total += signal[i] * (l[i] if g == 0 else math.expm1(g * l[i]) / g)
                elif method.kind == "ppo":
                    clipped = min(max(w, 1 - B.PPO_EPS), 1 + B.PPO_EPS)
                    total += min(w * adv[i], clipped * adv[i])
                else:  # truncated IS: stop_grad(min(w, 2)) * A * log pi; log pi = l + const
                    total += min(w0[i], B.TIS_CAP) * adv[i] * l[i]
            return total / len(l)

        grad = np.zeros_like(theta)
        eps = 1e-6
        for x in range(n_ctx):
            for a in range(n_arms):
                up, down = theta.copy(), theta.copy()
                up[x, a] += eps
                down[x, a] -= eps
                grad[x, a] = (surrogate(up) - surrogate(down)) / (2 * eps)
        theta = theta + lr * grad
    return theta, gammas


@pytest.mark.parametrize(
    "key", ["sft", "is_pg", "fixed_0.5", "closed_form", "ess", "psis", "ess_adv", "ppo_clip", "tis"]
)
@pytest.mark.parametrize("staleness", [None, 2])
def test_training_step_matches_finite_differences(key, staleness):
    method = METHOD[key]
    bandit = B.make_bandit([3], n_contexts=3, n_arms=4)
    kwargs = {"steps": 4, "staleness": staleness, "n_groups": 2, "group_size": 3}
    result = B.simulate(method, bandit, lrs=[3.0], record_khat=False, **kwargs)
    ref_theta, ref_gamma = _reference_run(method, bandit, 3.0, **kwargs)
    np.testing.assert_allclose(result.logits[0], ref_theta, atol=1e-6)
    if method.kind == "isreshape":
        np.testing.assert_allclose(result.gamma[0], ref_gamma, atol=1e-6)
    else:
        assert np.isnan(result.gamma).all()


def test_regret_is_the_exact_sum_over_arms():
    bandit = B.make_bandit([5, 6], n_contexts=3, n_arms=4)
    logits = np.random.default_rng(0).normal(size=(2, 3, 4))
    got = bandit.regret(logits, np.array([0, 1]))
    for s in range(2):
        value, best = 0.0, 0.0
        for x in range(3):
            z = [math.exp(v) for v in logits[s, x]]
            value += sum(zi / sum(z) * bandit.rewards[s, x, a] for a, zi in enumerate(z)) / 3
            best += max(bandit.rewards[s, x]) / 3
        assert got[s] == pytest.approx(best - value, abs=1e-12)


def test_bandit_rewards_are_positive_and_seeded():
    a = B.make_bandit([0, 1])
    b = B.make_bandit([1])
    assert a.rewards.shape == (2, 20, 50)
    assert (a.rewards > 0.05 - 1e-12).all() and (a.rewards <= 1.0).all()
    np.testing.assert_array_equal(a.rewards[1], b.rewards[0])  # a seed's table is its own
    assert not np.allclose(a.rewards[0], a.rewards[1])


def test_runs_are_independent_of_their_batch_mates():
    """The vectorised run of seeds x learning rates equals each run on its own."""
    method = METHOD["ess"]
    kw = {"steps": 6, "staleness": 3, "record_khat": False}
    both = B.simulate(method, B.make_bandit([0, 1], 4, 6), lrs=[3.0, 30.0], **kw)
    for row, (seed, lr) in enumerate([(0, 3.0), (0, 30.0), (1, 3.0), (1, 30.0)]):
        alone = B.simulate(method, B.make_bandit([seed], 4, 6), lrs=[lr], **kw)
        np.testing.assert_allclose(both.regret[row], alone.regret[0], rtol=1e-12, atol=1e-14)


def test_tuning_picks_the_best_learning_rate_on_the_tuning_seeds_only():
    method = METHOD["sft"]
    lrs = (1.0, 10.0, 100.0)
    tuned = B.tune_and_evaluate(method, [7, 8], [9], lrs=lrs, steps=5, staleness=2, window=1)
    alone = {
        lr: B.simulate(method, B.make_bandit([7, 8]), lrs=[lr], steps=5, staleness=2) for lr in lrs
    }
    scores = {lr: res.regret[:, -1].mean() for lr, res in alone.items()}
    assert tuned.lr == min(scores, key=scores.get)
    for lr in lrs:
        assert tuned.tuning_regret[lr] == pytest.approx(scores[lr], rel=1e-12)
    evaluation = B.simulate(method, B.make_bandit([9]), lrs=[tuned.lr], steps=5, staleness=2)
    np.testing.assert_allclose(tuned.runs.regret, evaluation.regret, rtol=1e-12)


def test_on_policy_updates_see_unit_weights():
    """Right after a refresh pi = mu, so every weight is 1 and ESS/n = 1 for every method."""
    for key in ("is_pg", "ppo_clip", "tis"):
        res = B.simulate(METHOD[key], B.make_bandit([0], 3, 5), lrs=[10.0], steps=5, staleness=1)
        np.testing.assert_allclose(res.ess, 1.0, rtol=1e-12)


def test_kish_ratio():
    v = np.array([[1.0, 1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(B.kish_ratio(v), [64 / 22 / 4, 0.0, 0.25])


@pytest.mark.parametrize("rule", ["tail", "combined"])
def test_pareto_rules_are_reachable(rule):
    l = np.random.default_rng(0).standard_t(3, size=(3, 400))
    gamma = B.gamma_by_rule(l, rule)
    assert gamma.shape == (3,) and ((gamma >= 0) & (gamma <= 1)).all()
    if rule == "combined":  # never above the exact-ESS rule
        for row, g in zip(l, gamma, strict=True):
            assert g <= _bisect_gamma(list(row)) + 1e-9


def test_gamma_by_rule_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown gamma rule"):
        B.gamma_by_rule(np.zeros((1, 4)), "psi")


def test_simulate_rejects_bad_staleness():
    with pytest.raises(ValueError, match="staleness"):
        B.simulate(METHOD["sft"], B.make_bandit([0]), lrs=[1.0], steps=1, staleness=0)


def test_parse_staleness():
    assert parse_staleness("never") is None
    assert parse_staleness(" Never ") is None
    assert parse_staleness("4") == 4
    for bad in ("0", "-3", "often"):
        with pytest.raises(argparse.ArgumentTypeError, match="--staleness"):
            parse_staleness(bad)


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--staleness", "0"])
    assert info.value.code == 2
    assert "--staleness must be >= 1" in capsys.readouterr().err
    assert main([]) == 2  # no sub-command: help, exit status 2
    assert "demo" in capsys.readouterr().out


def test_demo_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    stream = io.StringIO()
    results, table = run_demo(seed=1, staleness=None, out=out, steps=3, stream=stream)
    text = stream.getvalue()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r.method.key for r in results] == [m.key for m in B.METHODS]
    for m in B.METHODS:
        assert f"| {m.label} |" in table
        assert m.label in text  # progress lines
    assert "Done in" in text
    # The table's J(pi) is the exact expected reward of the final evaluation policy.
    bandit = B.make_bandit([1])
    for res, line in zip(results, table.splitlines()[2:], strict=True):
        j = float(line.split("|")[3])
        pi = np.exp(_log_softmax(res.runs.logits[0]))
        assert j == pytest.approx(float((pi * bandit.rewards[0]).sum(-1).mean()), abs=1e-4)
        assert res.lr in B.LR_GRID


def test_main_runs_the_demo(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "d.png"
    assert main(["demo", "--seed", "2", "--staleness", "4", "--steps", "2", "--out", str(out)]) == 0
    assert out.exists()
    assert "Learning curves written to" in capsys.readouterr().out
