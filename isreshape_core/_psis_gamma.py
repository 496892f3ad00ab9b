"""Gamma from Pareto-smoothed importance sampling and from the Pareto tail.

- :func:`gamma_psis`: the exact ESS gamma on the PSIS-smoothed log weights where ``k_hat`` is
  acceptable, else a conservative fallback (flagged);
- :func:`gamma_tail`: the tail rule, ``gamma = k_target / k_hat``, checked on the ``k_hat`` of
  ``w^gamma`` itself;
- :func:`gamma_combined`: the smaller of the exact ESS gamma and the tail rule.

None of these is in the paper the theory starts from; they are this library's additions
(:ref:`theory-pareto-gamma`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._gamma import gamma_ess
from ._lib.checks import (
    check_count,
    check_gamma,
    check_gamma_bounds,
    check_positive_number,
    check_rho_min,
)
from ._lib.dtypes import as_compute_array
from ._lib.inputs import prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, namespace
from ._lib.numerics import shift_by_max, tempered_log_weights
from ._lib.pareto import MIN_TAIL
from ._lib.rows import batch_param
from ._lib.tracing import poison, traced_bad_rows
from ._psis import (
    check_r_eff,
    pareto_k_threshold,
    psis,
    psis_tail_length,
    sorted_tail,
    tail_khat,
)

__all__ = ["gamma_combined", "gamma_psis", "gamma_tail"]


def gamma_psis(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    axis: int = -1,
    mask: Array | None = None,
    r_eff: float = 1.0,
    k_threshold: float | None = 0.7,
    fallback: float = 0.3,
    gamma_min: Any = 0.0,
    gamma_max: Any = 1.0,
    max_iter: int | None = None,
) -> tuple[Array, Array, Array]:
    r"""Exact ESS gamma on Pareto-smoothed weights, with a flagged fallback for heavy tails.

    Smooth once, ``(l_s, k_hat) = psis(l)``; then per row

    .. math::

        \gamma = \begin{cases}
            \gamma_{\mathrm{ESS}}(l_s) & \hat k \le k_{\mathrm{threshold}} \\
            \min(\mathrm{fallback}, \gamma_{\mathrm{ESS}}(l)) & k_{\mathrm{threshold}} <
            \hat k < \infty \\
            \gamma_{\mathrm{ESS}}(l) & \hat k = \infty \text{ (no tail could be fitted),}
        \end{cases}

    where ``gamma_ESS`` is :func:`isreshape_core.gamma_ess`, the largest gamma in
    ``[gamma_min, gamma_max]`` whose ESS ratio is at least ``rho_min``. The fallback is the
    smaller of the fixed value and the exact ESS gamma on the raw log weights, because a fixed
    0.3 alone can leave ESS/n near 0.001 on heavy tails (:ref:`theory-correction-fallback`).

    Parameters
    ----------
    log_w : array, shape (..., S, ...)
        Log importance weights, samples along ``axis``.
    rho_min : float or array broadcastable to the batch shape, in (0, 1]
        Least acceptable ESS ratio.
    axis : int, default -1
        The sample axis.
    mask : bool array broadcastable to ``log_w.shape``, optional
        False removes a sample: it is a zero weight for PSIS (which sorts the whole axis, so it
        still counts in the tail length ``S``) and is left out of every ESS.
    r_eff : float, default 1.0
        Relative efficiency of the draws, as in :func:`isreshape_core.psis`.
    k_threshold : float or None, default 0.7
        Rows with ``k_hat <= k_threshold`` use the smoothed weights. ``None`` uses the sample
        size dependent threshold ``min(1 - 1/log10 S, 0.7)``
        (:func:`isreshape_core.pareto_k_threshold`).
    fallback : float in [0, 1], default 0.3
        Upper bound on gamma where ``k_hat`` exceeds the threshold; must be ``>= gamma_min``.
    gamma_min, gamma_max : float or array broadcastable to the batch shape, in [0, 1]
        Bounds on gamma, as in :func:`isreshape_core.gamma_ess`.
    max_iter : int, optional
        Newton iterations of :func:`isreshape_core.gamma_ess` (fixed work); ``None`` (default):
        its own default (the candidate grid where it applies, else Newton).

    Returns
    -------
    gamma : array, the batch shape
    k_hat : array, the batch shape
        Pareto ``k_hat`` of the raw weights (``inf`` where PSIS could not fit a tail: ``S < 25``
        as in small GRPO groups, a constant tail as on-policy, ...; those rows take the exact
        ESS gamma of the raw weights, which still meets ``rho_min``).
    fallback_used : bool array, the batch shape
        True where the fallback was applied (``k_threshold < k_hat < inf``).

    References
    ----------
    :ref:`theory-pareto-gamma`; Vehtari et al., "Pareto smoothed importance sampling",
    JMLR 25 (2024).

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import gamma_psis
    >>> rng = np.random.default_rng(0)
    >>> log_w = np.stack([rng.normal(0.0, 1.0, 2000), 2.0 * rng.standard_t(3, 2000)])
    >>> gamma, k_hat, fallback_used = gamma_psis(log_w, 0.3)
    >>> print(np.round(gamma, 3), np.round(k_hat, 2), fallback_used)
    [1.    0.087] [0.17 3.79] [False  True]
    """
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_rho_min(rho_min)
    check_gamma_bounds(gamma_min, gamma_max)
    check_gamma(fallback, "fallback")
    if isinstance(gamma_min, numbers.Real) and fallback < gamma_min:
        raise ValueError(
            f"fallback={fallback!r} is below gamma_min={gamma_min!r}; pass fallback >= gamma_min"
        )
    if k_threshold is None:
        n = l.shape[axis]
        threshold = pareto_k_threshold(n) if n > 1 else -math.inf
    else:
        threshold = check_positive_number(
            k_threshold, "k_threshold", "use 0.7 or None for min(1 - 1/log10 S, 0.7)"
        )
    max_iter = None if max_iter is None else check_count(max_iter, "max_iter")

    smoothed, k_hat = psis(l, axis=axis, r_eff=r_eff)
    bounds = {"gamma_min": gamma_min, "gamma_max": gamma_max, "max_iter": max_iter}
    gamma_smoothed = gamma_ess(smoothed, rho_min, axis=axis, mask=mask, **bounds)
    gamma_raw = gamma_ess(l, rho_min, axis=axis, mask=mask, **bounds)
    estimable = xp.isfinite(k_hat)
    fallback_used = estimable & (k_hat > threshold)
    conservative = xp.minimum(gamma_raw, as_compute_array(xp, fallback, l.dtype, like=l))
    gamma = xp.where(fallback_used, conservative, gamma_smoothed)
    # No tail could be fitted (S < 25, a constant tail, ...): nothing to smooth, and no evidence
    # of a heavy tail either; the exact ESS gamma of the raw weights still meets rho_min.
    gamma = xp.where(estimable, gamma, gamma_raw)
    return gamma, k_hat, fallback_used


def _tail_rule_rows(
    xp: Namespace,
    rows: Array,
    tail_len: int,
    k_target: float,
    lo: Array,
    hi: Array,
    max_iter: int,
) -> tuple[Array, Array, Array]:
    """The tail rule on ``(B, S)`` rows; ``lo``/``hi`` of shape ``(B,)``."""
    if tail_len < MIN_TAIL:
        inf = xp.full(lo.shape, xp.inf, dtype=rows.dtype, device=array_device(rows))
        return hi, inf, inf
    shifted = shift_by_max(xp, rows, -1)[0]  # no overflow for rows spanning the float range
    tail, cutoff, *_ = sorted_tail(xp, shifted, tail_len)
    k_hat = tail_khat(xp, tail, cutoff)

    def tempered_khat(g: Array) -> Array:
        # w**g has the same sort order for g > 0: temper the shifted tail and the cutoff
        # (-inf stays -inf; g = 0 gives equal weights, whose tail cannot be fitted: k = inf).
        g = g[:, None]
        return tail_khat(xp, tempered_log_weights(xp, tail, g), tempered_log_weights(xp, cutoff, g))

    ratio = k_target / k_hat  # 0 where k_hat = inf
    start = xp.where(k_hat <= k_target, 1.0, ratio)
    start = xp.minimum(xp.maximum(start, lo), hi)
    k_start = tempered_khat(start)
    start_ok = k_start <= k_target
    # Where the first guess is too heavy (k_hat(w^g) ~ g k_hat(w) fails for very heavy tails),
    # bisect on [gamma_min, start]: the lower end is taken as feasible (w^0 has no tail at all),
    # and the feasible end is returned.
    a, b = lo, start
    for _ in range(max_iter):
        mid = 0.5 * (a + b)
        feasible = tempered_khat(mid) <= k_target
        a = xp.where(feasible, mid, a)
        b = xp.where(feasible, b, mid)
    gamma = xp.where(start_ok, start, a)
    k_gamma = xp.where(start_ok, k_start, tempered_khat(a))
    # No tail could be fitted to w itself: the rule has no evidence of a heavy tail and sets no
    # limit (gamma_max); gamma_combined then reduces to the exact ESS gamma.
    estimable = xp.isfinite(k_hat)
    gamma = xp.where(estimable, gamma, hi)
    k_gamma = xp.where(estimable, k_gamma, k_hat)
    return gamma, k_hat, k_gamma


def gamma_tail(
    log_w: Array,
    *,
    k_target: float = 0.5,
    axis: int = -1,
    mask: Array | None = None,
    r_eff: float = 1.0,
    gamma_min: Any = 0.0,
    gamma_max: Any = 1.0,
    max_iter: int = 12,
) -> tuple[Array, Array, Array]:
    """The Pareto tail rule: the largest tempering that keeps ``k_hat(w^gamma) <= k_target``.

    Start from ``gamma_0 = 1`` where ``k_hat(w) <= k_target``, else ``k_target / k_hat(w)``
    (``k_hat(w^gamma) ≈ gamma·k_hat(w)`` for a Pareto tail), clipped to ``[gamma_min,
    gamma_max]``. Then re-estimate the PSIS ``k_hat`` of ``w^gamma`` itself (the approximation
    fails for very heavy tails, e.g. log-Student-t weights, whose tail stays heavier than any
    Pareto's) and, where it exceeds ``k_target``, bisect ``max_iter`` times on
    ``[gamma_min, gamma_0]`` (a fixed count, vectorised over rows), keeping the feasible end.
    Rows where no tail can be fitted to ``w`` (``k_hat = inf``: ``S < 25``, a constant tail as
    on-policy, ...) carry no evidence of a heavy tail and get ``gamma_max``.

    So the returned ``gamma`` satisfies ``k_hat(w^gamma) <= k_target``, or equals ``gamma_min``
    (where no bisection point met the target); it is the largest such gamma to within
    ``gamma_0 / 2**max_iter`` where ``k_hat(w^gamma)`` is monotone in gamma. ``k < 1/2`` means
    the weights have a finite variance (:ref:`theory-pareto-gamma`).

    Parameters
    ----------
    log_w, axis, mask, r_eff
        As in :func:`gamma_psis`.
    k_target : float, default 0.5
        Target Pareto shape, ``> 0``.
    gamma_min, gamma_max : float or array broadcastable to the batch shape, in [0, 1]
        Bounds on gamma.
    max_iter : int, default 12
        Bisection steps where the first estimate is too heavy.

    Returns
    -------
    gamma : array, the batch shape
    k_hat : array, the batch shape
        PSIS ``k_hat`` of ``w``. ``inf`` where no tail can be fitted (``S < 25``, a tail of
        equal values, ...): the rule then sets no limit and returns ``gamma_max``.
    k_hat_gamma : array, the batch shape
        PSIS ``k_hat`` of ``w^gamma`` at the returned gamma (``inf`` at ``gamma = 0``, where all
        weights are equal and there is no tail to fit).

    References
    ----------
    :ref:`theory-pareto-gamma`; Vehtari et al., JMLR 25 (2024), section 3 (``k < 1/2``:
    finite variance).

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import gamma_tail
    >>> rng = np.random.default_rng(0)
    >>> log_w = np.stack([rng.normal(0.0, 1.0, 4000), np.log(rng.pareto(1.0, 4000) + 1.0)])
    >>> gamma, k_hat, k_hat_gamma = gamma_tail(log_w, k_target=0.5)
    >>> print(np.round(gamma, 3), np.round(k_hat, 2), np.round(k_hat_gamma, 2))
    [1.    0.572] [0.12 0.87] [0.12 0.5 ]
    """
    xp, l, _, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    k_target = check_positive_number(
        k_target, "k_target", "0.5 (finite variance) is the usual target"
    )
    r_eff = check_r_eff(r_eff)
    check_gamma_bounds(gamma_min, gamma_max)
    max_iter = check_count(max_iter, "max_iter")
    n = l.shape[axis]
    moved = xp.moveaxis(l, axis, -1) if axis != l.ndim - 1 else l
    batch_shape = tuple(moved.shape[:-1])
    rows = xp.reshape(moved, (-1, n))
    lo = xp.reshape(batch_param(xp, gamma_min, rows, batch_shape), (-1,))
    hi = xp.reshape(batch_param(xp, gamma_max, rows, batch_shape), (-1,))
    gamma, k_hat, k_gamma = _tail_rule_rows(
        xp, rows, psis_tail_length(n, r_eff), k_target, lo, hi, max_iter
    )
    bad = traced_bad_rows(xp, rows, -1, lo, hi)
    return tuple(xp.reshape(poison(xp, a, bad), batch_shape) for a in (gamma, k_hat, k_gamma))


def gamma_combined(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    k_target: float = 0.5,
    axis: int = -1,
    mask: Array | None = None,
    r_eff: float = 1.0,
    gamma_min: Any = 0.0,
    gamma_max: Any = 1.0,
    max_iter: int = 16,
    tail_iter: int = 12,
) -> tuple[Array, Array]:
    """The smaller of the exact ESS gamma and the Pareto tail rule: ESS and a finite-variance tail.

    ``gamma = min(gamma_ESS(l; rho_min), gamma_tail(l; k_target))`` row by row, with
    :func:`isreshape_core.gamma_ess` and :func:`gamma_tail`.

    Parameters
    ----------
    log_w : array, shape (..., S, ...)
        Log importance weights, samples along ``axis``.
    rho_min : float or array broadcastable to the batch shape, in (0, 1]
        Least acceptable ESS ratio.
    k_target : float, default 0.5
        Target Pareto shape of ``w^gamma``.
    axis, mask, r_eff, gamma_min, gamma_max
        As in :func:`gamma_tail`.
    max_iter : int, optional
        Newton iterations of :func:`isreshape_core.gamma_ess` (fixed work); ``None`` (default):
        its own default (the candidate grid where it applies, else Newton).
    tail_iter : int, default 12
        Bisection steps of :func:`gamma_tail`.

    Returns
    -------
    gamma : array, the batch shape
    k_hat : array, the batch shape
        PSIS ``k_hat`` of the raw weights.

    References
    ----------
    :ref:`theory-gamma-ess`; :ref:`theory-pareto-gamma`.

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import gamma_combined
    >>> rng = np.random.default_rng(0)
    >>> log_w = np.stack([rng.normal(0.0, 2.0, 4000), np.log(rng.pareto(1.0, 4000) + 1.0)])
    >>> gamma, k_hat = gamma_combined(log_w, 0.3)
    >>> print(np.round(gamma, 3), np.round(k_hat, 2))
    [0.584 0.572] [0.45 0.87]
    """
    check_rho_min(rho_min)
    tail_iter = check_count(tail_iter, "tail_iter")
    shared = {"axis": axis, "mask": mask, "gamma_min": gamma_min, "gamma_max": gamma_max}
    gamma_t, k_hat, _ = gamma_tail(
        log_w, k_target=k_target, r_eff=r_eff, max_iter=tail_iter, **shared
    )
    gamma_e = gamma_ess(log_w, rho_min, max_iter=max_iter, **shared)
    return namespace(gamma_e).minimum(gamma_e, gamma_t), k_hat
