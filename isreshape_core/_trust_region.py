"""Trust-region losses with an ESS-controlled behaviour correction (decoupled PPO).

Asynchronous trainers keep three policies apart: the behaviour policy ``mu`` that sampled the
data (``logq``, the inference engine's log-probs), a proximal policy ``pi_prox`` (the trainer's
policy when the batch arrived, ``old_log_prob``) and the trained policy ``pi``. Decoupled PPO
clips the ratio ``pi / pi_prox`` and multiplies the loss by a correction for ``pi_prox / mu``;
AReaL and verl truncate that correction at a fixed cap. Here the correction is controlled by the
effective sample size of the step instead:

- :func:`decoupled_ppo_loss_and_grad` with ``behaviour="tempered"``: the correction
  ``(pi_prox / mu)^gamma``, gamma by :func:`step_gamma` (the ESS of the tempered behaviour weights
  meets ``rho_min``);
- ``behaviour="truncated"``: ``min(pi_prox / mu, c)``, the cap ``c`` by
  :func:`ess_truncation_cap` (the ESS of the truncated weights meets ``rho_min``), or fixed.

See the docs page *When to use IS Reshape* for where these help and where they do not.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal

from ._ess import kish_ess_from_log
from ._lib.checks import (
    check_choice,
    check_gamma,
    check_log_weights,
    check_rho_min,
    check_same_shape,
)
from ._lib.dtypes import as_compute_array
from ._lib.dtypes import log_max as _log_max
from ._lib.inputs import broadcast_mask, prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, namespace
from ._lib.numerics import tempered_log_weights
from ._lib.reduce import Reducer, reduce_max, reduce_sum
from ._lib.tracing import is_concrete
from ._loss import LOSS_AGG_MODES, UnitGradient, _aggregation_weights, token_gradient
from ._select import GAMMA_METHODS
from ._step import step_gamma
from ._weights import LEVELS as _LEVELS
from ._weights import unit_log_weights

__all__ = ["BEHAVIOUR_CORRECTIONS", "decoupled_ppo_loss_and_grad", "ess_truncation_cap"]

#: How :func:`decoupled_ppo_loss_and_grad` corrects for the behaviour policy.
BEHAVIOUR_CORRECTIONS = ("tempered", "truncated", "none")


def _truncated_ess_ratio(xp: Namespace, l: Array, t: Array, top: Array, n: Array, reducer):
    """Kish ESS / n of ``min(exp(l), exp(t))`` along the last axis (``-inf`` entries are weight
    0), scaled by the largest truncated weight ``exp(min(top, t))`` so that nothing overflows."""
    e = xp.exp(xp.minimum(l, t[..., None]) - xp.minimum(top, t)[..., None])
    sums = xp.stack([xp.sum(e, axis=-1), xp.sum(e * e, axis=-1)])
    if reducer is not None:
        sums = reducer.sum(sums)
    s2 = xp.where(sums[1, ...] > 0, sums[1, ...], 1.0)
    return sums[0, ...] * sums[0, ...] / s2 / n


def ess_truncation_cap(
    log_w: Array,
    rho_min: Any = 0.3,
    *,
    mask: Array | None = None,
    reducer: Reducer | None = None,
    max_iter: int = 60,
) -> Array:
    r"""The log of the largest truncation cap ``c`` whose truncated weights keep ESS/n >= rho_min.

    Truncated importance sampling (TIS) replaces ``w`` by ``min(w, c)``. Kish's ESS of the
    truncated weights ``v_i = min(w_i, c)`` does not increase with ``c`` (its log-derivative is
    ``2k (1/S_1 - c/S_2) <= 0``, ``k`` the number of truncated weights, ``S_j = sum v^j``, since
    ``S_2 <= c S_1``), and equals ``n`` at ``c = min w``; so

    .. math::

        \log c^* = \max\{t \in [\min_i l_i, \max_i l_i] :
        \mathrm{ESS}(\min(w, e^t)) / n \ge \rho_{\min}\}

    exists and is found by bisection on ``t`` (``max_iter`` halvings of ``[min l, max l]``,
    keeping the feasible end). ``log c* = max l`` (no truncation) when the raw weights already
    meet ``rho_min``. In log space: no weight is formed unscaled.

    Parameters
    ----------
    log_w : array (..., n)
        Unit log weights of the step (this shard's part), samples along the last axis, e.g.
        ``log pi_prox - log mu`` per token (flattened) or per sequence; leading axes are
        independent batches (one cap each).
    rho_min : float in (0, 1]
    mask : bool array broadcastable to ``log_w``, optional
        Valid units.
    reducer : Reducer, optional
        Merges the sums over data-parallel shards (two collectives per halving).
    max_iter : int
        Number of halvings; 60 reach the float64 resolution of any practical range.

    Returns
    -------
    array (...)
        ``log c*`` per batch (``-inf`` where there is no valid unit), detached.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([1.0, 1.0, 1.0, 100.0]))
    >>> t = ess_truncation_cap(l, 0.9)
    >>> v = np.minimum(np.exp(l), np.exp(t))
    >>> print(np.round(np.exp(t), 4), np.round(v.sum() ** 2 / (v * v).sum() / 4, 4))
    1.9533 0.9
    """
    if not hasattr(log_w, "shape") or log_w.ndim < 1:
        raise ValueError(
            f"log_w must be an array of unit log weights (..., n), got shape "
            f"{getattr(log_w, 'shape', None)}"
        )
    check_rho_min(rho_min)
    if not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    xp, l, _, _ = prepare_log_weights(log_w, axis=-1, mask=mask)
    valid = l > -xp.inf
    n = reduce_sum(xp, xp.astype(valid, l.dtype), -1, reducer)
    top = reduce_max(xp, l, -1, reducer)
    bottom = -reduce_max(xp, xp.where(valid, -l, -xp.inf), -1, reducer)
    any_valid = n > 0
    n = xp.where(any_valid, n, 1.0)
    top_s = xp.where(any_valid, top, 0.0)
    lo = xp.where(any_valid, bottom, 0.0)
    hi = top_s
    rho = as_compute_array(xp, rho_min, l.dtype, like=l)
    untruncated_ok = _truncated_ess_ratio(xp, l, hi, top_s, n, reducer) >= rho
    for _ in range(int(max_iter)):
        mid = 0.5 * (lo + hi)
        ok = _truncated_ess_ratio(xp, l, mid, top_s, n, reducer) >= rho
        lo = xp.where(ok, mid, lo)
        hi = xp.where(ok, hi, mid)
    out = xp.where(untruncated_ok, top_s, lo)
    return xp.where(any_valid, out, -xp.inf)


def _behaviour_log_weight(
    xp: Namespace,
    beh_l: Array,
    valid: Array,
    behaviour: str,
    gamma: Any,
    cap: Any,
    rho_min: Any,
    reducer: Reducer | None,
    gamma_options: dict[str, Any],
) -> tuple[Array, dict[str, Array]]:
    """``log b_u`` of the behaviour correction of every unit (``-inf`` for invalid units) and the
    metrics of the correction (``behaviour_gamma`` or ``behaviour_log_cap``)."""
    masked = xp.where(valid, beh_l, -xp.inf)
    if behaviour == "none":
        return xp.where(valid, 0.0 * beh_l, -xp.inf), {}
    flat, flat_valid = xp.reshape(beh_l, (-1,)), xp.reshape(valid, (-1,))
    if behaviour == "tempered":
        if isinstance(gamma, str):
            g, _ = step_gamma(
                flat, rho_min, method=gamma, mask=flat_valid, reducer=reducer, **gamma_options
            )
            g = xp.reshape(g, tuple(beh_l.shape))
        else:
            g = xp.broadcast_to(as_compute_array(xp, gamma, beh_l.dtype, like=beh_l), beh_l.shape)
        totals = xp.stack([xp.sum(xp.where(valid, g, 0.0)), xp.sum(xp.astype(valid, beh_l.dtype))])
        if reducer is not None:
            totals = reducer.sum(totals)
        mean_g = totals[0] / xp.where(totals[1] > 0, totals[1], 1.0)
        return tempered_log_weights(xp, masked, g), {"behaviour_gamma": mean_g}
    if isinstance(cap, str):
        log_cap = ess_truncation_cap(flat, rho_min, mask=flat_valid, reducer=reducer)
    else:
        log_cap = xp.log(as_compute_array(xp, cap, beh_l.dtype, like=beh_l))
    return xp.minimum(masked, log_cap), {"behaviour_log_cap": log_cap}


def _check_arguments(logp, logp_prox, logq, advantages, level, loss_agg_mode, behaviour, gamma,
                     cap, rho_min, clip_low, clip_high, log_ratio_clamp) -> None:  # fmt: skip
    check_choice(level, "level", _LEVELS)
    check_choice(loss_agg_mode, "loss_agg_mode", LOSS_AGG_MODES)
    check_choice(behaviour, "behaviour", BEHAVIOUR_CORRECTIONS)
    check_same_shape({"logp": logp, "logp_prox": logp_prox, "logq": logq})
    if logp.ndim not in (1, 2) or logp.shape[0] == 0:
        raise ValueError(f"logp must have shape (B, T) or (B,) with B > 0, got {tuple(logp.shape)}")
    if not hasattr(advantages, "shape"):
        raise TypeError(
            "advantages are required: an array of shape (B,) or (B, T), e.g. GRPO's group-"
            f"normalised rewards; got {type(advantages).__name__}"
        )
    if isinstance(gamma, str):
        if gamma not in GAMMA_METHODS:
            raise ValueError(f"gamma must be one of {GAMMA_METHODS}, a number or an array")
    else:
        check_gamma(gamma, "gamma")
    if isinstance(cap, str):
        if cap != "ess":
            raise ValueError(f"cap must be 'ess' or a positive number, got {cap!r}")
    elif not isinstance(cap, numbers.Real) or isinstance(cap, bool) or not cap > 0:
        raise ValueError(f"cap must be 'ess' or a positive number, got {cap!r}")
    check_rho_min(rho_min)
    for name, value in (("clip_ratio_low", clip_low), ("clip_ratio_high", clip_high)):
        if not isinstance(value, numbers.Real) or not 0 <= value:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if clip_low >= 1:
        raise ValueError(f"clip_ratio_low must be below 1 (the ratio's floor), got {clip_low!r}")
    if not isinstance(log_ratio_clamp, numbers.Real) or not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be a positive number, got {log_ratio_clamp!r}")


def decoupled_ppo_loss_and_grad(
    logp: Array,
    logp_prox: Array,
    logq: Array,
    advantages: Array,
    mask: Array | None = None,
    *,
    behaviour: Literal["tempered", "truncated", "none"] = "tempered",
    gamma: str | float | Array = "ess",
    cap: str | float = "ess",
    rho_min: float = 0.3,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    level: Literal["token", "geometric", "sequence"] = "token",
    loss_agg_mode: str = "token-mean",
    loss_scale_factor: float | None = None,
    log_ratio_clamp: float = 20.0,
    reducer: Reducer | None = None,
    **gamma_options: Any,
) -> tuple[Array, Array, dict[str, Array]]:
    r"""Decoupled PPO-clip with an ESS-controlled behaviour correction: value, gradient, metrics.

    With unit log ratios ``u = log pi - log pi_prox`` (trust region) and ``v = log pi_prox -
    log mu`` (behaviour) at ``level`` (per token; or per sequence, summed, or averaged over its
    tokens as GSPO does), ``rho_u = exp(clamp(u, +-log_ratio_clamp))``, a detached correction
    ``b_u`` and verl's aggregation coefficients ``c_bt``,

    .. math::

        \text{loss} = \sum_{b,t} c_{bt}\, b_{u}\,
        \max\big(-A_{bt}\rho_u,\ -A_{bt}\,\mathrm{clip}(\rho_u, 1-\epsilon_l, 1+\epsilon_h)\big),
        \qquad b_u = \begin{cases} e^{\gamma v_u} & \text{tempered} \\
        \min(e^{v_u}, c) & \text{truncated} \\ 1 & \text{none} \end{cases}

    which is verl's ``compute_policy_loss_vanilla`` (without its dual clip) times
    ``rollout_is_weights`` (``verl/trainer/ppo/core_algos.py``), AReaL's decoupled PPO loss
    ``ppo_actor_loss_fn`` with ``proximal_logprobs`` (``areal/utils/functional.py``; arXiv
    2505.24298, eq. 5) with ``b = pi_prox/mu`` there truncated at a fixed ``behav_imp_weight_cap``.
    Here ``gamma`` is chosen by :func:`step_gamma` on the behaviour log weights ``v`` of the batch
    (all shards with a ``reducer``; flattened tokens at ``level="token"``), or the cap ``c`` by
    :func:`ess_truncation_cap`, so that the ESS of the correction meets ``rho_min``. The gradient
    ``d loss / d logp_bt`` is exact: ``-sum_t' c_bt' b_u A_bt' rho_u`` over the tokens whose
    unclipped term is active, times ``d u / d logp_bt`` (0 outside the clamp, as autograd gives).
    With ``logp_prox = logp`` (one update per batch) the value is ``-sum c b A`` and the gradient
    ``-c b A``: tempered (or truncated) importance-sampled policy gradient.

    Parameters
    ----------
    logp, logp_prox, logq : array (B, T) or (B,)
        Token log-probabilities under the trained, the proximal and the behaviour policy.
    advantages : array (B,) or (B, T)
    mask : bool array (B, T), optional
    behaviour : {"tempered", "truncated", "none"}
    gamma : {"ess", "closed_form", "psis", "tail", "combined"}, float or array
        The behaviour exponent (``"tempered"``): a rule of :func:`step_gamma`, a number, or a
        precomputed array broadcastable to the units (e.g. ``step_gamma`` over the whole step).
    cap : "ess" or float
        The truncation cap (``"truncated"``): chosen by ESS, or fixed (AReaL's, verl's TIS).
    rho_min : float
        Target ESS ratio of the correction.
    clip_ratio, clip_ratio_low, clip_ratio_high : float
        PPO's clip range ``[1 - low, 1 + high]`` (``low``, ``high`` default to ``clip_ratio``).
    level : {"token", "geometric", "sequence"}
    loss_agg_mode : one of :data:`LOSS_AGG_MODES`
    loss_scale_factor : float, optional
        The divisor of ``seq-mean-token-sum-norm``.
    log_ratio_clamp : float
        ``u`` is clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` (verl's 20).
    reducer : Reducer, optional
        Data-parallel shards: the correction's gamma or cap and the normalisers become global.
    **gamma_options
        ``gamma_min``, ``gamma_max``, ... of :func:`step_gamma`.

    Returns
    -------
    loss : 0-d array
    grad_logp : array, ``logp``'s shape
    metrics : dict of 0-d arrays
        ``clip_fraction`` (valid tokens whose unclipped term is inactive), ``ess_ratio`` (Kish
        ESS/n of the corrections ``b_u``), ``ess_ratio_at_1`` (of the raw ``pi_prox / mu``),
        ``max_weight`` (largest normalised correction), and ``behaviour_gamma`` (mean) or
        ``behaviour_log_cap``.

    Examples
    --------
    >>> import numpy as np
    >>> logp, logq = np.log([[0.5, 0.5], [0.25, 0.5]]), np.log([[0.25, 0.5], [0.5, 0.5]])
    >>> a = np.array([1.0, -1.0])
    >>> loss, grad, m = decoupled_ppo_loss_and_grad(logp, logp, logq, a, gamma=1.0)
    >>> print(np.round(loss, 4), grad[0])  # -(2 + 1 - 0.5 - 1)/4; -c b A = -(1/4)(2, 1)
    -0.375 [-0.5  -0.25]
    """
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    _check_arguments(logp, logp_prox, logq, advantages, level, loss_agg_mode, behaviour, gamma,
                     cap, rho_min, low, high, log_ratio_clamp)  # fmt: skip
    xp, lp, lprox, lq, a, mask, one_d = _prepare_inputs(logp, logp_prox, logq, advantages, mask)
    ratio_tok = xp.where(mask, lp, 0.0) - xp.where(mask, lprox, 0.0)
    beh_tok = xp.where(mask, lprox, 0.0) - xp.where(mask, lq, 0.0)
    check_log_weights(xp, ratio_tok, "logp - logp_prox")
    check_log_weights(xp, beh_tok, "logp_prox - logq")
    n_tok = xp.sum(xp.astype(mask, lp.dtype), axis=-1)
    valid = mask if level == "token" else n_tok > 0
    beh_l = unit_log_weights(xp, beh_tok, n_tok, level)
    log_b, metrics = _behaviour_log_weight(
        xp, beh_l, valid, behaviour, gamma, cap, rho_min, reducer,
        gamma_options,
    )  # fmt: skip
    c = _aggregation_weights(xp, mask, lp.dtype, loss_agg_mode, loss_scale_factor, reducer)
    clip = (1.0 - low, 1.0 + high, log_ratio_clamp)
    u = unit_log_weights(xp, ratio_tok, n_tok, level)
    loss, token_grad, active = _clipped_loss(xp, u, log_b, a, c, level, clip, reducer)
    # A sequence's tokens share its unit derivative, the sum of its tokens' terms.
    unit_grad = token_grad if level == "token" else xp.sum(token_grad, axis=-1)
    metrics.update(_metrics(xp, mask, active, log_b, beh_l, valid, reducer))
    return loss, token_gradient(UnitGradient(unit_grad, n_tok, mask, level, one_d)), metrics


def _prepare_inputs(
    logp: Array, logp_prox: Array, logq: Array, advantages: Array, mask: Array | None
) -> tuple[Namespace, Array, Array, Array, Array, Array, bool]:
    """``(xp, logp, logp_prox, logq, advantages, mask, one_d)``: the log-probabilities in the
    compute dtype, shape ``(B, T)`` (``(B,)`` inputs become ``(B, 1)``, flagged by ``one_d``),
    the advantages broadcast to ``(B, T)`` and 0 on padding, and ``mask`` boolean ``(B, T)``."""
    xp = namespace(logp, logp_prox, logq, advantages, mask)
    one_d = logp.ndim == 1
    lp = as_compute_array(xp, logp)
    dtype = lp.dtype
    lprox, lq = as_compute_array(xp, logp_prox, dtype), as_compute_array(xp, logq, dtype)
    a = as_compute_array(xp, advantages, dtype)
    if one_d:
        lp, lprox, lq = lp[:, None], lprox[:, None], lq[:, None]
        mask = mask[:, None] if mask is not None and getattr(mask, "ndim", 0) == 1 else mask
    B, T = lp.shape
    if tuple(a.shape) == (B,):
        a = a[:, None]
    elif tuple(a.shape) != (B, T):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {a.shape}")
    mask = broadcast_mask(xp, mask, (B, T))
    if mask is None:
        mask = xp.broadcast_to(xp.ones((1, 1), dtype=xp.bool, device=array_device(lp)), (B, T))
    a = xp.where(mask, xp.broadcast_to(a, (B, T)), 0.0)
    if is_concrete(a) and not bool(xp.all(xp.isfinite(a))):
        raise ValueError("advantages contain NaN or inf; they must be finite")
    return xp, lp, lprox, lq, a, mask, one_d


def _clipped_loss(
    xp: Namespace,
    u: Array,
    log_b: Array,
    a: Array,
    c: Array,
    level: str,
    clip: tuple[float, float, float],
    reducer: Reducer | None,
) -> tuple[Array, Array, Array]:
    """The PPO-clip loss ``sum c b max(-A rho, -A clip(rho))`` (over every shard), its derivative
    with respect to the unit log ratios ``u`` per token, and the tokens whose unclipped term is
    active. ``clip``: the ratio's floor and ceiling, and the clamp of ``u``."""
    floor, ceiling, clamp = clip
    b = xp.exp(xp.minimum(log_b, _log_max(xp, u.dtype)))  # 0 for invalid units
    inside = (u >= -clamp) & (u <= clamp)
    rho = xp.exp(xp.clip(u, -clamp, clamp))
    clipped = xp.clip(rho, floor, ceiling)
    if level != "token":
        b, rho, clipped, inside = b[:, None], rho[:, None], clipped[:, None], inside[:, None]
    active = a * rho <= a * clipped  # the unclipped term is the max of the two losses
    local = xp.sum(c * b * xp.where(active, -a * rho, -a * clipped))
    loss = local if reducer is None else reducer.sum(local)
    token_grad = xp.where(active & inside, -c * b * a * rho, 0.0)
    return loss, token_grad, active


def _metrics(xp, mask, active, log_b, beh_l, valid, reducer) -> dict[str, Array]:
    """Clip fraction over the valid tokens, and the ESS of the corrections over the units."""
    dtype = log_b.dtype
    counts = xp.stack(
        [
            xp.sum(xp.astype(mask & ~active, dtype)),
            xp.sum(xp.astype(mask, dtype)),
        ]
    )
    if reducer is not None:
        counts = reducer.sum(counts)
    flat_b = xp.reshape(log_b, (-1,))
    flat_l = xp.reshape(xp.where(valid, beh_l, -xp.inf), (-1,))
    n = reduce_sum(xp, xp.astype(xp.reshape(valid, (-1,)), dtype), 0, reducer)
    n = xp.where(n > 0, n, 1.0)
    top = reduce_max(xp, flat_b, 0, reducer)
    top = xp.where(xp.isfinite(top), top, 0.0)
    total = reduce_sum(xp, xp.exp(flat_b - top), 0, reducer)
    return {
        "clip_fraction": counts[0] / xp.where(counts[1] > 0, counts[1], 1.0),
        "ess_ratio": kish_ess_from_log(xp, flat_b, 0, reducer) / n,
        "ess_ratio_at_1": kish_ess_from_log(xp, flat_l, 0, reducer) / n,
        "max_weight": xp.where(total > 0, 1.0 / xp.where(total > 0, total, 1.0), 0.0),
    }
