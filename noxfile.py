"""Sessions: ``tests(backend)`` for numpy, strict, torch, jax; ``lint``.

``nox -s tests`` runs every backend, each in its own virtual environment; ``nox -s lint tests``
is what CI runs (``.ci/run``).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

# torch==2.13.0 is the CPU build on these machines' local wheel store; an open range would pull a
# multi-GB CUDA build from the registry.
BACKEND_REQUIREMENTS = {
    "numpy": [],
    "strict": [],
    "torch": ["torch==2.13.0"],
    "jax": ["jax>=0.4.35"],
}


@nox.session
@nox.parametrize("backend", list(BACKEND_REQUIREMENTS))
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite with the ``xp`` fixture restricted to one array backend."""
    if BACKEND_REQUIREMENTS[backend]:
        session.install(*BACKEND_REQUIREMENTS[backend])
    session.install("-e", ".[test]")
    args = session.posargs or ["-q"]
    paths = ["tests"]
    if backend == "numpy":
        # The docstring examples use numpy inputs: run them once, here.
        paths = ["--doctest-modules", "isreshape_core", "tests"]
    session.run(
        "python",
        "-m",
        "pytest",
        *paths,
        *args,
        env={"ISRESHAPE_XP": backend, "TORCHINDUCTOR_COMPILE_THREADS": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
