"""Experiment 3: regret after a fixed budget versus staleness, every method of the demo.

Usage: ``python benchmarks/experiments/exp3_staleness.py [--smoke] [--out DIR]``.

The bandit of :mod:`isreshape_cli.bandit` (20 contexts x 50 arms, positive rewards, batches of
16 contexts x 8 arms, 300 updates). The behaviour policy is refreshed every 1, 4, 16, 64 updates
or never. For each (method, staleness) the learning rate is picked from
:data:`isreshape_cli.bandit.LR_GRID` by the mean regret of the last 10 updates on 3 tuning seeds
(1000-1002), then the exact regret ``J* - J(pi)`` after the last update is reported on 10
evaluation seeds (0-9): mean, median and interquartile range. All methods and learning rates of a
seed see the same random draws. Writes ``exp3_staleness.{md,json,png}`` to ``--out``
(default ``benchmarks/experiments/results``). About 5 minutes on 2 CPU cores.
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
if str(ROOT) not in sys.path:  # run as a script from anywhere in the repository
    sys.path.insert(0, str(ROOT))

from isreshape_cli.bandit import LR_GRID, METHODS, tune_and_evaluate  # noqa: E402

STALENESS: tuple[int | None, ...] = (1, 4, 16, 64, None)
FULL = {"steps": 300, "tune_seeds": (1000, 1001, 1002), "eval_seeds": tuple(range(10))}
SMOKE = {"steps": 4, "tune_seeds": (1000,), "eval_seeds": (0, 1)}


def _name(staleness: int | None) -> str:
    return "never" if staleness is None else str(staleness)


def run(setting: dict, progress=print) -> list[dict]:
    """One row per (method, staleness): chosen lr, regret statistics over the evaluation seeds."""
    rows = []
    for staleness in STALENESS:
        for method in METHODS:
            start = time.perf_counter()
            tuned = tune_and_evaluate(
                method,
                setting["tune_seeds"],
                setting["eval_seeds"],
                steps=setting["steps"],
                staleness=staleness,
                record_khat=False,
            )
            regret = tuned.runs.regret[:, -1]
            q25, q50, q75 = np.percentile(regret, [25, 50, 75])
            gamma = tuned.runs.gamma
            rows.append(
                {
                    "staleness": _name(staleness),
                    "method": method.key,
                    "label": method.label,
                    "lr": tuned.lr,
                    "regret_mean": float(regret.mean()),
                    "regret_median": float(q50),
                    "regret_q25": float(q25),
                    "regret_q75": float(q75),
                    "regret_per_seed": [float(x) for x in regret],
                    "mean_gamma": None if np.isnan(gamma).all() else float(np.nanmean(gamma)),
                    "least_ess_ratio": float(tuned.runs.ess.min()),
                    "tuning_regret": {str(k): v for k, v in tuned.tuning_regret.items()},
                    "seconds": time.perf_counter() - start,
                }
            )
            progress(
                f"staleness {_name(staleness):>5}  {method.label:<34} lr {tuned.lr:>5g}  "
                f"regret {regret.mean():.4f}  ({rows[-1]['seconds']:.1f} s)"
            )
    return rows


def markdown(rows: list[dict]) -> str:
    """Regret mean [IQR] per method (rows) and staleness (columns)."""
    names = [_name(s) for s in STALENESS]
    header = "| method | " + " | ".join(f"staleness {n}" for n in names) + " |"
    lines = [header, "| --- |" + " ---: |" * len(names)]
    for method in METHODS:
        cells = []
        for n in names:
            row = next(r for r in rows if r["method"] == method.key and r["staleness"] == n)
            cells.append(
                f"{row['regret_mean']:.3f} [{row['regret_q25']:.3f}, {row['regret_q75']:.3f}]"
                f" (lr {row['lr']:g})"
            )
        lines.append(f"| {method.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_name(s) for s in STALENESS]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, method in enumerate(METHODS):
        sel = [
            next(r for r in rows if r["method"] == method.key and r["staleness"] == n)
            for n in names
        ]
        med = np.array([r["regret_median"] for r in sel])
        lo = med - np.array([r["regret_q25"] for r in sel])
        hi = np.array([r["regret_q75"] for r in sel]) - med
        style = "--" if method.kind != "isreshape" else "-"
        ax.errorbar(
            x + (i - 4) * 0.03,
            med,
            yerr=[lo, hi],
            fmt=style + "o",
            ms=3,
            capsize=2,
            label=method.label,
        )
    ax.set_xticks(x, names)
    ax.set(
        xlabel="behaviour refreshed every ... updates",
        ylabel="exact regret after the budget (median, IQR)",
        title="Experiment 3: regret vs staleness (10 seeds)",
        ylim=(0, None),
    )
    ax.legend(fontsize=7)
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
    rows = run(setting)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    meta = (
        f"Exact regret J* - J(pi) after {setting['steps']} updates, mean [25th, 75th percentile] "
        f"over {len(setting['eval_seeds'])} evaluation seeds, learning rate tuned per cell on "
        f"{len(setting['tune_seeds'])} other seeds from {list(LR_GRID)}. "
        f"{elapsed:.0f} s on {platform.machine()} ({platform.python_version()})."
    )
    (args.out / "exp3_staleness.md").write_text(f"{meta}\n\n{table}\n")
    payload = {"setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}}
    payload.update({"lr_grid": list(LR_GRID), "seconds": elapsed, "rows": rows})
    (args.out / "exp3_staleness.json").write_text(json.dumps(payload, indent=1))
    plot(rows, args.out / "exp3_staleness.png")
    print(meta)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
