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

from ._array import (
    Array,
    Namespace,
    array_device,
    as_compute_array,
    check_log_weights,
    check_real_floating,
    is_concrete,
    logsumexp,
    namespace,
    normalize_axis,
    poison,
    shift_by_max,
)

__all__ = ["pareto_k_threshold", "psis", "psis_tail_length"]

#: Zhang & Stephens (2009) grid constant and the PSIS weakly informative prior on ``k``
#: (Vehtari et al. 2024, appendix; arviz-stats ``_gpdfit``: ``prior_bs = 3``, ``prior_k = 10``).
_PRIOR_BS = 3.0
_PRIOR_K = 10.0
_PRIOR_K_MEAN = 0.5
#: Fewest tail draws for a fit (R ``loo``: ``enough_tail_samples``; arviz-stats raises below it).
_MIN_TAIL = 5
#: Largest temporary (in elements) of the eager Zhang-Stephens grid computation (256 KiB).
_GRID_BLOCK = 32768
#: Largest temporary (in elements) of the eager NumPy normalisation (512 KiB).
_EXP_BLOCK = 65536
#: Largest block of the NumPy block-max prefilter of the tail selection.
_MAX_BLOCK = 64


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
    >>> from isreshape_core._psis import psis_tail_length
    >>> psis_tail_length(4000), psis_tail_length(200), psis_tail_length(24)
    (189, 40, 4)
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise TypeError(f"n must be a non-negative int (the number of draws), got {n!r}")
    r_eff = _check_r_eff(r_eff)
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
    xp, lw, axis = _prepare(log_w, axis)
    r_eff = _check_r_eff(r_eff)
    n = lw.shape[axis]
    tail_len = psis_tail_length(n, r_eff)
    moved = xp.moveaxis(lw, axis, -1) if axis != lw.ndim - 1 else lw
    batch_shape = tuple(moved.shape[:-1])
    rows = xp.reshape(moved, (-1, n))
    if is_numpy_namespace(xp) and rows.dtype == xp.float64 and tail_len >= _MIN_TAIL:
        out, k_hat = _psis_rows_numpy(xp, rows, tail_len)
    else:
        out, k_hat = _psis_rows(xp, rows, tail_len)
    out = xp.reshape(out, (*batch_shape, n))
    if axis != lw.ndim - 1:
        out = xp.moveaxis(out, -1, axis)
    return out, xp.reshape(k_hat, batch_shape)


# --------------------------------------------------------------------------------------------
# private helpers (also used by psis_gamma)


def _check_r_eff(r_eff: Any) -> float:
    if not isinstance(r_eff, numbers.Real) or isinstance(r_eff, bool):
        raise TypeError(
            f"r_eff must be a positive Python number (it fixes the static tail length), "
            f"got {type(r_eff).__name__}; use r_eff=1.0 for independent draws"
        )
    if not (math.isfinite(r_eff) and r_eff > 0):
        raise ValueError(f"r_eff must be a finite number > 0, got {r_eff!r}")
    return float(r_eff)


def _prepare(log_w: Any, axis: int) -> tuple[Namespace, Array, int]:
    """``prepare_log_weights`` without a mask and without its value check.

    The check for NaN and ``+inf`` is made in :func:`_psis_rows`: on NumPy on the row maxima (a
    row holds NaN or ``+inf`` exactly when its NumPy max is NaN or ``+inf``), which saves four
    passes over the data; elsewhere on every entry (XLA's CPU ``max`` may drop a NaN).
    """
    if not hasattr(log_w, "shape"):
        raise TypeError(f"log_w must be an array, got {type(log_w).__name__}")
    xp = namespace(log_w)
    check_real_floating(xp, log_w)
    lw = as_compute_array(xp, log_w)
    axis = normalize_axis(axis, lw.ndim)
    if lw.shape[axis] == 0:
        raise ValueError(
            f"log_w has no samples along axis {axis} (shape {tuple(lw.shape)}); "
            "the reduction axis must not be empty"
        )
    return xp, lw, axis


def _shift_rows(xp: Namespace, rows: Array) -> Array:
    """Rows shifted so that their max is 0 (an all ``-inf`` row stays all ``-inf``)."""
    return shift_by_max(xp, rows, -1)[0]  # no overflow for rows spanning the float range


