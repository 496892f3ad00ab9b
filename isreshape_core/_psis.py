"""Pareto-smoothed importance sampling (PSIS) and the Pareto ``k_hat`` diagnostic.

:ref:`theory-psis`. The algorithm follows Vehtari, Simpson, Gelman, Yao and Gabry,
"Pareto smoothed importance sampling", JMLR 25 (2024), and reproduces the Python reference,
arviz-stats' ``psislw`` (``arviz_stats.base.diagnostics`` ``_psislw``/``_ps_tail``/``_gpdfit``/
``_gpinv``, version 0.8), step for step; the generalised Pareto fit is the empirical Bayes method
of Zhang and Stephens, "A new and efficient estimation method for the generalized Pareto
distribution", Technometrics 51 (2009), with the weakly informative prior of the PSIS paper.
Only the facts of the algorithm were taken from those sources; the code is written for the array
API and is vectorised over every batch axis.

Where arviz-stats raises or returns NaN, this module does what R's ``loo`` does: a tail shorter
than 5 draws, or one whose values cannot be fitted (all equal, too many ties at the cutoff, or
containing weights of zero), is left unsmoothed and gets ``k_hat = inf``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_extra as xpx
from array_api_compat import (
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
)

from ._lib.checks import check_log_weights, check_positive_number
from ._lib.inputs import prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, namespace
from ._lib.numerics import logsumexp, shift_by_max
from ._lib.pareto import MIN_TAIL, PRIOR_BS, grid_size, quartile_index, with_prior
from ._lib.tracing import is_concrete, nan_or_plus_inf, poison

__all__ = [
    "check_r_eff",
    "pareto_k_threshold",
    "psis",
    "psis_tail_fit",
    "psis_tail_length",
    "smooth_rows",
    "sorted_tail",
    "tail_khat",
]


def psis_tail_length(n: int, r_eff: float = 1.0) -> int:
    """Number ``M`` of largest draws whose tail PSIS fits with a generalised Pareto distribution.

    ``M = floor(3·sqrt(n / r_eff))`` when ``n·r_eff > 225``, else ``floor(n / 5)``; PSIS smooths
    only when ``M >= 5``. This is arviz-stats' rule; R ``loo`` and legacy ArviZ take the
    ``ceiling`` instead (one draw more where the bound is not an integer; docs: diagnostics).

    Parameters
    ----------
    n : int
        Number of draws ``S`` along the reduction axis (a static shape, never an array).
    r_eff : float, default 1.0
        Relative efficiency of the draws (``ESS / S`` of MCMC draws; 1 for independent draws).

    Returns
    -------
    int
        The tail length ``M`` (``0 <= M <= n/5``).

    References
    ----------
    :ref:`theory-psis`; Vehtari et al. (2024), section 3; arviz-stats ``_get_ps_tails``.

    Examples
    --------
    >>> import isreshape_core as isr
    >>> isr.psis_tail_length(4000), isr.psis_tail_length(200), isr.psis_tail_length(24)
    (189, 40, 4)
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise TypeError(f"n must be a non-negative int (the number of draws), got {n!r}")
    r_eff = check_r_eff(r_eff)
    if n * r_eff > 225:
        return math.floor(3 * (n / r_eff) ** 0.5)
    return math.floor(n / 5)


