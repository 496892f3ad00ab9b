"""Griffe extension: render the reStructuredText bits of our NumPy-style docstrings in mkdocs.

The docstrings are written for ``help()`` and Sphinx-style readers: ``.. math::`` blocks,
``:math:`` roles, cross-reference roles (``:func:``, ``:class:``, ``:mod:``, ``:meth:``,
``:attr:``, ``:data:``, ``:obj:``) and ``:ref:`title <label>``` pointers to sections of the
documentation. mkdocstrings renders docstring text as Markdown, so this extension turns

- each ``.. math::`` block into a ``$$ ... $$`` block and each ``:math:`x``` role into ``\\(x\\)``
  (both rendered by MathJax through ``pymdownx.arithmatex``, which keeps their backslashes and
  underscores away from Markdown);
- each cross-reference role into an optional mkdocs-autorefs link on the name in code: a link
  where the target has an entry in the API reference, plain code where it has none (a private
  helper, another library's function);
- each ``:ref:`` role into an autorefs link to the heading or anchor with that id (for example
  ``theory-objective`` on the theory page), titled by the heading where the role gives no title;
  an unknown label fails the strict build.

The source docstrings are unchanged.
"""

from __future__ import annotations

import html
import re
import textwrap
from pathlib import Path
from typing import Any

from griffe import Extension, Object
from griffe import NameResolutionError as _NameResolutionError

_XREF = re.compile(r":(?:py:)?(?P<role>func|class|mod|data|meth|attr|obj|exc):`(?P<target>[^`]+)`")
_INLINE_MATH = re.compile(r":math:`(?P<tex>[^`]+)`")
_REF = re.compile(r":ref:`(?P<body>[^`]+)`")
_TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<label>[^<>]+)>\s*$", re.S)
# A labelled heading (``## Title { #label }``) or an anchor before a bold title
# (``[](){#label}**Title.**``).
_LABELLED = re.compile(
    r"^#+ (?P<title>.+?) \{ #(?P<label>[\w-]+) \}\s*$"
    r"|\[\]\(\)\{#(?P<anchor>[\w-]+)\}\s*\*\*(?P<bold>.+?)\.?\*\*",
    re.M,
)
# Titles of the labels of the docs pages, for ``:ref:`label``` without a title.
_TITLES = {
    m["label"] or m["anchor"]: (m["title"] or m["bold"]).replace("`", "")
    for page in sorted(Path(__file__).parent.rglob("*.md"))
    for m in _LABELLED.finditer(page.read_text(encoding="utf-8"))
}
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


def _resolve(name: str, scope: Object | None, role: str) -> str:
    """The full path of ``name`` as Python would find it from ``scope`` (a dotted name resolves
    its first part), or ``name`` itself where griffe cannot resolve it. A function or class
    named like the module that defines it (a module ``pkg.f`` holding ``f``) resolves to the
    member, not to the module."""
    if scope is None:
        return name
    head, dot, rest = name.partition(".")
    try:
        path = scope.resolve(head) + dot + rest
    except (_NameResolutionError, KeyError, AttributeError):
        path = name
    if role != "mod":
        try:
            target = scope.modules_collection[path]
        except (KeyError, AttributeError, ValueError):
            return path
        last = path.rsplit(".", 1)[-1]
        if target.is_module and last in target.members:
            return f"{path}.{last}"
    return path


def _xref(match: re.Match, scope: Object | None) -> str:
    target = match["target"].strip()
    titled = _TITLED.match(target)
    if titled:  # :func:`title <name>`
        title, name = titled["title"], titled["label"].lstrip("~")
    else:
        name = target.lstrip("~")
        title = name.rsplit(".", 1)[-1] if target.startswith("~") else name
    identifier = html.escape(_resolve(name, scope, match["role"]), quote=True)
    return f'<autoref identifier="{identifier}" optional>`{title}`</autoref>'


def _ref(match: re.Match) -> str:
    body = match["body"].strip()
    titled = _TITLED.match(body)
    if titled:
        title, label = titled["title"], titled["label"].strip()
    else:
        label = body
        title = _TITLES.get(label, label)
        if label.startswith("theory-") and label in _TITLES:
            title = f"Theory: {title}"
    return f"[{title}][{label}]"


def rst_to_markdown(text: str, scope: Object | None = None) -> str:
    """The docstring ``text`` with ``.. math::`` blocks as ``$$`` blocks, ``:math:`` roles as
    arithmatex inline math, cross-reference roles as autorefs links (names resolved from
    ``scope``), ``:ref:`` roles as heading links, and table item types without inline-code
    marks."""
    text = _MATH.sub(_math_block, text + "\n")
    text = _INLINE_MATH.sub(lambda m: rf"\({m['tex']}\)", text)
    text = _XREF.sub(lambda m: _xref(m, scope), text)
    text = _REF.sub(_ref, text)
    return _plain_item_types(text).rstrip("\n")


class RstToMarkdown(Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`, once the object tree
    is complete (so that names resolve)."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = rst_to_markdown(obj.docstring.value, obj)
