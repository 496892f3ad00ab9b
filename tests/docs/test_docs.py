"""The documentation: API reference coverage, runnable examples, and a strict build of the site.

- every name in a package's ``__all__`` has an entry in ``docs/api/`` (read from the sources with
  ``ast``, so no framework is imported), and every public function and class has a docstring
  example (the examples themselves run as doctests in the nox session of their framework);
- the Python examples of ``docs/getting-started.md`` run (each in its own process, where its
  framework is installed) and print what the page says they print;
- ``mkdocs build --strict`` succeeds (no warning, no broken link or anchor) and the site has an
  entry for every public name and the experiments' figures (where mkdocs is installed: the
  ``docs`` nox session);
- the built HTML, as a reader sees it, holds no reStructuredText mark left unconverted (a role
  such as ``:math:`` or ``:func:``, a ``.. math::`` block) and no reference to a document that does
  not ship (``DESIGN.md``, ``shared/``, ``seeds/``, or the seed paper without a link to the theory
  page that presents it).
"""

from __future__ import annotations

import ast
import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Public modules and the file that defines their ``__all__``.
PACKAGES = {
    "isreshape_core": ROOT / "isreshape_core" / "__init__.py",
    "isreshape_torch": ROOT / "adapters" / "isreshape_torch" / "__init__.py",
    "isreshape_torch.verl": ROOT / "adapters" / "isreshape_torch" / "verl.py",
    "isreshape_torch.trl": ROOT / "adapters" / "isreshape_torch" / "trl.py",
    "isreshape_jax": ROOT / "adapters" / "isreshape_jax" / "__init__.py",
    "isreshape_jax.tunix": ROOT / "adapters" / "isreshape_jax" / "tunix.py",
    "isreshape_cupy": ROOT / "adapters" / "isreshape_cupy" / "__init__.py",
}

# The layer for adapters re-exports the private stages and checks; the module docstring holds its
# example, and it is listed in the reference like the packages.
REFERENCED = {**PACKAGES, "isreshape_core.extend": ROOT / "isreshape_core" / "extend.py"}


def _module_all(path: Path) -> list[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no __all__")


def _definition(path: Path, name: str) -> ast.AST | None:
    """The ``def``/``class`` of ``name`` in ``path`` or in the module it is imported from."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return node
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if any((a.asname or a.name) == name for a in node.names):
                source = path.parent / (node.module.replace(".", "/") + ".py")
                return _definition(source, name)
    return None  # a constant


def _api_entries() -> set[str]:
    entries = set()
    for page in (DOCS / "api").glob("*.md"):
        entries.update(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.M))
    return entries


def _documented(package: str, name: str, entries: set[str]) -> bool:
    # An entry names the package's member (`isreshape_core.ess`) or its defining module's member.
    return f"{package}.{name}" in entries or any(
        e.startswith(f"{package}.") and e.endswith(f".{name}") for e in entries
    )


@pytest.mark.parametrize("package", list(REFERENCED))
def test_api_reference_lists_every_public_name(package):
    entries = _api_entries()
    missing = [n for n in _module_all(REFERENCED[package]) if not _documented(package, n, entries)]
    assert not missing, f"docs/api/ has no entry for {package}: {missing}"


@pytest.mark.parametrize("package", list(PACKAGES))
def test_every_public_function_and_class_has_a_docstring_example(package):
    path = PACKAGES[package]
    without = []
    for name in _module_all(path):
        node = _definition(path, name)
        if node is None:
            continue
        doc = ast.get_docstring(node) or ""
        if ">>>" not in doc:
            without.append(name)
    assert not without, f"{package}: no docstring example in {without}"


def _examples() -> list[tuple[str, list[str]]]:
    """(code, claimed outputs) of each python block of getting-started.md."""
    text = (DOCS / "getting-started.md").read_text()
    out = []
    for match in re.finditer(r"```python\n(.*?)```\n\n(It prints .*?)(?:\n\n|$)", text, re.S):
        claims = re.findall(r"`([^`]+)`", match[2].split(":")[0].replace("\n", " "))
        out.append((match[1], claims))
    return out


def test_getting_started_has_three_examples_with_claims():
    examples = _examples()
    assert len(examples) == 3
    assert all(claims for _, claims in examples)


@pytest.mark.parametrize("index, framework", [(0, "torch"), (1, "jax"), (2, "numpy")])
def test_getting_started_example_prints_what_the_page_says(index, framework):
    pytest.importorskip(framework)
    if framework == "jax":
        pytest.importorskip("optax")
    code, claims = _examples()[index]
    assert f"import {framework}" in code
    env_paths = [str(ROOT), str(ROOT / "adapters")]
    run = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {env_paths!r}\n" + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for claim in claims:
        assert claim in run.stdout, f"{claim!r} not in the output:\n{run.stdout}"
    # The ESS ratio printed last (torch, jax) or by the exact-ESS rule (numpy) meets rho_min.
    ess = [float(x) for x in re.findall(r"ESS/n (\d\.\d+)", run.stdout)]
    assert ess[-1] >= 0.3 - 5e-4


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by ``mkdocs build --strict`` (skipped where mkdocs is not installed)."""
    for module in ("mkdocs", "mkdocstrings", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'isreshape[docs]')")
    home = tmp_path_factory.mktemp("home")
    site = home / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "", "HOME": str(home)},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    return site


