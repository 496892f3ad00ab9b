"""Helpers for the test suite: backend discovery, conversion to NumPy, reference computations."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

ALL_BACKENDS = ("numpy", "strict", "torch", "jax", "cupy")


def _usable(name: str, module: str) -> bool:
    """Whether the backend's module is installed (and, for CuPy, sees a CUDA device: its wheel
    imports without one and fails at the first array)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:  # a folder named like the module is no install
        return False
    if name == "cupy":
        import cupy

        return bool(cupy.is_available())
    return True


def available_backends() -> list[str]:
    """Backends to run the ``xp`` fixture on: ``ISRESHAPE_XP`` (comma-separated) or every one
    that is installed (CuPy: with a GPU)."""
    requested = os.environ.get("ISRESHAPE_XP")
    names = [b.strip() for b in requested.split(",")] if requested else list(ALL_BACKENDS)
    modules = {
        "numpy": "numpy",
        "strict": "array_api_strict",
        "torch": "torch",
        "jax": "jax",
        "cupy": "cupy",
    }
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"ISRESHAPE_XP names unknown backends {unknown}; known: {ALL_BACKENDS}")
    out = []
    for name in names:
        if _usable(name, modules[name]):
            out.append(name)
        elif requested:
            raise RuntimeError(
                f"ISRESHAPE_XP asks for {name!r}, which is not installed"
                + (" or sees no CUDA device" if name == "cupy" else "")
            )
    return out


def get_namespace(name: str):
    """The array-API namespace for a backend name, configured for float64."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "strict":
        import array_api_strict as xp

        return xp
    if name == "torch":
        import array_api_compat.torch as xp
        import torch

        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        return xp
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        return xp
    if name == "cupy":
        import array_api_compat.cupy as xp

        return xp
    raise ValueError(name)


def to_numpy(x) -> np.ndarray:
    """Any backend's array (or a Python number) as a float64-or-bool NumPy array."""
    if isinstance(x, (int, float, bool, np.ndarray, np.generic)):
        return np.asarray(x)
    mod = type(x).__module__
    if mod.startswith("array_api_strict"):
        import array_api_strict as s

        if x.dtype == s.bool:
            return np.asarray(x._array)
        return np.asarray(x._array)
    if mod.startswith("torch"):
        return x.detach().cpu().numpy()
    if mod.startswith("cupy"):  # no implicit conversion from device memory
        return x.get()
    return np.asarray(x)


def brute_force_ess(w: np.ndarray) -> float:
    """Kish's ESS by the textbook formula, with plain Python sums over ``w`` (1-D, weights >= 0)."""
    s1 = sum(float(v) for v in w)
    s2 = sum(float(v) ** 2 for v in w)
    return 0.0 if s2 == 0 else s1 * s1 / s2
