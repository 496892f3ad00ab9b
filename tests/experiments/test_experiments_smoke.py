"""Smoke tests: each experiment of benchmarks/experiments runs end to end on a tiny setting.

The full experiments are not part of the test run (minutes each); these check that every script
writes its table (Markdown and JSON) and figure, and that the numbers it reports are sane.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path, capsys) -> dict:
    module = _load(name)
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / f"{name}.md").read_text().count("|") > 10
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_exp1_fixed_points(tmp_path, capsys):
    data = _run("exp1_fixed_points", tmp_path, capsys)
    rows = {r["gamma"]: r for r in data["rows"]}
    assert sorted(rows) == [0.0, 0.25, 0.5, 0.75, 0.9]
    # At gamma = 0 both targets are mu r / Z: exact training reaches both.
    assert rows[0.0]["exact_kl_stationary_max"] < 1e-5
    assert rows[0.0]["exact_kl_pgamma_tau1_max"] < 1e-5
    # At gamma = 0.5 the loss trains towards mu r^2 / Z, not towards p_gamma.
    assert rows[0.5]["exact_kl_stationary_median"] < rows[0.5]["exact_kl_pgamma_tau1_median"]


def test_exp1_kl_matches_scipy():
    from scipy.stats import entropy

    kl = _load("exp1_fixed_points").kl
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6), 2)
    assert kl(np.log(p), np.log(q)) == pytest.approx(entropy(p, q), rel=1e-12)
    p[0] = 0.0
    p /= p.sum()
    assert kl(np.log(p, where=p > 0, out=np.full(6, -np.inf)), np.log(q)) == pytest.approx(
        entropy(p, q), rel=1e-12
    )


def test_exp2_gamma_rules(tmp_path, capsys):
    data = _run("exp2_gamma_rules", tmp_path, capsys)
    rows = data["rules"]
    assert len(rows) == 3 * 5  # three kinds of log weights, five rules, one n
    for r in rows:
        assert 0.0 < r["ess_p5"] <= r["ess_median"] <= 1.0
        assert 0.0 <= r["gamma_mean"] <= 1.0
        if r["rule"] in ("ess", "combined"):  # these never miss the target
            assert r["share_below"] == 0.0
    modes = {(r["rule"], r["mode"]) for r in data["grpo"]}
    assert ("ess", "per-group") in modes and ("ess", "batch-wide") in modes
    per_group = next(r for r in data["grpo"] if r["rule"] == "ess" and r["mode"] == "per-group")
    assert per_group["group_share_below"] == 0.0


def test_exp3_staleness(tmp_path, capsys):
    data = _run("exp3_staleness", tmp_path, capsys)
    rows = data["rows"]
    assert len(rows) == 5 * 9  # staleness values x methods
    for r in rows:
        assert r["regret_q25"] <= r["regret_median"] <= r["regret_q75"]
        assert np.mean(r["regret_per_seed"]) == pytest.approx(r["regret_mean"])
        assert 0.0 < r["regret_mean"] < 1.0
        assert r["lr"] in data["lr_grid"]