def pareto_k_threshold(n: Any) -> Any:
    """Sample-size dependent threshold below which a Pareto ``k_hat`` is "good".

    ``threshold(n) = min(1 - 1/log10(n), 0.7)``: with ``S = n`` draws, PSIS estimates are
    reliable when ``k_hat`` is below it; above 0.7 they are unreliable for every ``n``.

    Parameters
    ----------
    n : int, float or array
        Number of draws (``> 1``). An array gives an array of the same shape and namespace
        (entries ``<= 1`` give ``-inf``, no ``k`` is good; they are rejected on eager inputs).

    Returns
    -------
    float or array
        The threshold; a Python float for a Python number.

    References
    ----------
    :ref:`theory-psis`; Vehtari et al. (2024), section 3.2.4 (eq. for the sample size
    dependent threshold); R ``loo::ps_khat_threshold``.

    Examples
    --------
    >>> import numpy as np
    >>> import isreshape_core as isr
    >>> round(isr.pareto_k_threshold(100), 4), round(isr.pareto_k_threshold(4000), 4)
    (0.5, 0.7)
    >>> print(np.round(np.asarray(isr.pareto_k_threshold(np.asarray([10.0, 50.0, 1e6]))), 4))
    [0.     0.4114 0.7   ]
    """
    if isinstance(n, numbers.Real) and not isinstance(n, bool):
        if not (math.isfinite(n) and n > 1):
            raise ValueError(f"n must be a finite number of draws > 1, got {n!r}")
        return min(1.0 - 1.0 / math.log10(n), 0.7)
    if not hasattr(n, "shape"):
        raise TypeError(f"n must be a real number or an array, got {type(n).__name__}")
    xp = namespace(n)
    n = n if xp.isdtype(n.dtype, "real floating") else xp.astype(n, xp.float64)
    if is_concrete(n) and not bool(xp.all(n > 1)):
        raise ValueError("n must be > 1 everywhere (it is a number of draws)")
    above = n > 1
    log10n = xp.log10(xp.where(above, n, 10.0))
    return xp.where(above, xp.minimum(1.0 - 1.0 / log10n, 0.7), -xp.inf)


