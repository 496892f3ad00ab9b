"""Choosing the tempering exponent gamma from the importance weights (:ref:`theory-gamma-ess`).

- :func:`gamma_closed_form`: the paper's Theorem 8.1, exact only for log-normal weights
  (:ref:`theory-closed-form`);
- :func:`gamma_ess`: the default, the largest gamma whose empirical ESS ratio meets ``rho_min``;
- ``select_gamma`` (``_select.py``) is the one entry point for every method.

Per-group gamma (GRPO groups of ``G`` responses) comes from the same functions: reshape the log
weights to ``(groups, G)`` and reduce along the group axis.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import array_api_compat.numpy as _HOST
import numpy as np

from ._ess_grid import (
    exponent_floor,
    grid_plan,
    largest_feasible_gamma,
    polish_factors,
    polish_feasible_end,
    weight_matrix,
    weight_sums,
)
from ._lib.checks import check_count, check_gamma_bounds, check_rho_min
from ._lib.inputs import broadcast_rewards, prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, masked_values
from ._lib.numerics import floored_shift, log_abs, log_variance_stats, shift_floor
from ._lib.reduce import Reducer, count_true, reduce_max, sample_count
from ._lib.rows import batch_param
from ._lib.sizes import is_large
from ._lib.tracing import host_values, is_concrete, poison, traced_bad_rows

__all__ = [
    "Shifted",
    "closed_form_gamma",
    "ess_search",
    "gamma_closed_form",
    "gamma_ess",
    "shifted_log_weights",
]

# Newton steps aim this fraction past the predicted root, so that the iterates land on both sides
# of it and the feasible end of the bracket (the value returned) converges too.
_OVERSHOOT = 0.02
# Newton iterations where the candidate grid does not apply (see gamma_ess).
_NEWTON_ITERATIONS = 12
# Passes of the eager Newton search at most (it ends at the test's resolution, in float32 after
# about 6; float64 brackets of a few ulps take 10 to 16, a few heavy-tailed ones more).
_EAGER_PASSES = 20
# Log weights below the max by more than this count as this much in the Newton slope.
_SLOPE_FLOOR = 2.0**16


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


class Shifted(NamedTuple):
    """Unit log weights relative to their row max, shared by the ESS search and the metrics:
    ``finite`` marks the positive weights, ``floored`` is ``l - max`` floored
    (:func:`floored_shift`: the floor at a zero weight; ``None`` where the caller needs only
    ``d``), ``d`` the same with 0 at a zero weight, ``count`` this shard's number of positive
    weights; ``bounded``: every log weight is known to be at most the variance's
    ``spread_bound`` in magnitude; ``weight``: ``finite`` as 0 and 1 in the dtype, where every
    shifted value is finite (the max given), so that a product masks as a where would (about
    3 times faster a pass on CPU), else ``None``."""

    finite: Array
    floored: Array | None
    d: Array
    count: Array
    bounded: bool = False
    weight: Array | None = None


def shifted_log_weights(
    xp: Namespace,
    masked_l: Array,
    axis: Any,
    reducer: Reducer | None,
    keepdims: bool = False,
    bounded: bool = False,
    finite: Array | None = None,
    count: Array | None = None,
    floored: bool = True,
    top: Array | None = None,
) -> Shifted:
    """The :class:`Shifted` of unit log weights ``masked_l`` (``-inf`` = invalid or weight 0)
    along ``axis``, relative to the max over every shard: bit for bit the exponents of
    :func:`gamma_ess` and of the loss's metrics. ``bounded``: the caller has checked every
    ``|l|`` against the variance's ``spread_bound`` (of all of them, over every shard);
    ``finite``: ``masked_l > -inf`` and ``count`` the number of them, where the caller knows
    them (the valid units, when all are finite); ``floored=False``: no ``floored`` array, where
    only ``d`` is needed; ``top``: the max of the ``finite`` entries (0-d; bounded weights of
    one shard) where the caller has it, and ``masked_l`` may then hold any finite value where
    ``finite`` is false."""
    finite = masked_l > -xp.inf if finite is None else finite
    given_top = top is not None
    if top is None:
        top = reduce_max(xp, masked_l, axis, reducer, keepdims=keepdims)
        top = xp.maximum(top, -float(xp.finfo(masked_l.dtype).max))  # no weights: -inf
    # Every statistic is relative to the row max, d = l - max <= 0 (0 where invalid): the
    # tempered weights e^(gamma d) <= 1 need no shift of their own (max gamma d = 0 for
    # gamma >= 0).
    weight = None
    if bounded:  # |l - max| <= 2 spread_bound: the floor only stands for a zero weight
        shift = masked_l - top
        floored_d = xp.where(finite, shift, shift_floor(xp, shift.dtype)) if floored else None
    else:
        shift = floored_d = floored_shift(xp, masked_l, top)
    # Every shifted value finite, and many of them: masks are products (few: operators count).
    if given_top and bounded and is_large(shift):
        weight = xp.astype(finite, shift.dtype)
        d = shift * weight
    else:
        d = xp.where(finite, shift, 0.0)
    count = count_true(xp, finite, axis, d.dtype) if count is None else count
    return Shifted(finite, floored_d, d, count, bounded, weight)


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
      512 candidates) leave a bracket narrower than ``2**-24`` and ``2**-48``. Traced, where a
      compiled pass costs its exponentials rather than its operators, fewer candidates a pass
      and more passes (at 64 samples, 5 passes of 32 in float32). A few large array
      operations instead of a dozen sequential rounds of small ones: what a sequence-level
      loss, whose statistics are a few dozen numbers, pays for in kernel launches;
    - **safeguarded Newton** (larger batches, a ``reducer``, or an explicit ``max_iter``):
      ``max_iter`` iterations (default 12) on ``log ESS`` in the variable ``gamma^2`` (exact in
      one step for log-normal weights), started from the closed form; a step that leaves the
      bracket or does not halve the previous one is replaced by bisection; one exponential per
      sample an iteration. A last pass tests points just below the final iterate, so that the
      feasible end catches up with it.

    Eagerly (not under tracing), one host read after the first pass ends the grid where every
    row is decided by its ends (``gamma_max`` meets the target, or ``gamma_min`` misses it),
    with the same result: fresh data, whose gamma is ``gamma_max``, costs one pass. Eager
    Newton (without ``max_iter``) keeps its bookkeeping on the host, one read a pass: it
    starts from the Newton point of the pass at ``gamma_max`` (fresh data end there), works
    on the positive weights only, and ends once every row's bracket is within the resolution
    of the test itself (about ``4 eps / |d log ESS / d gamma|``; at most 20 passes), so that a
    search is a few passes of a few operators; its gamma is the traced search's to that
    resolution.

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
        Forces the Newton search with this many iterations after the two end-point checks,
        the fixed work that traced code runs, eagerly too (the same gamma eagerly and compiled,
        bit for bit). ``None`` (default): the grid where it applies, else Newton with 12
        (eagerly up to 20, until the bracket is within the resolution of the test). Bisection
        alone would give a bracket of width ``(gamma_max - gamma_min) / 2**max_iter``; Newton
        converges to rounding in a median of about 6 iterations on log-normal and Student-t
        weights.
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
    # Loop invariants: the log weights shifted by their maximum once (a constant offset of l
    # costs no digits), so that no iteration needs a max-reduction or a collective for it
    # (max(g l) = g max(l) for g >= 0), and zero weights as an offset of -inf (built by the
    # search where it needs one; the floor of the shift stands in for it on the grid).
    shifted = shifted_log_weights(xp, l, axis, reducer, keepdims=True)
    offset = None if log_r is None else xp.where(shifted.finite, log_r, -xp.inf)
    n_pos = shifted.count if reducer is None else reducer.sum(shifted.count)
    prepared = {"l": l, "d": shifted.d, "finite": shifted.finite, "offset": offset, "n": n}
    prepared["n_pos"] = n_pos
    if log_r is None:
        prepared["floored"] = shifted.floored
    bounds = {"rho_min": rho_min, "gamma_min": gamma_min, "gamma_max": gamma_max}
    gamma = ess_search(xp, prepared, bounds, axis, reducer, max_iter).gamma
    return poison(xp, gamma, bad)


class Searched(NamedTuple):
    """What :func:`ess_search` found: ``gamma`` (the batch shape) and, where the eager search
    tested both, Kish's sums ``(s1, s2)`` of the weights at ``gamma`` and at 1, each with a
    leading axis of 2 (at gamma, at 1), as the metrics take them; else ``None``."""

    gamma: Array
    sums: tuple[Array, Array] | None = None


def ess_search(
    xp: Namespace,
    prepared: dict[str, Array | None],
    bounds: dict[str, Any],
    axis: int,
    reducer: Reducer | None,
    max_iter: int | None,
) -> Searched:
    """The search of :func:`gamma_ess` on prepared log weights (``axis`` non-negative).

    ``prepared`` holds the validated ``l`` (``-inf``: weight 0), ``d`` (``l`` relative to its
    row max, floored, 0 at weight 0), ``finite`` (the positive weights), ``offset`` (``log|r|``
    for the gradient ESS, ``-inf`` at weight 0; absent or ``None``: Kish's ESS), the sample count
    ``n`` and the positive-weight count ``n_pos`` (batch shape), and optionally ``floored``:
    ``d`` with the floor of :func:`floored_shift` at weight 0. ``bounds``: the checked
    ``rho_min``, ``gamma_min`` and ``gamma_max``; numbers stay numbers on the grid, where no
    array needs to hold them."""
    l, d, n, n_pos = (prepared[k] for k in ("l", "d", "n", "n_pos"))
    offset = prepared.get("offset")
    top_is_zero = offset is None
    rho_min, gamma_min, gamma_max = bounds["rho_min"], bounds["gamma_min"], bounds["gamma_max"]
    # Shards may hold different numbers of samples, and the grid's size follows it: with a
    # reducer every shard takes the Newton search, whose collectives have one shape everywhere.
    plan = grid_plan(math.prod(tuple(l.shape)), xp.finfo(l.dtype).bits, not is_concrete(l))
    grid = max_iter is None and plan is not None and reducer is None
    if grid and all(isinstance(v, numbers.Real) for v in bounds.values()):
        floored = prepared.get("floored")
        if top_is_zero and floored is not None and _floor_vanishes(xp, d, bounds, plan):
            d = floored  # zero weights as the floor: no offset to add in any pass
        else:
            offset = _zero_weight_offset(xp, prepared)
        scalars = (rho_min, gamma_min, gamma_max)
        gamma = _grid_gamma(xp, d, offset, *scalars, n, axis, plan, top_is_zero)
        # No positive weight: gamma_max. With Kish's ESS every candidate passes then (s1 = s2
        # = 0; with the floor, s1 = s2 = n_all >= needed at g = 0), so the grid returns it.
        return Searched(gamma if top_is_zero else xp.where(n_pos > 0, gamma, gamma_max))
    if is_concrete(l) and not grid and max_iter is None:  # eagerly: bookkeeping on the host
        sums = functools.partial(_eager_weight_matrix, xp, prepared, axis, reducer)
        params = _host_params(xp, (gamma_min, gamma_max, rho_min), n, n_pos, l.dtype)
        return _eager_newton_gamma(xp, sums, params, _EAGER_PASSES, top_is_zero, l)
    offset = _zero_weight_offset(xp, prepared)
    shape = tuple(n.shape)
    lo, hi, rho = (batch_param(xp, v, l, shape) for v in (gamma_min, gamma_max, rho_min))
    if grid:
        gamma = _grid_gamma(xp, d, offset, rho, lo, hi, n, axis, plan, top_is_zero)
    else:
        # The closed form's start, computed only where the search runs.
        start = functools.partial(
            closed_form_gamma, xp, l, axis, rho_min, gamma_min, gamma_max, reducer
        )
        batch = {"rho": rho, "n": n, "n_pos": n_pos, "lo": lo, "hi": hi, "start": start}
        iterations = _NEWTON_ITERATIONS if max_iter is None else max_iter
        last = _samples_last(xp, axis, d.ndim)
        polish = functools.partial(
            polish_feasible_end, xp, d=last(d), offset=last(offset), reducer=reducer,
            top_is_zero=top_is_zero,
        )  # fmt: skip
        search = (xp, d, offset, axis, reducer, top_is_zero, batch, iterations, polish)
        gamma = _newton_gamma(*search)
    return Searched(xp.where(n_pos > 0, gamma, hi))  # no positive weight: gamma_max


def _eager_weight_matrix(
    xp: Namespace,
    prepared: dict[str, Array | None],
    axis: int,
    reducer: Reducer | None,
) -> Callable[[Array | float], Array]:
    """The eager search's pass, :func:`weight_matrix` over the samples moved last: on one row
    of samples, the positive weights only, gathered once, so that no pass spends its
    exponentials on padding or zero weights (each would add the floor's ``exp``, below the
    rounding of the sums, at a slower exponential than a weight's); on several rows, Kish's
    ESS on the floored shift (a zero weight as the floor, which the exponent floor lifts to
    exactly what an offset of ``-inf`` gives), else ``d`` with the zero weights' offset."""
    d = prepared["d"]
    last = _samples_last(xp, axis, d.ndim)
    floored, top_is_zero = prepared.get("floored"), prepared.get("offset") is None
    if d.ndim == 1 and (top_is_zero or reducer is None):  # no max of a bare shard
        finite = prepared["finite"]
        offset = None if top_is_zero else masked_values(xp, prepared["offset"], finite)
        d = masked_values(xp, d, finite)
        slope = xp.maximum(d, -_SLOPE_FLOOR)
        # Kish's ESS of weights relative to their max, g <= 1: no exponent g [d, 2 d] is below
        # the floor where 2 min(d) is not (one read), and no pass needs the max with it.
        floored = not top_is_zero or d.shape[-1] == 0
        floored = floored or not bool(2.0 * xp.min(d) >= exponent_floor(xp, d.dtype))
        return weight_matrix(xp, d, slope, offset, reducer, not top_is_zero, floored)
    if top_is_zero and floored is not None:
        exponents, offset = floored, None
    else:
        exponents, offset = d, _zero_weight_offset(xp, prepared)
    slope = xp.maximum(last(d), -_SLOPE_FLOOR)
    offset = None if offset is None else last(offset)
    return weight_matrix(xp, last(exponents), slope, offset, reducer, not top_is_zero)


def _pick(cond: Any, a: Any, b: Any) -> Any:
    """``np.where(cond, a, b)``, where a numpy scalar ``cond`` picks without a ufunc: the eager
    search keeps the bookkeeping of one row in numpy scalars, whose arithmetic costs a tenth of
    that on 0-d arrays, and a where would turn them into arrays again."""
    if isinstance(cond, (bool, np.bool_)):
        return a if cond else b
    return np.where(cond, a, b)


class _HostNamespace:
    """The host's namespace for the eager search's bookkeeping: NumPy (through
    array-api-compat), with :func:`_pick` as its ``where``."""

    where = staticmethod(_pick)

    def __getattr__(self, name: str) -> Any:
        return getattr(_HOST, name)


_HOST_STEPS = _HostNamespace()


def _host_params(
    xp: Namespace, bounds: tuple[Any, Any, Any], n: Array, n_pos: Array, dtype: Any
) -> dict[str, np.ndarray]:
    """``lo, hi, rho, n, n_pos`` on the host, in ``dtype`` and the batch shape (one read of
    the counts)."""
    counts = host_values(n if n is n_pos else xp.stack([n, n_pos]))
    n_h, n_pos_h = (counts, counts) if n is n_pos else (counts[0, ...], counts[1, ...])
    shape, host_dtype = n_h.shape, counts.dtype
    lo, hi, rho = (
        np.broadcast_to(
            np.asarray(host_values(v) if hasattr(v, "shape") else v, host_dtype), shape
        ).copy()
        for v in bounds
    )
    # One row: numpy scalars ([()] of a 0-d array; an array of a row or more stays itself).
    params = {"lo": lo, "hi": hi, "rho": rho, "n": n_h, "n_pos": n_pos_h}
    return {k: v[()] for k, v in params.items()}


def _eager_newton_gamma(
    xp: Namespace,
    make_sums: Callable[..., Callable[[Array | float], Array]],
    params: dict[str, np.ndarray],
    iterations: int,
    top_is_zero: bool,
    like: Array,
) -> Searched:
    """Eagerly, the search of :func:`_newton_gamma` with its bookkeeping on the host: each pass
    is one :func:`weight_matrix` on the device and one read, and the bracket, the tests, the
    Newton points and the stop are computed on the host in the samples' dtype, so that an
    iteration costs a few operators instead of a few dozen.

    It starts from the Newton point of the pass at ``hi`` (exact in one step for log-normal
    weights) instead of the closed form; on one row every pass, the first too, reads the
    positive weights only, gathered once. It ends where every row's bracket, a tested feasible
    ``lo`` and a tested infeasible ``hi``, is within the test's resolution
    (:func:`_test_resolution`), and otherwise, after ``iterations`` passes, tests points just
    below the last iterate
    (:func:`polish_factors`). Rows whose ``hi`` is feasible, or that hold no positive weight,
    get ``hi``; where no point passed, ``lo`` (``gamma_min``) stays. Kish's sums at the
    gamma and at 1 come with it where the passes tested both in every row (:class:`Searched`).
    """
    hxp = _HOST_STEPS
    lo, hi, rho, n, n_pos = (params[k] for k in ("lo", "hi", "rho", "n", "n_pos"))
    dtype = n.dtype
    device = array_device(like)
    if np.all(n_pos <= 0):  # no positive weight anywhere: gamma_max, and nothing to gather
        return Searched(xp.asarray(np.asarray(hi, dtype), device=device))
    at = _host_pass(xp, make_sums(), like)
    if top_is_zero:
        s, t = at(hi)
        base = n
    else:  # the rewards' target needs g = 0: ESS_grad(0) = s1^2 / s2 of the weights |r|
        s, t = at(np.stack([np.zeros_like(hi), hi]))
        base = s[0, 0, ...] * s[0, 0, ...] / s[1, 0, ...]
        s, t = s[:, 1, ...], t[:, 1, ...]
    needed = _pick(n_pos > 0, _needed_ess(hxp, rho, base), np.asarray(1.0, dtype)[()])
    terms = _host_terms(s, t, needed, np.log(np.asarray(needed, np.float64)))
    done_hi = terms[0] | (n_pos <= 0)
    at_gamma = s
    if not np.all(done_hi):
        with _quiet_host_steps():  # any point inside the bracket, in the samples' dtype
            candidate = _newton_candidate(hxp, terms[1], terms[2], hi).astype(dtype)
            state = _newton_step(hxp, *terms, hi, lo, hi, hi - lo, candidate=candidate)
            root = _newton_root(hxp, terms[1], terms[2], hi)
        search = (hxp, at, state, needed, iterations, done_hi)
        lo, at_lo = _eager_iterations(*search, previous=(root, np.abs(root - hi)))
        at_gamma = _pick(done_hi, s, at_lo)
    gamma = _pick(done_hi, hi, lo)
    gamma = xp.asarray(np.asarray(gamma, dtype), device=device)
    # The metrics' sums: Kish's, tested at the gamma and at 1 in every row, each row with a
    # positive weight (the floor of a zero weight counts as exp(floor), below rounding, only
    # next to the max's weight 1).
    if not (top_is_zero and np.all(hi == 1.0) and np.all(n_pos > 0)) or np.isnan(at_gamma).any():
        return Searched(gamma)
    sums = xp.asarray(np.stack([at_gamma, s], axis=1), device=device)  # (2, 2, ...)
    return Searched(gamma, (sums[0, ...], sums[1, ...]))


def _host_pass(
    xp: Namespace, sums: Callable[[Array | float], Array], like: Array
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``g -> (s, t)`` on the host for the device pass ``sums`` (:func:`weight_matrix`) at
    candidates ``g`` (leading axes, then the batch shape), each with a leading axis of 2 (the
    powers 1 and 2 of the weights): one read."""

    def at(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = np.reshape(g, (*g.shape, 1, 1))
        on_device = float(g) if g.ndim == 0 else xp.asarray(cols, device=array_device(like))
        m = np.moveaxis(host_values(sums(on_device)), -2, 0)  # (2, ..., 2)
        return m[..., 0], m[..., 1]

    return at


def _eager_iterations(
    hxp: Namespace,
    at: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    state: tuple[np.ndarray, ...],
    needed: np.ndarray,
    iterations: int,
    done_hi: np.ndarray,
    previous: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The feasible end after the host's Newton iterations from ``state`` (``x, lo, hi,
    half_step``): once every row's bracket is within the test's resolution
    (:func:`_test_resolution`), else after ``iterations`` passes and a last one just below
    ``x``; with the sums ``s`` of the pass that tested it (NaN where none did: ``lo`` is the
    untested ``gamma_min``). ``previous``: the root that the step to ``x`` predicted and the
    length of that prediction's step, which calibrate the margin of the next point
    (:func:`_aim_margin`)."""
    gamma_min, untested_lo = state[1], np.ones(np.shape(state[1]), dtype=bool)[()]
    at_lo = np.full((2, *np.shape(state[1])), np.nan, dtype=state[1].dtype)
    log_needed = np.log(np.asarray(needed, np.float64))[()]
    for _ in range(iterations):
        s, t = at(state[0])
        terms = _host_terms(s, t, needed, log_needed)
        at_lo = _pick(terms[0], s, at_lo)
        near = _test_resolution(terms[2], state[0])
        untested_lo &= (state[0] != gamma_min) & (state[1] == gamma_min)
        with _quiet_host_steps():
            root = _newton_root(hxp, terms[1], terms[2], state[0].astype(np.float64))
            candidate = _aimed_point(root, state[0], terms[0], near, previous)
        previous = (root, np.abs(root - state[0]))
        # Steps within a few resolutions are taken even where they do not halve the last one:
        # the margins end the search with steps of that size on both sides of the root.
        state = (*state[:3], np.maximum(state[3], 4.0 * near))
        state = _eager_step(terms, state, near, untested_lo, candidate)
        if np.all(done_hi | (state[2] - state[1] <= near)):
            return state[1], at_lo
    x, lo, hi = state[:3]
    shrink = np.asarray(polish_factors(hxp, x.dtype), x.dtype)
    candidates = np.minimum(np.maximum(x, lo), hi) * np.reshape(shrink, (-1,) + (1,) * x.ndim)
    s = at(candidates)[0]  # (2, candidates, ...)
    feasible = s[0, ...] * s[0, ...] >= needed * s[1, ...]
    best = np.argmax(np.where(feasible, candidates, -1.0), axis=0)
    found = np.take_along_axis(feasible, best[None, ...], axis=0)[0, ...]
    picked = np.take_along_axis(candidates, best[None, ...], axis=0)[0, ...]
    at_best = np.take_along_axis(s, best[None, None, ...], axis=1)[:, 0, ...]
    above = found & (picked >= lo)
    return np.where(above, picked, lo), np.where(above, at_best, at_lo)


def _host_terms(
    s: np.ndarray, t: np.ndarray, needed: np.ndarray, log_needed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_newton_terms` of a pass read to the host (``log_needed``: the log of
    ``needed``, in float64): the test in the samples' dtype, as the device takes it, and
    ``-2 F`` and the slope in float64 from the same sums. They only aim the next point, and a
    float32 ``log`` of sums near ``n`` would round ``F`` to steps of about ``eps log n``,
    several times the test's own resolution."""
    feasible = s[0] * s[0] >= needed * s[1]  # s[0]: a scalar where the batch is one row
    with _quiet_host_steps():  # no positive weight: sums of 0, whose gamma is gamma_max anyway
        logs, ratios = np.log(s.astype(np.float64)), t.astype(np.float64) / s
        log_excess_2 = 2.0 * (logs[1] + log_needed - 2.0 * logs[0])
        return feasible, log_excess_2, 2.0 * (ratios[0] - ratios[1])


def _test_resolution(slope: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How far in gamma the test ``s1^2 >= needed s2`` resolves the root near ``x``: a
    relative error of ``4 eps`` in the ESS (the roundings of the exponentials, the pairwise
    sums and the products) over the slope ``d log ESS / d gamma``, at least the spacing of the
    floats at ``x`` and at most ``min(2^-14, 2^20 eps)`` (6e-5 in float32, 2e-10 in float64),
    where the ESS is flat. A narrower bracket would follow the rounding, not the ESS: within
    the test's own error its ends are both feasible or both not."""
    error, cap = _relative_error_and_cap(x.dtype)
    # fmax takes the bound where the slope is NaN: no division by 0, no NaN, no warning.
    width = error / np.fmax(np.abs(slope), error / cap)
    return np.maximum(width, np.spacing(x)).astype(x.dtype)


@functools.cache
def _relative_error_and_cap(dtype: np.dtype) -> tuple[float, float]:
    """``4 eps`` and ``min(2^-14, 2^20 eps)`` of ``dtype`` (:func:`_test_resolution`)."""
    eps = float(np.finfo(dtype).eps)
    return 4.0 * eps, min(2.0**-14, 2.0**20 * eps)


def _newton_factors(xp: Namespace, needed: Array) -> tuple[Array, Array, Array]:
    """The factors of :func:`_newton_terms`: ``[-4, 2]`` and ``[2, -2]`` along a leading axis
    (before the axes of ``needed``), and ``-2 log needed``."""
    pairs = xp.asarray([[-4.0, 2.0], [2.0, -2.0]], dtype=needed.dtype, device=array_device(needed))
    pairs = xp.reshape(pairs, (2, 2) + (1,) * needed.ndim)
    return pairs[0, ...], pairs[1, ...], -2.0 * xp.log(needed)


def _zero_weight_offset(xp: Namespace, prepared: dict[str, Array | None]) -> Array:
    """The exponents' offset: the given one (gradient ESS), else 0, and ``-inf`` at weight 0."""
    offset = prepared.get("offset")
    if offset is not None:
        return offset
    return xp.where(prepared["finite"], xp.zeros_like(prepared["d"]), -xp.inf)


def _floor_vanishes(xp: Namespace, d: Array, bounds: dict[str, float], plan: tuple) -> bool:
    """Whether ``exp(g floor)`` is exactly 0 for every positive candidate ``g`` of the grid
    (the floor of :func:`floored_shift`), so that the floor can stand for a zero weight.

    At ``g = 0`` it gives the weight 1 instead of 0; the test there passes either way (``ESS(0)
    = n`` meets every target ``<= n``, and so does the count of all samples). The smallest
    positive candidate is ``gamma_min``, or at ``gamma_min = 0`` at least ``gamma_max /
    candidates**(passes + 1)``."""
    k, passes = plan
    lo, hi = bounds["gamma_min"], bounds["gamma_max"]
    smallest = lo if lo > 0 else hi / float(k) ** (passes + 1)
    info = xp.finfo(d.dtype)
    floor = float(info.max) * 2.0**-20  # floored_shift's, in magnitude
    # exp(x) is 0 a little below the log of the smallest subnormal, itself above
    # log(smallest_normal) - bits log 2 (bits: the dtype's width, more than its mantissa's).
    underflow = -math.log(float(info.smallest_normal)) + info.bits * math.log(2.0)
    return smallest * floor > underflow


def _grid_gamma(
    xp: Namespace,
    d: Array,
    offset: Array | None,
    rho: Array | float,
    lo: Array | float,
    hi: Array | float,
    n: Array,
    axis: int,
    plan: tuple[int, int],
    top_is_zero: bool,
) -> Array:
    """:func:`largest_feasible_gamma` for ``gamma_ess``: samples moved to the last axis, and the
    target ``rho n`` (or ``rho ESS_grad(0)`` with rewards, where ``w^0 = 1``); ``offset``
    ``None``: ``d`` holds the zero weights as a floor that vanishes (:func:`_floor_vanishes`)."""
    if top_is_zero:
        base = n
    else:
        kept = (1, *tuple(xp.expand_dims(n, axis=axis).shape))
        g = xp.reshape(xp.zeros_like(n), kept)
        s = weight_sums(xp, g, d, offset, d, axis - d.ndim, None, True, slopes=False)[0]
        base = xp.reshape(s[0, ...] * s[0, ...] / s[1, ...], tuple(n.shape))
    needed = _needed_ess(xp, rho, base)
    last = _samples_last(xp, axis, d.ndim)
    grid = {"candidates": plan[0], "passes": plan[1], "top_is_zero": top_is_zero}
    offset = None if offset is None else last(offset)
    return largest_feasible_gamma(xp, last(d), offset, needed, lo, hi, **grid)


def _samples_last(xp: Namespace, axis: int, ndim: int) -> Callable[[Array], Array]:
    """The sample axis moved last (the layout of the grid and of the polishing pass)."""
    return (lambda a: a) if axis == ndim - 1 else (lambda a: xp.moveaxis(a, axis, -1))


def _needed_ess(xp: Namespace, rho: Array | float, base: Array) -> Array:
    """``rho * base`` with a margin of a few ulps, so that the returned gamma meets ``rho_min``
    also when the ratio is recomputed in another order (e.g. fused by a compiler)."""
    eps = float(xp.finfo(base.dtype).eps)
    needed = rho * base * (1.0 + 4.0 * eps)
    if isinstance(rho, numbers.Real) and rho <= 1.0 - 8.0 * eps:  # the product stays <= base
        return needed
    return xp.minimum(needed, base)


def _newton_gamma(
    xp: Namespace,
    d: Array,
    offset: Array,
    axis: int,
    reducer: Reducer | None,
    top_is_zero: bool,
    batch: dict[str, Any],
    iterations: int,
    polish: Callable[[Array, Array, Array], Array],
) -> Array:
    """The largest ``g`` in ``[lo, hi]`` with ``ESS(g) >= needed`` (``lo`` where none is), by
    ``iterations`` safeguarded Newton steps from ``start`` and a last pass just below the final
    iterate (``polish(x, lo, needed=...)``, :func:`polish_feasible_end`); ``batch`` holds ``rho, n,
    n_pos, lo, hi`` in the batch shape and ``start``, a function that returns the start.

    Every array has a leading axis of gammas (1 but in the passes that test several) and the
    batch shape with the sample axis kept, so that one :func:`weight_sums` serves them all. The
    first pass tests ``hi``, ``lo`` and the first iterate (and ``g = 0`` for the rewards'
    target) at once; each iteration then costs one pass and one stacked sum (a max too with
    rewards, whose exponents have no known maximum). Traced code takes this path; eagerly
    :func:`_eager_newton_gamma` keeps the bookkeeping on the host.
    """
    kept = (1, *tuple(xp.expand_dims(batch["n"], axis=axis).shape))
    lo, hi, n, rho, n_pos = (xp.reshape(batch[k], kept) for k in ("lo", "hi", "n", "rho", "n_pos"))
    shape = tuple(batch["n"].shape)
    # The slope's factor d, floored so that a weight the exponent floor lifts adds at most
    # 2e-14 (float32) to its sums (it would add exp(g d) d).
    d_slope = xp.maximum(d, -_SLOPE_FLOOR)

    def sums_at(g: Array) -> tuple[Array, Array]:
        shift = not top_is_zero
        return weight_sums(xp, g, d, offset, d_slope, axis - d.ndim, reducer, shift)

    start = xp.reshape(batch["start"](), kept)
    x = xp.where((start > lo) & (start < hi), start, 0.5 * (lo + hi))
    zero = [] if top_is_zero else [xp.zeros_like(hi)]  # the rewards' target needs g = 0
    s, t, needed = _with_target(
        xp, *sums_at(xp.concat([*zero, hi, lo, x])), top_is_zero, n, rho, n_pos
    )
    factors = _newton_factors(xp, needed)
    feasible, log_excess, slope = _newton_terms(xp, s, t, needed, factors)
    done_hi, feasible_lo = feasible[0:1, ...], feasible[1:2, ...]
    gamma_min, state = lo, (x, lo, hi, 0.5 * (hi - lo))
    terms = (feasible[2:, ...], log_excess[2:, ...], slope[2:, ...])
    for i in range(iterations):
        if i > 0:
            terms = _newton_terms(xp, *sums_at(state[0]), needed, factors)
        state = _newton_step(xp, *terms, *state)
    x, lo, hi_end = state[:3]
    x = xp.reshape(xp.minimum(xp.maximum(x, lo), hi_end), shape)
    lo = xp.reshape(polish(x, xp.reshape(lo, shape), needed=xp.reshape(needed, shape)), kept)
    gamma = xp.where(done_hi, hi, xp.where(feasible_lo, lo, gamma_min))
    return xp.reshape(gamma, shape)


def _with_target(
    xp: Namespace,
    s: Array,
    t: Array,
    top_is_zero: bool,
    n: Array,
    rho: Array,
    n_pos: Array,
) -> tuple[Array, Array, Array]:
    """``(s, t, needed)`` from the first pass's :func:`weight_sums`: the target ``rho n``, or
    ``rho ESS_grad(0)`` from the sums at ``g = 0`` (then taken off ``s`` and ``t``)."""
    if top_is_zero:
        base = n
    else:  # ESS_grad(0) = s1^2 / s2 of the weights |r| (w^0 = 1 for every positive weight)
        base = s[0, :1, ...] * s[0, :1, ...] / s[1, :1, ...]
        s, t = s[:, 1:, ...], (None if t is None else t[:, 1:, ...])
    # A row without a positive weight (its gamma is overridden) gets a target that keeps its
    # logs finite.
    return s, t, xp.where(n_pos > 0, _needed_ess(xp, rho, base), 1.0)


def _newton_terms(
    xp: Namespace, s: Array, t: Array, needed: Array, factors: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
    """From :func:`weight_sums`: whether ``ESS >= needed`` (``s1^2 >= needed s2``, without the
    division: the margin in ``needed`` covers the rounding), ``-2 (log ESS - log needed)`` and
    ``d log ESS / dg = 2 (t1 / s1 - t2 / s2)`` (``d/dg LSE(g d + c) = E_softmax[d]``).

    ``factors`` are ``[-4, 2]`` and ``[2, -2]`` along the leading axis and ``-2 log needed``:
    each term is one product and one sum, with the roundings of ``2 log s1 - log s2`` and of
    the separate ratios (the factors of 2 are exact)."""
    s1, s2 = s[0, ...], s[1, ...]
    log_excess = xp.sum(xp.log(s) * factors[0], axis=0) - factors[2]
    slope = xp.sum(t / s * factors[1], axis=0)
    return s1 * s1 >= needed * s2, log_excess, slope


def _newton_candidate(xp: Namespace, log_excess_2: Array, slope: Array, x: Array) -> Array:
    """The Newton point on ``F = log ESS - log needed`` in ``u = g^2`` (exact in one step for
    log-normal weights), aimed ``_OVERSHOOT`` past the predicted root:
    ``u' = x^2 + (1 + o) du`` with ``du = -F / (dF/dg / (2 x))`` (``log_excess_2`` is ``-2 F``,
    from :func:`_newton_terms`); NaN where the slope is not negative."""
    du = log_excess_2 * x / xp.where(slope < 0, slope, xp.nan)
    return xp.sqrt(xp.maximum(x * x + (1.0 + _OVERSHOOT) * du, 0.0))


def _newton_root(xp: Namespace, log_excess_2: Array, slope: Array, x: Array) -> Array:
    """The root that the Newton step from ``x`` predicts, :func:`_newton_candidate` without its
    overshoot; NaN where the slope is not negative."""
    du = log_excess_2 * x / xp.where(slope < 0, slope, xp.nan)
    return xp.sqrt(xp.maximum(x * x + du, 0.0))


def _aim_margin(
    root: np.ndarray,
    x: np.ndarray,
    near: np.ndarray,
    previous: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """How far past the predicted ``root`` the host's next point is aimed, so that it lands on
    the other side of the true root and narrows the bracket from there.

    A Newton prediction's error shrinks as the square of its step ``s = |root - x|``: the
    error of the previous prediction (``previous``: its root and step ``s'``), seen from this
    more accurate one, gives ``k = |root' - root| / s'^2``, and the margin is ``4 k s^2``
    (where ``s'`` is within the test's resolution ``near``, which leaves ``k`` unknown, the
    overshoot of :func:`_newton_candidate`, ``_OVERSHOOT s``). It is at least ``0.4 near``, so
    that two points aimed from one root are within ``near`` of each other and close the
    bracket, and at most ``s``, where the prediction is worse than the step."""
    step = np.abs(root - x)
    margin = _OVERSHOOT * step
    if previous is not None:
        previous_root, previous_step = previous
        known = previous_step > near
        k = np.abs(previous_root - root) / _pick(known, previous_step, 1.0) ** 2
        margin = _pick(known, 4.0 * k * step * step, margin)
    return np.maximum(np.minimum(margin, step), 0.4 * near)


def _aimed_point(
    root: np.ndarray,
    x: np.ndarray,
    feasible: np.ndarray,
    near: np.ndarray,
    previous: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """The host's next point from ``x``, in ``x``'s dtype: past the predicted ``root`` by
    :func:`_aim_margin`, on the side the test did not take at ``x``; where the root is
    predicted within the resolution ``near`` of ``x``, the farthest float on that side within
    ``near`` of ``x``, which closes the bracket if the test fails there."""
    side = _pick(feasible, 1.0, -1.0)
    aimed = root + side * _aim_margin(root, x, near, previous)
    ulp = np.spacing(x)  # the floats below x are at most this far apart
    reach = np.floor(near / ulp) * ulp  # within near of x, exactly
    closing = np.abs(root - x) < near
    return _pick(closing, x + side * reach, aimed).astype(x.dtype)


def _newton_step(
    xp: Namespace,
    feasible: Array,
    log_excess_2: Array,
    slope: Array,
    x: Array,
    lo: Array,
    hi: Array,
    half_step: Array,
    candidate: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """One step of the search: ``x`` narrows the bracket ``[lo, hi]``, then the next point is
    ``candidate`` (by default :func:`_newton_candidate`), or the bracket's midpoint where that
    point leaves the bracket, does not halve the previous step (``half_step`` is half of it),
    or the slope is not negative."""
    lo = xp.where(feasible, x, lo)
    hi = xp.where(feasible, hi, x)
    # A NaN candidate (the slope is not negative) passes no comparison; a candidate of 0
    # (x = 0, or u <= 0) is never above lo >= 0 either.
    if candidate is None:
        candidate = _newton_candidate(xp, log_excess_2, slope, x)
    step = xp.abs(candidate - x)
    newton_ok = (candidate > lo) & (candidate < hi) & (step <= half_step)
    half_step = xp.where(newton_ok, 0.5 * step, 0.25 * (hi - lo))
    x = xp.where(newton_ok, candidate, 0.5 * (lo + hi))
    return x, lo, hi, half_step


def _quiet_host_steps() -> np.errstate:
    """A flat slope may overflow a Newton step, as it does silently on a device; the bracket's
    comparisons then reject the step (inf and NaN pass none), so NumPy need not warn."""
    return np.errstate(over="ignore", divide="ignore", invalid="ignore")


def _eager_step(
    terms: tuple[np.ndarray, np.ndarray, np.ndarray],
    state: tuple[np.ndarray, ...],
    near: np.ndarray,
    untested_lo: np.ndarray,
    candidate: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """:func:`_newton_step` on the host, to ``candidate`` where given (else the overshooting
    Newton point), with two ends that close the bracket in one more test where that point
    cannot: where ``F`` at ``x`` has the sign the test denies (it is 0
    within its rounding, so the root is at ``x``'s end), the point ``near`` (the test's
    resolution) inside that end; where an infeasible ``x`` puts the root below ``lo`` while
    ``lo`` is the untested ``gamma_min`` (``untested_lo``), ``lo`` itself (if it fails, so does
    every gamma of the bracket)."""
    feasible, log_excess_2, slope = terms
    with _quiet_host_steps():
        if candidate is None:
            candidate = _newton_candidate(_HOST_STEPS, log_excess_2, slope, state[0])
        x_next, lo, hi, half_step = _newton_step(_HOST_STEPS, *terms, *state, candidate=candidate)
    beyond = _pick(feasible, candidate <= lo, candidate >= hi)
    inside = _pick(feasible, lo + near, hi - near)
    x_next = _pick(beyond & (inside > lo) & (inside < hi), inside, x_next)
    below = ~feasible & (candidate <= lo) & untested_lo
    return _pick(below, lo, x_next), lo, hi, half_step
