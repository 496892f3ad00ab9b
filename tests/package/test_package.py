"""The built distributions: the wheel and the sdist hold what they should, and the wheel, installed
(not editable) into a fresh virtual environment without torch, JAX or CuPy, imports and runs.

Run by ``nox -s tests_package``, which builds both with ``python -m build`` (the sdist, then the
wheel from the sdist, so the sdist is known to build) and points ``ISRESHAPE_DIST`` at them;
elsewhere the module skips. The adapters whose framework is missing fail at import with a message
naming the extra to install; ``isreshape_cupy`` imports without CuPy (its generic path runs on
NumPy arrays), as its docstring says.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

DIST = os.environ.get("ISRESHAPE_DIST")
if not DIST:
    pytest.skip(
        "run by `nox -s tests_package` (ISRESHAPE_DIST: the folder of the built wheel and sdist)",
        allow_module_level=True,
    )

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("isreshape_core", "isreshape_cli", "isreshape_torch", "isreshape_jax", "isreshape_cupy")
# The adapters that need their framework, and the extra that installs it.
NEEDS_FRAMEWORK = {"isreshape_torch": "torch", "isreshape_jax": "jax"}
SDIST_PATHS = ("isreshape_core", "isreshape_cli", "adapters", "tests", "docs", "benchmarks",
               "examples", "README.md", "noxfile.py", "mkdocs.yml", "pyproject.toml")  # fmt: skip


def _one(pattern: str) -> pathlib.Path:
    found = sorted(pathlib.Path(DIST).glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {DIST}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def wheel() -> pathlib.Path:
    return _one("isreshape-*.whl")


@pytest.fixture(scope="module")
def sdist() -> pathlib.Path:
    return _one("isreshape-*.tar.gz")


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put the source tree or the nox session's
    packages on the fresh environment's path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> pathlib.Path:
    """A fresh virtual environment with the wheel installed (and its dependencies only)."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, env=_clean_env())
    python = path / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, env=_clean_env()
    )
    return path


def run_in(venv: pathlib.Path, args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True)


def test_wheel_holds_the_five_packages_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top - dist_info == set(PACKAGES)
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
    for module in ("verl.py", "trl.py"):
        assert f"isreshape_torch/{module}" in names
    assert "isreshape_cupy/kernels.py" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def _metadata(wheel: pathlib.Path) -> list[str]:
    archive = zipfile.ZipFile(wheel)
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    return archive.read(name).decode().splitlines()


def test_wheel_requirements_fit_users_machines(wheel):
    requires = [line.split(":", 1)[1].strip() for line in _metadata(wheel)
                if line.startswith("Requires-Dist:")]  # fmt: skip
    base = sorted(r.split(">=")[0] for r in requires if "extra ==" not in r)
    assert base == ["array-api-compat", "array-api-extra", "numpy"]
    extras = {r.split(";")[1].split("==")[1].strip(" '\"") for r in requires if ";" in r}
    assert {"torch", "jax", "cupy", "verl", "trl", "test", "plot", "docs", "all"} <= extras
    torch = [r.split(";")[0] for r in requires if r.startswith("torch")]
    # In every extra that pulls torch (torch, verl, trl, all): no cap at one machine's build,
    # users bring newer (CUDA) builds.
    assert torch and set(torch) == {"torch>=2.5"}, torch
    assert not [r for r in requires if "2.13" in r], requires


def test_sdist_holds_the_tracked_sources(sdist):
    names = tarfile.open(sdist).getnames()
    prefix = names[0].split("/")[0]
    inside = {n[len(prefix) + 1 :] for n in names if n.startswith(prefix + "/")}
    for path in ("PKG-INFO", "pyproject.toml", "README.md", "noxfile.py", "mkdocs.yml",
                 "isreshape_core/__init__.py", "adapters/isreshape_torch/verl.py",
                 "tests/conftest.py", "tests/_helpers.py", "docs/index.md"):  # fmt: skip
        assert path in inside, path
    assert not [n for n in inside if n.startswith((".nox/", ".git/", "site/", "dist/"))]
    assert not [n for n in inside if "__pycache__" in n or n.endswith(".pyc")]
    if (ROOT / ".git").exists():  # built from a checkout: every tracked file of those paths
        tracked = subprocess.run(
            ["git", "ls-files", "--", *SDIST_PATHS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        tracked = [t for t in tracked if (ROOT / t).exists()]  # a deletion not yet committed
        assert tracked and not sorted(set(tracked) - inside)


IMPORTS = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        out[name] = {"file": module.__file__}
    except ImportError as error:
        out[name] = {"error": str(error)}
import numpy as np
from isreshape_cupy import is_reshape_loss_and_grad
rng = np.random.default_rng(0)
logp = rng.normal(-1.0, 0.1, (4, 3))
loss, grad, metrics = is_reshape_loss_and_grad(logp, logp + 0.05, rng.normal(size=4))
out["cupy_generic_path"] = [float(loss), list(grad.shape)]
print(json.dumps(out))
"""


def test_packages_import_from_the_installed_wheel(venv, tmp_path):
    result = run_in(venv, [str(venv / "bin" / "python"), "-c", IMPORTS, *PACKAGES], tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    site = str(venv)
    for name in ("isreshape_core", "isreshape_cli", "isreshape_cupy"):
        assert out[name]["file"].startswith(site), out[name]  # the wheel, not the source tree
    for name, extra in NEEDS_FRAMEWORK.items():
        message = out[name].get("error", "")
        assert f"pip install 'isreshape[{extra}]'" in message, out[name]
        assert "not installed" in message
    assert out["cupy_generic_path"][1] == [4, 3]
    assert np.isfinite(out["cupy_generic_path"][0])


def test_console_script_help(venv, tmp_path):
    result = run_in(venv, [str(venv / "bin" / "isreshape"), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "diagnose" in result.stdout and "demo" in result.stdout


def test_console_script_diagnose(venv, tmp_path):
    l = np.random.default_rng(0).normal(0.0, 1.0, 500)
    np.save(tmp_path / "log_w.npy", l)
    script = str(venv / "bin" / "isreshape")
    text = run_in(venv, [script, "diagnose", "log_w.npy"], tmp_path)
    assert text.returncode == 0, text.stderr
    assert "verdict" in text.stdout
    result = run_in(venv, [script, "diagnose", "log_w.npy", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    w = np.exp(l - l.max())
    assert report["n"] == [500.0]
    np.testing.assert_allclose(report["ess_ratio_at_1"], [w.sum() ** 2 / (w**2).sum() / 500])