def psis(log_w: Array, *, axis: int = -1, r_eff: float = 1.0) -> tuple[Array, Array]:
    """Pareto-smoothed, self-normalised log importance weights and the Pareto ``k_hat``.

    For each row (the samples along ``axis``; ``S`` of them): shift by the max; take the ``M``
    largest values (``M`` from :func:`psis_tail_length`) and the cutoff ``c``, the ``(M+1)``-th
    largest; fit a generalised Pareto distribution (GPD) to ``x = exp(tail) - exp(c)``
    (ascending) by Zhang & Stephens (2009): ``m = 30 + floor(sqrt(M))`` grid points
    ``theta_j = 1/x_M + (1 - sqrt(m/(j - 1/2)))/(3·x*)``, ``x* = x[floor(M/4 + 1/2)]`` (1-based),
    profile log-likelihood ``M·(log(-theta/k) - k - 1)`` with ``k(theta) = mean(log1p(-theta·x))``,
    posterior-mean ``theta`` (grid weights below ``10·eps`` dropped), ``k = mean(log1p(-theta·x))``,
    ``sigma = -k/theta`` and the prior ``k_hat = (M·k + 10·0.5)/(M + 10)``. The ``i``-th smallest
    tail value is replaced by ``log(exp(c) + F^-1((i - 1/2)/M))``, ``F^-1`` the GPD quantile
    function, truncated at the largest raw log weight. Finally each row is normalised so that
    ``logsumexp = 0``.

    Parameters
    ----------
    log_w : array, shape (..., S, ...)
        Log importance weights ``log p - log q``; ``-inf`` is a weight of zero (it stays ``-inf``).
        NaN and ``+inf`` are rejected on eager inputs. Any real dtype; computed in at least
        float32.
    axis : int, default -1
        The axis of the ``S`` samples; every other axis is a batch axis.
    r_eff : float, default 1.0
        Relative efficiency of the draws (1 for independent draws); a positive Python number,
        because it fixes the (static) tail length.

    Returns
    -------
    smoothed_log_w : array, same shape as ``log_w``
        Smoothed log weights, normalised so that ``logsumexp`` along ``axis`` is 0. A row that is
        all ``-inf`` stays all ``-inf``.
    k_hat : array, shape of ``log_w`` with ``axis`` removed
        Pareto shape estimate. ``inf`` where the row was left unsmoothed (and only normalised):
        fewer than 5 tail draws (``S < 25`` for ``r_eff = 1``), a tail of equal values, a tail
        containing ``-inf`` (fewer than ``M`` positive weights), a first quartile ``x*`` of the
        exceedances equal to their minimum (a quarter of the tail tied, at the cutoff or above
        it: R ``loo`` >= 2.10 and ``posterior`` >= 1.7 give ``k = inf`` there), or a
        degenerate fit.

    Notes
    -----
    ``k_hat < 0.5``: finite variance; below :func:`pareto_k_threshold` (``min(1 - 1/log10 S,
    0.7)``): reliable; above 0.7: unreliable. On ordinary inputs the result equals arviz-stats'
    ``psislw(-log_w)`` to floating-point accuracy (arviz-stats takes log-likelihoods and smooths
    their negation). Among exactly tied log weights, which one receives which smoothed value is
    unspecified (as in arviz-stats and R ``loo``); the smoothed values as a set and ``k_hat`` are
    not. NumPy float64 input goes through a NumPy kernel (``isreshape_core._psis_numpy``:
    fewer passes over memory, one ``log`` per 8 terms of the Zhang-Stephens grid) that is 10
    to 35 times faster than arviz-stats on batches (``benchmarks/psis_vs_arviz.py``); rows
    with ties at the cutoff take the portable path. On CuPy, JAX and NumPy float32 the tail is
    found with ``argpartition`` and written back with an indexed update
    (``array_api_extra.at``); elsewhere (torch, ``array_api_strict``) with a stable sort,
    undone with ``take_along_axis(., argsort(order))``. All paths give the same values.

    References
    ----------
    :ref:`theory-psis`; Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 25 (2024);
    Zhang & Stephens, Technometrics 51 (2009); arviz-stats ``psislw``; R ``loo::psis``.

    Examples
    --------
    >>> import numpy as np
    >>> import isreshape_core as isr
    >>> rng = np.random.default_rng(0)
    >>> log_w = rng.normal(0.0, 1.0, size=(2, 400))
    >>> smoothed, k_hat = isr.psis(log_w)
    >>> print(np.round(k_hat, 2))
    [0.33 0.26]
    >>> print(np.round(np.exp(smoothed).sum(axis=-1), 6))
    [1. 1.]
    >>> print(isr.psis(np.zeros(10))[1])  # too few draws for a tail fit
    inf
    """
    xp, rows, tail_len, batch_shape, axis = _as_rows(log_w, axis, r_eff)
    out, k_hat = smooth_rows(xp, rows, tail_len)
    out = xp.reshape(out, (*batch_shape, rows.shape[-1]))
    if axis != len(batch_shape):
        out = xp.moveaxis(out, -1, axis)
    return out, xp.reshape(k_hat, batch_shape)


