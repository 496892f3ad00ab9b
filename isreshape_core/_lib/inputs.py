"""The arrays of a public call (log weights, mask, rewards): validated, promoted and broadcast."""

from __future__ import annotations

from typing import Any

from .checks import check_log_weights, check_mask_type, check_real_floating, normalize_axis
from .dtypes import as_compute_array
from .namespace import Array, Namespace, namespace
from .tracing import is_concrete

__all__ = ["broadcast_mask", "broadcast_rewards", "prepare_log_weights"]


def broadcast_mask(xp: Namespace, mask: Array | None, shape: tuple, name: str = "mask") -> Array:
    """``mask`` as a boolean array of ``shape`` (``None`` keeps every sample)."""
    if mask is None:
        return None
    check_mask_type(mask, name)
    if mask.dtype != xp.bool:
        raise TypeError(
            f"{name} must have a boolean dtype, got {mask.dtype}; pass e.g. `{name} > 0`"
        )
    try:
        return xp.broadcast_to(mask, shape)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the log weights' "
            f"shape {tuple(shape)}"
        ) from exc


def prepare_log_weights(
    log_w: Any, *, axis: int, mask: Array | None, name: str = "log_w", check_values: bool = True
) -> tuple[Namespace, Array, Array | None, int]:
    """Validate and promote log weights at a public boundary.

    Returns ``(xp, log_w, mask, axis)`` with ``log_w`` in the compute dtype, masked entries set to
    ``-inf`` (weight 0, never counted), ``mask`` broadcast to ``log_w.shape`` (or ``None``) and
    ``axis`` non-negative. ``check_values=False`` leaves the check for NaN and ``+inf`` to the
    caller (PSIS makes it on the row maxima, which is cheaper).
    """
    if not hasattr(log_w, "shape"):
        raise TypeError(f"{name} must be an array, got {type(log_w).__name__}")
    check_mask_type(mask)
    xp = namespace(log_w, mask)
    check_real_floating(xp, log_w, name)
    log_w = as_compute_array(xp, log_w)
    axis = normalize_axis(axis, log_w.ndim)
    if log_w.shape[axis] == 0:
        raise ValueError(
            f"{name} has no samples along axis {axis} (shape {tuple(log_w.shape)}); "
            "the reduction axis must not be empty"
        )
    mask = broadcast_mask(xp, mask, log_w.shape)
    if check_values:
        check_log_weights(xp, log_w if mask is None else xp.where(mask, log_w, 0.0), name)
    if mask is not None:
        log_w = xp.where(mask, log_w, -xp.inf)
    return xp, log_w, mask, axis


def broadcast_rewards(xp: Namespace, rewards: Any, like: Array, name: str = "rewards") -> Array:
    """``rewards`` broadcast to ``like``'s shape and dtype; NaN or inf rejected (eager inputs)."""
    if not hasattr(rewards, "shape"):
        raise TypeError(f"{name} must be an array, got {type(rewards).__name__}")
    r = as_compute_array(xp, rewards, like.dtype)
    try:
        r = xp.broadcast_to(r, like.shape)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{name} of shape {tuple(rewards.shape)} does not broadcast to the log weights' "
            f"shape {tuple(like.shape)}"
        ) from exc
    ok = xp.all(xp.isfinite(r)) if is_concrete(r) else None
    if ok is not None and is_concrete(ok) and not bool(ok):
        raise ValueError(f"{name} contains NaN or inf; rewards must be finite")
    return r
