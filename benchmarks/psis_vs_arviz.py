"""Time isreshape_core's PSIS (NumPy) against arviz-stats' ``psislw`` on the same inputs.

Usage: ``python benchmarks/psis_vs_arviz.py [--repeats 5] [--rounds 3]``. Both run in this
process on the same seeded standard-normal log weights; each time is the best of ``--repeats``
runs, and the whole comparison is repeated ``--rounds`` times (the two interleaved, so that a
loaded machine slows both alike): the table gives the median speed-up over the rounds and its
range. Prints a Markdown table and writes it (and a JSON copy) to
``benchmarks/results/psis_vs_arviz.{md,json}``. The results are checked to agree before timing.
"""

from __future__ import annotations

import os

# One core for both: BLAS (which isreshape's kernel calls for small matrix products) would
# otherwise use every core. Set before NumPy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from isreshape_core._psis import psis  # noqa: E402

SHAPES = [(1, 4000), (64, 256), (1000, 4000), (1, 10**6)]
TARGETS = {(1000, 4000): 10.0, (64, 256): 30.0, (1, 10**6): 1.0}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from arviz_stats import __version__ as arviz_stats_version
    from arviz_stats.base import array_stats

    rows = []
    for shape in SHAPES:
        log_w = np.random.default_rng(sum(shape)).normal(0.0, 1.0, size=shape)
        ours, k_ours = psis(log_w)
        ref, k_ref = array_stats.psislw(-log_w, axis=-1)
        err = max(float(np.max(np.abs(ours - ref))), float(np.max(np.abs(k_ours - k_ref))))
        t_arviz, t_ours = [], []
        for _ in range(args.rounds):
            t_arviz.append(best_of(lambda x=log_w: array_stats.psislw(-x, axis=-1), args.repeats))
            t_ours.append(best_of(lambda x=log_w: psis(x), args.repeats))
        ratios = sorted(a / o for a, o in zip(t_arviz, t_ours, strict=True))
        t_arviz, t_ours = min(t_arviz), min(t_ours)
        ratio = ratios[len(ratios) // 2]
        target = TARGETS.get(shape)
        rows.append(
            {
                "shape": list(shape),
                "arviz_stats_ms": 1e3 * t_arviz,
                "isreshape_ms": 1e3 * t_ours,
                "speedup": ratio,
                "speedup_min": ratios[0],
                "speedup_max": ratios[-1],
                "target": target,
                "max_abs_diff": err,
            }
        )
        print(f"{shape}: arviz-stats {1e3 * t_arviz:.2f} ms, isreshape {1e3 * t_ours:.2f} ms")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        "# PSIS: isreshape_core.psis (NumPy) vs arviz-stats psislw",
        "",
        f"Times: best of {args.repeats} runs, best over {args.rounds} rounds; speed-up: median "
        f"(range) over the rounds of arviz-stats time / isreshape time; seeded N(0, 1) log "
        f"weights; CPU `{platform.processor() or '?'}`,"
        f" {os.cpu_count()} cores, load average {load}; numpy {np.__version__}, arviz-stats "
        f"{arviz_stats_version}; BLAS threads {os.environ['OPENBLAS_NUM_THREADS']} (both run "
        f"on one core).",
        "",
        "| shape (rows, S) | arviz-stats (ms) | isreshape (ms) | speed-up | target | max diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = "-" if r["target"] is None else f">= {r['target']:g}x"
        lines.append(
            f"| {tuple(r['shape'])} | {r['arviz_stats_ms']:.2f} | {r['isreshape_ms']:.2f} | "
            f"{r['speedup']:.1f}x ({r['speedup_min']:.1f}-{r['speedup_max']:.1f}) | {target} | "
            f"{r['max_abs_diff']:.1e} |"
        )
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "psis_vs_arviz.md").write_text(table)
    (args.out / "psis_vs_arviz.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