def psis_tail_fit(
    log_w: Array, *, axis: int = -1, r_eff: float = 1.0
) -> tuple[Array, Array, Array]:
    """The generalised Pareto fit that :func:`psis` makes to each row's tail.

    With the row shifted so that its max is 0, ``c`` the cutoff (the ``(M+1)``-th largest value,
    ``M`` from :func:`psis_tail_length`) and ``x = exp(tail) - exp(c)`` the exceedances of the
    ``M`` largest weights, the fitted GPD has the density
    ``(1/sigma) (1 + k x / sigma)^(-1/k - 1)`` for ``x >= 0`` (``exp(-x / sigma) / sigma`` at
    ``k = 0``); ``k`` is :func:`psis`'s ``k_hat``, prior included, and the fit is the one whose
    quantiles replace the tail (:ref:`theory-psis`).

    Parameters
    ----------
    log_w : array, shape (..., S, ...)
        Log importance weights, as in :func:`psis`.
    axis : int, default -1
        The axis of the ``S`` samples; every other axis is a batch axis.
    r_eff : float, default 1.0
        Relative efficiency of the draws, as in :func:`psis`.

    Returns
    -------
    k_hat : array, shape of ``log_w`` with ``axis`` removed
        Pareto shape, equal to :func:`psis`'s; ``inf`` where no tail is fitted.
    sigma : array, same shape
        Pareto scale of the exceedances (weights relative to the row max); 0 where no tail is
        fitted.
    log_cutoff : array, same shape
        ``c``, relative to the row max (at most 0); ``-inf`` where the tail is shorter than 5.
        Traced rows holding NaN or ``+inf`` give NaN in all three.

    Examples
    --------
    >>> import numpy as np
    >>> import isreshape_core as isr
    >>> log_w = np.random.default_rng(0).normal(0.0, 1.0, size=(2, 400))
    >>> k_hat, sigma, log_cutoff = isr.psis_tail_fit(log_w)
    >>> bool(np.allclose(k_hat, isr.psis(log_w)[1])), bool(np.all(sigma > 0))
    (True, True)
    >>> print(isr.psis_tail_fit(np.zeros(10))[0])  # too few draws for a tail fit
    inf
    """
    xp, rows, tail_len, batch_shape, _ = _as_rows(log_w, axis, r_eff)
    shifted, bad = _checked_shift(xp, rows)
    if tail_len < MIN_TAIL:
        k_hat = xp.full((rows.shape[0], 1), xp.inf, dtype=rows.dtype, device=array_device(rows))
        sigma, cutoff = xp.zeros_like(k_hat), -k_hat
    else:
        tail, cutoff, *_ = sorted_tail(xp, shifted, tail_len)
        k_hat, sigma, _, ok = _gpd_fit(xp, tail, cutoff)
        k_hat, sigma = xp.where(ok, k_hat, xp.inf), xp.where(ok, sigma, 0.0)
    fit = (k_hat[:, 0], sigma[:, 0], cutoff[:, 0])
    return tuple(xp.reshape(poison(xp, v, bad), batch_shape) for v in fit)


def _as_rows(log_w: Any, axis: int, r_eff: Any) -> tuple[Namespace, Array, int, tuple, int]:
    """``(xp, rows, tail_len, batch_shape, axis)``: the checked input as ``(B, S)`` rows."""
    # The NaN and +inf check is made on the row maxima where that suffices (see smooth_rows).
    xp, lw, _, axis = prepare_log_weights(log_w, axis=axis, mask=None, check_values=False)
    tail_len = psis_tail_length(lw.shape[axis], check_r_eff(r_eff))
    moved = xp.moveaxis(lw, axis, -1) if axis != lw.ndim - 1 else lw
    rows = xp.reshape(moved, (-1, lw.shape[axis]))
    return xp, rows, tail_len, tuple(moved.shape[:-1]), axis


def _checked_shift(xp: Namespace, rows: Array) -> tuple[Array, Array | None]:
    """Rows shifted so that their max is 0, after the check for NaN and ``+inf``; and, traced,
    the rows holding either (``(B,)``, to be poisoned), else None."""
    check_log_weights(xp, rows)
    # Traced, a row holding NaN or +inf gives NaN everywhere. (What is computed from a JAX
    # constant closed over by jax.jit is traced although the constant is not.)
    bad = None
    if not is_concrete(xp.max(rows, axis=-1)):
        bad = xp.any(nan_or_plus_inf(xp, rows), axis=-1)
    return shift_by_max(xp, rows, -1)[0], bad  # no overflow for rows spanning the float range


def check_r_eff(r_eff: Any) -> float:
    """``r_eff`` must be a positive Python number: it fixes the (static) tail length."""
    if not isinstance(r_eff, numbers.Real) or isinstance(r_eff, bool):
        raise TypeError(
            f"r_eff must be a positive Python number (it fixes the static tail length), "
            f"got {type(r_eff).__name__}; use r_eff=1.0 for independent draws"
        )
    return check_positive_number(r_eff, "r_eff", "use r_eff=1.0 for independent draws")


def _native_numpy(xp: Namespace, x: Array) -> bool:
    """Whether the NumPy kernel (``_psis_numpy.py``, float64 only) computes for ``x``."""
    return is_numpy_namespace(xp) and x.dtype == xp.float64


