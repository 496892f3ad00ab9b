"""``isreshape demo``: train a tabular softmax policy on a stale-behaviour contextual bandit.

Every method of :data:`isreshape_cli.bandit.METHODS` trains the same policy from the same draws
(20 contexts x 50 arms, groups of 8 arms for 16 contexts per update, behaviour refreshed every
``--staleness`` updates). Each method's learning rate is chosen from the same grid
(:data:`isreshape_cli.bandit.LR_GRID`) on two tuning seeds (``seed + 1000``, ``seed + 1001``) and
the table reports a separate evaluation seed (``--seed``). NumPy only; matplotlib (the ``plot``
extra) draws the learning curves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .bandit import LR_GRID, METHODS, RHO_MIN, Tuned, tune_and_evaluate

__all__ = ["add_parser", "format_table", "parse_staleness", "run_demo"]

STEPS = 300
DESCRIPTION = (
    "Train a tabular softmax policy (20 contexts x 50 arms, positive rewards) from samples of a "
    "stale behaviour policy with every method: reward-weighted SFT (gamma 0), IS policy gradient "
    "(gamma 1), fixed gamma 0.5, closed-form, exact-ESS and PSIS adaptive gamma, exact-ESS gamma "
    "on advantages, PPO-clip and truncated IS (cap 2). Each method's learning rate is picked from "
    "the same grid on two tuning seeds; the table reports the evaluation seed: exact expected "
    "reward, regret, mean gamma, least ESS ratio and PSIS k_hat. Writes a PNG of the learning "
    "curves (needs matplotlib)."
)


def parse_staleness(text: str) -> int | None:
    """``"never"`` -> None, else a positive int (updates between behaviour refreshes)."""
    if text.strip().lower() == "never":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--staleness must be a positive integer or 'never', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--staleness must be >= 1 (1 = on-policy) or 'never', got {value}"
        )
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``demo`` sub-command."""
    parser = subparsers.add_parser(
        "demo",
        help="train every method on a stale-behaviour bandit and compare them",
        description=DESCRIPTION,
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    parser.add_argument(
        "--staleness",
        type=parse_staleness,
        default=16,
        help="updates between refreshes of the behaviour policy, or 'never' (default 16)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("isreshape_demo.png"),
        help="where to write the PNG of the learning curves (default isreshape_demo.png)",
    )
    parser.add_argument(
        "--steps", type=int, default=STEPS, help=f"updates per run (default {STEPS})"
    )
    parser.set_defaults(func=_run_from_args)
    return parser


def _median_finite(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("inf")


def format_table(results: list[Tuned], optimum: float) -> str:
    """Markdown table of the evaluation run of each method (one seed)."""
    lines = [
        "| method | lr | J(pi) | regret | mean gamma | least ESS/n | median k_hat |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tuned in results:
        run = tuned.runs
        regret = float(run.regret[0, -1])
        gamma = run.gamma[0]
        mean_gamma = "n/a" if np.isnan(gamma).all() else f"{np.nanmean(gamma):.3f}"
        lines.append(
            f"| {tuned.method.label} | {tuned.lr:g} | {optimum - regret:.4f} | {regret:.4f} | "
            f"{mean_gamma} | {run.ess[0].min():.3f} | {_median_finite(run.k_hat[0]):.2f} |"
        )
    return "\n".join(lines)


def plot_curves(results: list[Tuned], path: Path, title: str) -> None:
    """Learning curves (regret per update) and the adaptive gamma per update, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for tuned in results:
        style = "--" if tuned.method.kind != "isreshape" else "-"
        ax1.plot(tuned.runs.regret[0], style, label=f"{tuned.method.label} (lr {tuned.lr:g})")
        if isinstance(tuned.method.rule, str):
            ax2.plot(tuned.runs.gamma[0], style, label=tuned.method.label, lw=1)
    ax1.set(xlabel="update", ylabel="exact regret J* - J(pi)", title=title, ylim=(0, None))
    ax1.legend(fontsize=7)
    ax2.set(xlabel="update", ylabel="gamma", title="adaptive gamma per update", ylim=(0, 1.05))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(
    seed: int = 0,
    staleness: int | None = 16,
    out: Path | None = Path("isreshape_demo.png"),
    steps: int = STEPS,
    stream=None,
) -> tuple[list[Tuned], str]:
    """Tune, train and compare every method; returns the results and the Markdown table.

    Examples
    --------
    >>> import io
    >>> results, table = run_demo(seed=0, staleness=4, out=None, steps=3, stream=io.StringIO())
    >>> len(results), table.splitlines()[0].startswith("| method")
    (9, True)
    """
    stream = sys.stdout if stream is None else stream
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    tune_seeds = (seed + 1000, seed + 1001)
    where = "never" if staleness is None else f"every {staleness} updates"
    print(
        f"isreshape demo: 20 contexts x 50 arms, rewards in (0.05, 1], batches of 16 contexts "
        f"x 8 arms, behaviour policy refreshed {where}, {steps} updates.\n"
        f"Learning rate of every method picked from {list(LR_GRID)} on seeds {list(tune_seeds)}; "
        f"table for seed {seed}. Adaptive rules target ESS/n >= {RHO_MIN}.",
        file=stream,
    )
    start = time.perf_counter()
    results = []
    for i, method in enumerate(METHODS, 1):
        print(f"[{i}/{len(METHODS)}] {method.label} ...", end=" ", file=stream, flush=True)
        tuned = tune_and_evaluate(method, tune_seeds, [seed], steps=steps, staleness=staleness)
        results.append(tuned)
        print(f"lr {tuned.lr:g}, regret {tuned.runs.regret[0, -1]:.4f}", file=stream, flush=True)
    from .bandit import make_bandit

    optimum = float(make_bandit([seed]).optimum[0])
    table = format_table(results, optimum)
    print(f"\nOptimum J* = {optimum:.4f}; J(pi) and regret are exact sums over arms.", file=stream)
    print(table, file=stream)
    print(
        "least ESS/n: smallest Kish ESS ratio over updates of the weights each method applies "
        "(w^gamma; min(w, 2) for truncated IS; w on unclipped samples for PPO). k_hat: PSIS "
        "Pareto k of the raw weights, median over updates (refresh updates, where all weights "
        "are 1, have no tail and are left out).",
        file=stream,
    )
    if out is not None:
        try:
            plot_curves(results, Path(out), f"staleness {where}, seed {seed}")
        except ImportError:
            print(
                "matplotlib is not installed, so no PNG was written; install it with "
                "`pip install isreshape[plot]` (or `pip install matplotlib`).",
                file=stream,
            )
        except (OSError, ValueError) as exc:  # e.g. the disk filled up during the run
            print(f"No PNG was written to {out}: {' '.join(str(exc).split())}", file=stream)
        else:
            print(f"Learning curves written to {out}", file=stream)
    print(f"Done in {time.perf_counter() - start:.1f} s.", file=stream)
    return results, table


def _run_from_args(args: argparse.Namespace) -> int:
    from ._output import OutputError, check_image_path

    if args.steps < 1:
        print(f"isreshape demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    try:  # before the run: a bad path costs one line, not the whole run and a traceback
        out = check_image_path(args.out, "--out", "isreshape_demo.png")
    except OutputError as exc:
        print(f"isreshape demo: error: {exc}", file=sys.stderr)
        return 2
    run_demo(seed=args.seed, staleness=args.staleness, out=out, steps=args.steps)
    return 0
