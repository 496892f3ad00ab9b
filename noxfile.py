"""Nox sessions: ``tests(backend)``, ``tests_verl``, ``tests_trl``, ``tests_tunix``,
``tests_package``, ``docs`` and ``lint``.

Plain ``nox`` runs all but ``tests(backend='cupy')``, and is what CI runs (``.ci/run``, no GPU);
each array backend runs in its own virtual environment with the ``xp`` fixture restricted to it,
and the verl, TRL and Tunix integrations have their own environments because they pull large
frameworks.
``tests(backend='cupy')`` needs an NVIDIA GPU and is run by name; without one it stops at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

# torch==2.13.0 is the CPU build on these machines' local wheel store; an open range would pull a
# multi-GB CUDA build from the registry.
TORCH = "torch==2.13.0"
BACKEND_REQUIREMENTS = {
    "numpy": [],
    "strict": [],
    "torch": [TORCH],
    "jax": ["jax>=0.4.35", "optax>=0.2.4"],
    "cupy": ["cupy-cuda12x>=13"],
}
# The backends that need no GPU: the ones plain ``nox`` (and CI) runs.
CPU_BACKENDS = ["numpy", "strict", "torch", "jax"]
nox.options.sessions = [
    "lint",
    "docs",
    *[f"tests(backend='{backend}')" for backend in CPU_BACKENDS],
    "tests_verl",
    "tests_trl",
    "tests_tunix",
    "tests_package",
]
# The docstring examples run once, in the session that has their framework.
DOCTESTS = {
    "numpy": ["isreshape_core", "isreshape_cli", "adapters/isreshape_cupy"],
    "strict": [],
    "torch": [
        "adapters/isreshape_torch/__init__.py",
        "adapters/isreshape_torch/loss.py",
        "adapters/isreshape_torch/distributed.py",
    ],
    # isreshape_jax/tunix.py needs Tunix: its examples run in tests_tunix.
    "jax": ["adapters/isreshape_jax/__init__.py", "adapters/isreshape_jax/loss.py"],
    "cupy": [],
}
# The Tunix release isreshape_jax.tunix is tested with (its TUNIX_TESTED).
TUNIX = "google-tunix==0.1.7"
ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Set to 1 to keep the framework sessions' environments (verl, TRL, Tunix: 5 GB together).
KEEP_VENVS = "ISRESHAPE_NOX_KEEP_VENVS"


def release_venv(session: nox.Session) -> None:
    """Remove a passed framework session's environment (1.4 to 2 GB each), so that plain
    ``nox`` on a fresh clone peaks near 6 GB of disk rather than 8.4 GB (a CI run once ran out
    of disk); ``ISRESHAPE_NOX_KEEP_VENVS=1`` keeps it for a faster rerun. A failed session
    keeps its environment for debugging."""
    if os.environ.get(KEEP_VENVS) == "1":
        return
    location = getattr(session.virtualenv, "location", None)
    if location and os.path.isdir(location):
        shutil.rmtree(location)
        session.log(f"removed {location} to spare disk (set {KEEP_VENVS}=1 to keep it)")


@nox.session
@nox.parametrize("backend", list(BACKEND_REQUIREMENTS))
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite with the ``xp`` fixture restricted to one array backend.

    ``cupy`` runs on an NVIDIA GPU, the CuPy adapter's GPU tests included; on a machine without
    one it is skipped at once, with one line (a missing GPU is the machine's, not a failure)."""
    if backend == "cupy" and not nvidia_gpus():
        session.skip("tests(backend='cupy') needs an NVIDIA GPU: nvidia-smi lists none here")
    if BACKEND_REQUIREMENTS[backend]:
        session.install(*BACKEND_REQUIREMENTS[backend])
    session.install("-e", ".[test,plot]")
    doctests = ["--doctest-modules", *DOCTESTS[backend]] if DOCTESTS[backend] else []
    # One worker per core (xdist): the suite is CPU-bound, and under JAX mostly compile time.
    args = session.posargs or ["-q", "-p", "no:cacheprovider", "-n", "auto"]
    if backend == "cupy":
        # The GPU tests skip where CuPy sees no device: make that an error here instead.
        session.run("python", "-c", CUPY_SEES_GPU)
    session.run(
        "python", "-m", "pytest", "tests", *doctests, *args, env={"ISRESHAPE_XP": backend, **ENV}
    )


