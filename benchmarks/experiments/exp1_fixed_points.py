"""Experiment 1: what the loss L_gamma converges to on a finite support.

Usage: ``python benchmarks/experiments/exp1_fixed_points.py [--smoke] [--out DIR]``.

20 random problems with ``K = 10`` outcomes: behaviour ``mu = softmax(Normal(0, 1))``, rewards
``r ~ Uniform(0.2, 1)``. For each fixed gamma in {0, 0.25, 0.5, 0.75, 0.9} a softmax policy,
started at ``mu``, maximises ``L_gamma(pi) = E_mu[r · expm1(gamma·l)/gamma]``,
``l = log pi - log mu``, by gradient ascent on its logits, with the derivative from
:func:`isreshape_core.objective_grad`:

- *exact*: the expectation over ``mu`` summed over the K outcomes (rewards ``mu·r``,
  reduction ``"sum"``), 20000 steps of size ``min(16, (1 - gamma)^-2)``;
- *sampled*: 1024 samples from ``mu`` per step, 4000 steps of half that size, the logits
  averaged over the last half (Polyak), as stochastic training would.

The learned policy is compared with the loss's maximiser ``stationary_log_probs``
(``mu·r^(1/(1-gamma))``, docs/theory.md#theory-finite-support) and with the paper's geometric target
``target_log_probs`` (``p_gamma``, at ``tau = 1`` and ``tau = 0.1``): ``KL(learned || target)``,
median and largest over the 20 problems. Writes ``exp1_fixed_points.{md,json,png}``. About 30 s
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import isreshape_core as isr  # noqa: E402

GAMMAS = (0.0, 0.25, 0.5, 0.75, 0.9)
TAUS = (1.0, 0.1)
FULL = {"problems": 20, "arms": 10, "exact_steps": 20000, "sampled_steps": 4000, "samples": 1024}
SMOKE = {"problems": 3, "arms": 5, "exact_steps": 200, "sampled_steps": 50, "samples": 64}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """``KL(p || q)`` along the last axis (``0·log 0 = 0``)."""
    p = np.exp(logp)
    diff = np.where(p > 0, logp - np.where(np.isfinite(logq), logq, 0.0), 0.0)
    return np.maximum((p * diff).sum(axis=-1), 0.0)  # rounding can give -1e-17


def problems(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logq = _log_softmax(rng.normal(0.0, 1.0, (n, k)))
    rewards = rng.uniform(0.2, 1.0, (n, k))
    return logq, rewards


def exact_lr(gamma: float) -> float:
    """Step size of the exact runs: ``min(16, (1 - gamma)^-2)``; the fixed point gets sharper
    (flatter logit directions) as gamma -> 1, and the larger step keeps 20000 steps enough."""
    return min(16.0, (1.0 - gamma) ** -2)


def train_exact(logq, rewards, gamma, steps, lr=None):
    """Gradient ascent on the exact ``L_gamma`` (sum over outcomes); returns log pi, grad norm."""
    lr = exact_lr(gamma) if lr is None else lr
    theta = logq.copy()
    weights = np.exp(logq) * rewards  # E_mu[r f(l)] = sum_a (mu r)_a f(l_a)
    for _ in range(steps):
        logp = _log_softmax(theta)
        c = np.asarray(isr.objective_grad(logp - logq, weights, gamma, reduction="sum"))
        grad = c - np.exp(logp) * c.sum(axis=-1, keepdims=True)
        theta += lr * grad
    return _log_softmax(theta), np.abs(grad).max()


def train_sampled(logq, rewards, gamma, steps, n, lr=None, seed=1):
    """SGD on the sampled ``L_gamma`` (n draws from mu per step), Polyak-averaged logits."""
    lr = 0.5 * exact_lr(gamma) if lr is None else lr
    rng = np.random.default_rng(seed)
    rows, k = logq.shape
    theta = logq.copy()
    avg = np.zeros_like(theta)
    cdf = np.cumsum(np.exp(logq), axis=-1)
    row_ix = np.arange(rows)[:, None]
    for t in range(steps):
        arms = np.minimum((cdf[:, None, :] < rng.random((rows, n, 1))).sum(-1), k - 1)
        logp = _log_softmax(theta)
        l = logp[row_ix, arms] - logq[row_ix, arms]
        c = np.asarray(isr.objective_grad(l, rewards[row_ix, arms], gamma))  # mean over n
        flat = (row_ix * k + arms).ravel()
        g = np.bincount(flat, c.ravel(), rows * k).reshape(rows, k)
        grad = g - np.exp(logp) * c.sum(axis=-1, keepdims=True)
        theta += lr * grad
        if t >= steps // 2:
            avg += theta
    return _log_softmax(avg / (steps - steps // 2))


def run(setting: dict, progress=print) -> tuple[list[dict], tuple[np.ndarray, np.ndarray]]:
    """One row of KL distances per gamma; also returns the problems (for the figure)."""
    logq, rewards = problems(setting["problems"], setting["arms"])
    rows = []
    for gamma in GAMMAS:
        start = time.perf_counter()
        stationary = np.asarray(isr.stationary_log_probs(logq, rewards, gamma))
        targets = {tau: np.asarray(isr.target_log_probs(logq, rewards, gamma, tau)) for tau in TAUS}
        exact, grad_norm = train_exact(logq, rewards, gamma, setting["exact_steps"])
        sampled = train_sampled(logq, rewards, gamma, setting["sampled_steps"], setting["samples"])
        row = {"gamma": gamma, "final_grad_max": float(grad_norm)}
        for name, learned in (("exact", exact), ("sampled", sampled)):
            d = kl(learned, stationary)
            row[f"{name}_kl_stationary_median"] = float(np.median(d))
            row[f"{name}_kl_stationary_max"] = float(d.max())
            for tau in TAUS:
                d = kl(learned, targets[tau])
                row[f"{name}_kl_pgamma_tau{tau:g}_median"] = float(np.median(d))
                row[f"{name}_kl_pgamma_tau{tau:g}_max"] = float(d.max())
        row["kl_stationary_pgamma_tau1_median"] = float(np.median(kl(stationary, targets[1.0])))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        progress(
            f"gamma {gamma:4.2f}: KL(exact || stationary) {row['exact_kl_stationary_max']:.1e}, "
            f"KL(exact || p_gamma, tau 1) {row['exact_kl_pgamma_tau1_median']:.3f} "
            f"({row['seconds']:.1f} s)"
        )
    return rows, (logq, rewards)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| gamma | exact: KL(learned ‖ stationary) median / max | exact: KL(learned ‖ p_gamma) "
        "tau=1, median / max | exact: KL(learned ‖ p_gamma) tau=0.1, median | sampled: "
        "KL(learned ‖ stationary) median / max | sampled: KL(learned ‖ p_gamma) tau=1, median |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['gamma']:.2f} | {r['exact_kl_stationary_median']:.1e} / "
            f"{r['exact_kl_stationary_max']:.1e} | {r['exact_kl_pgamma_tau1_median']:.3f} / "
            f"{r['exact_kl_pgamma_tau1_max']:.3f} | {r['exact_kl_pgamma_tau0.1_median']:.3f} | "
            f"{r['sampled_kl_stationary_median']:.1e} / {r['sampled_kl_stationary_max']:.1e} | "
            f"{r['sampled_kl_pgamma_tau1_median']:.3f} |"
        )
    return "\n".join(lines)


def plot(rows, example, setting, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["gamma"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    floor = 1e-16
    for key, label, style in (
        ("exact_kl_stationary_median", "exact: KL(learned ‖ stationary)", "-o"),
        ("sampled_kl_stationary_median", "sampled: KL(learned ‖ stationary)", "--o"),
        ("exact_kl_pgamma_tau1_median", "exact: KL(learned ‖ p_gamma), tau 1", "-s"),
        ("exact_kl_pgamma_tau0.1_median", "exact: KL(learned ‖ p_gamma), tau 0.1", "-^"),
        ("sampled_kl_pgamma_tau1_median", "sampled: KL(learned ‖ p_gamma), tau 1", "--s"),
    ):
        ax1.semilogy(g, [max(r[key], floor) for r in rows], style, label=label)
    ax1.set(xlabel="gamma", ylabel="KL (median over problems)", title="What L_gamma converges to")
    ax1.legend(fontsize=7)
    logq, rewards = example
    gamma = 0.75
    i = 0
    learned, _ = train_exact(logq[i : i + 1], rewards[i : i + 1], gamma, setting["exact_steps"])
    k = logq.shape[-1]
    x = np.arange(k)
    bars = {
        "mu": np.exp(logq[i]),
        "learned (exact)": np.exp(learned[0]),
        "stationary mu·r^(1/(1-gamma))": np.exp(
            isr.stationary_log_probs(logq[i], rewards[i], gamma)
        ),
        "p_gamma, tau 1": np.exp(isr.target_log_probs(logq[i], rewards[i], gamma, 1.0)),
    }
    width = 0.2
    for j, (label, p) in enumerate(bars.items()):
        ax2.bar(x + (j - 1.5) * width, p, width, label=label)
    ax2.set(xlabel="outcome", ylabel="probability", title=f"problem 0, gamma = {gamma}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny setting (a few seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    setting = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    rows, example = run(setting)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, example, setting, args.out / "exp1_fixed_points.png")
    elapsed = time.perf_counter() - start
    table = markdown(rows)
    meta = (
        f"{setting['problems']} problems, K = {setting['arms']}; exact: {setting['exact_steps']} "
        f"gradient steps; sampled: {setting['sampled_steps']} steps of {setting['samples']} "
        f"draws. {elapsed:.0f} s on {platform.machine()} ({platform.python_version()})."
    )
    (args.out / "exp1_fixed_points.md").write_text(f"{meta}\n\n{table}\n")
    payload = {"setting": setting, "gammas": list(GAMMAS), "seconds": elapsed, "rows": rows}
    (args.out / "exp1_fixed_points.json").write_text(json.dumps(payload, indent=1))
    print(meta)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
