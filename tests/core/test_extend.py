"""Tests of isreshape_core/extend.py: the public layer for adapters and integrations.

Every name of ``isreshape_core.extend.__all__`` resolves, is the private module's own object (a
re-export, not a copy) and is listed in the module docstring with its purpose; and no source file
of the adapters or of the CLI imports a private module of the core (``isreshape_core._...``):
they reach it through ``isreshape_core`` and ``isreshape_core.extend`` only. The scan parses the
imports with ``ast``, so that no framework is imported.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import isreshape_core.extend as extend

ROOT = Path(__file__).resolve().parents[2]
# Where each name is defined (the private module the public layer re-exports from).
DEFINED_IN = {
    "Array": "isreshape_core._lib.namespace",
    "array_device": "isreshape_core._lib.namespace",
    "is_array": "isreshape_core._lib.namespace",
    "check_choice": "isreshape_core._lib.checks",
    "check_rho_min": "isreshape_core._lib.checks",
    "check_logq": "isreshape_core._weights",
    "check_loss_arguments": "isreshape_core._loss",
    "check_loss_options": "isreshape_core._loss",
    "prepare_loss_inputs": "isreshape_core._loss",
    "require": "isreshape_core._versions",
    "row_coefficients": "isreshape_core._loss",
    "split_loss_options": "isreshape_core._loss",
    "token_gradient": "isreshape_core._loss",
    "UnitGradient": "isreshape_core._loss",
    "unit_loss": "isreshape_core._loss",
    "units_from_row_sums": "isreshape_core._loss",
}


def test_all_names_resolve_to_the_private_definitions():
    assert sorted(extend.__all__) == sorted(DEFINED_IN)
    for name, module in DEFINED_IN.items():
        assert getattr(extend, name) is getattr(importlib.import_module(module), name), name


@pytest.mark.parametrize("name", sorted(DEFINED_IN))
def test_module_docstring_lists_every_name(name):
    role = {"Array": ":data:", "UnitGradient": ":class:"}.get(name, ":func:")
    assert f"{role}`{name}`" in extend.__doc__


def _private_core_imports(path: Path) -> list[str]:
    """``module:line`` of every import of ``isreshape_core._*`` in the file at ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            private = len(parts) > 1 and parts[1].startswith("_") and not parts[1].startswith("__")
            if parts[0] == "isreshape_core" and private:
                found.append(f"{module}:{node.lineno}")
                break
    return found


def _product_sources() -> list[Path]:
    return [
        path
        for folder in ("adapters", "isreshape_cli")
        for path in sorted((ROOT / folder).rglob("*.py"))
    ]


def test_the_scan_finds_a_private_import(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import isreshape_core\nfrom isreshape_core import _loss\n"
        "from isreshape_core import __version__\nfrom isreshape_core.extend import require\n"
    )
    assert _private_core_imports(source) == ["isreshape_core._loss:2"]


def test_adapters_and_cli_import_no_private_core_module():
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in _product_sources()
        if (found := _private_core_imports(path))
    }
    assert not offenders, (
        f"import these names from isreshape_core or isreshape_core.extend instead: {offenders}"
    )