# --------------------------------------------------------------------------------------------
# The NumPy seam: each function below validates its rows, hands NumPy float64 to the kernel
# and computes everything else (and the rows the kernel leaves) with the portable code.


def smooth_rows(xp: Namespace, rows: Array, tail_len: int) -> tuple[Array, Array]:
    """PSIS on ``(B, S)`` rows: ``(smoothed (B, S), k_hat (B,))``; NaN and ``+inf`` rejected
    (eager) or poisoned (traced)."""
    if not (_native_numpy(xp, rows) and tail_len >= MIN_TAIL):
        return _psis_rows(xp, rows, tail_len)
    from . import _psis_numpy  # NumPy is imported only where NumPy arrays are passed

    out, k_hat, redo = _psis_numpy.psis_rows(rows, tail_len)
    if redo is not None and bool(xp.any(redo)):
        out[redo], k_hat[redo] = _psis_rows(xp, rows[redo], tail_len)
    return out, k_hat


def _gpd_fit(xp: Namespace, tail: Array, cutoff: Array) -> tuple[Array, Array, Array, Array]:
    """Zhang & Stephens (2009) GPD fit to the exceedances of a sorted log-space tail.

    ``tail`` (shape ``(B, M)``, ascending, shifted so that the row max is 0) and ``cutoff``
    (shape ``(B, 1)``). Returns ``(k_hat, sigma, exp_cutoff, ok)``, each of shape ``(B, 1)``;
    ``k_hat`` includes the weakly informative prior; ``ok`` is False where no fit is possible
    (and the other outputs are then meaningless but finite). NumPy float64 tails are fitted by
    the NumPy kernel, the same numbers in fewer passes.
    """
    if _native_numpy(xp, tail):
        from . import _psis_numpy

        return _psis_numpy.gpd_fit_sorted_tail(tail, cutoff)
    return _portable_gpd_fit(xp, tail, cutoff)


def tail_khat(xp: Namespace, tail: Array, cutoff: Array) -> Array:
    """``k_hat`` (shape ``(B,)``) of a sorted shifted tail; ``inf`` where no fit is possible."""
    k_hat, _, _, ok = _gpd_fit(xp, tail, cutoff)
    return xp.where(ok, k_hat, xp.inf)[..., 0]


# --------------------------------------------------------------------------------------------
# The portable code (every array-API namespace).


def _use_argpartition(xp: Namespace) -> bool:
    # array_api_extra.argpartition is O(S) here (native argpartition / top_k) and
    # array_api_extra.at an indexed update. Not torch: argpartition's torch path uses
    # boolean-mask indexing and dynamo rejects at's index handling, both of which break
    # torch.compile(fullgraph=True); torch (and array_api_strict) sort fully instead.
    return is_numpy_namespace(xp) or is_cupy_namespace(xp) or is_jax_namespace(xp)


