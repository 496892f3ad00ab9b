"""The framework version check that the adapters and integrations run when they are imported.

Each adapter (``isreshape_torch``, ``isreshape_jax``) and integration (``isreshape_torch.verl``,
``isreshape_torch.trl``, ...) calls :func:`require` before it imports its framework, so that a
missing framework or one outside the range it is tested with fails at import with a message that
names the supported range and the extra to install, instead of an ``AttributeError`` deep inside
the framework later. Versions are read from the installed distribution's metadata, which needs no
import of the framework (verl imports the integration while it is itself being imported).

The range is a comma-separated list of clauses ``>=X``, ``>X``, ``<=X``, ``<X``, ``==X``,
compared on the release numbers as PEP 440 does (``0.10`` equals ``0.10.0``; a local label such as
``+cpu`` is ignored; a pre-release or dev release ``1.16.0rc1`` lies below ``1.16.0``, a post
release above it, and ``<0.10`` admits no pre-release of 0.10). It is not a full PEP 440
implementation: the core depends on no packaging library, and these ranges need no more.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re

__all__ = ["in_range", "installed_version", "require"]

_CLAUSE = re.compile(r"^\s*(>=|<=|==|>|<)\s*(\d+(?:\.\d+)*)\s*$")
_VERSION = re.compile(r"^\s*v?(\d+(?:\.\d+)*)(.*)$")
_PRE = re.compile(r"^[-_.]?(a|b|c|rc|alpha|beta|pre|preview|dev)", re.IGNORECASE)
_POST = re.compile(r"^[-_.]?(post|rev|r)\d*", re.IGNORECASE)
_WIDTH = 6  # release numbers are padded with zeros to this many parts before comparing


def _key(release: str, phase: int) -> tuple[int, ...]:
    parts = [int(p) for p in release.split(".")]
    return (*parts, *[0] * (_WIDTH - len(parts)), phase)


def _version_key(version: str) -> tuple[int, ...]:
    """Sort key of a version string: padded release numbers, then 0 (pre/dev), 1 (final) or 2
    (post)."""
    match = _VERSION.match(version.split("+", 1)[0])
    if match is None:
        raise ValueError(f"cannot read the version {version!r}: it does not start with a number")
    release, rest = match.groups()
    phase = 0 if _PRE.match(rest) else 2 if _POST.match(rest) else 1
    return _key(release, phase)


def in_range(version: str, supported: str) -> bool:
    """Whether ``version`` (e.g. ``"2.13.0+cpu"``) satisfies every clause of ``supported``
    (e.g. ``">=0.9,<0.10"``).

    Examples
    --------
    >>> in_range("0.9.1", ">=0.9,<0.10"), in_range("0.10.0", ">=0.9,<0.10")
    (True, False)
    >>> in_range("2.13.0+cpu", ">=2.5"), in_range("1.16.0rc1", ">=1.16")
    (True, False)
    """
    key = _version_key(version)
    # As PEP 440: <V admits no pre-release of V itself, >V no post-release (nor local build) of V.
    checks = {
        ">=": lambda a, b: a >= b,
        ">": lambda a, b: a[:-1] > b[:-1],
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a[:-1] < b[:-1],
        "==": lambda a, b: a[:-1] == b[:-1] and a[-1] == 1,
    }
    for clause in supported.split(","):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(
                f"cannot read the version range {supported!r}: each comma-separated clause is an "
                "operator (>=, >, <=, <, ==) and a release number such as 0.9 or 1.16.0"
            )
        op, release = match.groups()
        if not checks[op](key, _key(release, 1)):
            return False
    return True


def installed_version(distribution: str, module: str) -> str | None:
    """The installed version of ``distribution`` (its metadata), or, where it has no metadata
    (a source tree on ``sys.path``), ``module.__version__`` (``"unknown"`` where that is missing
    too); None where ``module`` is absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(importlib.import_module(module), "__version__", "unknown"))


def require(
    distribution: str,
    supported: str,
    *,
    tested: str,
    integration: str,
    extra: str,
    module: str | None = None,
) -> str:
    """Check that ``distribution`` is installed in the ``supported`` range; return its version.

    Parameters
    ----------
    distribution : str
        The framework's distribution name on the package index (``"verl"``, ``"trl"``).
    supported : str
        The range the integration supports, e.g. ``">=0.9,<0.10"`` (see the module docstring).
    tested : str
        The version(s) the integration's tests run against, named in the message.
    integration : str
        The importing module, named in the message (``"isreshape_torch.verl"``).
    extra : str
        The ``isreshape`` extra that installs a supported version (``"verl"``).
    module : str, optional
        The framework's import name where it differs from ``distribution``.

    Raises
    ------
    ImportError
        If the framework is not installed, its version cannot be determined, or it lies outside
        ``supported``; the message names the range, the version found and the extra to install.
    """
    found = installed_version(distribution, module or distribution.replace("-", "_"))
    install = f"pip install 'isreshape[{extra}]'"
    needs = f"{integration} needs {distribution} {supported} (tested with {tested})"
    if found is None:
        raise ImportError(f"{needs}, which is not installed. Install it with: {install}")
    try:
        _version_key(found)
        readable = True
    except ValueError:  # e.g. "unknown": unsupported, since it cannot be checked
        readable = False
    if not (readable and in_range(found, supported)):
        raise ImportError(
            f"{integration} supports {distribution} {supported} (tested with {tested}); found "
            f"{distribution} {found}. Install a supported version with: {install}"
        )
    return found
