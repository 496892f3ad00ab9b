"""The ``xp`` fixture: every core test runs on each array backend that is installed (float64)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from _helpers import available_backends, get_namespace
from hypothesis import HealthCheck, settings

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# Helper scripts that tests run in subprocesses (e.g. with XLA_FLAGS set before jax imports) are
# not test modules, nor doctest modules.
collect_ignore_glob = ["*/_*.py"]

JAX_ONLY = os.environ.get("ISRESHAPE_XP") == "jax"
if JAX_ONLY:
    # Eager JAX compiles every operation once per shape and dtype, and the tests' arrays are
    # tiny: compile time, not run time, is the cost, so XLA is asked to spend little on it.
    import jax

    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True, scope="module")
def _release_jax_compilations():
    """Under JAX, drop the compiled executables and traces after each test module.

    Eager JAX keeps one executable per operation, shape and dtype, and every test module adds
    thousands: without this, the tests at the end of the suite ran up to 60 times slower than
    alone, with the caches (and the process's live objects) growing all through the run."""
    yield
    if JAX_ONLY:
        import jax

        jax.clear_caches()


# Each hypothesis example is a new shape, so a new set of compilations, under JAX.
settings.register_profile(
    "isreshape",
    max_examples=6 if JAX_ONLY else 40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("isreshape")


@pytest.fixture(params=available_backends())
def xp(request):
    """An array-API namespace: numpy, array-api-strict, torch, jax or cupy, all in float64."""
    return get_namespace(request.param)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("torch_loss")``: the module of ``benchmarks/torch_loss.py`` (the scripts
    of benchmarks/ are not a package, so they are imported by file)."""
    return _load_benchmark
