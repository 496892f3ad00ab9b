"""The version check of the verl and TRL integrations, against the framework installed for real.

Run in the ``tests_verl`` and ``tests_trl`` nox sessions (each skips the framework it lacks): the
installed version lies in the module's supported range and the module imports; with the
installed version faked to one outside the range, executing the module's source fails at once
with an ``ImportError`` that names the range, the version found and the extra.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

import pytest

from isreshape_core._versions import in_range

# (integration module, distribution, the range's constant, an unsupported version, the range)
INTEGRATIONS = [
    ("isreshape_torch.verl", "verl", "VERL_SUPPORTED", "0.8.2", ">=0.9,<0.10"),
    ("isreshape_torch.trl", "trl", "TRL_SUPPORTED", "1.17.0", ">=1.16,<1.17"),
]


@pytest.mark.parametrize(("name", "dist", "constant", "bad", "supported"), INTEGRATIONS)
def test_installed_version_is_supported(name, dist, constant, bad, supported):
    pytest.importorskip("torch")
    pytest.importorskip(dist)
    module = importlib.import_module(name)
    assert getattr(module, constant) == supported
    assert in_range(importlib.metadata.version(dist), supported)


@pytest.mark.parametrize(("name", "dist", "constant", "bad", "supported"), INTEGRATIONS)
def test_unsupported_version_fails_at_import(monkeypatch, name, dist, constant, bad, supported):
    pytest.importorskip("torch")
    pytest.importorskip(dist)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: bad if d == dist else real(d))
    # A fresh copy of the module (the imported one stays registered with the framework).
    origin = importlib.util.find_spec(name).origin
    spec = importlib.util.spec_from_file_location(f"{name}_version_probe", origin)
    probe = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError) as info:
        spec.loader.exec_module(probe)
    message = str(info.value)
    assert f"supports {dist} {supported}" in message
    assert f"found {dist} {bad}" in message
    assert f"pip install 'isreshape[{dist}]'" in message
    assert not hasattr(probe, "compute_policy_loss_is_reshape")  # stopped before the loss
    assert not hasattr(probe, "ISReshapeGRPOTrainer")
