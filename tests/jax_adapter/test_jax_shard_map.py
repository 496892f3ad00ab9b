"""``shard_map`` and ``pmap`` over 4 host CPU devices against the single-device whole batch.

JAX fixes its device count when it is first imported, so the check runs in its own process
(``_shard_map_check.py`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4``) and
reports every comparison as JSON: gamma, the metrics, the loss, the gradient taken inside and
outside ``shard_map``, a forward-mode tangent, ``pmap``, and a three-step SGD loop in
``lax.scan`` with replicated parameters, each equal to the single-device result to 1e-12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")
if not hasattr(jax, "shard_map"):  # jax.shard_map (with varying-axis types) is jax >= 0.7
    pytest.skip("jax.shard_map needs a newer jax", allow_module_level=True)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "adapters"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_shard_map_check.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"the shard_map check failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout)


def test_runs_on_four_devices(report):
    assert report["devices"] == 4


def test_every_sharded_quantity_equals_the_single_device_result(report):
    results = report["results"]
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(
        f"{r['case']}: {r['quantity']} differs by {r['max_abs_diff']:.3g}" for r in failed
    )
    quantities = {(r["case"], r["quantity"]) for r in results}
    # Every configuration reported its gradients, and the extra checks ran.
    for level in ("sequence", "geometric", "token"):
        assert any(c.startswith(level) and q == "grad (outside shard_map)" for c, q in quantities)
    for q in ("jvp (outside shard_map)", "pmap grad", "parameters after 3 steps"):
        assert any(quantity == q for _, quantity in quantities), q
    assert len(results) >= 50
