"""Experiment 5: when does IS Reshape help? Every off-policy correction users run, on one bandit.

Usage: ``python benchmarks/experiments/exp5_when_to_use.py [--smoke] [--out DIR]``.

The bandit of :mod:`isreshape_cli.bandit` (20 contexts x 50 arms, positive rewards, batches of
16 contexts x 8 arms), trained for a fixed number of gradient updates, in these settings
(columns):

- ``fresh``: a new batch from the current policy every update;
- ``stale 4``, ``stale 16``: the sampler ``mu`` refreshed every 4 or 16 batches (asynchronous RL);
- ``logged``: ``mu`` never refreshed (a fixed logging policy's data);
- ``epochs 4``: every fresh batch reused for 4 updates (PPO epochs), so the proximal policy
  ``pi_prox`` (the policy when the batch arrived) differs from the current one;
- ``stale 4 x epochs 4``: both, so ``mu``, ``pi_prox`` and ``pi`` all differ;
- ``mismatch``: fresh batches, but the sampler's reported ``logq`` differs from the true
  log-probability of the arm it drew by per-sample noise ``N(0, 0.2^2)`` and, with probability
  2 %, a spike of ``+-4`` nats (the bf16 / inference-engine mismatch users report).

Methods (:data:`METHODS`): the IS Reshape rows of experiment 3, the two compositions of
:func:`isreshape_core.decoupled_ppo_loss_and_grad`, and the corrections users run. For each
(method, column) the learning rate is picked from :data:`LR_GRID` by the mean regret of the last
10 updates on the tuning seeds; the exact regret ``J* - J(pi)`` after the last update is
reported on the evaluation seeds. All methods see the same draws (common random numbers), so
differences between methods are paired per seed; for every column the paired difference between
each IS Reshape row and the best other method (least mean regret) has a bootstrap 90 % interval.
Writes ``exp5_when_to_use.{md,json}`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere in the repository
    sys.path.insert(0, str(ROOT))

import isreshape_core as isr  # noqa: E402
from isreshape_cli.bandit import (  # noqa: E402
    RHO_MIN,
    Bandit,
    _log_softmax,
    kish_ratio,
    make_bandit,
)

LR_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
PPO_EPS = 0.2  # PPO-clip, decoupled PPO, CISPO: verl's default clip_ratio
TIS_CAP = 2.0
ICEPOP_RANGE = (0.5, 2.0)
GSPO_EPS = (3e-4, 4e-4)  # GSPO's left and right clip ranges (arXiv 2507.18071, section 5.1)
M2_THRESHOLD = 0.04  # M2PO's tau_M2 (arXiv 2510.01161)
NOISE_SD, SPIKE_P, SPIKE_SIZE = 0.2, 0.02, 4.0


@dataclass(frozen=True)
class Setting:
    """A column: sampler refresh period in batches (None: never), updates per batch, mismatch."""

    name: str
    staleness: int | None
    epochs: int = 1
    mismatch: bool = False


SETTINGS = (
    Setting("fresh", 1),
    Setting("stale 4", 4),
    Setting("stale 16", 16),
    Setting("logged", None),
    Setting("epochs 4", 1, 4),
    Setting("stale 4 x epochs 4", 4, 4),
    Setting("mismatch", 1, 1, True),
)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    isreshape: bool  # an IS Reshape row (compared against the best other method)


METHODS = (
    Method("ess", "IS Reshape, exact-ESS gamma (reward)", True),
    Method("ess_adv", "IS Reshape, exact-ESS gamma (advantage)", True),
    Method("sft", "reward-weighted SFT (gamma 0)", True),
    Method("dppo_tempered", "decoupled PPO x (pi_prox/mu)^gamma, ESS gamma", True),
    Method("dppo_esscap", "decoupled PPO x min(pi_prox/mu, c), ESS cap", True),
    Method("ppo_clip", "PPO-clip on pi/mu (eps 0.2)", False),
    Method("dppo_tis", "decoupled PPO x min(pi_prox/mu, 2) (AReaL, verl)", False),
    Method("tis", "truncated IS (cap 2)", False),
    Method("icepop", "IcePop / MIS mask [0.5, 2]", False),
    Method("cispo", "CISPO (clip 0.8-1.2)", False),
    Method("gspo", "GSPO (length-normalised ratio, clip 3e-4/4e-4)", False),
    Method("m2po", "M2PO (second moment <= 0.04)", False),
    Method("vcpo", "VCPO-style: IS-PG, lr x ESS/n", False),
    Method("is_pg", "IS policy gradient (advantage)", False),
)


def _ppo_active(adv: np.ndarray, ratio: np.ndarray, low: float, high: float) -> np.ndarray:
    """Where PPO-clip's unclipped term is the active one (its gradient is ``ratio * A``):
    ``max(-A r, -A clip(r))`` picks ``-A r`` iff ``A r <= A clip(r)`` (verl's
    ``compute_policy_loss_vanilla``, without the dual clip)."""
    return adv * ratio <= adv * np.clip(ratio, 1.0 - low, 1.0 + high)


def coefficients(
    key: str, l: np.ndarray, l_prox: np.ndarray, r: np.ndarray, adv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``d surrogate / d log pi`` of every sample (runs, B), the lr factor (runs,), and the ESS/n
    of the weights applied (runs,).

    ``l = log pi - log q`` (current policy against the reported sampler log-probs), ``l_prox =
    log pi_prox - log q`` (the proximal policy against them), so ``l - l_prox = log pi/pi_prox``.
    """
    R, B = l.shape
    one = np.ones(R)
    w = np.exp(l)
    if key in ("ess", "ess_adv", "sft"):
        # IS Reshape, L_gamma on the raw reward (or the advantage): isreshape_core.objective_grad.
        gamma = np.zeros(R) if key == "sft" else np.asarray(isr.select_gamma(l, RHO_MIN))
        signal = adv if key == "ess_adv" else r
        coef = np.asarray(isr.objective_grad(l, signal, gamma))
        return coef, one, np.asarray(isr.ess_ratio(l, gamma))
    if key.startswith("dppo"):
        # Decoupled PPO (isreshape_core.decoupled_ppo_loss_and_grad, level="token"): PPO-clip on
        # pi/pi_prox times a detached behaviour correction b of pi_prox/mu.
        ratio = np.exp(l - l_prox)
        if key == "dppo_tempered":
            gamma = np.asarray(isr.select_gamma(l_prox, RHO_MIN))  # = step_gamma per run
            b = np.exp(gamma[:, None] * l_prox)
        elif key == "dppo_esscap":
            b = np.minimum(np.exp(l_prox), np.exp(isr.ess_truncation_cap(l_prox, RHO_MIN))[:, None])
        else:  # AReaL's behav_imp_weight_cap / verl's rollout_is_threshold, fixed at 2
            b = np.minimum(np.exp(l_prox), TIS_CAP)
        active = _ppo_active(adv, ratio, PPO_EPS, PPO_EPS)
        return np.where(active, b * ratio * adv, 0.0) / B, one, kish_ratio(b)
    if key == "ppo_clip":
        # PPO-clip (arXiv 1707.06347) with the sampler as the old policy (exp. 3's row).
        applied = np.where(_ppo_active(adv, w, PPO_EPS, PPO_EPS), w, 0.0)
    elif key == "gspo":
        # GSPO (arXiv 2507.18071, eq. 7): the sequence ratio (pi/pi_old)^(1/|y|) clipped to
        # [1 - 3e-4, 1 + 4e-4]; a bandit answer is one token, so the length-normalised ratio is w.
        applied = np.where(_ppo_active(adv, w, *GSPO_EPS), w, 0.0)
    elif key == "tis":
        # Truncated IS (Yao et al., "Your efficient RL framework secretly brings you off-policy
        # RL training", 2025; verl rollout_is="token"): sg(min(w, C)) A grad log pi.
        applied = np.minimum(w, TIS_CAP)
    elif key == "icepop":
        # IcePop (Ring-1T, arXiv 2510.18855) / verl's masked IS (rollout_rs token mask): the
        # IS-weighted gradient of samples with w in [0.5, 2], the others masked out.
        applied = np.where((w >= ICEPOP_RANGE[0]) & (w <= ICEPOP_RANGE[1]), w, 0.0)
    elif key == "cispo":
        # CISPO (MiniMax-M1, arXiv 2506.13585; verl compute_policy_loss_cispo):
        # sg(clip(w, 1 - eps_low, 1 + eps_high)) A log pi, no sample dropped.
        applied = np.clip(w, 1.0 - PPO_EPS, 1.0 + PPO_EPS)
    elif key == "m2po":
        # M2PO (arXiv 2510.01161; AReaL docs/algorithms/m2po.md): mask the samples of largest
        # (log w)^2 until the mean (log w)^2 of the rest is below tau_M2; then w A grad log pi.
        applied = np.where(_m2po_keep(l, M2_THRESHOLD), w, 0.0)
    elif key in ("vcpo", "is_pg"):
        # Plain IS policy gradient w A grad log pi. VCPO (arXiv 2602.17616) scales the learning
        # rate by the effective sample size; its exact scaling was not available to us, so the
        # factor here is the Kish ESS / n of w (the statement), its baseline is not used.
        applied = w
    else:
        raise ValueError(key)
    factor = kish_ratio(w) if key == "vcpo" else one
    return applied * adv / B, factor, kish_ratio(applied)


