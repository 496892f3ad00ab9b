"""Argument checks at the public boundary, each raising an error that names the argument.

Value checks of arrays run only on concrete (eager) arrays: traced code cannot raise, and the
functions return NaN for invalid traced rows instead (:mod:`.tracing`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from array_api_compat import array_namespace

from .namespace import Array, Namespace, is_array
from .tracing import is_concrete, nan_or_plus_inf

__all__ = [
    "check_choice",
    "check_count",
    "check_gamma",
    "check_gamma_bounds",
    "check_in_interval",
    "check_log_weights",
    "check_mask_type",
    "check_positive_number",
    "check_real_floating",
    "check_rho_min",
    "check_same_shape",
    "normalize_axis",
]


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """``axis`` as a non-negative index; a clear error when it is out of range."""
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if ndim == 0:
        raise ValueError(
            f"{name}={axis} cannot reduce a 0-d array; pass at least one sample along {name}"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimension(s)")
    return int(axis) % ndim


def check_real_floating(xp: Namespace, x: Array, name: str = "log_w") -> None:
    """Refuse bool, integer and complex arrays where log weights or log-probabilities go.

    A bool array is almost always a mask passed in the wrong place, and an integer one would be
    rounded to float32 (``1e8 + 1`` is not representable there): convert explicitly instead.
    """
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got "
            f"{x.dtype}; convert it explicitly, e.g. `{name}.astype(float64)` (integers are not "
            "rounded silently; a bool array is a mask: pass it as `mask`)"
        )


def check_log_weights(xp: Namespace, log_w: Array, name: str = "log_w") -> None:
    """Reject NaN and ``+inf`` (``-inf`` is weight 0 and allowed); eager inputs only."""
    if not is_concrete(log_w):
        return
    # The result, not only the input, must be concrete: inside jax.jit a constant closed over is
    # concrete, but what is computed from it is traced (and then NaN rows are made NaN instead).
    bad = xp.any(nan_or_plus_inf(xp, log_w))
    if is_concrete(bad) and bool(bad):
        raise ValueError(
            f"{name} contains NaN or +inf; log weights must be finite or -inf (weight 0). "
            "Check logp/logq for NaN or use `mask` to drop those samples."
        )


def check_same_shape(arrays: dict[str, Any]) -> None:
    """Every value of ``arrays`` (name to value, in order) must be an array, all of one shape.

    Checked before the namespace is looked up, whose error would not name the argument.
    """
    for name, value in arrays.items():
        if not hasattr(value, "shape"):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    names = list(arrays)
    first = tuple(arrays[names[0]].shape)
    for name in names[1:]:
        shape = tuple(arrays[name].shape)
        if shape != first:
            together = ", ".join(names[:-1]) + " and " + names[-1]
            raise ValueError(
                f"{together} must have the same shape; {name} has {shape}, {names[0]} {first}"
            )


def check_mask_type(mask: Any, name: str = "mask") -> None:
    """``mask`` must be ``None`` or an array (checked before the namespace is looked up, whose
    error would not name the argument)."""
    if mask is not None and not hasattr(mask, "shape"):
        raise TypeError(
            f"{name} must be a boolean array (of the log weights' namespace) or None, got "
            f"{type(mask).__name__}; convert it first, e.g. `xp.asarray({name}, dtype=bool)`"
        )


def check_choice(value: Any, name: str, choices: tuple, hint: str = "") -> None:
    """``value`` must be one of the strings ``choices``; ``hint`` says which to pick."""
    if not isinstance(value, str) or value not in choices:
        message = f"{name} must be one of {choices!r}, got {value!r}"
        raise ValueError(f"{message}; {hint}" if hint else message)


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _interval_text(low: float, high: float, low_open: bool, allow_inf: bool) -> str:
    if math.isfinite(high):
        return f"lie in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"
    sign = ">" if low_open else ">="
    if allow_inf:
        return f"be a number {sign} {_bound(low)} (or inf)"
    return f"be finite and {sign} {_bound(low)}"


def check_in_interval(
    value: Any,
    name: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    allow_inf: bool = False,
    meaning: str = "",
) -> None:
    """``value`` (a real number, or an array checked where concrete) must lie in the interval
    from ``low`` (excluded with ``low_open``) to ``high`` (included); an infinite ``high``
    admits ``inf`` only with ``allow_inf``. ``meaning`` says what the argument is."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "shape")):
        raise TypeError(f"{name} must be a real number or an array, got {type(value).__name__}")
    label = f"{name} ({meaning})" if meaning else name
    text = _interval_text(low, high, low_open, allow_inf)

    def inside(v: Any, finite: Any) -> Any:
        above = v > low if low_open else v >= low
        return above & (v <= high) & finite  # NaN fails every comparison

    if isinstance(value, numbers.Real):  # Python or NumPy scalar (or a traced symbolic float)
        if not inside(value, allow_inf or abs(value) < math.inf):  # comparisons: they trace
            raise ValueError(f"{label} must {text}, got {value!r}")
        return
    if is_concrete(value):
        xp = array_namespace(value)
        finite = True if allow_inf or math.isfinite(high) else xp.isfinite(value)
        ok = xp.all(inside(value, finite))
        if is_concrete(ok) and not bool(ok):
            raise ValueError(f"{label} must {text} everywhere; got values outside it")


def check_gamma(gamma: Any, name: str = "gamma") -> None:
    """``gamma`` must lie in [0, 1]."""
    check_in_interval(gamma, name, 0.0, 1.0)


def check_rho_min(rho_min: Any, name: str = "rho_min") -> None:
    """``rho_min`` must lie in (0, 1]."""
    check_in_interval(rho_min, name, 0.0, 1.0, low_open=True)


def check_gamma_bounds(gamma_min: Any, gamma_max: Any) -> None:
    """``gamma_min`` and ``gamma_max`` must lie in [0, 1], ``gamma_min <= gamma_max``."""
    check_gamma(gamma_min, "gamma_min")
    check_gamma(gamma_max, "gamma_max")
    if isinstance(gamma_min, numbers.Real) and isinstance(gamma_max, numbers.Real):
        if gamma_min > gamma_max:
            raise ValueError(
                f"gamma_min={gamma_min!r} exceeds gamma_max={gamma_max!r}; pass "
                "gamma_min <= gamma_max"
            )
        return
    arrays = [v for v in (gamma_min, gamma_max) if is_array(v)]
    if all(is_concrete(v) for v in arrays):
        xp = array_namespace(*arrays)
        ordered = xp.all(xp.asarray(gamma_min <= gamma_max))
        if is_concrete(ordered) and not bool(ordered):
            raise ValueError(
                "gamma_min exceeds gamma_max for some rows; pass gamma_min <= gamma_max everywhere"
            )


def check_positive_number(value: Any, name: str, hint: str = "") -> float:
    """``value`` must be a finite Python number > 0 (a static setting, not an array)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive Python number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        message = f"{name} must be a finite number > 0, got {value!r}"
        raise ValueError(f"{message}; {hint}" if hint else message)
    return float(value)


def check_count(value: Any, name: str, *, positive: bool = False) -> int:
    """``value`` must be a non-negative int (``positive``: at least 1), e.g. an iteration count."""
    least = 1 if positive else 0
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    return int(value)
