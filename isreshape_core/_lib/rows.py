"""Per-row parameters: a number, or one value per row of the batch (the shape without ``axis``).

``gamma``, ``rho_min``, ``tau``, ... may be given per row. :func:`row_param` lays such a value
out against the full array (a size-1 dimension at ``axis``), :func:`batch_param` against the
reduced batch shape, and :func:`squeeze_row` takes the first layout to the second.
"""

from __future__ import annotations

import numbers
from typing import Any

from .dtypes import as_compute_array
from .namespace import Array, Namespace, namespace

__all__ = ["batch_param", "row_param", "squeeze_row"]


def _mismatch(name: str, value: Any, batch: tuple, of: str, axis: int) -> ValueError:
    return ValueError(
        f"{name} of shape {tuple(value.shape)} does not broadcast to the batch shape {batch} "
        f"(the shape of {of} without axis {axis}); pass a number or one value per row (an "
        f"array broadcastable to {batch})"
    )


def row_param(xp: Namespace, value: Any, axis: int, like: Array, name: str, of: str = "log_w"):
    """``value`` (a real number or an array broadcastable to the batch shape of ``like``) as an
    array of ``like``'s dtype with a size-1 dimension at ``axis``; 0-d for a number.

    ``of`` names the array whose batch shape it must match, for the error message.
    """
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "shape")):
        raise TypeError(f"{name} must be a real number or an array, got {type(value).__name__}")
    if isinstance(value, numbers.Real):  # Python or NumPy scalar
        return as_compute_array(xp, float(value), like=like)
    namespace(like, value)  # one namespace for all arrays (TypeError otherwise)
    batch = tuple(s for i, s in enumerate(like.shape) if i != axis)
    if value.ndim > len(batch):
        raise _mismatch(name, value, batch, of, axis)
    out = value if value.dtype == like.dtype else xp.astype(value, like.dtype)
    if out.ndim == 0:
        return out
    # Right-align against the batch shape, then re-insert `axis`.
    out = xp.reshape(out, (1,) * (len(batch) - out.ndim) + tuple(out.shape))
    out = xp.expand_dims(out, axis=axis)
    for i, (have, want) in enumerate(zip(out.shape, like.shape, strict=True)):
        if i != axis and have not in (1, want):
            raise _mismatch(name, value, batch, of, axis)
    return out


def batch_param(xp: Namespace, value: Any, like: Array, shape: tuple) -> Array:
    """A number or an array broadcast to the batch ``shape``, in ``like``'s dtype."""
    value = as_compute_array(xp, value, like.dtype, like=like)
    return xp.broadcast_to(value, shape)


def squeeze_row(xp: Namespace, value: Array, axis: int) -> Array:
    """A :func:`row_param` value back in the batch layout (0-d stays 0-d)."""
    return value if value.ndim == 0 else xp.squeeze(value, axis=axis)