def _use_argpartition(xp: Namespace) -> bool:
    # array_api_extra.argpartition is O(S) here (native argpartition / top_k); its torch path
    # uses boolean-mask indexing, which breaks torch.compile(fullgraph=True), so torch sorts.
    return is_numpy_namespace(xp) or is_cupy_namespace(xp) or is_jax_namespace(xp)


def _has_indexed_update(xp: Namespace) -> bool:
    # Namespaces whose arrays take ``x[rows, cols] = values`` (JAX through ``.at``), which
    # array_api_extra.at uses; the standard itself has no scatter. Not torch: array_api_extra.at
    # does not trace under torch.compile(fullgraph=True) (dynamo rejects its index handling).
    return is_numpy_namespace(xp) or is_cupy_namespace(xp) or is_jax_namespace(xp)


def _block_size(n_rows: int, n: int, tail_len: int) -> int:
    """Block length of the NumPy block-max prefilter of :func:`_numpy_top` (0: not used)."""
    ratio = n / (tail_len + 1)
    if ratio < 8 or n * n_rows < _EXP_BLOCK:  # small inputs: the extra calls cost more
        return 0
    return min(int(ratio**0.5) * 2, int(ratio), _MAX_BLOCK)


def _numpy_top(xp: Namespace, rows: Array, tail_len: int) -> tuple[Array, Array]:
    """Values and positions of the ``M+1`` largest entries of each row, in position order.

    NumPy only (eager). ``argpartition`` costs about 10 ns a value here, so where the rows are
    long it runs on a few candidates only. The row is cut into ``nb = n // b`` strided blocks
    ``{j, j + nb, j + 2·nb, ...}`` (``b`` from :func:`_block_size`); the ``(M+1)``-th largest
    block max ``L`` is a lower bound of the ``(M+1)``-th largest draw (the ``M+1`` largest
    maxima are ``M+1`` draws at least ``L``), so the draws ``>= L`` (a few percent of the row)
    hold the ``M+1`` largest. They are gathered, in position order, into a ``(B, width)``
    array padded with ``-inf`` (never selected: every row has ``M+1`` finite candidates), on
    which ``argpartition`` runs. Rows whose bound is ``-inf`` (many zero weights) use the
    whole row.
    """
    n_rows, n = rows.shape
    k1 = tail_len + 1
    b = _block_size(n_rows, n, tail_len)
    cand, pos = rows, None
    if b:
        nb = n // b
        maxima = xp.max(xp.reshape(rows[:, : nb * b], (n_rows, b, nb)), axis=1)
        bound = xpx.partition(maxima, nb - k1, axis=-1, xp=xp)[:, nb - k1 : nb - k1 + 1]
        if bool(xp.all(bound > -xp.inf)):
            keep = rows >= bound
            counts = xp.count_nonzero(keep, axis=-1)
            flat = xp.nonzero(xp.reshape(keep, (-1,)))[0]
            row_of = flat // n
            slot = xp.arange(flat.shape[0]) - (xp.cumulative_sum(counts) - counts)[row_of]
            width = int(xp.max(counts))
            cand = xp.full((n_rows, width), -xp.inf, dtype=rows.dtype)
            cand[row_of, slot] = xp.reshape(rows, (-1,))[flat]
            pos = xp.zeros((n_rows, width), dtype=flat.dtype)
            pos[row_of, slot] = flat - row_of * n
    kth = cand.shape[-1] - k1
    top = xp.sort(xpx.argpartition(cand, kth, axis=-1, xp=xp)[:, kth:], axis=-1)
    pos = top if pos is None else xp.take_along_axis(pos, top, axis=-1)
    return xp.take_along_axis(cand, top, axis=-1), pos