def sorted_tail(
    xp: Namespace, rows: Array, tail_len: int
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """The ``tail_len`` largest values of each row of ``rows`` (shape ``(B, S)``), ascending.

    Returns ``(tail, cutoff, tail_idx, order, sorted_rows)``: ``tail`` and ``tail_idx`` of shape
    ``(B, M)``, ``cutoff`` of shape ``(B, 1)`` (the ``(M+1)``-th largest value); ``order`` and
    ``sorted_rows`` are the full stable sort where it was computed, else ``None``. Ties are
    broken by position, as a stable sort of the whole row would do.
    """
    n = rows.shape[-1]
    kth = n - tail_len - 1
    if _use_argpartition(xp):
        # Sort the candidates' positions first, then stably by value.
        top_idx = xp.sort(xpx.argpartition(rows, kth, axis=-1, xp=xp)[..., kth:], axis=-1)
        top_val = xp.take_along_axis(rows, top_idx, axis=-1)
        by_value = xp.argsort(top_val, axis=-1, stable=True)
        top_idx = xp.take_along_axis(top_idx, by_value, axis=-1)
        top_val = xp.take_along_axis(top_val, by_value, axis=-1)
        return top_val[..., 1:], top_val[..., :1], top_idx[..., 1:], None, None
    order = xp.argsort(rows, axis=-1, stable=True)
    sorted_rows = xp.take_along_axis(rows, order, axis=-1)
    return (
        sorted_rows[..., kth + 1 :],
        sorted_rows[..., kth : kth + 1],
        order[..., kth + 1 :],
        order,
        sorted_rows,
    )


def _replace_tail(
    xp: Namespace,
    rows: Array,
    tail_idx: Array,
    new_tail: Array,
    order: Array | None,
    sorted_rows: Array | None,
) -> Array:
    """``rows`` with the values at ``tail_idx`` replaced by ``new_tail`` (row by row)."""
    n, tail_len = rows.shape[-1], tail_idx.shape[-1]
    if order is None:  # found by argpartition: an indexed update
        row_ids = xp.arange(rows.shape[0], device=array_device(rows))[:, None]
        # ``rows`` is a temporary of ours, so an in-place update (copy=None) is safe.
        return xpx.at(rows, (row_ids, tail_idx)).set(new_tail, xp=xp)
    full = xp.concat([sorted_rows[..., : n - tail_len], new_tail], axis=-1)
    return xp.take_along_axis(full, xp.argsort(order, axis=-1), axis=-1)


def _portable_gpd_fit(
    xp: Namespace, tail: Array, cutoff: Array
) -> tuple[Array, Array, Array, Array]:
    """:func:`_gpd_fit` in array-API code."""
    dtype, dev = tail.dtype, array_device(tail)
    tail_len = tail.shape[-1]
    exp_cut = xp.exp(cutoff)
    x = xp.exp(tail) - exp_cut
    # Equal tail (arviz-stats raises, R loo warns and leaves it): equal exceedances, the values
    # that are fitted (log values a few ulps apart can have equal exponentials, and whether
    # they do changes with a common shift). A tail holding -inf is not fitted either.
    ok = (tail[..., :1] > -xp.inf) & (x[..., -1:] > x[..., :1])
    star = quartile_index(tail_len)
    # loo >= 2.10 / posterior >= 1.7: a first quartile equal to the smallest exceedance (a
    # quarter of the tail tied) has no reliable fit (k = inf, the tail left unsmoothed).
    ok = ok & (x[..., star : star + 1] > x[..., :1])
    # Rows without a fit get a harmless stand-in sample, so that no NaN or warning arises.
    stand_in = xp.arange(1, tail_len + 1, dtype=dtype, device=dev) / tail_len
    x = xp.where(ok, x, stand_in)
    theta, weights, ok = _grid_posterior(xp, x, x[..., star : star + 1], ok)
    theta_hat = xp.sum(theta * weights, axis=-1, keepdims=True)
    k_raw = xp.mean(xp.log1p(-theta_hat * x), axis=-1, keepdims=True)
    theta_nonzero = theta_hat != 0
    sigma = -k_raw / xp.where(theta_nonzero, theta_hat, 1.0)
    ok = ok & theta_nonzero & (sigma > 0) & xp.isfinite(sigma) & xp.isfinite(k_raw)
    return with_prior(k_raw, tail_len), sigma, exp_cut, ok


def _grid_posterior(
    xp: Namespace, x: Array, x_star: Array, ok: Array
) -> tuple[Array, Array, Array]:
    """Zhang & Stephens' grid ``theta_j`` (B, m) and its normalised posterior weights (grid
    weights below ``10 eps`` dropped, as arviz-stats does); ``ok`` and-ed with "a grid point
    has a valid profile likelihood"."""
    tail_len = x.shape[-1]
    n_grid = grid_size(tail_len)
    j = xp.arange(1, n_grid + 1, dtype=x.dtype, device=array_device(x))
    theta = (1.0 - xp.sqrt(n_grid / (j - 0.5))) / (PRIOR_BS * x_star) + 1.0 / x[..., -1:]
    # theta_j < 1/x_max for every j, so log1p(-theta·x) is finite.
    k_grid = xp.mean(xp.log1p(-theta[..., :, None] * x[..., None, :]), axis=-1)  # (B, m)
    nonzero = k_grid != 0
    ratio = -theta / xp.where(nonzero, k_grid, 1.0)
    # A grid point at exactly theta = 0 (k = 0) takes the profile's limit there, the
    # exponential fit: -theta/k -> 1/mean(x). Dropping it would make k_hat depend on whether
    # a point rounds to 0, which changes with a constant shift of the log weights.
    at_zero = theta == 0
    ratio = xp.where(at_zero, 1.0 / xp.mean(x, axis=-1, keepdims=True), ratio)
    valid = (nonzero | at_zero) & (ratio > 0)
    profile = xp.where(
        valid, tail_len * (xp.log(xp.where(valid, ratio, 1.0)) - k_grid - 1.0), -xp.inf
    )
    ok = ok & xp.any(valid, axis=-1, keepdims=True)
    profile = xp.where(ok, profile, 0.0)
    weights = xp.exp(profile - logsumexp(xp, profile, axis=-1, keepdims=True))
    weights = xp.where(weights >= 10 * xp.finfo(x.dtype).eps, weights, 0.0)
    return theta, weights / xp.sum(weights, axis=-1, keepdims=True), ok


def _gpd_smoothed_tail(
    xp: Namespace, k_hat: Array, sigma: Array, exp_cut: Array, ok: Array, tail_len: int
) -> Array:
    """``log(exp(c) + F^-1(p_i))``, ``p_i = (i - 1/2)/M``, truncated at 0 (the shifted max)."""
    dtype, dev = sigma.dtype, array_device(sigma)
    p = (xp.arange(tail_len, dtype=dtype, device=dev) + 0.5) / tail_len
    log1m_p = xp.log1p(-p)
    k_zero = k_hat == 0
    safe_k = xp.where(k_zero, 1.0, k_hat)
    safe_sigma = xp.where(ok, sigma, 1.0)
    quantile = xp.where(
        k_zero,
        -safe_sigma * log1m_p,
        safe_sigma * xp.expm1(-safe_k * log1m_p) / safe_k,
    )
    q = exp_cut + quantile
    positive = q > 0
    smoothed = xp.where(positive, xp.log(xp.where(positive, q, 1.0)), -xp.inf)
    return xp.minimum(smoothed, 0.0)


def _normalise_rows(xp: Namespace, rows: Array) -> Array:
    """``rows - logsumexp(rows)`` row by row (an all ``-inf`` row stays all ``-inf``)."""
    total = logsumexp(xp, rows, axis=-1, keepdims=True)
    return rows - xp.where(xp.isfinite(total), total, 0.0)


def _psis_rows(xp: Namespace, rows: Array, tail_len: int) -> tuple[Array, Array]:
    """PSIS on a ``(B, S)`` array whose rows are batches; returns ``(smoothed, k_hat (B,))``."""
    shifted, bad = _checked_shift(xp, rows)
    if tail_len < MIN_TAIL:
        k_hat = xp.full((rows.shape[0],), xp.inf, dtype=rows.dtype, device=array_device(rows))
        return poison(xp, _normalise_rows(xp, shifted), _col(bad)), poison(xp, k_hat, bad)
    tail, cutoff, tail_idx, order, sorted_rows = sorted_tail(xp, shifted, tail_len)
    k_hat, sigma, exp_cut, ok = _gpd_fit(xp, tail, cutoff)
    smoothed = _gpd_smoothed_tail(xp, k_hat, sigma, exp_cut, ok, tail_len)
    new_tail = xp.where(ok, smoothed, tail)
    out = _replace_tail(xp, shifted, tail_idx, new_tail, order, sorted_rows)
    k_hat = poison(xp, xp.where(ok, k_hat, xp.inf)[..., 0], bad)
    return poison(xp, _normalise_rows(xp, out), _col(bad)), k_hat


def _col(bad: Array | None) -> Array | None:
    return None if bad is None else bad[:, None]
