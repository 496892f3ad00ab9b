"""A finite-support contextual bandit and the training methods compared by the demo and experiments.

The setting (used by ``isreshape demo`` and ``benchmarks/experiments/exp3_staleness.py``):

- ``n_contexts`` contexts (uniform) x ``n_arms`` arms, a fixed reward table
  ``r(x, a) = 0.05 + 0.95·u^4``, ``u ~ Uniform(0, 1)``: positive (so that reward-weighted SFT,
  gamma = 0, has a well-defined target ``mu·r/Z``) and sparse at the top (a few good arms per
  context);
- a tabular softmax policy ``pi_theta(a|x) = softmax(theta[x])``, started from random
  "pretrained" logits ``theta_0 ~ Normal(0, 1)`` that know nothing about the reward;
- every update draws ``n_groups`` contexts and ``group_size`` arms for each (GRPO-shaped
  batches, ``B = n_groups·group_size`` samples) from the *behaviour* policy ``mu``, which is a
  copy of ``pi_theta`` refreshed only every ``staleness`` updates (``None``: never, so ``mu``
  stays ``pi_theta_0`` and the data are a fixed logging policy's). Fresh samples are drawn at
  every update, from the stale ``mu``, as in asynchronous RL where the sampler lags the trainer;
- one plain gradient-ascent step on the logits per update, ``theta += lr·g``, with ``g`` the
  exact gradient of the method's batch surrogate with respect to the logits; the regret is the
  exact ``J* - J(pi)``, ``J(pi) = mean_x sum_a pi(a|x) r(x, a)`` (a sum over arms, not sampled).

What each method maximises on a batch of samples ``(x_i, a_i)``, ``l_i = log pi - log mu``,
``w_i = exp(l_i)``, ``r_i`` the reward and ``A_i = r_i - mean of r over the sample's group``:

========================  =============================================================
``sft`` (gamma 0)          ``mean(r_i · l_i)`` = reward-weighted SFT, ``L_0``
``is_pg`` (gamma 1)        ``mean(r_i · (w_i - 1))`` = importance-sampled PG, ``L_1``
``fixed_0.5``              ``L_0.5 = mean(r_i · expm1(0.5·l_i) / 0.5)``
``closed_form``            ``L_gamma``, gamma = the closed-form rule (rho_min = 0.3)
``ess``                    ``L_gamma``, gamma = the exact empirical-ESS rule (rho_min = 0.3)
``psis``                   ``L_gamma``, gamma = PSIS rule (rho_min = 0.3, fallback 0.3)
``ess_adv``                ``L_gamma`` on the advantages ``A_i``, gamma = exact-ESS rule
``ppo_clip``               ``mean(min(w_i A_i, clip(w_i, 0.8, 1.2) A_i))`` (PPO, eps 0.2)
``tis``                    ``mean(stop_grad(min(w_i, 2)) · A_i · log pi)`` (truncated IS)
========================  =============================================================

The IS Reshape family (the first six) uses the raw positive reward, as the loss is defined for
(:ref:`theory-objective`; its fixed point ``mu·r^(1/(1-gamma))`` needs ``r > 0``); PPO-clip and
truncated IS use the group-baseline advantage, as GRPO, verl and TRL use them (``ess_adv`` is the
exact-ESS rule on the same advantages, to separate the effect of the baseline). The gradient with
respect to the logits of context ``x`` is ``sum_i c_i (onehot(a_i) - pi(.|x))`` over the samples
of that context, with ``c_i`` the derivative of the surrogate with respect to ``log pi(a_i|x_i)``
(for ``L_gamma``: ``r_i w_i^gamma / B`` from :func:`isreshape_core.objective_grad`). The gamma
rules: :ref:`theory-closed-form`, :ref:`theory-gamma-ess`, :ref:`theory-pareto-gamma`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import isreshape_core as isr

__all__ = [
    "LR_GRID",
    "METHODS",
    "RHO_MIN",
    "Bandit",
    "Method",
    "RunResult",
    "Tuned",
    "final_regret",
    "gamma_by_rule",
    "kish_ratio",
    "log_softmax",
    "make_bandit",
    "simulate",
    "tune_and_evaluate",
]

#: Target ESS ratio of the adaptive rules.
RHO_MIN = 0.3
#: The learning-rate grid every method is tuned on (same grid for all).
LR_GRID = (3.0, 10.0, 30.0, 100.0, 300.0)
#: PPO's clip range and truncated IS's cap.
PPO_EPS = 0.2
TIS_CAP = 2.0


@dataclass(frozen=True)
class Method:
    """A training method: its key, a label for tables, and how it weights each sample."""

    key: str
    label: str
    kind: str  # "isreshape", "ppo" or "tis"
    rule: str | float | None = None  # gamma rule of the IS Reshape family
    signal: str = "reward"  # "reward" (raw r > 0) or "advantage" (r - group mean)


METHODS: tuple[Method, ...] = (
    Method("sft", "reward-weighted SFT (gamma 0)", "isreshape", 0.0),
    Method("is_pg", "IS policy gradient (gamma 1)", "isreshape", 1.0),
    Method("fixed_0.5", "fixed gamma 0.5", "isreshape", 0.5),
    Method("closed_form", "closed-form gamma", "isreshape", "closed_form"),
    Method("ess", "exact-ESS gamma (default)", "isreshape", "ess"),
    Method("psis", "PSIS gamma", "isreshape", "psis"),
    Method("ess_adv", "exact-ESS gamma, advantages", "isreshape", "ess", "advantage"),
    Method("ppo_clip", "PPO-clip (eps 0.2, advantages)", "ppo", signal="advantage"),
    Method("tis", "truncated IS (cap 2, advantages)", "tis", signal="advantage"),
)


def gamma_by_rule(log_w: np.ndarray, rule: str | float, rho_min: float = RHO_MIN) -> np.ndarray:
    """Gamma per row of ``log_w`` (samples on the last axis) by a rule name or a fixed number.

    Names are those of :func:`isreshape_core.select_gamma` (``"ess"``, ``"closed_form"``,
    ``"psis"``, ``"tail"``, ``"combined"``), each with its default options.
    """
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return np.full(log_w.shape[:-1], float(rule))
    if rule not in isr.GAMMA_METHODS:
        raise ValueError(
            f"unknown gamma rule {rule!r}; use a number in [0, 1] or one of {isr.GAMMA_METHODS}"
        )
    return np.asarray(isr.select_gamma(log_w, rho_min, method=rule))


def kish_ratio(v: np.ndarray) -> np.ndarray:
    """Kish ESS / n of non-negative weights ``v`` along the last axis (0 where all are 0)."""
    top = v.max(axis=-1, keepdims=True)
    s = v / np.where(top > 0, top, 1.0)
    s1, s2 = s.sum(axis=-1), (s * s).sum(axis=-1)
    return np.where(s2 > 0, s1 * s1 / np.where(s2 > 0, s2, 1.0), 0.0) / v.shape[-1]


@dataclass(frozen=True)
class Bandit:
    """Reward tables and initial logits of several seeds, shape ``(seeds, contexts, arms)``."""

    rewards: np.ndarray
    init_logits: np.ndarray
    seeds: tuple[int, ...]

    @property
    def optimum(self) -> np.ndarray:
        """``J* = mean_x max_a r(x, a)`` per seed."""
        return self.rewards.max(axis=-1).mean(axis=-1)

    def regret(self, logits: np.ndarray, seed_index: np.ndarray) -> np.ndarray:
        """Exact regret ``J* - J(pi)`` of ``softmax(logits)`` (runs, contexts, arms)."""
        pi = _softmax(logits)
        value = (pi * self.rewards[seed_index]).sum(axis=-1).mean(axis=-1)
        return self.optimum[seed_index] - value


def make_bandit(seeds: Sequence[int], n_contexts: int = 20, n_arms: int = 50) -> Bandit:
    """The reward table ``0.05 + 0.95·u^4`` and logits ``Normal(0, 1)`` of each seed.

    Examples
    --------
    >>> b = make_bandit([0, 1], n_contexts=3, n_arms=4)
    >>> b.rewards.shape, bool((b.rewards > 0).all())
    ((2, 3, 4), True)
    """
    rewards, logits = [], []
    for seed in seeds:
        rng = np.random.default_rng([int(seed), 0])
        rewards.append(0.05 + 0.95 * rng.random((n_contexts, n_arms)) ** 4)
        logits.append(rng.normal(0.0, 1.0, (n_contexts, n_arms)))
    return Bandit(np.stack(rewards), np.stack(logits), tuple(int(s) for s in seeds))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log softmax`` along the last axis (the policy's log-probabilities from its logits)."""
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


