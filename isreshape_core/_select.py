"""One entry point for every gamma rule: :func:`select_gamma` (:ref:`theory-gamma-ess`).

The rules themselves live in ``_gamma.py`` (ESS and closed form) and ``_psis_gamma.py`` (the
Pareto rules); a fixed number is a rule too.
"""

from __future__ import annotations

import numbers
from typing import Any

from ._gamma import gamma_closed_form, gamma_ess
from ._lib.checks import check_gamma, check_gamma_bounds
from ._lib.inputs import prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, is_array
from ._lib.reduce import Reducer
from ._lib.rows import batch_param
from ._psis_gamma import gamma_combined, gamma_psis, gamma_tail

__all__ = ["GAMMA_METHODS", "fixed_gamma_rows", "select_gamma"]

GAMMA_METHODS = ("ess", "closed_form", "psis", "tail", "combined")


def select_gamma(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    method: str | float = "ess",
    axis: int = -1,
    mask: Array | None = None,
    gamma_min: Any = 0.0,
    gamma_max: Any = 1.0,
    reducer: Reducer | None = None,
    **options: Any,
) -> Array:
    """Gamma for every row of the batch, by the named method or a fixed number.

    Parameters
    ----------
    log_w : array
        Log importance weights, samples along ``axis``.
    rho_min : float or array, in (0, 1]
        Least acceptable ESS ratio (ignored by a fixed number and by ``"tail"``).
    method : {"ess", "closed_form", "psis", "tail", "combined"} or float in [0, 1]
        ``"ess"`` (default): :func:`gamma_ess`; ``"closed_form"``: :func:`gamma_closed_form`
        (the paper's, :ref:`theory-closed-form`); ``"psis"``, ``"tail"``, ``"combined"``: the
        Pareto-smoothed rules (:ref:`theory-pareto-gamma`); a number: that gamma for every row.
    axis, mask, gamma_min, gamma_max
        As in :func:`gamma_ess`. Every method's result is clipped to ``[gamma_min, gamma_max]``,
        so a warm-up schedule passed as ``gamma_max`` gives ``min(schedule(step), gamma*)``.
    reducer : Reducer, optional
        For samples sharded over processes (``"ess"``, ``"closed_form"`` and fixed numbers).
    **options
        Passed to the method's function: for ``"ess"``, ``max_iter`` and ``rewards``
        (:func:`gamma_ess`); for ``"psis"``, ``r_eff``, ``k_threshold``, ``fallback``
        (:func:`gamma_psis`); for ``"tail"``, ``k_target`` (:func:`gamma_tail`); for
        ``"combined"``, ``k_target`` and ``tail_iter`` (:func:`gamma_combined`). The Pareto
        methods take no ``reducer``: PSIS sorts the whole sample.

    Returns
    -------
    array, the batch shape

    Examples
    --------
    >>> import numpy as np
    >>> l = np.random.default_rng(1).normal(0.0, 1.5, size=(2, 512))
    >>> print(select_gamma(l, method=0.5))
    [0.5 0.5]
    >>> print(select_gamma(l, method="closed_form", gamma_max=0.4))
    [0.4 0.4]
    """
    if is_array(method):
        raise TypeError(
            f"method must be a method name {GAMMA_METHODS} or a Python number in [0, 1], got an "
            f"array of shape {tuple(method.shape)}; for a fixed gamma per row pass "
            "gamma_min=gamma_max=<array> (or use the array as gamma directly)"
        )
    bounds = {"axis": axis, "mask": mask, "gamma_min": gamma_min, "gamma_max": gamma_max}
    if isinstance(method, numbers.Real) and not isinstance(method, bool):
        check_gamma(method, "method")
        if options:
            raise TypeError(f"a fixed gamma takes no options, got {sorted(options)}")
        return _fixed_gamma(log_w, method, **bounds)
    if method == "ess":
        return gamma_ess(log_w, rho_min, reducer=reducer, **bounds, **options)
    if method == "closed_form":
        if options:
            raise TypeError(f"method 'closed_form' takes no options, got {sorted(options)}")
        return gamma_closed_form(log_w, rho_min, reducer=reducer, **bounds)
    if method in ("psis", "tail", "combined"):
        if reducer is not None:
            raise ValueError(
                f"method {method!r} needs the whole sample on one process (PSIS sorts it): pass "
                "reducer=None (gather the log weights first), or use method='ess'"
            )
        if method == "psis":
            return gamma_psis(log_w, rho_min, **bounds, **options)[0]
        if method == "tail":
            return gamma_tail(log_w, **bounds, **options)[0]
        return gamma_combined(log_w, rho_min, **bounds, **options)[0]
    raise ValueError(f"method must be one of {GAMMA_METHODS} or a number in [0, 1], got {method!r}")


def _fixed_gamma(
    log_w: Array, gamma: float, *, axis: int, mask: Array | None, gamma_min: Any, gamma_max: Any
) -> Array:
    """``gamma`` for every row, clipped to ``[gamma_min, gamma_max]``."""
    xp, l, _, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_gamma_bounds(gamma_min, gamma_max)
    return fixed_gamma_rows(xp, l, gamma, axis, gamma_min, gamma_max)


def fixed_gamma_rows(
    xp: Namespace, l: Array, gamma: float, axis: int, gamma_min: Any, gamma_max: Any
) -> Array:
    """``gamma`` clipped to ``[gamma_min, gamma_max]`` for every row of validated log weights
    ``l`` (samples along ``axis``); the bounds are numbers or arrays of the batch shape."""
    shape = tuple(s for i, s in enumerate(l.shape) if i != axis)
    if all(isinstance(b, numbers.Real) for b in (gamma_min, gamma_max)):
        value = min(max(gamma, gamma_min), gamma_max)  # Python numbers: no array work
        return xp.full(shape, value, dtype=l.dtype, device=array_device(l))
    value = batch_param(xp, gamma, l, shape)
    lo = batch_param(xp, gamma_min, l, shape)
    hi = batch_param(xp, gamma_max, l, shape)
    return xp.minimum(xp.maximum(value, lo), hi)