def test_site_builds_strictly_with_every_public_name(site):
    html_text = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    assert "::: " not in html_text  # every reference entry was rendered
    for package, path in PACKAGES.items():
        for name in _module_all(path):
            assert re.search(rf'id="{re.escape(package)}\.(?:\w+\.)?{name}"', html_text), (
                package,
                name,
            )
    figures = {p.name for p in (site / "results").glob("*.png")}
    assert {"exp1_fixed_points.png", "exp2_gamma_rules.png", "exp3_staleness.png"} <= figures
    experiments = (site / "experiments" / "index.html").read_text()
    assert 'src="../results/exp1_fixed_points.png"' in experiments


# What a reader must never see in the built site.
_ROLE = re.compile(r"(?<![\w:]):(?:math|func|class|mod|meth|attr|data|ref|obj|exc|doc|py:\w+):")
_UNSHIPPED = re.compile(r"\bDESIGN\b|DESIGN\.md|\bshared/|\bseeds/")
_SEED = re.compile(
    r"\bthe seed\b(?!s)|\bseed(?:'s|\u2019s)|\bseed (?:paper|theorem|proposition|definition|"
    r"corollary|assumption|section)",
    re.IGNORECASE,
)
_THEORY_LINK = re.compile(r'<a\b[^>]*\bhref="(?:[^"]*/)?theory/(?:#[^"]*)?"[^>]*>.*?</a>', re.S)
_DROP = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")


def _reader_text(page: str) -> str:
    """The text of an HTML page as a reader sees it: no scripts, no tags, entities decoded."""
    return html.unescape(_TAG.sub("", _DROP.sub(" ", page)))


def site_problems(page: str) -> list[str]:
    """Leftover reST marks and references to documents that do not ship, in one HTML page.

    "The seed" (the paper the theory starts from) may be named only inside a link to the theory
    page, which presents it.
    """
    problems = []
    text = _reader_text(page)
    unlinked = _reader_text(_THEORY_LINK.sub(" ", page))
    for pattern, what, where in (
        (_ROLE, "reST role", text),
        (_UNSHIPPED, "document that does not ship", text),
        (_SEED, "the seed without a link to the theory page", unlinked),
    ):
        for m in pattern.finditer(where):
            context = " ".join(where[max(m.start() - 60, 0) : m.end() + 60].split())
            problems.append(f"{what}: {m[0]!r} in ...{context}...")
    if ".. math::" in text or "$$" in text or "``" in text:
        problems.append("a .. math:: block, $$ or a double backtick left unconverted")
    return problems


@pytest.mark.parametrize(
    "planted",
    [
        "<p>:math:<code>l_b = \\sum_t m_{bt}</code></p>",
        "<p>see :func:`gamma_ess`</p>",
        "<li>:class:<code>Reducer</code> and :data:<code>VERDICTS</code></li>",
        "<p>(DESIGN.md section 3 item 5)</p>",
        "<p>in <code>shared/seeds/</code></p>",
        "<p>the seed's closed form</p>",
        "<p>(seed Theorem 2.1)</p>",
        '<p><a href="../concepts/">the seed</a></p>',
        "<p>.. math:: x</p>",
    ],
)
def test_site_problems_finds_what_is_planted(planted):
    assert site_problems(f"<html><body>{planted}</body></html>")


@pytest.mark.parametrize(
    "clean",
    [
        '<p>the closed form of <a href="../../theory/#theory-paper">the seed</a></p>',
        '<p>the <span class="arithmatex">\\(l_b = \\sum_t m_{bt}\\)</span></p>',
        "<p>10 evaluation seeds; the random seed; <code>--seed</code></p>",
        "<p>axis: data: the key</p>",
    ],
)
def test_site_problems_passes_clean_pages(clean):
    assert site_problems(f"<html><body>{clean}</body></html>") == []


def test_built_pages_show_no_rest_markup_and_cite_only_shipped_documents(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 15
    found = [f"{p.relative_to(site)}: {q}" for p in pages for q in site_problems(p.read_text())]
    assert not found, "\n".join(found)


def test_inline_math_and_cross_references_render(site):
    core = (site / "api" / "core" / "index.html").read_text()
    # The :math: roles of log_weights, as MathJax (arithmatex) spans with their TeX intact.
    assert (
        '<span class="arithmatex">\\(l_b = \\sum_t m_{bt} (\\log p_{bt} - \\log q_{bt})\\)</span>'
        in core
    )
    # :func: roles link to the entries of the reference; :ref: roles to the theory page.
    assert re.search(
        r'<a class="autorefs autorefs-internal"[^>]*href="#isreshape_core\.gamma_ess"', core
    )
    assert re.search(r'href="\.\./\.\./theory/#theory-objective"', core)
    assert (site / "theory" / "index.html").is_file()
    # MathJax is served by the site itself, so the maths renders offline.
    assert (site / "javascripts" / "mathjax" / "tex-mml-chtml.js").is_file()