@dataclass
class RunResult:
    """Per-run traces of one :func:`simulate` call (runs = seeds x learning rates)."""

    method: Method
    seed_index: np.ndarray  # (R,)
    lr: np.ndarray  # (R,)
    regret: np.ndarray  # (R, steps + 1), exact, before the first and after every update
    gamma: np.ndarray  # (R, steps), NaN for PPO-clip and truncated IS
    ess: np.ndarray  # (R, steps), ESS/n of the weights the gradient applies
    k_hat: np.ndarray  # (R, steps), PSIS k_hat of the raw weights (NaN if not recorded)
    logits: np.ndarray  # (R, contexts, arms), the logits after the last update


def _coefficients(
    method: Method, l: np.ndarray, r: np.ndarray, adv: np.ndarray, rho_min: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(c, gamma, ESS/n)`` of one update: ``c_i`` the derivative of the method's surrogate
    with respect to ``log pi(a_i|x_i)``, the gamma (NaN outside the IS Reshape family) and the
    Kish ratio of the weights the gradient applies. ``l``, ``r``, ``adv``: ``(runs, B)``."""
    if method.kind == "isreshape":
        gamma = gamma_by_rule(l, method.rule, rho_min)
        signal = adv if method.signal == "advantage" else r
        coef = np.asarray(isr.objective_grad(l, signal, gamma))  # r w^gamma / B
        return coef, gamma, np.asarray(isr.ess_ratio(l, gamma))
    w = np.exp(l)
    if method.kind == "ppo":
        active = np.where(adv >= 0, w <= 1.0 + PPO_EPS, w >= 1.0 - PPO_EPS)
        applied = np.where(active, w, 0.0)
    else:
        applied = np.minimum(w, TIS_CAP)
    return applied * adv / l.shape[-1], np.full(l.shape[:-1], np.nan), kish_ratio(applied)


def simulate(
    method: Method,
    bandit: Bandit,
    *,
    lrs: Sequence[float],
    steps: int,
    staleness: int | None,
    n_groups: int = 16,
    group_size: int = 8,
    record_khat: bool = True,
    rho_min: float = RHO_MIN,
) -> RunResult:
    """Train one method on every (seed, learning rate) pair at once, vectorised over runs.

    The draws (contexts and the uniforms that pick arms by inverse CDF) depend only on the random
    seed and the step, so every method and learning rate sees the same random numbers (common random
    numbers), and the comparison between methods is paired.
    """
    if staleness is not None and (not isinstance(staleness, int) or staleness < 1):
        raise ValueError(f"staleness must be a positive int or None (never), got {staleness!r}")
    n_seeds, n_ctx, n_arms = bandit.rewards.shape
    seed_index = np.repeat(np.arange(n_seeds), len(lrs))
    lr = np.tile(np.asarray(lrs, dtype=float), n_seeds)
    runs = seed_index.size
    batch = n_groups * group_size

    ctx_draws, u_draws = [], []
    for seed in bandit.seeds:
        rng = np.random.default_rng([seed, 1])
        ctx_draws.append(rng.integers(0, n_ctx, (steps, n_groups)))
        u_draws.append(rng.random((steps, batch)))
    ctx_all = np.stack(ctx_draws)[seed_index]  # (R, steps, n_groups)
    u_all = np.stack(u_draws)[seed_index]  # (R, steps, B)

    rewards = bandit.rewards[seed_index]  # (R, X, A)
    theta = bandit.init_logits[seed_index].copy()
    run_ix = np.arange(runs)[:, None]
    regret = np.empty((runs, steps + 1))
    gammas = np.full((runs, steps), np.nan)
    ess = np.empty((runs, steps))
    k_hat = np.full((runs, steps), np.nan)
    regret[:, 0] = bandit.regret(theta, seed_index)

    for t in range(steps):
        if t == 0 or (staleness is not None and t % staleness == 0):
            mu_logp = log_softmax(theta)
            mu_cdf = np.cumsum(np.exp(mu_logp), axis=-1)
        ctx = np.repeat(ctx_all[:, t, :], group_size, axis=1)  # (R, B)
        cdf = mu_cdf[run_ix, ctx]  # (R, B, A)
        arm = np.minimum((cdf < u_all[:, t, :, None] * cdf[..., -1:]).sum(axis=-1), n_arms - 1)
        logp_all = log_softmax(theta)
        logp = logp_all[run_ix, ctx, arm]
        logq = mu_logp[run_ix, ctx, arm]
        l = logp - logq
        r = rewards[run_ix, ctx, arm]

        adv = r - r.reshape(runs, n_groups, group_size).mean(axis=-1).repeat(group_size, 1)
        coef, gammas[:, t], ess[:, t] = _coefficients(method, l, r, adv, rho_min)
        if record_khat:
            k_hat[:, t] = np.asarray(isr.psis(l)[1]) if batch >= 25 else np.inf

        flat = (run_ix * n_ctx + ctx) * n_arms + arm
        g = np.bincount(flat.ravel(), coef.ravel(), runs * n_ctx * n_arms)
        row = np.bincount((run_ix * n_ctx + ctx).ravel(), coef.ravel(), runs * n_ctx)
        grad = g.reshape(runs, n_ctx, n_arms) - row.reshape(runs, n_ctx, 1) * np.exp(logp_all)
        theta += lr[:, None, None] * grad
        regret[:, t + 1] = bandit.regret(theta, seed_index)
    return RunResult(method, seed_index, lr, regret, gammas, ess, k_hat, theta)


def final_regret(result: RunResult, window: int = 1) -> np.ndarray:
    """Mean regret over the last ``window`` recorded points, per run."""
    return result.regret[:, -window:].mean(axis=-1)


@dataclass
class Tuned:
    """A method's learning rate chosen on the tuning seeds, and its runs on the evaluation seeds."""

    method: Method
    lr: float
    tuning_regret: dict  # lr -> mean final regret on the tuning seeds
    runs: RunResult  # evaluation runs at the chosen lr (rows = evaluation seeds)


def _select_rows(result: RunResult, rows: np.ndarray) -> RunResult:
    return RunResult(
        result.method,
        result.seed_index[rows],
        result.lr[rows],
        result.regret[rows],
        result.gamma[rows],
        result.ess[rows],
        result.k_hat[rows],
        result.logits[rows],
    )


def tune_and_evaluate(
    method: Method,
    tune_seeds: Sequence[int],
    eval_seeds: Sequence[int],
    *,
    lrs: Sequence[float] = LR_GRID,
    steps: int,
    staleness: int | None,
    n_contexts: int = 20,
    n_arms: int = 50,
    record_khat: bool = True,
    window: int = 10,
) -> Tuned:
    """Pick the learning rate with the least final regret on ``tune_seeds``; report ``eval_seeds``.

    Both sets of seeds run in one vectorised :func:`simulate` call; the tuning criterion is the
    mean regret over the last ``window`` updates, averaged over the tuning seeds.
    """
    seeds = [*tune_seeds, *eval_seeds]
    bandit = make_bandit(seeds, n_contexts, n_arms)
    result = simulate(
        method, bandit, lrs=lrs, steps=steps, staleness=staleness, record_khat=record_khat
    )
    is_tune = result.seed_index < len(tune_seeds)
    score = final_regret(result, window)
    tuning = {lr: float(score[is_tune & (result.lr == lr)].mean()) for lr in lrs}
    best = min(lrs, key=lambda lr: (tuning[lr], lr))
    rows = np.flatnonzero(~is_tune & (result.lr == best))
    return Tuned(method, float(best), tuning, _select_rows(result, rows))
