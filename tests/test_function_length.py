"""No function of the product code is longer than 60 lines of code (docstring, blank and comment
lines not counted): the limit the project's code style sets."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("isreshape_core", "isreshape_cli", "adapters")
LIMIT = 60
_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


def code_lines(source: str) -> set[int]:
    """The line numbers that hold a token other than a comment or layout."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def function_lengths(source: str) -> dict[str, int]:
    """``{name:line: lines of code}`` of every function, signature included, docstring not."""
    code = code_lines(source)
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        span = set(range(node.lineno, node.end_lineno + 1))
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            span -= set(range(first.lineno, first.end_lineno + 1))
        lengths[f"{node.name}:{node.lineno}"] = len(span & code)
    return lengths


def test_the_counter_counts_code_not_docstrings_or_comments():
    source = 'def f(x):\n    """Doc.\n\n    More."""\n    # why\n\n    y = x\n    return y\n'
    assert function_lengths(source) == {"f:1": 3}


def test_no_function_over_the_limit():
    long = {
        f"{path.relative_to(ROOT)}:{name}": n
        for folder in PRODUCT
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, n in function_lengths(path.read_text()).items()
        if n > LIMIT
    }
    assert not long, f"functions over {LIMIT} lines of code (split them): {long}"
