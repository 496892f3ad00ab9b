"""Gamma for a whole optimizer step, and the statistics of tempered unit weights.

A training framework calls the loss once per micro-batch, and one optimizer step sums many such
calls over many data-parallel ranks. :func:`step_gamma` chooses gamma once, from the unit log
weights of the whole step (sharded over ranks through a :class:`Reducer`), per batch or per
GRPO group given by a group index; the loss then takes the result as a precomputed ``gamma``
array (:func:`is_reshape_loss_and_grad`), so that every micro-batch of the step uses it
(:ref:`theory-step`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._ess import kish_ess_from_log, kish_from_sums
from ._gamma import Searched, Shifted, ess_search, shifted_log_weights
from ._lib.checks import check_choice, check_gamma, check_gamma_bounds, check_rho_min
from ._lib.inputs import prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, namespace
from ._lib.numerics import tempered_log_weights
from ._lib.reduce import Reducer, reduce_sum
from ._lib.sizes import is_large
from ._lib.tracing import is_concrete
from ._metrics import merge_rows
from ._psis_gamma import gamma_combined, gamma_psis, gamma_tail
from ._select import GAMMA_METHODS, fixed_gamma_rows, select_gamma

__all__ = ["step_gamma"]

_PARETO_METHODS = {"psis": gamma_psis, "tail": gamma_tail, "combined": gamma_combined}


def choose_gamma(
    l: Array,
    valid: Array,
    rho_min: Any,
    method: str,
    reducer: Reducer | None,
    options: dict[str, Any],
) -> tuple[Array, Array | None]:
    """Gamma of every row of ``l`` (samples along the last axis, ``valid`` marks them) by a
    named method, and the Pareto ``k_hat`` of each row for the Pareto methods (else ``None``)."""
    if method in _PARETO_METHODS:
        if reducer is not None:
            raise ValueError(
                f"gamma={method!r} needs the whole sample on one process (PSIS sorts it); with a "
                "reducer use gamma='ess' or 'closed_form', or gather the log weights first"
            )
        # Called directly (not through select_gamma) to keep k_hat for the metrics.
        rule = _PARETO_METHODS[method]
        args = (l,) if method == "tail" else (l, rho_min)
        g, k_hat = rule(*args, axis=-1, mask=valid, **options)[:2]
        return g, k_hat
    if isinstance(method, numbers.Real) and not options.keys() - {"gamma_min", "gamma_max"}:
        # The loss has validated l already: a fixed number needs no second check of it.
        check_gamma(method, "gamma")
        bounds = {"gamma_min": 0.0, "gamma_max": 1.0, **options}
        check_gamma_bounds(bounds["gamma_min"], bounds["gamma_max"])
        return fixed_gamma_rows(namespace(l), l, method, l.ndim - 1, **bounds), None
    g = select_gamma(l, rho_min, method=method, axis=-1, mask=valid, reducer=reducer, **options)
    return g, None


def spread_bound(xp: Namespace, dtype: Any, n: int) -> float:
    """The largest ``|l|`` of ``n`` log weights for which no deviation from the mean needs the
    scaling of :func:`_variance` (``2^(h - 25) / n``, with ``2^(2h)`` the dtype's overflow
    limit: 8.6e9 at 64 samples in float32)."""
    h = (math.frexp(float(xp.finfo(dtype).max))[1]) // 2
    return 2.0 ** (h - 25) / max(n, 1)


def ess_gamma_of_shifted(
    xp: Namespace, masked_l: Array, shifted: Shifted, rho_min: Any, options: dict[str, Any]
) -> Searched:
    """:func:`gamma_ess` of one row of finite log weights ``masked_l`` (``-inf``: invalid),
    from their :func:`shifted_log_weights` (no reducer): the loss's default search, without a
    second validation or shift, and the metrics' sums where the search has them.
    ``options``: numbers ``gamma_min`` and ``gamma_max`` at most."""
    bounds = {"rho_min": rho_min, "gamma_min": 0.0, "gamma_max": 1.0, **options}
    check_gamma_bounds(bounds["gamma_min"], bounds["gamma_max"])
    prepared = {
        "l": masked_l,
        "d": shifted.d,
        "floored": shifted.floored,
        "finite": shifted.finite,
        "n": shifted.count,
        "n_pos": shifted.count,
    }
    axis = masked_l.ndim - 1  # the search takes a non-negative axis
    return ess_search(xp, prepared, bounds, axis, None, None)


def tempered_metrics(
    xp: Namespace,
    masked_l: Array,
    unit_gamma: Array,
    gamma: Array,
    stats_reducer: Reducer | None,
    merge_reducer: Reducer | None,
    k_hat: Array | None = None,
    shifted: Shifted | None = None,
    sums: tuple[Array, Array] | None = None,
) -> dict[str, Array]:
    """0-d summaries of unit log weights ``masked_l`` (rows = groups, or 1-d: one row; ``-inf``
    = invalid) and of the weights tempered by ``unit_gamma`` (broadcastable to ``masked_l``: one
    gamma per row or per unit, in ``[0, 1]``).

    ``gamma`` holds one value per row (the row means for per-unit gammas), ``k_hat`` (Pareto
    methods) one per row too. ``stats_reducer`` merges the samples of a row across shards (rows
    spread over shards); ``merge_reducer`` merges the per-row summaries across shards (rows that
    live on one shard) by :data:`METRIC_MERGE`, so that every shard reports the metrics of the
    whole batch: ``gamma``, ``sigma2``, ``ess_ratio`` and ``ess_ratio_at_1`` are means over rows,
    ``max_weight`` the largest normalised unit weight, ``k_hat`` the worst row's.
    ``shifted``: the :func:`shifted_log_weights` of ``masked_l`` where the caller has them;
    ``sums``: Kish's sums of the weights at ``unit_gamma`` and at 1, as :func:`_tempered_sums`
    gives them, where the search has them (:class:`Searched`; one row, no reducer).
    """
    # One row and nothing to merge over shards: the 0-d metrics, from the row as one axis.
    if masked_l.ndim == 2 and masked_l.shape[0] == 1 and merge_reducer is None:
        masked_l = xp.reshape(masked_l, (-1,))
        unit_gamma = xp.reshape(unit_gamma, (-1,))
    whole = masked_l.ndim == 1
    if shifted is None:
        shifted = shifted_log_weights(xp, masked_l, -1, stats_reducer, keepdims=not whole)
    d = shifted.d
    if sums is None:
        sums = _tempered_sums(xp, shifted, unit_gamma)
    s1, s2, count, total = _merged_sums(xp, sums, shifted.count, d, stats_reducer)
    n = xp.maximum(count, 1.0)
    mean = total / n
    ess = kish_from_sums(xp, s1, s2, count) / n  # at gamma, at 1
    at_1 = s1[1, ...]  # >= 1 (the max's own e^0) wherever a weight is positive, else 0
    rows = {
        "gamma": gamma,
        "sigma2": _variance(xp, shifted, mean, count, total, stats_reducer, whole),
        "ess_ratio": ess[0, ...],
        "ess_ratio_at_1": ess[1, ...],
        "max_weight": xp.minimum(at_1, xp.divide(1.0, xp.maximum(at_1, 1.0))),
    }
    if k_hat is not None:
        rows["k_hat"] = k_hat
    if whole:
        return {k: xp.reshape(v, ()) if v.ndim else v for k, v in rows.items()}
    return merge_rows(xp, rows, merge_reducer)


def _tempered_sums(xp: Namespace, shifted: Shifted, unit_gamma: Array) -> tuple[Array, Array]:
    """``(sum e, sum e^2)`` along the last axis of ``e = exp(gamma d)`` at ``unit_gamma`` and
    at 1 (stacked first), over the positive weights of ``shifted``. The exponentials are of
    ``d`` (0 at a zero weight), masked after: exp of the floor would be 0 too, but torch's CPU
    exp is several times slower on arguments whose result underflows."""
    finite, d = shifted.finite, shifted.d
    if not is_large(d) or not is_concrete(d):  # stacked: few operators, or fused
        gammas = xp.stack([unit_gamma, xp.ones_like(unit_gamma)])
        e = xp.where(finite, xp.exp(gammas * d), 0.0)
        return xp.sum(e, axis=-1), xp.sum(e * e, axis=-1)
    exps = [_masked(xp, shifted, xp.exp(z)) for z in (unit_gamma * d, d)]
    # The squares as dot products: no array of them.
    return xp.stack([xp.sum(e, axis=-1) for e in exps]), xp.stack([xp.vecdot(e, e) for e in exps])


def _masked(xp: Namespace, shifted: Shifted, x: Array) -> Array:
    """``x`` (finite) where ``shifted`` has a positive weight, else 0: a product by its 0/1
    ``weight`` where it has one, else a where."""
    if shifted.weight is not None:
        return x * shifted.weight
    return xp.where(shifted.finite, x, 0.0)


def _merged_sums(
    xp: Namespace, sums: tuple[Array, Array], count: Array, d: Array, reducer: Reducer | None
) -> tuple[Array, Array, Array, Array]:
    """``(sum e, sum e^2, count, sum d)`` from :func:`_tempered_sums` and this shard's count,
    over every shard in one collective."""
    s1, s2 = sums
    total = xp.sum(d, axis=-1)
    if reducer is None:
        return s1, s2, count, total
    merged = reducer.sum(xp.concat([s1, s2, xp.stack([count, total])]))
    return merged[0:2, ...], merged[2:4, ...], merged[4, ...], merged[5, ...]


def _variance(
    xp: Namespace,
    shifted: Shifted,
    mean: Array,
    count: Array,
    total: Array,
    reducer: Reducer | None,
    whole: bool,
) -> Array:
    """``sum (d - mean)^2 / (count - 1)`` over the valid entries (the variance of the log
    weights, which ``d`` shifts; ``total = sum d``), ``+inf`` only where it exceeds the dtype.

    With ``2^e`` the dtype's overflow limit and ``h = e/2``: where ``|total| <= 2^(h-24)`` every
    ``|d - mean|`` is that small too and the squares are summed as they are; beyond it (a spread
    of at least ``2^(h-24) / count``) the deviations are multiplied by ``2^(1-h)`` first and the
    variance by ``2^(2h-2)`` at the end, exact powers of 2, so that no square over- or underflows
    (``d >= -2^(e-20)``, up to ``2^38`` samples) and the result is the unscaled one's. Where
    ``shifted.bounded`` (every ``|l|`` within :func:`spread_bound`, so ``|total| <= 2^(h-24)``)
    no row is big, and nothing is tested.
    """
    d = shifted.d
    h = (math.frexp(float(xp.finfo(d.dtype).max))[1]) // 2  # 64, 512
    big = None if shifted.bounded else total < -(2.0 ** (h - 24))
    dev = _masked(xp, shifted, d - (mean if whole else mean[..., None]))
    # Eager: one read, then no scaling where no row is big.
    no_big = big is None or (is_concrete(big) and not bool(xp.any(big)))
    if not no_big:
        small = xp.asarray(2.0 ** (1 - h), dtype=d.dtype, device=array_device(d))
        factor = xp.where(big, small, 1.0)  # per row: one product over the samples
        dev = dev * (factor if whole else factor[..., None])
    squares = xp.vecdot(dev, dev, axis=-1)
    if reducer is not None:
        squares = reducer.sum(squares)
    var = squares / xp.maximum(count - 1.0, 1.0)
    if no_big:
        return var
    # var * 2^(2h-2) fits exactly where var <= max_float / 2^(2h-2) (a power-of-2 product).
    cap = float(xp.finfo(d.dtype).max) * 2.0 ** (2 - 2 * h)
    scaled_back = xp.where(var > cap, xp.inf, xp.minimum(var, cap) * 2.0 ** (2 * h - 2))
    return xp.where(big, scaled_back, var)


def _check_groups(xp: Namespace, group_ids: Any, num_groups: Any, n: int) -> None:
    if num_groups is None:
        raise TypeError(
            "group_ids needs num_groups (the number of groups, the same on every shard)"
        )
    if (
        not isinstance(num_groups, numbers.Integral)
        or isinstance(num_groups, bool)
        or num_groups <= 0
    ):
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not hasattr(group_ids, "shape"):
        raise TypeError(f"group_ids must be an integer array of shape ({n},), got {group_ids!r}")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(
            f"group_ids must have one group index per unit, shape ({n},); got "
            f"{tuple(group_ids.shape)}"
        )
    if not xp.isdtype(group_ids.dtype, "integral"):
        raise TypeError(
            f"group_ids must have an integer dtype, got {group_ids.dtype}; map the group keys "
            "(e.g. verl's uid strings) to integers 0 .. num_groups - 1 first"
        )
    if (
        is_concrete(group_ids)
        and n
        and not bool(xp.all((group_ids >= 0) & (group_ids < num_groups)))
    ):
        raise ValueError(f"group_ids must lie in [0, num_groups) = [0, {num_groups})")


def step_gamma(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    method: str = "ess",
    mask: Array | None = None,
    group_ids: Array | None = None,
    num_groups: int | None = None,
    reducer: Reducer | None = None,
    **gamma_options: Any,
) -> tuple[Array, dict[str, Array]]:
    r"""Gamma for a whole optimizer step, per batch or per group, for every unit of the step.

    The loss of one step is a sum over micro-batches and data-parallel ranks; gamma chosen
    inside each loss call sees one micro-batch only, which rarely holds the tail of the weights,
    so the step the optimizer takes has far less ESS than the target. This function chooses gamma
    from the unit log weights ``l_u`` of the *whole* step (this shard's part, merged over shards
    by ``reducer``):

    .. math::

        \gamma_g = \max\{\gamma \in [\gamma_{\min}, \gamma_{\max}] :
        \mathrm{ESS}_g(\gamma)/n_g \ge \rho_{\min}\}, \qquad
        \mathrm{ESS}_g(\gamma) = \frac{(\sum_{u \in g} w_u^\gamma)^2}{\sum_{u\in g} w_u^{2\gamma}}

    for each group ``g`` (the whole step is one group without ``group_ids``), by ``method``
    (:func:`select_gamma`). Pass the returned per-unit gamma to the loss of each micro-batch
    (``is_reshape_loss_and_grad(..., gamma=gamma[rows])``). See the docs page *Distributed
    training* for where the frameworks hold a step's data.

    Parameters
    ----------
    log_w : array (n,)
        Unit log weights of this shard's part of the step, e.g.
        ``log_weights(logp, logq, mask, level="sequence")``; at ``level="token"`` flatten the
        tokens (and the mask).
    rho_min : float or 0-d array in (0, 1]
        Least acceptable ESS ratio.
    method : {"ess", "closed_form", "psis", "tail", "combined"}
        The rule (:func:`select_gamma`); the Pareto rules need the whole step on one process.
    mask : bool array (n,), optional
        Valid units (padding rows, empty sequences).
    group_ids : integer array (n,), optional
        The group of each unit, in ``[0, num_groups)`` (GRPO: the prompt's index, e.g. verl's
        ``uid`` mapped to integers; the same index means the same group on every shard). Groups
        need not be contiguous and may be split across shards. Costs ``O(num_groups * n)``.
    num_groups : int, optional
        Number of groups (required with ``group_ids``; the same on every shard).
    reducer : Reducer, optional
        Merges the statistics over the data-parallel shards of the step.
    **gamma_options
        ``gamma_min``, ``gamma_max``, ``max_iter``, ... of :func:`select_gamma`.

    Returns
    -------
    gamma : array (n,)
        Each unit's gamma (its group's, or the step's), detached, in ``log_w``'s dtype.
    metrics : dict of 0-d arrays, the whole step over all shards
        ``gamma``, ``ess_ratio`` (at gamma), ``ess_ratio_at_1``, ``sigma2``: means over groups;
        ``ess_ratio_pooled``: ESS/n of all the step's tempered weights ``w_u^{gamma_u}``
        together; ``max_weight``: the largest normalised weight of a group; ``k_hat`` (Pareto
        methods): the largest over groups.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.random.default_rng(0).normal(0.0, 2.0, size=1024)
    >>> gamma, metrics = step_gamma(l, 0.3)
    >>> print(gamma.shape, bool(np.all(gamma == gamma[0])), np.round(metrics["ess_ratio"], 3))
    (1024,) True 0.3
    >>> ids = np.arange(1024) % 4  # four groups, interleaved
    >>> g4, _ = step_gamma(l, 0.3, group_ids=ids, num_groups=4)
    >>> print(len(np.unique(g4)), bool(np.all(g4[ids == 2] == g4[2])))
    4 True
    """
    check_choice(method, "method", GAMMA_METHODS)
    check_rho_min(rho_min)
    if not hasattr(log_w, "shape") or log_w.ndim != 1:
        shape = getattr(log_w, "shape", None)
        raise ValueError(
            f"log_w must be a 1-d array of unit log weights (n,), got shape {shape}; flatten "
            "token-level weights (and their mask) first"
        )
    xp, l, valid, _ = prepare_log_weights(log_w, axis=-1, mask=mask)
    n = l.shape[0]
    if valid is None:
        valid = xp.ones(l.shape, dtype=xp.bool, device=array_device(l))
    if group_ids is None:
        if num_groups is not None:
            raise TypeError("num_groups is given without group_ids; pass both or neither")
        rows_l, rows_valid = l[None, :], valid[None, :]
    else:
        _check_groups(xp, group_ids, num_groups, n)
        ids = xp.asarray(group_ids, device=array_device(l))
        member = (
            ids[None, :] == xp.arange(num_groups, dtype=ids.dtype, device=array_device(l))[:, None]
        )
        rows_valid = member & valid[None, :]
        rows_l = xp.broadcast_to(l[None, :], tuple(rows_valid.shape))
    g, k_hat = choose_gamma(rows_l, rows_valid, rho_min, method, reducer, gamma_options)
    unit_g = g[0] * xp.ones_like(l) if group_ids is None else xp.take(g, ids)
    masked_rows = xp.where(rows_valid, rows_l, -xp.inf)
    metrics = tempered_metrics(xp, masked_rows, g[:, None], g, reducer, None, k_hat)
    pooled = tempered_log_weights(xp, xp.where(valid, l, -xp.inf), unit_g)
    total = reduce_sum(xp, xp.astype(valid, l.dtype), 0, reducer)
    pooled_ess = kish_ess_from_log(xp, pooled, 0, reducer)
    metrics["ess_ratio_pooled"] = pooled_ess / xp.where(total > 0, total, 1.0)
    return unit_g, metrics
