"""The dtype the core computes in, and the largest exponent that dtype can take."""

from __future__ import annotations

import math
from typing import Any

from .namespace import Array, Namespace, array_device

__all__ = ["as_compute_array", "compute_dtype", "log_max"]


def compute_dtype(xp: Namespace, x: Array) -> Any:
    """float64 for float64 inputs, float32 for every other input (half, bfloat16, ints, bool)."""
    if x.dtype == xp.float64:
        return xp.float64
    return xp.float32


def as_compute_array(xp: Namespace, x: Any, dtype: Any = None, *, like: Array = None) -> Array:
    """``x`` as an array of ``xp`` in at least float32 (or exactly ``dtype`` when given)."""
    if not hasattr(x, "shape"):
        dev = None if like is None else array_device(like)
        target = dtype if dtype is not None else (xp.float32 if like is None else like.dtype)
        return xp.asarray(x, dtype=target, device=dev)
    target = dtype if dtype is not None else compute_dtype(xp, x)
    if x.dtype != target:
        x = xp.astype(x, target)
    return x


def log_max(xp: Namespace, dtype: Any) -> float:
    """A value a little below ``log(finfo(dtype).max)``: ``exp`` of anything up to it is finite.

    ``finfo`` describes the dtype, not the data, so this Python float is safe under tracing.
    """
    cap = math.log(float(xp.finfo(dtype).max))
    eps = float(xp.finfo(dtype).eps)
    return cap * (1.0 - 4.0 * eps)