def _sorted_tail(
    xp: Namespace, rows: Array, tail_len: int
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """The ``tail_len`` largest values of each row of ``rows`` (shape ``(B, S)``), ascending.

    Returns ``(tail, cutoff, tail_idx, order, sorted_rows)``: ``tail`` and ``tail_idx`` of shape
    ``(B, M)``, ``cutoff`` of shape ``(B, 1)`` (the ``(M+1)``-th largest value); ``order`` and
    ``sorted_rows`` are the full stable sort where it was computed, else ``None``.
    """
    n = rows.shape[-1]
    kth = n - tail_len - 1
    if is_numpy_namespace(xp):
        top_val, top_idx = _numpy_top(xp, rows, tail_len)
        # Ties are broken by position, as a stable sort of the whole row would do among the
        # candidates (they are in position order). The unstable sort is several times faster
        # and gives the same order when no two candidates are equal.
        by_value = xp.argsort(top_val, axis=-1, stable=False)
        ranked = xp.take_along_axis(top_val, by_value, axis=-1)
        if bool(xp.any(ranked[:, 1:] == ranked[:, :-1])):
            by_value = xp.argsort(top_val, axis=-1, stable=True)
            ranked = xp.take_along_axis(top_val, by_value, axis=-1)
        top_val, top_idx = ranked, xp.take_along_axis(top_idx, by_value, axis=-1)
        return top_val[..., 1:], top_val[..., :1], top_idx[..., 1:], None, None
    if _use_argpartition(xp):
        top_idx = xpx.argpartition(rows, kth, axis=-1, xp=xp)[..., kth:]
        # Ties are broken by position, as a stable sort of the whole row would do among the
        # candidates: sort the candidates' positions first, then stably by value.
        top_idx = xp.sort(top_idx, axis=-1)
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
    if is_numpy_namespace(xp):
        # What array_api_extra.at does on NumPy, without its dispatch overhead.
        rows[xp.arange(rows.shape[0])[:, None], tail_idx] = new_tail
        return rows
    if _has_indexed_update(xp):
        row_ids = xp.arange(rows.shape[0], device=array_device(rows))[:, None]
        # ``rows`` is a temporary of ours, so an in-place update (copy=None) is safe.
        return xpx.at(rows, (row_ids, tail_idx)).set(new_tail, xp=xp)
    if order is None:  # pragma: no cover - _sorted_tail sorts fully on these namespaces
        raise AssertionError("the portable path needs the full sort order")
    full = xp.concat([sorted_rows[..., : n - tail_len], new_tail], axis=-1)
    return xp.take_along_axis(full, xp.argsort(order, axis=-1), axis=-1)


def _gpd_fit(xp: Namespace, tail: Array, cutoff: Array) -> tuple[Array, Array, Array, Array]:
    """Zhang & Stephens (2009) GPD fit to the exceedances of a sorted log-space tail.

    ``tail`` (shape ``(B, M)``, ascending, shifted so that the row max is 0) and ``cutoff``
    (shape ``(B, 1)``). Returns ``(k_hat, sigma, exp_cutoff, ok)``, each of shape ``(B, 1)``;
    ``k_hat`` includes the weakly informative prior; ``ok`` is False where no fit is possible
    (and the other outputs are then meaningless but finite). NumPy float64 tails are fitted by
    the NumPy kernel's fit (``isreshape_core._psis_numpy``), the same numbers in fewer passes.
    """
    if is_numpy_namespace(xp) and tail.dtype == xp.float64:
        from . import _psis_numpy

        return _psis_numpy.gpd_fit_sorted_tail(tail, cutoff)
    dtype, dev = tail.dtype, array_device(tail)
    finfo = xp.finfo(dtype)
    tail_len = tail.shape[-1]
    exp_cut = xp.exp(cutoff)
    x = xp.exp(tail) - exp_cut
    # Equal tail (arviz-stats raises, R loo warns and leaves it): equal exceedances, the values
    # that are fitted (log values a few ulps apart can have equal exponentials, and whether
    # they do changes with a common shift). A tail holding -inf is not fitted either.
    ok = (tail[..., :1] > -xp.inf) & (x[..., -1:] > x[..., :1])
    star = int(tail_len / 4 + 0.5) - 1  # arviz-stats `_gpdfit` index of the quartile x*
    # loo >= 2.10 / posterior >= 1.7: a first quartile equal to the smallest exceedance (a
    # quarter of the tail tied) has no reliable fit (k = inf, the tail left unsmoothed).
    ok = ok & (x[..., star : star + 1] > x[..., :1])
    # Rows without a fit get a harmless stand-in sample, so that no NaN or warning arises.
    stand_in = xp.arange(1, tail_len + 1, dtype=dtype, device=dev) / tail_len
    x = xp.where(ok, x, stand_in)
    x_star, x_max = x[..., star : star + 1], x[..., -1:]

    n_grid = 30 + int(tail_len**0.5)
    j = xp.arange(1, n_grid + 1, dtype=dtype, device=dev)
    theta = (1.0 - xp.sqrt(n_grid / (j - 0.5))) / (_PRIOR_BS * x_star) + 1.0 / x_max  # (B, m)
    # theta_j < 1/x_max for every j, so log1p(-theta·x) is finite.
    k_grid = _grid_means(xp, -theta, x)  # (B, m)
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
    weights = xp.where(weights >= 10 * finfo.eps, weights, 0.0)  # as arviz-stats does
    weights = weights / xp.sum(weights, axis=-1, keepdims=True)
    theta_hat = xp.sum(theta * weights, axis=-1, keepdims=True)
    k_raw = xp.mean(xp.log1p(-theta_hat * x), axis=-1, keepdims=True)
    theta_nonzero = theta_hat != 0
    sigma = -k_raw / xp.where(theta_nonzero, theta_hat, 1.0)
    ok = ok & theta_nonzero & (sigma > 0) & xp.isfinite(sigma) & xp.isfinite(k_raw)
    k_hat = (tail_len * k_raw + _PRIOR_K * _PRIOR_K_MEAN) / (tail_len + _PRIOR_K)
    return k_hat, sigma, exp_cut, ok


def _grid_means(xp: Namespace, neg_theta: Array, x: Array) -> Array:
    """``mean(log1p(neg_theta[..., j] · x), axis=-1)`` for every grid point ``j``: shape (B, m).

    One broadcast ``(B, m, M)`` computation, except on NumPy: there the ``(B, m, M)``
    temporary is built block by block (blocks of whole rows, or of grid points when one row is
    too large) in a reused buffer of about ``_GRID_BLOCK`` elements that stays in cache, with
    in-place ``log1p``: large temporaries are allocated and returned to the OS on every call,
    and their page faults cost more than the arithmetic. Other namespaces cache their memory
    or fuse the computation when traced.
    """
    n_rows, n_grid = neg_theta.shape
    tail_len = x.shape[-1]
    if not is_numpy_namespace(xp):
        return xp.mean(xp.log1p(neg_theta[..., :, None] * x[..., None, :]), axis=-1)
    per_row = n_grid * tail_len
    if per_row * n_rows <= _GRID_BLOCK:
        grid = neg_theta[:, :, None] * x[:, None, :]
        return xp.sum(xp.log1p(grid, out=grid), axis=-1) / tail_len
    sums = xp.empty((n_rows, n_grid), dtype=x.dtype)
    if per_row <= _GRID_BLOCK:
        step = _GRID_BLOCK // per_row
        buf = xp.empty((step, n_grid, tail_len), dtype=x.dtype)
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            grid = xp.multiply(neg_theta[r0:r1, :, None], x[r0:r1, None, :], out=buf[: r1 - r0])
            xp.sum(xp.log1p(grid, out=grid), axis=-1, out=sums[r0:r1])
    else:
        step = max(_GRID_BLOCK // (n_rows * tail_len), 1)
        buf = xp.empty((n_rows, step, tail_len), dtype=x.dtype)
        for j0 in range(0, n_grid, step):
            j1 = min(j0 + step, n_grid)
            grid = xp.multiply(neg_theta[:, j0:j1, None], x[:, None, :], out=buf[:, : j1 - j0])
            xp.sum(xp.log1p(grid, out=grid), axis=-1, out=sums[:, j0:j1])
    return sums / tail_len


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


def _numpy_sum_exp(xp: Namespace, rows: Array) -> Array:
    """``sum(exp(rows), axis=-1, keepdims=True)`` on NumPy, through a reused buffer.

    The exponentials of a large ``(B, S)`` array are taken a block of rows (or of one row) at
    a time into a buffer of about ``_EXP_BLOCK`` elements that stays in cache, instead of into
    a fresh array as large as ``rows`` whose page faults cost more than ``exp`` itself.
    """
    n_rows, n = rows.shape
    if n_rows * n <= _EXP_BLOCK:
        return xp.sum(xp.exp(rows), axis=-1, keepdims=True)
    if n <= _EXP_BLOCK:
        total = xp.empty((n_rows, 1), dtype=rows.dtype)
        step = _EXP_BLOCK // n
        buf = xp.empty((step, n), dtype=rows.dtype)
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            part = xp.exp(rows[r0:r1], out=buf[: r1 - r0])
            xp.sum(part, axis=-1, keepdims=True, out=total[r0:r1])
        return total
    step = max(_EXP_BLOCK // n_rows, 1024)
    buf = xp.empty((n_rows, step), dtype=rows.dtype)
    total = xp.zeros((n_rows, 1), dtype=rows.dtype)
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        total += xp.sum(xp.exp(rows[:, c0:c1], out=buf[:, : c1 - c0]), axis=-1, keepdims=True)
    return total


def _normalise_rows(xp: Namespace, rows: Array, top: Array | None = None) -> Array:
    """``rows - logsumexp(rows)`` row by row; ``top`` (B, 1) is the rows' max where known.

    On NumPy, with rows that are a temporary of ours, max 0 or less and a max above -500, the
    exponentials cannot overflow nor all underflow: no shift is needed and the rows are
    normalised in place (two passes over the data instead of five).
    """
    if top is not None and is_numpy_namespace(xp) and bool(xp.all(top > -500.0)):
        return xp.subtract(rows, xp.log(_numpy_sum_exp(xp, rows)), out=rows)
    total = logsumexp(xp, rows, axis=-1, keepdims=True)
    return rows - xp.where(xp.isfinite(total), total, 0.0)


def _psis_rows(xp: Namespace, rows: Array, tail_len: int) -> tuple[Array, Array]:
    """PSIS on a ``(B, S)`` array whose rows are batches; returns ``(smoothed, k_hat (B,))``."""
    top = xp.max(rows, axis=-1, keepdims=True)
    # A row holds NaN or +inf exactly when its max is NaN or +inf: one check on (B, 1).
    # NumPy's max propagates NaN, so the (B, 1) maxima tell whether a row holds NaN or +inf;
    # XLA's CPU max does not (it may drop NaN): elsewhere every entry is checked.
    numpy_max = is_numpy_namespace(xp)
    check_log_weights(xp, top if numpy_max else rows)
    # Traced, a row holding NaN or +inf gives NaN everywhere.
    bad = None
    if not is_concrete(top):
        bad = xp.any(xp.isnan(rows) | (rows == xp.inf), axis=-1, keepdims=True)
    shifted = shift_by_max(xp, rows, -1)[0]  # no overflow for rows spanning the float range
    if tail_len < _MIN_TAIL:
        k_hat = xp.full((rows.shape[0],), xp.inf, dtype=rows.dtype, device=array_device(rows))
        return poison(xp, _normalise_rows(xp, shifted), bad), poison(xp, k_hat, _col(bad))
    tail, cutoff, tail_idx, order, sorted_rows = _sorted_tail(xp, shifted, tail_len)
    k_hat, sigma, exp_cut, ok = _gpd_fit(xp, tail, cutoff)
    smoothed = _gpd_smoothed_tail(xp, k_hat, sigma, exp_cut, ok, tail_len)
    new_tail = xp.where(ok, smoothed, tail)
    out = _replace_tail(xp, shifted, tail_idx, new_tail, order, sorted_rows)
    k_hat = poison(xp, xp.where(ok, k_hat, xp.inf), bad)
    # The new tail is ascending and at least the cutoff: its last value is the row max.
    return poison(xp, _normalise_rows(xp, out, new_tail[:, -1:]), bad), k_hat[..., 0]


def _col(bad: Array | None) -> Array | None:
    return None if bad is None else bad[:, 0]


def _psis_rows_numpy(xp: Namespace, rows: Array, tail_len: int) -> tuple[Array, Array]:
    """:func:`_psis_rows` through the NumPy kernel; the rows it leaves go the portable way."""
    from . import _psis_numpy  # NumPy is imported only where NumPy arrays are passed

    out, k_hat, redo = _psis_numpy.psis_rows(rows, tail_len)
    if redo is not None and bool(xp.any(redo)):
        out[redo], k_hat[redo] = _psis_rows(xp, rows[redo], tail_len)
    return out, k_hat


def _tail_khat(xp: Namespace, tail: Array, cutoff: Array) -> Array:
    """``k_hat`` (shape ``(B,)``) of a sorted shifted tail; ``inf`` where no fit is possible."""
    k_hat, _, _, ok = _gpd_fit(xp, tail, cutoff)
    return xp.where(ok, k_hat, xp.inf)[..., 0]
