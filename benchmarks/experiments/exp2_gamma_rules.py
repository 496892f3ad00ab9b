"""Experiment 2: how well each gamma rule meets its ESS target, and what it costs.

Usage: ``python benchmarks/experiments/exp2_gamma_rules.py [--smoke] [--out DIR]``.

Part A. Log weights of three kinds -- log-normal (``Normal(0, 1.5^2)``), Student-t(3) (scale 1)
and a two-component mixture (90% ``Normal(0, 0.5^2)``, 10% ``Normal(3, 0.5^2)``: a cluster of
high weights) -- at n = 64, 512, 4096, 2000 batches each, drawn as one ``(2000, n)`` array (the
core is vectorised over rows). For the closed-form, exact-ESS, PSIS, tail (``k_target = 0.5``)
and combined rules (:func:`isreshape_cli.bandit.gamma_by_rule`): the ESS ratio each achieves
(``isreshape_core.ess_ratio`` at its gamma) against ``rho_min = 0.3`` -- median, 5th
percentile, share of batches below target -- the mean gamma, and the time for all 2000 rows
(best of 3 calls, NumPy, one process).

Part B. GRPO-shaped batches: 64 groups of 8 responses, the log weights of group ``g`` drawn
from ``Normal(0, s_g^2)`` with ``s_g ~ Uniform(0, 2)`` (some prompts are stale, some are not),
2000 batches. Per-group gamma (reduce over the 8 responses) against one batch-wide gamma
(reduce over all 512), for the exact-ESS and closed-form rules: mean gamma, the per-group ESS
ratio (median, share of groups below target) and the ESS ratio of the pooled batch.

Writes ``exp2_gamma_rules.{md,json,png}``. About 2-3 minutes on 2 CPU cores.
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
from isreshape_cli.bandit import gamma_by_rule, kish_ratio  # noqa: E402

RHO_MIN = 0.3
RULES = ("closed_form", "ess", "psis", "tail", "combined")
KINDS = ("log-normal", "student-t(3)", "mixture")
FULL = {"sizes": (64, 512, 4096), "batches": 2000, "repeats": 3, "groups": 64, "group_size": 8}
SMOKE = {"sizes": (64,), "batches": 20, "repeats": 1, "groups": 4, "group_size": 8}


def draw(kind: str, batches: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "log-normal":
        return rng.normal(0.0, 1.5, (batches, n))
    if kind == "student-t(3)":
        return rng.standard_t(3, (batches, n))
    hot = rng.random((batches, n)) < 0.1
    return np.where(hot, rng.normal(3.0, 0.5, (batches, n)), rng.normal(0.0, 0.5, (batches, n)))


def part_a(setting: dict, progress=print) -> list[dict]:
    rows = []
    for i, kind in enumerate(KINDS):
        for n in setting["sizes"]:
            l = draw(kind, setting["batches"], n, seed=1000 * i + n)
            for rule in RULES:
                times = []
                for _ in range(setting["repeats"]):
                    start = time.perf_counter()
                    gamma = gamma_by_rule(l, rule, RHO_MIN)
                    times.append(time.perf_counter() - start)
                achieved = np.asarray(isr.ess_ratio(l, gamma))
                rows.append(
                    {
                        "kind": kind,
                        "n": n,
                        "rule": rule,
                        "ess_median": float(np.median(achieved)),
                        "ess_p5": float(np.percentile(achieved, 5)),
                        "share_below": float(np.mean(achieved < RHO_MIN)),
                        "gamma_mean": float(gamma.mean()),
                        "seconds": min(times),
                    }
                )
                r = rows[-1]
                progress(
                    f"{kind:<13} n={n:<5} {rule:<12} ESS/n median {r['ess_median']:.3f} "
                    f"p5 {r['ess_p5']:.4f} below {r['share_below']:.1%}  "
                    f"{1e3 * r['seconds']:.0f} ms"
                )
    return rows


def part_b(setting: dict, progress=print) -> list[dict]:
    rng = np.random.default_rng(7)
    b, g, size = setting["batches"], setting["groups"], setting["group_size"]
    scale = rng.uniform(0.0, 2.0, (b, g, 1))
    l = scale * rng.normal(0.0, 1.0, (b, g, size))
    rows = []
    for rule in ("ess", "closed_form"):
        for mode in ("per-group", "batch-wide"):
            if mode == "per-group":
                gamma = gamma_by_rule(l, rule, RHO_MIN)  # (b, g)
            else:
                gamma = np.repeat(
                    gamma_by_rule(l.reshape(b, g * size), rule, RHO_MIN)[:, None], g, 1
                )
            group_ess = np.asarray(isr.ess_ratio(l, gamma))  # (b, g)
            pooled = kish_ratio(np.exp((gamma[..., None] * l).reshape(b, g * size)))
            rows.append(
                {
                    "rule": rule,
                    "mode": mode,
                    "gamma_mean": float(gamma.mean()),
                    "group_ess_median": float(np.median(group_ess)),
                    "group_share_below": float(np.mean(group_ess < RHO_MIN)),
                    "pooled_ess_median": float(np.median(pooled)),
                    "pooled_share_below": float(np.mean(pooled < RHO_MIN)),
                }
            )
            r = rows[-1]
            progress(
                f"GRPO {rule:<12} {mode:<10} mean gamma {r['gamma_mean']:.3f}  groups below "
                f"{r['group_share_below']:.1%}  pooled ESS/n {r['pooled_ess_median']:.3f}"
            )
    return rows


def markdown(rows_a: list[dict], rows_b: list[dict]) -> str:
    lines = [
        "| log weights | n | rule | ESS/n median | ESS/n 5th pct | share < 0.3 | mean gamma | "
        "time (2000 rows) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows_a:
        lines.append(
            f"| {r['kind']} | {r['n']} | {r['rule']} | {r['ess_median']:.3g} | "
            f"{r['ess_p5']:.3g} | {r['share_below']:.1%} | {r['gamma_mean']:.3f} | "
            f"{1e3 * r['seconds']:.0f} ms |"
        )
    lines += [
        "",
        "| rule | gamma per | mean gamma | group ESS/G median | groups < 0.3 | pooled ESS/n median "
        "| batches with pooled < 0.3 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows_b:
        lines.append(
            f"| {r['rule']} | {r['mode']} | {r['gamma_mean']:.3f} | {r['group_ess_median']:.3f}"
            f" | {r['group_share_below']:.1%} | {r['pooled_ess_median']:.3f} | "
            f"{r['pooled_share_below']:.1%} |"
        )
    return "\n".join(lines)


def plot(rows_a: list[dict], sizes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS) + 1, figsize=(16, 4.2))
    for ax, kind in zip(axes, KINDS, strict=False):
        for rule in RULES:
            sel = [r for r in rows_a if r["kind"] == kind and r["rule"] == rule]
            med = [r["ess_median"] for r in sel]
            p5 = [r["ess_p5"] for r in sel]
            line = ax.semilogy([r["n"] for r in sel], med, "-o", label=rule)[0]
            ax.semilogy([r["n"] for r in sel], p5, ":", color=line.get_color())
        ax.axhline(RHO_MIN, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="n", ylabel="achieved ESS/n (median; dotted: 5th pct)", title=kind)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for rule in RULES:
        sel = [r for r in rows_a if r["rule"] == rule and r["kind"] == "log-normal"]
        ax.loglog([r["n"] for r in sel], [1e3 * r["seconds"] for r in sel], "-o", label=rule)
    ax.set(xlabel="n", ylabel="ms for 2000 rows (log-normal)", title="cost")
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
    rows_a = part_a(setting)
    rows_b = part_b(setting)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows_a, rows_b)
    meta = (
        f"rho_min = {RHO_MIN}, {setting['batches']} batches per cell; times are the best of "
        f"{setting['repeats']} calls on all rows at once (NumPy). {elapsed:.0f} s in all on "
        f"{platform.machine()} ({platform.python_version()}), a shared 2-core machine."
    )
    (args.out / "exp2_gamma_rules.md").write_text(f"{meta}\n\n{table}\n")
    payload = {
        "setting": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()},
        "rho_min": RHO_MIN,
        "seconds": elapsed,
        "rules": rows_a,
        "grpo": rows_b,
    }
    (args.out / "exp2_gamma_rules.json").write_text(json.dumps(payload, indent=1))
    plot(rows_a, setting["sizes"], args.out / "exp2_gamma_rules.png")
    print(meta)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
