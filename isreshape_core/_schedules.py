"""Warm-up schedules for the upper bound of gamma and the sensitivity guard.

See :ref:`theory-schedules`.

In the paper's "training trick" view (section 4.5), gamma < 1 controls variance and should rise
towards 1 as training proceeds (0.3 -> 1.0, like a learning-rate warm-up). A schedule gives the
upper bound; the adaptive gamma of the batch is then ``min(schedule(step), gamma*)``:
pass ``gamma_max=schedule(step)`` to :func:`select_gamma`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from ._array import check_gamma, is_concrete, namespace

__all__ = ["cosine_warmup", "linear_warmup", "sensitivity_guard"]

Schedule = Callable[[Any], Any]


def _check_schedule_args(init_value: float, end_value: float, transition_steps: int) -> None:
    check_gamma(init_value, "init_value")
    check_gamma(end_value, "end_value")
    if (
        not isinstance(transition_steps, numbers.Integral)
        or isinstance(transition_steps, bool)
        or transition_steps <= 0
    ):
        raise ValueError(f"transition_steps must be a positive int, got {transition_steps!r}")


def _progress(step: Any, transition_steps: int) -> Any:
    """``clip(step / transition_steps, 0, 1)`` for a Python number or an array."""
    if isinstance(step, numbers.Real) and not isinstance(step, bool):
        return min(max(step / transition_steps, 0.0), 1.0)
    if not hasattr(step, "shape"):
        raise TypeError(f"step must be a number or an array, got {type(step).__name__}")
    xp = namespace(step)
    dtype = step.dtype if xp.isdtype(step.dtype, "real floating") else xp.float32
    frac = xp.astype(step, dtype) / transition_steps
    return xp.clip(frac, 0.0, 1.0)


def linear_warmup(
    init_value: float = 0.3, end_value: float = 1.0, transition_steps: int = 1000
) -> Schedule:
    """A schedule that moves the upper bound of gamma linearly from ``init_value`` to
    ``end_value`` over ``transition_steps`` steps, then stays at ``end_value`` (optax-style).

    ``schedule(step)`` accepts a Python int (returns a float) or a 0-d integer array, traced or
    not (returns an array of the same namespace).

    Examples
    --------
    >>> schedule = linear_warmup(0.3, 1.0, transition_steps=100)
    >>> [round(schedule(s), 3) for s in (0, 50, 100, 1000)]
    [0.3, 0.65, 1.0, 1.0]
    """
    _check_schedule_args(init_value, end_value, transition_steps)

    def schedule(step: Any) -> Any:
        frac = _progress(step, transition_steps)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_warmup(
    init_value: float = 0.3, end_value: float = 1.0, transition_steps: int = 1000
) -> Schedule:
    """Like :func:`linear_warmup` with a half-cosine ramp,
    ``end - (end - init) * (1 + cos(pi * step / transition_steps)) / 2``.

    Examples
    --------
    >>> schedule = cosine_warmup(0.3, 1.0, transition_steps=100)
    >>> [round(schedule(s), 3) for s in (0, 50, 100)]
    [0.3, 0.65, 1.0]
    """
    _check_schedule_args(init_value, end_value, transition_steps)

    def schedule(step: Any) -> Any:
        frac = _progress(step, transition_steps)
        if isinstance(frac, float):
            return end_value - (end_value - init_value) * 0.5 * (1.0 + math.cos(math.pi * frac))
        xp = namespace(step)
        return end_value - (end_value - init_value) * 0.5 * (1.0 + xp.cos(math.pi * frac))

    return schedule


def sensitivity_guard(gamma: Any, tau: Any, s_max: float = 10.0) -> Any:
    r"""Cap the reward sensitivity ``gamma / tau`` at ``s_max``: ``min(gamma, s_max * tau)``.

    The paper (section 8.5) reads ``gamma / tau`` as the sensitivity of the target
    ``p_gamma ∝ mu^(1-gamma) r^(1-gamma) exp(gamma r / tau)`` to reward differences; a small
    temperature with a large gamma makes the target extremely peaked. ``gamma`` and ``tau`` may be
    numbers or arrays (broadcast).

    Raises
    ------
    ValueError
        If ``tau <= 0`` or ``s_max <= 0`` (eager inputs), or ``gamma`` is outside [0, 1].

    Examples
    --------
    >>> sensitivity_guard(0.9, tau=0.05, s_max=10.0)
    0.5
    """
    check_gamma(gamma)
    if isinstance(s_max, numbers.Real) and not (math.isfinite(s_max) and s_max > 0):
        raise ValueError(f"s_max must be a positive finite number, got {s_max!r}")
    if isinstance(tau, numbers.Real) and not isinstance(tau, bool):
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if isinstance(gamma, numbers.Real):
            return min(gamma, s_max * tau)
    arrays = [v for v in (gamma, tau) if hasattr(v, "shape")]
    xp = namespace(*arrays)
    if hasattr(tau, "shape") and is_concrete(tau) and not bool(xp.all(tau > 0)):
        raise ValueError("tau must be > 0 everywhere")
    like = arrays[0]
    dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else xp.float32
    tau_arr = xp.asarray(tau, dtype=dtype) if not hasattr(tau, "shape") else xp.astype(tau, dtype)
    gamma_arr = xp.asarray(gamma, dtype=dtype) if not hasattr(gamma, "shape") else gamma
    return xp.minimum(xp.astype(gamma_arr, dtype), s_max * tau_arr)
