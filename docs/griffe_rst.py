"""Griffe extension: render the reStructuredText bits of our NumPy-style docstrings in mkdocs.

The docstrings are written for ``help()`` and Sphinx-style readers: ``.. math::`` blocks and
``:func:`name``` roles. mkdocstrings renders docstring text as Markdown, so this extension turns
each ``.. math::`` block into a ``$$ ... $$`` block (rendered by MathJax through
``pymdownx.arithmatex``) and each role into inline code. The source docstrings are unchanged.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj):`~?([^`]+)`")
_MATH = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)\n"
    r"(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)*)",
    re.M,
)


def _math_block(match: re.Match) -> str:
    indent = match["indent"]
    body = match["first"].strip() + "\n" + textwrap.dedent(match["body"])
    body = body.strip("\n")
    lines = [f"{indent}$$", *(f"{indent}{line}" for line in body.splitlines()), f"{indent}$$"]
    return "\n".join(lines) + "\n\n"


_ITEM_SECTIONS = {"Parameters", "Returns", "Yields", "Attributes", "Raises", "Other Parameters"}


def _plain_item_types(text: str) -> str:
    """Drop inline-code marks from the unindented item lines (``name : type`` or ``type``) of
    the NumPy sections that mkdocstrings renders as tables: it shows the type as code already."""
    lines = text.split("\n")
    section = None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and set(lines[i + 1]) == {"-"} and line.strip():
            section = line.strip()
        elif section in _ITEM_SECTIONS and line[:1] not in ("", " ", "-"):
            lines[i] = line.replace("``", "")
    return "\n".join(lines)


def rst_to_markdown(text: str) -> str:
    """The docstring ``text`` with ``.. math::`` blocks as ``$$`` blocks, roles as code, and
    table item types without inline-code marks."""
    text = _ROLE.sub(r"`\1`", _MATH.sub(_math_block, text + "\n"))
    return _plain_item_types(text).rstrip("\n")


class RstToMarkdown(Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, node: Any, obj: Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
