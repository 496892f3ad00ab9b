"""The README's Python example runs and prints what it claims."""

from __future__ import annotations

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "IS Reshape diagnostics" in out
    l, gamma = namespace["l"], namespace["gamma"]
    # The printed gamma meets its ESS target, recomputed by hand.
    w = np.exp(gamma * (l - l.max()))
    assert w.sum() ** 2 / (w**2).sum() / l.size >= 0.3 * (1 - 1e-12)
    n = l.size
    np.testing.assert_allclose(
        namespace["dloss_dl"], -namespace["rewards"] * np.exp(gamma * l) / n, rtol=1e-12
    )