CUPY_SEES_GPU = (
    "import cupy, sys; cupy.is_available() or sys.exit("
    "'CuPy sees no CUDA device although nvidia-smi lists one: check the driver and that "
    "cupy-cuda12x matches its CUDA version')"
)


def nvidia_gpus() -> list[str]:
    """The GPUs that ``nvidia-smi -L`` lists (none where it is missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in listing.splitlines() if line.startswith("GPU ")]


@nox.session
def tests_verl(session: nox.Session) -> None:
    """The verl integration against real verl 0.9: the policy loss, the step hook over 2 gloo
    ranks, and the trainer ``is_reshape`` on verl's FSDP2 engine (a tiny model, CPU).

    verl is installed without its dependencies (its extras pin CUDA builds of torch, vLLM, ...);
    the ones its trainer modules import are listed here, torch pinned in the same install."""
    session.install("--no-deps", "verl==0.9.*")
    session.install(
        TORCH,
        "ray>=2.41.0",
        "tensordict>=0.8.0,!=0.9.0,<=0.10.0",
        "transformers>=5.5.3,<5.11,!=5.6.0",
        "omegaconf",
        "hydra-core",
        "codetiming",
        "orjson",
        "packaging",
        # imported by verl's v1 trainer and engine workers (verl_trainer.py)
        "TransferQueue>=0.1.10,<0.2",
        "datasets>=3,<6",
        "torchdata>=0.10,<0.12",
        "peft>=0.15,<1",
        "fastapi<1",
        "uvicorn<1",
        "cachetools>=5",
        "pillow>=10",
    )
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/integrations/test_verl.py",
        "tests/integrations/test_integration_versions.py",
        "--doctest-modules",
        "adapters/isreshape_torch/verl.py",
        "-q",
        env={"ISRESHAPE_XP": "numpy", **ENV},
    )
    release_venv(session)


@nox.session
def tests_trl(session: nox.Session) -> None:
    """The TRL GRPOTrainer integration (a few real steps on a tiny offline GPT-2) and the
    smoke test of experiment 4 (a tiny language model trained through TRL)."""
    session.install(TORCH, "trl>=1.16,<1.17")
    session.install("-e", ".[test,plot]")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/integrations/test_trl.py",
        "tests/integrations/test_integration_versions.py",
        "tests/experiments/test_exp4_smoke.py",
        "--doctest-modules",
        "adapters/isreshape_torch/trl.py",
        "-q",
        env={"ISRESHAPE_XP": "numpy", **ENV},
    )
    release_venv(session)


@nox.session
def tests_tunix(session: nox.Session) -> None:
    """The Tunix GRPO learner integration (real optimizer steps of a tiny Qwen3 built from a
    config, a character tokenizer, offline on CPU), against the Tunix release it is tested with."""
    session.install(TUNIX)
    session.install("-e", ".", "pytest>=8", "hypothesis>=6.100")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/integrations/test_tunix.py",
        "--doctest-modules",
        "adapters/isreshape_jax/tunix.py",
        "-q",
        "-p",
        "no:cacheprovider",
        env={"ISRESHAPE_XP": "numpy", "JAX_PLATFORMS": "cpu", **ENV},
    )
    release_venv(session)


@nox.session
def tests_package(session: nox.Session) -> None:
    """Build the sdist and, from it, the wheel (``python -m build``); install the wheel, not
    editable, into a fresh virtual environment without torch, JAX or CuPy; import the five
    packages there and run the ``isreshape`` command (``tests/package``)."""
    # The tests' conftest needs numpy and hypothesis; the package is not installed in this one.
    session.install("build>=1.2", "pytest>=8", "hypothesis>=6.100", "numpy>=1.26")
    dist = session.create_tmp() + "/dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", dist, ".")
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/package",
        "-q",
        "-p",
        "no:cacheprovider",
        env={"ISRESHAPE_DIST": dist},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site with ``mkdocs build --strict`` into ``site/``, then its smoke tests."""
    session.install("-e", ".[docs,test]")
    env = {"NO_MKDOCS_2_WARNING": "1", "ISRESHAPE_XP": "numpy"}
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env=env)
    session.run("python", "-m", "pytest", "tests/docs", "-q", "-p", "no:cacheprovider", env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
