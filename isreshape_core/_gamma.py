"""Choosing the tempering exponent gamma from the importance weights (:ref:`theory-gamma-ess`).

- :func:`gamma_closed_form`: the paper's Theorem 8.1, exact only for log-normal weights
  (:ref:`theory-closed-form`);
- :func:`gamma_ess`: the default, the largest gamma whose empirical ESS ratio meets ``rho_min``;
- ``select_gamma`` (``_select.py``) is the one entry point for every method.

Per-group gamma (GRPO groups of ``G`` responses) comes from the same functions: reshape the log
weights to ``(groups, G)`` and reduce along the group axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._ess_grid import grid_plan, largest_feasible_gamma, polish_feasible_end
from ._lib.checks import check_count, check_gamma_bounds, check_rho_min
from ._lib.inputs import broadcast_rewards, prepare_log_weights
from ._lib.namespace import Array, Namespace
from ._lib.numerics import log_abs, log_variance_stats, shift_by_max
from ._lib.reduce import Reducer, reduce_max, reduce_sum, sample_count
from ._lib.rows import batch_param
from ._lib.tracing import poison, traced_bad_rows

__all__ = ["closed_form_gamma", "gamma_closed_form", "gamma_ess"]

# Newton steps aim this fraction past the predicted root, so that the iterates land on both sides
# of it and the feasible end of the bracket (the value returned) converges too.
_OVERSHOOT = 0.02
# Newton iterations where the candidate grid does not apply (see gamma_ess).
_NEWTON_ITERATIONS = 12


def closed_form_gamma(
    xp: Namespace,
    l: Array,
    axis: int,
    rho_min: Any,
    gamma_min: Any,
    gamma_max: Any,
    reducer: Reducer | None = None,
) -> Array:
    """:func:`gamma_closed_form` on validated log weights ``l`` (no checks, no poisoning)."""
    count, var = log_variance_stats(xp, l, axis, reducer)
    shape = tuple(var.shape)
    lo = batch_param(xp, gamma_min, l, shape)
    hi = batch_param(xp, gamma_max, l, shape)
    log_rho = xp.log(batch_param(xp, rho_min, l, shape))
    # A variance so small that -log(rho_min) / var overflows gives gamma_max, without a warning.
    tiny = var < -log_rho / float(xp.finfo(var.dtype).max)
    usable = (count >= 2) & (var > 0) & ~tiny
    gamma = xp.sqrt(-log_rho / xp.where(usable, var, 1.0))
    gamma = xp.where(usable, gamma, hi)
    return xp.minimum(xp.maximum(gamma, lo), hi)


def gamma_closed_form(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    axis: int = -1,
    mask: Array | None = None,
    gamma_min: Any = 0.0,
    gamma_max: Any = 1.0,
    reducer: Reducer | None = None,
) -> Array:
    r"""The paper's closed-form gamma (Theorem 8.1), exact only for log-normal weights.

    If ``l ~ Normal(m, sigma^2)`` then ``ESS(gamma)/n ~ exp(-sigma^2 gamma^2)``, so

    .. math::

        \gamma^* = \mathrm{clip}\Big(\sqrt{-\log\rho_{\min} / \sigma^2},
        \gamma_{\min}, \gamma_{\max}\Big), \qquad \sigma^2 = \mathrm{Var}(l)\ (\text{ddof}=1),

    and ``gamma* = gamma_max`` where ``sigma^2 = 0`` or fewer than 2 finite log weights. One pass,
    O(n). ``-inf`` log weights (weight 0) are left out of ``sigma^2``: the log-normal model
    describes the positive weights. Under heavy tails it overestimates gamma badly (Student-t(3)
    log weights at n = 4096 give ESS/n < 0.001; :ref:`theory-closed-form`): prefer
    :func:`gamma_ess`.

    Parameters
    ----------
    log_w : array
        Log importance weights, samples along ``axis``.
    rho_min : float or array broadcastable to the batch shape, in (0, 1]
        Least acceptable ESS ratio.
    axis, mask
        As in :func:`ess`.
    gamma_min, gamma_max : float or array broadcastable to the batch shape, in [0, 1]
        Bounds; ``gamma_max`` may be a warm-up schedule's value (:ref:`theory-schedules`).
    reducer : Reducer, optional
        Combines the partial statistics of every shard when the samples are split over
        processes (:class:`isreshape_core.Reducer`); the result is then the same on every shard.

    Returns
    -------
    array, the batch shape

    Examples
    --------
    >>> import numpy as np
    >>> l = np.random.default_rng(0).normal(0.0, 2.0, size=100_000)
    >>> print(np.round(gamma_closed_form(l, 0.3), 2))  # sqrt(-log 0.3 / 4)
    0.55
    """
    xp, l, _, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_rho_min(rho_min)
    check_gamma_bounds(gamma_min, gamma_max)
    bad = traced_bad_rows(xp, l, axis, rho_min, gamma_min, gamma_max, reducer=reducer)
    return poison(xp, closed_form_gamma(xp, l, axis, rho_min, gamma_min, gamma_max, reducer), bad)


def _ess_and_slope(
    xp: Namespace,
    d: Array,
    offset: Array,
    g: Array,
    n_pos: Array,
    axis: int,
    reducer: Reducer | None,
    *,
    top_is_zero: bool,
):
    """Sums ``s1 = sum e``, ``s2 = sum e^2``, ``log ESS(g)`` and ``d log ESS / d g`` of the weights
    ``e = exp(g d + offset)`` (Kish's ESS is ``s1^2 / s2``).

    ``d`` is the log weight relative to its row maximum (zero weights set to 0); ``offset`` is
    ``-inf`` for zero weights and ``log|r|`` (or 0) otherwise. One exponential per sample: with
    ``e = exp(g d + offset - max)`` the weights at ``2g`` are ``e^2``, and ``d/dg LSE(g d + c)
    = E_softmax[d]``. With a ``reducer``, the four sums travel in one collective. With
    ``top_is_zero`` (no rewards: ``offset`` is 0 or ``-inf``) the exponent's max is
    ``g max(d) = 0`` and no max is taken: the exponents are then bit for bit those of
    :func:`isreshape_core.ess_ratio` (``g (l - max l)``), so that its recomputation agrees with
    the feasibility test here.
    """
    z = g * d + offset
    if not top_is_zero:
        m = reduce_max(xp, z, axis, reducer, keepdims=True)
        z = z - xp.where(xp.isfinite(m), m, 0.0)
    e = xp.exp(z)
    e2 = e * e
    s1, s2 = xp.sum(e, axis=axis), xp.sum(e2, axis=axis)
    t1, t2 = xp.sum(e * d, axis=axis), xp.sum(e2 * d, axis=axis)
    if reducer is not None:
        sums = reducer.sum(xp.stack([s1, s2, t1, t2]))
        s1, s2, t1, t2 = sums[0, ...], sums[1, ...], sums[2, ...], sums[3, ...]
    # A row without a positive weight has s1 = s2 = 0; the floor keeps its logs finite (its
    # gamma is overridden by the caller).
    tiny = xp.finfo(s1.dtype).smallest_normal
    s1, s2 = xp.maximum(s1, tiny), xp.maximum(s2, tiny)
    log_ess = 2.0 * xp.log(s1) - xp.log(s2)
    slope = 2.0 * (t1 / s1 - t2 / s2)
    return s1, s2, log_ess, slope


def _weigh_by_rewards(
    xp: Namespace, l: Array, rewards: Array, axis: int, reducer: Reducer | None, bad: Array | None
) -> tuple[Array, Array, Array | None]:
    """``(l, log|r|, bad)``: samples of reward 0 get weight 0 (``l = -inf``), and a traced
    non-finite reward marks its row bad like a non-finite log weight."""
    r = broadcast_rewards(xp, rewards, l)
    r_bad = traced_bad_rows(xp, xp.abs(r), axis, reducer=reducer)
    bad = bad if r_bad is None else (r_bad if bad is None else bad | r_bad)
    log_r = log_abs(xp, r)
    return xp.where(log_r > -xp.inf, l, -xp.inf), log_r, bad


def gamma_ess(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    axis: int = -1,
    mask: Array | None = None,
    gamma_min: Any = 0.0,
    gamma_max: Any = 1.0,
    max_iter: int | None = None,
    rewards: Array | None = None,
    reducer: Reducer | None = None,
) -> Array:
    r"""The largest gamma whose empirical ESS ratio meets ``rho_min`` — the default method.

    .. math::

        \gamma = \max\{\gamma \in [\gamma_{\min}, \gamma_{\max}] :
        \mathrm{ESS}(\gamma) / n \ge \rho_{\min}\}

    ``ESS(gamma)`` is non-increasing in gamma, so the set is an interval and its right end is
    unique (:ref:`theory-gamma-ess`). Two searches find it, both inside a bracket ``[lo, hi]``
    with ``ESS(lo)/n >= rho_min > ESS(hi)/n``, both with a fixed amount of work (no
    data-dependent control flow, so they trace under ``jax.jit`` and ``torch.compile``):

    - a **candidate grid** (the default for up to 2048 samples in all rows, without a
      ``reducer``): each pass tests 16 to 512 values of gamma spread over the bracket at once and
      keeps the interval after the largest feasible one; 3 passes in float32, 6 in float64 (at
      512 candidates) leave a bracket narrower than ``2**-24`` and ``2**-48``. A few large array
      operations instead of a dozen sequential rounds of small ones: what a sequence-level
      loss, whose statistics are a few dozen numbers, pays for in kernel launches;
    - **safeguarded Newton** (larger batches, a ``reducer``, or an explicit ``max_iter``):
      ``max_iter`` iterations (default 12) on ``log ESS`` in the variable ``gamma^2`` (exact in
      one step for log-normal weights), started from the closed form; a step that leaves the
      bracket or does not halve the previous one is replaced by bisection; one exponential per
      sample an iteration. A last pass tests points just below the final iterate, so that the
      feasible end catches up with it.

    The two agree to about 1e-13 in float64. The result is always a value that passed the test
    ``ESS(gamma) >= rho_min n`` (with a margin of a few ulps), or ``gamma_min`` where even
    ``gamma_min`` misses it. No distributional assumption.

    Rows without a positive weight (fully masked, or all ``-inf``) carry no information and get
    ``gamma_max``.

    Parameters
    ----------
    log_w : array
        Log importance weights, samples along ``axis``.
    rho_min : float or array broadcastable to the batch shape, in (0, 1]
    axis, mask
        As in :func:`ess`.
    gamma_min, gamma_max : float or array broadcastable to the batch shape, in [0, 1]
    max_iter : int, optional
        Forces the Newton search with this many iterations after the two end-point checks.
        ``None`` (default): the grid where it applies, else Newton with 12. Bisection alone would
        give a bracket of width ``(gamma_max - gamma_min) / 2**max_iter``; Newton converges to
        rounding in a median of about 6 iterations on log-normal and Student-t weights.
    rewards : array broadcastable to ``log_w``, optional
        Use the gradient ESS of ``w^gamma |r|`` (:func:`gradient_ess`) instead of Kish's ESS of
        ``w^gamma``. The constraint is then relative to what the rewards alone allow,
        ``ESS_grad(gamma) >= rho_min * ESS_grad(0)``, since sparse rewards can put
        ``ESS_grad(0)/n`` below any fixed target. ``ESS_grad`` need not be monotone in gamma: the
        result still meets the constraint but is the largest feasible gamma only where it is.
    reducer : Reducer, optional
        Combines the partial sums of every shard when the samples are split over processes
        (:class:`isreshape_core.Reducer`): one max and one stacked sum per iteration, so every
        shard computes the gamma of the whole batch.

    Returns
    -------
    array, the batch shape

    Examples
    --------
    >>> import numpy as np
    >>> l = np.random.default_rng(0).standard_t(3, size=4096) * 2
    >>> g = gamma_ess(l, 0.3)
    >>> from isreshape_core import ess_ratio
    >>> print(bool(ess_ratio(l, g) >= 0.3), bool(ess_ratio(l, g + 1e-3) < 0.3))
    True True
    """
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_rho_min(rho_min)
    check_gamma_bounds(gamma_min, gamma_max)
    max_iter = None if max_iter is None else check_count(max_iter, "max_iter")
    bad = traced_bad_rows(xp, l, axis, rho_min, gamma_min, gamma_max, reducer=reducer)
    log_r = None
    if rewards is not None:
        l, log_r, bad = _weigh_by_rewards(xp, l, rewards, axis, reducer, bad)

    n = sample_count(xp, l, mask, axis, reducer)
    shape = tuple(n.shape)
    lo = batch_param(xp, gamma_min, l, shape)
    hi = batch_param(xp, gamma_max, l, shape)
    n_pos = reduce_sum(xp, xp.astype(l > -xp.inf, l.dtype), axis, reducer)

    # Loop invariants: zero weights as an offset of -inf, and (for Kish's ESS) the log weights
    # shifted by their maximum once, so that no iteration needs a max-reduction or a collective
    # for it: max(g l) = g max(l) for g >= 0.
    finite = l > -xp.inf
    offset = xp.where(finite, xp.zeros_like(l) if log_r is None else log_r, -xp.inf)
    # Relative to the max (exact for nearby values): a constant offset of l costs no digits.
    d = xp.where(finite, shift_by_max(xp, l, axis, reducer)[0], 0.0)

    def stats_at(g: Array, d: Array = d, offset: Array = offset) -> tuple[Array, ...]:
        g = xp.expand_dims(g, axis=axis)
        return _ess_and_slope(xp, d, offset, g, n_pos, axis, reducer, top_is_zero=log_r is None)

    # The ESS that gamma must reach: rho_min n, or rho_min ESS_grad(0) with rewards, where
    # ESS_grad(0) = s1^2 / s2 of the weights |r| (w^0 = 1 for every positive weight).
    if log_r is None:
        base = n
    else:
        s1_zero, s2_zero = stats_at(xp.zeros_like(lo))[:2]
        base = s1_zero * s1_zero / s2_zero
    needed = _needed_ess(xp, batch_param(xp, rho_min, l, shape), base)
    last = (lambda a: a) if axis == l.ndim - 1 else (lambda a: xp.moveaxis(a, axis, -1))
    d, offset = last(d), last(offset)
    top_is_zero = log_r is None
    # Shards may hold different numbers of samples, and the grid's size follows it: with a
    # reducer every shard takes the Newton search, whose collectives have one shape everywhere.
    plan = grid_plan(math.prod(tuple(l.shape)), xp.finfo(l.dtype).bits)
    if max_iter is None and plan is not None and reducer is None:
        grid = {"candidates": plan[0], "passes": plan[1], "top_is_zero": top_is_zero}
        gamma = largest_feasible_gamma(xp, d, offset, needed, lo, hi, **grid)
    else:

        def polish(x: Array, lo: Array) -> Array:
            return polish_feasible_end(
                xp, x, lo, d, offset, needed, reducer=reducer, top_is_zero=top_is_zero
            )

        start = closed_form_gamma(xp, l, axis, rho_min, gamma_min, gamma_max, reducer)
        iterations = _NEWTON_ITERATIONS if max_iter is None else max_iter
        gamma = _safeguarded_newton(xp, stats_at, needed, lo, hi, start, iterations, polish)
    gamma = xp.where(n_pos > 0, gamma, hi)  # no positive weight: no information, gamma_max
    return poison(xp, gamma, bad)


def _needed_ess(xp: Namespace, rho: Array, base: Array) -> Array:
    """``rho * base`` with a margin of a few ulps, so that the returned gamma meets ``rho_min``
    also when the ratio is recomputed in another order (e.g. fused by a compiler)."""
    margin = 1.0 + 4.0 * xp.finfo(base.dtype).eps
    return xp.minimum(rho * base * margin, base)


def _safeguarded_newton(
    xp: Namespace,
    stats_at: Callable[[Array], tuple[Array, Array, Array, Array]],
    needed: Array,
    lo: Array,
    hi: Array,
    start: Array,
    max_iter: int,
    polish: Callable[[Array, Array], Array],
) -> Array:
    """The largest ``g`` in ``[lo, hi]`` with ``ESS(g) >= needed`` (``lo`` where none is): a
    bracket narrowed by Newton steps on ``log ESS`` in ``g^2`` from ``start``, by bisection
    where a step leaves the bracket or does not halve the previous one (see :func:`gamma_ess`).
    ``stats_at(g)`` returns ``(s1, s2, log ESS, d log ESS / dg)``; ``polish(x, lo)`` moves the
    feasible end ``lo`` up to just below the last iterate ``x``, where the root lies."""
    log_needed = xp.log(xp.where(needed > 0, needed, 1.0))

    def meets(s1: Array, s2: Array) -> Array:
        # ESS = s1^2 / s2 >= needed, without the division (the margin covers the rounding).
        return s1 * s1 >= needed * s2

    gamma_min = lo
    done_hi = meets(*stats_at(hi)[:2])  # even gamma_max is feasible
    infeasible = ~meets(*stats_at(lo)[:2])  # even gamma_min misses the target
    x = xp.where((start > lo) & (start < hi), start, 0.5 * (lo + hi))
    step_old = hi - lo
    for _ in range(max_iter):
        s1, s2, log_ess, slope = stats_at(x)
        feasible = meets(s1, s2)
        # x always lies in [lo, hi]: it is a Newton point inside the bracket or its midpoint.
        lo = xp.where(feasible, x, lo)
        hi = xp.where(feasible, hi, x)
        # Newton on F(u) = log ESS - target with u = gamma^2: du = -F / (dF/dgamma / (2 gamma)).
        has_slope = (slope < 0) & (x > 0)
        du = -(log_ess - log_needed) * 2.0 * x / xp.where(has_slope, slope, -1.0)
        u = x * x + (1.0 + _OVERSHOOT) * du
        candidate = xp.sqrt(xp.where(u > 0, u, 0.0))
        step = xp.abs(candidate - x)
        newton_ok = has_slope & (candidate > lo) & (candidate < hi) & (step <= 0.5 * step_old)
        step_old = xp.where(newton_ok, step, 0.5 * (hi - lo))
        x = xp.where(newton_ok, candidate, 0.5 * (lo + hi))
    lo = polish(xp.minimum(xp.maximum(x, lo), hi), lo)
    gamma = xp.where(done_hi, hi, lo)
    return xp.where(infeasible & ~done_hi, gamma_min, gamma)
