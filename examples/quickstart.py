"""Quick start: diagnose a heavy-tailed batch of importance weights and compare gamma rules.

Run with ``python examples/quickstart.py`` (numpy only). It draws two synthetic batches of log
importance weights, ``l = log pi - log mu``: one log-normal (the model behind the closed-form
gamma; docs/theory.md, "The closed form") and one with Student-t(3) tails, as stale samples give.
For each it prints the diagnostics report and the gamma that every method of ``select_gamma``
picks, with the ESS ratio that gamma actually delivers against the target ``rho_min``.
"""

from __future__ import annotations

import argparse

import numpy as np

import isreshape_core as isr


def compare_methods(log_w: np.ndarray, rho_min: float) -> list[tuple[str, float, float]]:
    """(method, gamma, achieved ESS/n) for every gamma rule and one fixed gamma."""
    rows = []
    for method in (*isr.GAMMA_METHODS, 0.3):
        gamma = float(isr.select_gamma(log_w, rho_min, method=method))
        achieved = float(isr.ess_ratio(log_w, gamma))
        rows.append((str(method), gamma, achieved))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="samples per batch")
    parser.add_argument("--rho-min", type=float, default=0.3, help="target ESS ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    batches = {
        "log-normal log weights, sigma = 1.5": rng.normal(0.0, 1.5, args.n),
        "Student-t(3) log weights, scale 1.5": 1.5 * rng.standard_t(3, args.n),
    }
    for title, log_w in batches.items():
        print(f"=== {title} (n = {args.n}) ===")
        print(isr.diagnose(log_w, args.rho_min))
        print()
        print(f"  {'method':<12} {'gamma':>7} {'ESS/n':>8}  meets rho_min = {args.rho_min:g}?")
        for method, gamma, achieved in compare_methods(log_w, args.rho_min):
            verdict = "yes" if achieved >= args.rho_min else "NO"
            print(f"  {method:<12} {gamma:7.4f} {achieved:8.4f}  {verdict}")
        print()


if __name__ == "__main__":
    main()
