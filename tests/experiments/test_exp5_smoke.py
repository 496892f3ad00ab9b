"""Experiment 5 (benchmarks/experiments/exp5_when_to_use.py): the tiny setting runs end to end,
the bandit's decoupled-PPO rows apply exactly the core's gradient, and M2PO's mask is the one a
loop over the sorted second moments gives."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import isreshape_core as isr

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments" / "exp5_when_to_use.py"


@pytest.fixture(scope="module")
def exp5():
    spec = importlib.util.spec_from_file_location("exp5_when_to_use", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_exp5_smoke_writes_every_cell(exp5, tmp_path, capsys):
    assert exp5.main(["--smoke", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "exp5_when_to_use.json").read_text())
    cells = {(c["method"], c["column"]): c for c in data["cells"]}
    assert len(cells) == len(exp5.METHODS) * len(exp5.SETTINGS)
    for c in cells.values():
        assert len(c["regret_per_seed"]) == len(exp5.SMOKE["eval_seeds"])
        assert all(0.0 <= r < 1.0 for r in c["regret_per_seed"])
        assert c["lr"] in exp5.LR_GRID
    for stats in data["analysis"].values():
        assert not next(m for m in exp5.METHODS if m.key == stats["best_other"]).isreshape
        for d in stats["vs_best"].values():
            assert d["lo"] <= d["mean"] <= d["hi"]
    assert "stale 4 x epochs 4" in (tmp_path / "exp5_when_to_use.md").read_text()


@pytest.mark.parametrize(
    ("key", "options"),
    [
        ("dppo_tempered", {"behaviour": "tempered", "gamma": "ess"}),
        ("dppo_esscap", {"behaviour": "truncated", "cap": "ess"}),
        ("dppo_tis", {"behaviour": "truncated", "cap": 2.0}),
    ],
)
def test_bandit_decoupled_rows_apply_the_core_gradient(exp5, key, options):
    rng = np.random.default_rng(0)
    R, B = 3, 64
    lq = np.log(rng.dirichlet(np.ones(10), (R, B))[..., 0])
    lprox = lq + rng.normal(0.0, 1.5, (R, B))
    lp = lprox + rng.normal(0.0, 0.3, (R, B))
    adv = rng.normal(0.0, 1.0, (R, B))
    coef, _, _ = exp5.coefficients(key, lp - lq, lprox - lq, adv, adv)
    for i in range(R):
        _, grad, _ = isr.decoupled_ppo_loss_and_grad(lp[i], lprox[i], lq[i], adv[i], **options)
        np.testing.assert_allclose(coef[i], -grad, rtol=1e-10, atol=1e-14)


def test_m2po_mask_is_the_fewest_largest_dropped(exp5):
    rng = np.random.default_rng(1)
    l = rng.normal(0.0, 0.4, (4, 50))
    keep = exp5._m2po_keep(l, 0.04)
    for row, k in zip(l, keep, strict=True):
        m2 = np.sort(row**2)[::-1]
        drop = next(j for j in range(row.size) if m2[j:].mean() < 0.04)
        assert (~k).sum() == drop
        if drop:
            assert (row[~k] ** 2).min() >= (row[k] ** 2).max()
        assert (row[k] ** 2).mean() < 0.04