def _m2po_keep(l: np.ndarray, threshold: float) -> np.ndarray:
    """M2PO's mask per row: drop the fewest largest ``l^2`` so the mean ``l^2`` kept is below
    ``threshold`` (the suffix means of the descending sort; nothing dropped if already below)."""
    m2 = l * l
    order = np.argsort(-m2, axis=-1)
    sorted_m2 = np.take_along_axis(m2, order, axis=-1)
    n = l.shape[-1]
    suffix_mean = np.cumsum(sorted_m2[:, ::-1], axis=-1)[:, ::-1] / np.arange(n, 0, -1)
    below = suffix_mean < threshold
    k = np.where(below.any(axis=-1), below.argmax(axis=-1), n - 1)  # first index kept
    keep_sorted = np.arange(n)[None, :] >= k[:, None]
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def simulate(
    key: str,
    bandit: Bandit,
    setting: Setting,
    *,
    lrs,
    updates: int,
    n_groups: int = 16,
    group_size: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regret (runs, updates + 1) of every (seed, learning rate) pair, vectorised over runs,
    with the seed index and the learning rate of each run.

    Draws depend only on the seed and the batch index (common random numbers across methods and
    learning rates).
    """
    n_seeds, n_ctx, n_arms = bandit.rewards.shape
    seed_index = np.repeat(np.arange(n_seeds), len(lrs))
    lr = np.tile(np.asarray(lrs, dtype=float), n_seeds)
    runs, batch = seed_index.size, n_groups * group_size
    n_batches = -(-updates // setting.epochs)
    draws = [np.random.default_rng([seed, 5]) for seed in bandit.seeds]
    ctx_all = np.stack([g.integers(0, n_ctx, (n_batches, n_groups)) for g in draws])[seed_index]
    u_all = np.stack([g.random((n_batches, batch)) for g in draws])[seed_index]
    noise = np.stack(
        [
            g.normal(0.0, NOISE_SD, (n_batches, batch))
            + SPIKE_SIZE * np.sign(g.random((n_batches, batch)) - 0.5)
            * (g.random((n_batches, batch)) < SPIKE_P)
            for g in draws
        ]
    )[seed_index]  # fmt: skip
    rewards = bandit.rewards[seed_index]
    theta = bandit.init_logits[seed_index].copy()
    run_ix = np.arange(runs)[:, None]
    regret = np.empty((runs, updates + 1))
    regret[:, 0] = bandit.regret(theta, seed_index)
    step = 0
    for t in range(n_batches):
        if t == 0 or (setting.staleness is not None and t % setting.staleness == 0):
            mu_logp = _log_softmax(theta)
            mu_cdf = np.cumsum(np.exp(mu_logp), axis=-1)
        ctx = np.repeat(ctx_all[:, t, :], group_size, axis=1)
        cdf = mu_cdf[run_ix, ctx]
        arm = np.minimum((cdf < u_all[:, t, :, None] * cdf[..., -1:]).sum(axis=-1), n_arms - 1)
        logq = mu_logp[run_ix, ctx, arm] + (noise[:, t] if setting.mismatch else 0.0)
        r = rewards[run_ix, ctx, arm]
        adv = r - r.reshape(runs, n_groups, group_size).mean(axis=-1).repeat(group_size, 1)
        logp_prox = _log_softmax(theta)[run_ix, ctx, arm]
        for _ in range(setting.epochs):
            if step == updates:
                break
            logp_all = _log_softmax(theta)
            l = logp_all[run_ix, ctx, arm] - logq
            coef, factor, _ = coefficients(key, l, logp_prox - logq, r, adv)
            flat = (run_ix * n_ctx + ctx) * n_arms + arm
            g = np.bincount(flat.ravel(), coef.ravel(), runs * n_ctx * n_arms)
            row = np.bincount((run_ix * n_ctx + ctx).ravel(), coef.ravel(), runs * n_ctx)
            grad = g.reshape(runs, n_ctx, n_arms) - row.reshape(runs, n_ctx, 1) * np.exp(logp_all)
            theta += (lr * factor)[:, None, None] * grad
            step += 1
            regret[:, step] = bandit.regret(theta, seed_index)
    return regret, seed_index, lr


def tune_and_evaluate(key, setting, cfg) -> dict:
    """Learning rate by the mean regret of the last 10 updates on the tuning seeds; the final
    regret of the evaluation seeds at that learning rate."""
    seeds = [*cfg["tune_seeds"], *cfg["eval_seeds"]]
    bandit = make_bandit(seeds)
    regret, seed_index, lr = simulate(key, bandit, setting, lrs=LR_GRID, updates=cfg["updates"])
    is_tune = seed_index < len(cfg["tune_seeds"])
    score = regret[:, -10:].mean(axis=-1)
    tuning = {g: float(score[is_tune & (lr == g)].mean()) for g in LR_GRID}
    best = min(LR_GRID, key=lambda g: (tuning[g], g))
    final = regret[~is_tune & (lr == best), -1]
    return {"lr": best, "tuning_regret": tuning, "regret_per_seed": [float(x) for x in final]}


def paired_interval(a: np.ndarray, b: np.ndarray, level=0.9, n_boot=10_000, seed=0):
    """Mean of the paired difference ``a - b`` and its percentile bootstrap interval."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=-1)
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return float(d.mean()), float(lo), float(hi)


def analyse(cells: dict) -> dict:
    """Per column: the best other method, and each IS Reshape row's paired difference to it."""
    out = {}
    for s in SETTINGS:
        col = {m.key: np.array(cells[(m.key, s.name)]["regret_per_seed"]) for m in METHODS}
        others = [m.key for m in METHODS if not m.isreshape]
        best = min(others, key=lambda k: col[k].mean())
        out[s.name] = {
            "best_other": best,
            "vs_best": {
                m.key: dict(zip(("mean", "lo", "hi"), paired_interval(col[m.key], col[best]),
                                strict=True))
                for m in METHODS if m.isreshape
            },
            "best_overall": min(col, key=lambda k: col[k].mean()),
        }  # fmt: skip
    return out


def markdown(cells: dict, stats: dict, meta: str) -> str:
    """The regret table (methods x columns) and the paired-difference table."""
    names = [s.name for s in SETTINGS]
    header = ["| --- |" + " ---: |" * len(names)]
    lines = [
        meta,
        "",
        "Mean final regret over the evaluation seeds (lower is better); **bold**: the least in "
        "the column; (lr) the tuned learning rate.",
        "",
        "| method | " + " | ".join(names) + " |",
        *header,
    ]
    for m in METHODS:
        row = []
        for n in names:
            c = cells[(m.key, n)]
            v = f"{np.mean(c['regret_per_seed']):.4f}"
            row.append(f"**{v}** ({c['lr']:g})" if stats[n]["best_overall"] == m.key else
                       f"{v} ({c['lr']:g})")  # fmt: skip
        lines.append(f"| {m.label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Paired difference IS Reshape row - best other method (mean [90 % bootstrap interval]); "
        "negative: the IS Reshape row is ahead.",
        "",
        "| row | " + " | ".join(names) + " |",
        *header,
        "| best other method | " + " | ".join(stats[n]["best_other"] for n in names) + " |",
    ]
    for m in METHODS:
        if m.isreshape:
            row = [stats[n]["vs_best"][m.key] for n in names]
            cells_md = [f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" for d in row]
            lines.append(f"| {m.label} | " + " | ".join(cells_md) + " |")
    return "\n".join(lines) + "\n"


FULL = {"updates": 300, "tune_seeds": (1000, 1001, 1002), "eval_seeds": tuple(range(20))}
SMOKE = {"updates": 8, "tune_seeds": (1000,), "eval_seeds": (0, 1, 2)}


def run(cfg: dict, progress=print) -> dict:
    cells = {}
    for s in SETTINGS:
        for m in METHODS:
            start = time.perf_counter()
            cells[(m.key, s.name)] = tune_and_evaluate(m.key, s, cfg)
            cells[(m.key, s.name)]["seconds"] = time.perf_counter() - start
            c = cells[(m.key, s.name)]
            progress(f"{s.name:>18}  {m.label:<50} lr {c['lr']:>5g}  regret "
                     f"{np.mean(c['regret_per_seed']):.4f}  ({c['seconds']:.1f} s)")  # fmt: skip
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny setting (seconds)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    cells = run(cfg)
    stats = analyse(cells)
    elapsed = time.perf_counter() - start
    meta = (
        f"Exact regret J* - J(pi) after {cfg['updates']} updates, {len(cfg['eval_seeds'])} "
        f"evaluation seeds, learning rate tuned per cell on {len(cfg['tune_seeds'])} other seeds "
        f"from {list(LR_GRID)}. {elapsed:.0f} s on {platform.machine()} "
        f"(Python {platform.python_version()})."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exp5_when_to_use.md").write_text(markdown(cells, stats, meta))
    payload = {
        "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "lr_grid": list(LR_GRID),
        "columns": [s.__dict__ for s in SETTINGS],
        "methods": [m.__dict__ for m in METHODS],
        "seconds": elapsed,
        "cells": [{"method": k[0], "column": k[1], **v} for k, v in cells.items()],
        "analysis": stats,
    }
    (args.out / "exp5_when_to_use.json").write_text(json.dumps(payload, indent=1))
    print(markdown(cells, stats, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
