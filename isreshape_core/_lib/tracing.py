"""Eager or traced: whether values may be read, and NaN for traced rows with invalid inputs.

Traced code (``jax.jit``, ``torch.compile``) cannot raise on values; the public functions check
values eagerly and, under tracing, return NaN for the rows whose inputs hold NaN or ``+inf``
instead of a plausible finite number.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
from array_api_compat import is_cupy_array, is_jax_array, is_torch_array

from .namespace import Array, Namespace, is_array

if TYPE_CHECKING:  # reduce.py imports this module
    from .reduce import Reducer

__all__ = [
    "eager_all",
    "host_values",
    "is_concrete",
    "nan_or_plus_inf",
    "nonfinite_rows",
    "poison",
    "traced_bad_rows",
]


def is_concrete(x: Array) -> bool:
    """True where the values of ``x`` may be read cheaply: not traced by JAX or torch.compile."""
    if is_jax_array(x):
        return not any(cls.__name__.endswith("Tracer") for cls in type(x).__mro__)
    if is_torch_array(x):
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return False
        functorch = getattr(torch._C, "_functorch", None)
        if functorch is not None and functorch.is_functorch_wrapped_tensor(x):
            return False
        return x.device.type != "meta"
    return True


def eager_all(xp: Namespace, x: Array) -> bool:
    """Whether ``x`` (boolean) is concrete and all true: one host read, and ``False`` (nothing
    read) under tracing, so that a shortcut it guards leaves traced code as it is."""
    return is_concrete(x) and bool(xp.all(x))


def host_values(x: Array) -> np.ndarray:
    """The values of an eager array as a NumPy array of its dtype: one read (a copy where the
    array lives on another device), for decisions taken on the host."""
    if is_torch_array(x):
        # tolist dispatches no operator (numpy() dispatches a detach), and copies off a GPU.
        return np.asarray(x.tolist(), dtype=str(x.dtype).removeprefix("torch."))
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def nan_or_plus_inf(xp: Namespace, x: Array) -> Array:
    """Where ``x`` is NaN or ``+inf`` (the values a log weight may not take), as one comparison:
    ``not x < inf`` (``isnan`` is a scalar loop in some compilers' generated code)."""
    return ~(x < xp.inf)


def nonfinite_rows(
    xp: Namespace, x: Array, axis: int | None, reducer: Reducer | None = None
) -> Array | None:
    """Where a traced input holds NaN or ``+inf``: a boolean array of the batch shape (all
    axes reduced for ``axis=None``), or ``None`` on eager inputs (which raise instead).

    Traced code cannot raise; the functions use this to return NaN for such rows
    (:func:`poison`) instead of a plausible finite value.
    """
    if is_concrete(x) and not is_jax_array(x):
        return None
    bad = nan_or_plus_inf(xp, x)
    if axis is None:
        out = xp.any(bad)
    else:
        out = xp.any(bad, axis=axis)
    if is_concrete(out):  # eager (also a JAX constant outside a trace): raised already
        return None
    if reducer is not None:
        out = reducer.max(xp.astype(out, x.dtype)) > 0
    return out


def traced_bad_rows(
    xp: Namespace, l: Array, axis: int, *params: Any, reducer: Reducer | None = None
) -> Array | None:
    """:func:`nonfinite_rows` of the log weights, or'ed with NaN in any traced array parameter
    (``rho_min``, ``gamma_min``, ... broadcast to the batch shape); ``None`` when all are eager."""
    bad = nonfinite_rows(xp, l, axis, reducer)
    for value in params:
        if is_array(value):
            nan = xp.isnan(value)
            if not is_concrete(nan):  # eager: checked (and raised) already
                bad = nan if bad is None else bad | nan
    return bad


def poison(xp: Namespace, value: Array, bad: Array | None) -> Array:
    """``value`` with NaN where ``bad`` (see :func:`nonfinite_rows`); unchanged for ``None``."""
    if bad is None:
        return value
    return xp.where(bad, xp.nan, value)
