"""Tests of isreshape_core/_versions.py: the framework version check of the adapters.

``in_range`` is compared with ``packaging`` (PEP 440's reference implementation) on generated
versions and ranges; ``require`` runs against faked installed versions.
"""

from __future__ import annotations

import importlib.metadata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isreshape_core import _versions
from isreshape_core._versions import in_range, require

packaging_version = pytest.importorskip("packaging.version")
packaging_specifiers = pytest.importorskip("packaging.specifiers")

release = st.lists(st.integers(0, 12), min_size=1, max_size=4).map(
    lambda parts: ".".join(map(str, parts))
)
suffix = st.sampled_from(["", "rc1", "a2", ".dev0", ".post1", "+cpu", "+cu128", "rc1+local"])
operator = st.sampled_from([">=", ">", "<=", "<", "=="])


@settings(max_examples=400)
@given(version=st.tuples(release, suffix).map("".join), clauses=st.lists(
    st.tuples(operator, release).map("".join), min_size=1, max_size=3))  # fmt: skip
def test_in_range_agrees_with_packaging(version, clauses):
    spec = ",".join(clauses)
    # packaging excludes pre-releases from a range unless asked; the check treats them as the
    # ordered versions they are, which is what prereleases=True compares.
    want = packaging_specifiers.SpecifierSet(spec, prereleases=True).contains(
        packaging_version.Version(version)
    )
    assert in_range(version, spec) == want, (version, spec)


@pytest.mark.parametrize(
    ("version", "spec", "want"),
    [
        ("0.9.1", ">=0.9,<0.10", True),
        ("0.9", ">=0.9,<0.10", True),
        ("0.10.0", ">=0.9,<0.10", False),
        ("0.10.0.dev0", ">=0.9,<0.10", False),
        ("0.8.2", ">=0.9,<0.10", False),
        ("1.16.0", ">=1.16,<1.17", True),
        ("1.16.0rc1", ">=1.16,<1.17", False),
        ("1.17.0", ">=1.16,<1.17", False),
        ("2.13.0+cpu", ">=2.5", True),
        ("2.4.1", ">=2.5", False),
        ("2.10.0", ">=2.5", True),  # numbers, not strings: 10 > 5
    ],
)
def test_in_range_cases(version, spec, want):
    assert in_range(version, spec) is want


@pytest.mark.parametrize("spec", ["~=0.9", ">=0.9,", "0.9", ">=0.9.x"])
def test_unreadable_range_is_an_error(spec):
    with pytest.raises(ValueError, match="cannot read the version range"):
        in_range("0.9.1", spec)


@pytest.fixture
def fake_versions(monkeypatch):
    """Replace the installed distributions' metadata by a dict (absent: not installed)."""
    installed: dict[str, str] = {}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(_versions.importlib.util, "find_spec", lambda name: None)
    return installed


ARGS = dict(tested="0.9.1", integration="isreshape_torch.verl", extra="verl")


def test_require_returns_a_supported_version(fake_versions):
    fake_versions["verl"] = "0.9.1"
    assert require("verl", ">=0.9,<0.10", **ARGS) == "0.9.1"


def test_require_names_the_range_the_version_and_the_extra(fake_versions):
    fake_versions["verl"] = "0.8.2"
    with pytest.raises(ImportError) as info:
        require("verl", ">=0.9,<0.10", **ARGS)
    assert str(info.value) == (
        "isreshape_torch.verl supports verl >=0.9,<0.10 (tested with 0.9.1); found verl 0.8.2. "
        "Install a supported version with: pip install 'isreshape[verl]'"
    )


def test_require_when_not_installed(fake_versions):
    with pytest.raises(ImportError) as info:
        require("verl", ">=0.9,<0.10", **ARGS)
    assert str(info.value) == (
        "isreshape_torch.verl needs verl >=0.9,<0.10 (tested with 0.9.1), which is not "
        "installed. Install it with: pip install 'isreshape[verl]'"
    )


def test_require_reads_version_attribute_without_metadata(monkeypatch, tmp_path):
    # A source tree on sys.path: no metadata, the version comes from the module itself.
    (tmp_path / "fakefw").mkdir()
    (tmp_path / "fakefw" / "__init__.py").write_text("__version__ = '0.9.3'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert require("fakefw", ">=0.9,<0.10", **ARGS) == "0.9.3"
    (tmp_path / "fakefw2").mkdir()
    (tmp_path / "fakefw2" / "__init__.py").write_text("")
    with pytest.raises(ImportError, match="found fakefw2 unknown"):
        require("fakefw2", ">=0.9,<0.10", **ARGS)
