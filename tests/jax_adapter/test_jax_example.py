"""Smoke test of ``examples/jax_optax_bandit.py`` with a small setting."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jax_optax_bandit.py"


def load_example():
    spec = importlib.util.spec_from_file_location("jax_optax_bandit", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bandit_example_learns_and_reports_each_epoch(capsys):
    example = load_example()
    summary = example.main(["--epochs", "3", "--samples", "1024", "--batch", "128"])
    out = capsys.readouterr().out
    epochs = re.findall(r"epoch\s+(\d+)\s+reward ([\d.]+)\s+gamma ([\d.]+)\s+ESS/n ([\d.]+)", out)
    assert [int(e[0]) for e in epochs] == [1, 2, 3]
    for _, reward, gamma, ess in epochs:
        assert 0.0 <= float(reward) <= 1.0 and 0.0 <= float(gamma) <= 1.0
        # The ESS target holds at the chosen gamma (means over minibatches of ratios >= 0.3).
        assert float(ess) >= 0.3 - 1e-3 or float(gamma) == 0.0
    values = dict(summary)
    best, mu = values.pop("best policy"), values.pop("behaviour mu")
    for name, value in values.items():
        assert value <= best + 1e-12, name
    # Off-policy learning improves on the behaviour policy.
    assert values["IS Reshape, adaptive gamma"] > mu + 0.05
    assert values["fixed gamma = 0"] > mu
