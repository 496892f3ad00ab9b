"""The IS Reshape loss on token log-probabilities: value, exact gradient and metrics.

:func:`objective` and :func:`is_reshape_loss_and_grad` are one loss in two vocabularies.
``objective(log_w, rewards, gamma, reduction=...)`` takes unit log weights and reduces the terms
``r expm1(gamma l) / gamma`` by a mean or a sum along an axis; this module takes token
log-probabilities, forms the units itself and aggregates with verl's ``loss_agg_mode``
coefficients. Both use the same Box-Cox value (:func:`boxcox` in the objective's module) and the
same unit log weights (:func:`unit_log_weights`). The loss is one pipeline of named stages:

1. token units and aggregation coefficients: :func:`token_units` (unit log weights, validity,
   token counts; eager checks, traced NaN flags), :func:`aggregation_divisor`;
2. unit loss, gradient and metrics: :func:`unit_loss` (gamma by :func:`unit_gamma`, then
   :func:`unit_loss_and_grad`: log-space terms, one common scale, gradient, value terms);
3. gradient scatter: :func:`token_gradient` (``d l_u / d logp_bt`` is 1 or ``1 / n_b``), which
   an autograd wrapper may defer to its backward pass (``gradient="units"``).

The adapters wrap it: the torch adapter registers the gradient in a
``torch.autograd.Function``, the JAX adapter in a ``jax.custom_jvp``; the CuPy adapter fuses
stages 1 and 3 into two kernels and calls stage 2 (:func:`units_from_row_sums`,
:func:`row_coefficients`, :func:`unit_loss`).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Literal, NamedTuple

from array_api_compat import array_namespace, is_jax_namespace

from ._gamma import shifted_log_weights
from ._lib.checks import check_choice as _check_choice
from ._lib.checks import (
    check_gamma,
    check_log_weights,
    check_mask_type,
    check_real_floating,
    check_rho_min,
    check_same_shape,
)
from ._lib.dtypes import as_compute_array
from ._lib.dtypes import log_max as _log_max
from ._lib.inputs import broadcast_mask
from ._lib.namespace import Array, Namespace, array_device, is_array, namespace
from ._lib.numerics import log_abs, quiet_overflow, scaled_sum
from ._lib.reduce import Reducer, count_true, reduce_sum
from ._lib.sizes import is_large
from ._lib.tracing import host_values, is_concrete, nan_or_plus_inf
from ._objective import sign
from ._select import GAMMA_METHODS
from ._step import choose_gamma, ess_gamma_of_shifted, spread_bound, tempered_metrics
from ._weights import LEVELS as _LEVELS
from ._weights import checked_log_ratio, unit_log_weights

__all__ = [
    "LOSS_AGG_MODES",
    "LOSS_FORMS",
    "check_loss_arguments",
    "is_reshape_loss_and_grad",
    "prepare_loss_inputs",
]

#: verl's loss aggregation modes (``verl.trainer.ppo.core_algos.agg_loss``).
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
#: ``"objective"``: the Box-Cox value ``-r expm1(gamma l)/gamma``; ``"reinforce"``: the surrogate
#: ``-stop_grad(w^gamma) r log pi``. Both have the gradient ``-r w^gamma grad log pi``.
LOSS_FORMS = ("objective", "reinforce")


def _check_gamma_array(gamma: Array, logp: Any, level: Any, group_size: Any) -> None:
    """A precomputed gamma: 0-d, one per sequence ``(B,)`` or, at the token level, one per
    token ``(B, T)``; real, in [0, 1] (eager inputs), not combined with ``group_size``."""
    if group_size is not None:
        raise ValueError(
            "gamma is an array and group_size is given: a precomputed gamma already carries one "
            "value per group (step_gamma with group_ids); pass group_size=None"
        )
    if not hasattr(logp, "shape"):
        return  # logp's own check reports it
    shapes = [(), tuple(logp.shape[:1])]
    if level == "token":
        shapes.append(tuple(logp.shape))
    if tuple(gamma.shape) not in shapes:
        raise ValueError(
            f"gamma as an array must have shape () or (B,) = {tuple(logp.shape[:1])}"
            + (f" or (B, T) = {tuple(logp.shape)}" if level == "token" else "")
            + f" for level={level!r}; got {tuple(gamma.shape)}"
        )
    xp = array_namespace(gamma)
    if not xp.isdtype(gamma.dtype, "real floating"):
        raise TypeError(f"gamma as an array must have a real floating dtype, got {gamma.dtype}")
    if array_namespace(logp) is not xp:
        raise TypeError(
            f"gamma is a {type(gamma).__name__} but logp a {type(logp).__name__}; pass gamma as "
            "an array of logp's library"
        )
    check_gamma(gamma, "gamma")


def check_loss_options(
    *,
    gamma: Any = "ess",
    level: Any = "sequence",
    loss_agg_mode: Any = "token-mean",
    form: Any = "objective",
    **_: Any,
) -> None:
    """The choices among names of :func:`is_reshape_loss_and_grad` (``level``,
    ``loss_agg_mode``, ``form``, a gamma method), checked without any array: the adapters call it
    where the options are fixed before the arrays arrive (a module's constructor)."""
    _check_choice(level, "level", _LEVELS)
    _check_choice(loss_agg_mode, "loss_agg_mode", LOSS_AGG_MODES)
    _check_choice(form, "form", LOSS_FORMS)
    if isinstance(gamma, str):
        _check_choice(gamma, "gamma", GAMMA_METHODS)


def check_loss_arguments(
    logp: Any,
    logq: Any,
    rewards: Any,
    *,
    gamma: Any,
    rho_min: Any,
    level: Any,
    loss_agg_mode: Any,
    form: Any,
    group_size: Any,
    loss_scale_factor: Any = None,
    mask: Any = None,
) -> None:
    """The boundary checks of :func:`is_reshape_loss_and_grad`, shared with the adapters that
    reach the core by another path (the CuPy fused kernels), so that every entry point rejects
    the same inputs with the same messages."""
    check_loss_options(gamma=gamma, level=level, loss_agg_mode=loss_agg_mode, form=form)
    _check_gamma_option(gamma, logp, level, group_size)
    check_rho_min(rho_min)
    _check_loss_scale_factor(loss_scale_factor)
    if rewards is None:
        raise TypeError(
            "rewards are required (there is no r = 1 default, which would silently train pure "
            "SFT); pass rewards or advantages of shape (B,) or (B, T)"
        )
    check_same_shape({"logp": logp, "logq": logq})
    if not hasattr(rewards, "shape"):
        raise TypeError(f"rewards must be an array, got {type(rewards).__name__}")
    check_mask_type(mask)
    xp = namespace(logp, logq)
    check_real_floating(xp, logp, "logp")
    check_real_floating(xp, logq, "logq")
    if logp.ndim not in (1, 2):
        raise ValueError(f"logp must have shape (B, T) or (B,), got {tuple(logp.shape)}")
    if logp.shape[0] == 0:
        raise ValueError("the batch is empty: logp has no rows")
    if group_size is not None:
        B = logp.shape[0]
        if not isinstance(group_size, numbers.Integral) or group_size <= 0 or B % group_size:
            raise ValueError(
                f"group_size must be a positive int dividing the batch size {B}, got {group_size!r}"
            )


def _check_gamma_option(gamma: Any, logp: Any, level: Any, group_size: Any) -> None:
    """``gamma`` is a method name, a number in ``[0, 1]`` or an array of them."""
    if isinstance(gamma, str):
        return
    if is_array(gamma):
        _check_gamma_array(gamma, logp, level, group_size)
    elif not isinstance(gamma, numbers.Real) or isinstance(gamma, bool):
        raise TypeError(
            f"gamma must be a method name, a number in [0, 1] or an array of them, got {gamma!r}"
        )
    else:
        check_gamma(gamma, "gamma")


def _check_loss_scale_factor(loss_scale_factor: Any) -> None:
    """``None`` or a positive finite number: 0, NaN or inf would make the loss NaN or 0, and a
    negative factor would flip its sign (training in the wrong direction)."""
    if loss_scale_factor is None:
        return
    if not isinstance(loss_scale_factor, numbers.Real) or isinstance(loss_scale_factor, bool):
        raise TypeError(
            "loss_scale_factor must be a positive finite number (the divisor of "
            f"seq-mean-token-sum-norm) or None, got {type(loss_scale_factor).__name__}"
        )
    if not (math.isfinite(loss_scale_factor) and loss_scale_factor > 0):
        raise ValueError(
            "loss_scale_factor must be a positive finite number (the divisor of "
            f"seq-mean-token-sum-norm; 0, NaN or inf would make the loss NaN or 0, a "
            f"negative one would flip its sign), got {loss_scale_factor!r}"
        )


_NAMED_OPTIONS = (
    "gamma",
    "rho_min",
    "level",
    "loss_agg_mode",
    "form",
    "group_size",
    "loss_scale_factor",
)


def split_loss_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(named, gamma_options)``: the named options of :func:`is_reshape_loss_and_grad`, with
    its defaults where absent, and the rest (passed to :func:`select_gamma`)."""
    defaults = _named_defaults()
    named = {k: options.get(k, defaults[k]) for k in _NAMED_OPTIONS}
    return named, {k: v for k, v in options.items() if k not in named}


@functools.cache
def _named_defaults() -> dict[str, Any]:
    """The defaults of the named options, read once from the signature (about 10 us a call)."""
    parameters = inspect.signature(is_reshape_loss_and_grad).parameters
    return {k: parameters[k].default for k in _NAMED_OPTIONS}


def prepare_loss_inputs(
    logp: Array, logq: Array, rewards: Array, mask: Array | None
) -> tuple[Namespace, Array, Array, Array, Array, bool]:
    """Inputs of the loss (already checked by :func:`check_loss_arguments`) in the compute dtype.

    Returns ``(xp, logp, logq, rewards, mask, one_d)``: ``logp``, ``logq`` of shape ``(B, T)``
    (``(B,)`` inputs become ``(B, 1)``, flagged by ``one_d``), ``rewards`` of shape ``(B, 1)``
    or ``(B, T)`` (not broadcast, so that a fused kernel can broadcast it itself) and ``mask`` a
    boolean ``(B, T)`` array or broadcast view. Shared by the core and the CuPy fused path.
    """
    xp = namespace(logp, logq, rewards, mask)
    one_d = logp.ndim == 1
    logp = as_compute_array(xp, logp)
    dtype = logp.dtype
    logq = as_compute_array(xp, logq, dtype)
    if one_d:
        logp, logq = logp[:, None], logq[:, None]
        if mask is not None and hasattr(mask, "shape") and mask.ndim == 1:
            mask = mask[:, None]
    B, T = logp.shape
    mask = broadcast_mask(xp, mask, (B, T))
    if mask is None:
        mask = xp.broadcast_to(xp.ones((1, 1), dtype=xp.bool, device=array_device(logp)), (B, T))
    r = as_compute_array(xp, rewards, dtype)
    if tuple(r.shape) == (B,):
        r = r[:, None]
    elif tuple(r.shape) != (B, T):
        raise ValueError(
            f"rewards must have shape (B,) = ({B},) or (B, T) = ({B}, {T}), got "
            f"{tuple(rewards.shape)}"
        )
    return xp, logp, logq, r, mask, one_d


def is_reshape_loss_and_grad(
    logp: Array,
    logq: Array,
    rewards: Array,
    mask: Array | None = None,
    *,
    gamma: str | float = "ess",
    rho_min: float = 0.3,
    level: Literal["sequence", "geometric", "token"] = "sequence",
    loss_agg_mode: str = "token-mean",
    form: Literal["objective", "reinforce"] = "objective",
    group_size: int | None = None,
    loss_scale_factor: float | None = None,
    reducer: Reducer | None = None,
    gradient: Literal["tokens", "units"] = "tokens",
    **gamma_options: Any,
) -> tuple[Array, Array | UnitGradient, dict[str, Array]]:
    r"""The IS Reshape loss, its gradient with respect to ``logp``, and metrics.

    With unit log weights ``l_u`` (a sequence's summed or mean token log-ratio, or one token's;
    see :func:`log_weights`), a per-token reward ``r_bt`` (a per-sequence reward is broadcast
    along the tokens) and verl's aggregation coefficients ``c_bt`` (``loss = sum c * loss_mat``),

    .. math::

        \text{loss} = -\sum_{b,t} c_{bt}\, r_{bt}\, \frac{\operatorname{expm1}(\gamma l_{u(b,t)})}
        {\gamma} \quad(\text{objective}), \qquad
        \text{loss} = -\sum_{b,t} c_{bt}\, r_{bt}\, \overline{w_{u}^{\gamma}}\,
        \log\pi_{u(b,t)} \quad(\text{reinforce}),

    and both have the gradient ``d loss / d logp_bt = -sum_{t'} c_bt' r_bt' w_u^gamma
    d l_u / d logp_bt`` (:ref:`theory-objective`): exact at ``gamma = 0``, where the
    objective form is reward-weighted log-likelihood. ``gamma`` is chosen from the detached unit
    log weights and carries no gradient.

    Parameters
    ----------
    logp, logq : array (B, T) or (B,)
        Token (or sequence) log-probabilities under the trained and the behaviour policy.
        Half precision is computed in float32.
    rewards : array (B,) or (B, T)
        Rewards or advantages (signed allowed), per sequence or per token. Required.
    mask : bool array (B, T), optional
        Valid (response) tokens.
    gamma : {"ess", "closed_form", "psis", "tail", "combined"}, float or array
        How to choose gamma (:func:`select_gamma`), a fixed value in [0, 1], or a precomputed
        gamma array (e.g. from :func:`step_gamma`, one gamma for the whole optimizer step): 0-d,
        one per sequence ``(B,)``, or at ``level="token"`` one per token ``(B, T)``; in [0, 1],
        used as is and carrying no gradient (not combined with ``group_size``). The same array
        gives the same result as the same number.
    rho_min : float
        Target ESS ratio (unused with a fixed or precomputed gamma).
    level : {"sequence", "geometric", "token"}
    loss_agg_mode : one of :data:`LOSS_AGG_MODES`
        verl's: ``token-mean`` (default), ``seq-mean-token-sum``, ``seq-mean-token-mean``,
        ``seq-mean-token-sum-norm`` (divided by ``loss_scale_factor``, default ``T``).
    form : {"objective", "reinforce"}
    group_size : int, optional
        GRPO groups of ``G`` consecutive responses: one gamma per group (``B % G == 0``).
        Otherwise one gamma for the whole batch (over every shard, with a ``reducer``).
    loss_scale_factor : float, optional
        The divisor of ``seq-mean-token-sum-norm`` (default ``T``); a positive finite number.
    reducer : Reducer, optional
        For data-parallel shards of the batch: gamma and the normalisers become global, so every
        shard uses the same gamma and the loss is the loss of the whole batch.
    gradient : {"tokens", "units"}
        ``"units"``: the gradient as a :class:`UnitGradient` (per unit, with what scatters it to
        the tokens) instead of the ``logp``-shaped array, for an autograd wrapper that scatters
        it in its backward pass (``isreshape_torch`` does: it keeps a ``(B,)`` array rather than
        a ``(B, T)`` one between the passes, and writes the tokens' gradient once).
    **gamma_options
        Passed to :func:`select_gamma` (``gamma_min``, ``gamma_max``, ``max_iter``, ...).

    Returns
    -------
    loss : 0-d array
    grad_logp : array, the shape of ``logp``, or UnitGradient
        ``d loss / d logp`` (float32 or float64); a :class:`UnitGradient` with
        ``gradient="units"``.
    metrics : dict of 0-d arrays
        ``gamma`` (mean over groups; for a precomputed gamma its mean over the valid units),
        ``sigma2`` (variance of the unit log weights),
        ``ess_ratio`` (at gamma) and ``ess_ratio_at_1`` (means over groups), ``max_weight``
        (largest normalised unit weight), and ``k_hat`` (the largest over groups) for the
        Pareto methods ``"psis"``, ``"tail"``, ``"combined"``; the numerical-safety counters
        ``log_scale`` (the ``s`` below, 0 where nothing overflows), ``n_capped`` (units whose
        term needed it, or whose summed log ratio overflowed the dtype) and ``n_nonfinite``
        (valid tokens with a NaN or ``+inf`` log ratio or a non-finite reward: 0 on eager
        inputs, which raise instead).

    Notes
    -----
    Numerical safety (docs: concepts, "Numerical safety"). For every finite input in every
    dtype the loss and the gradient are finite and masked tokens get exactly 0. Where every
    term and gradient is representable the result is the plain formula, exactly. Otherwise
    value and gradient are both divided by one factor ``e^s``, the smallest that brings the
    largest of the ``K`` nonzero terms below ``max_float / K`` (so their sum is finite): the
    gradient's direction is kept, only its length changes, and ``s`` is reported as
    ``log_scale``. Unlike a clamp of the log ratio (verl, TRL: ``[-20, 20]``) nothing changes
    where the values are representable. Traced inputs cannot raise: a NaN or ``+inf`` log ratio
    or a non-finite reward makes its unit's value and gradient NaN, and every batch statistic
    it enters (a batch gamma chosen from the weights, hence the whole loss).

    Examples
    --------
    >>> import numpy as np
    >>> logp = np.log(np.array([[0.5, 0.5], [0.25, 0.5]]))
    >>> logq = np.log(np.array([[0.5, 0.25], [0.5, 0.5]]))
    >>> loss, grad, metrics = is_reshape_loss_and_grad(
    ...     logp, logq, np.array([1.0, 2.0]), gamma=0.0, loss_agg_mode="seq-mean-token-sum")
    >>> print(np.round(loss, 4))  # -(r_0 l_0 + r_1 l_1) = -(log 2 - 2 log 2)
    0.6931
    >>> print(grad)  # -(sum_t c_bt r_b) w^0 = -(2/2) r_b on every token
    [[-1. -1.]
     [-2. -2.]]
    """
    check_loss_arguments(
        logp,
        logq,
        rewards,
        gamma=gamma,
        rho_min=rho_min,
        level=level,
        loss_agg_mode=loss_agg_mode,
        form=form,
        group_size=group_size,
        loss_scale_factor=loss_scale_factor,
        mask=mask,
    )
    _check_choice(gradient, "gradient", ("tokens", "units"))
    grad_dtype = logp.dtype  # the adapters return the gradient in logp's own dtype
    xp, logp, logq, r, mask, one_d = prepare_loss_inputs(logp, logq, rewards, mask)
    n_tok = count_true(xp, mask, -1, logp.dtype)
    rows = n_tok > 0  # sequences with a valid token
    r = masked_rewards(xp, r, mask, rows)
    tokens = Tokens(logp, logq, r, mask, n_tok, rows)
    units, n_nonfinite = token_units(xp, tokens, level, form, reducer)
    divisor = aggregation_divisor(
        xp, n_tok, logp.shape[-1], loss_agg_mode, loss_scale_factor, reducer
    )
    coef = unit_coefficients(xp, r, n_tok, mask, divisor, level)
    loss, unit_grad, metrics = unit_loss(
        xp, units, coef, grad_dtype, gamma, rho_min, group_size, reducer, gamma_options
    )
    metrics["n_nonfinite"] = n_nonfinite
    by_unit = UnitGradient(unit_grad, units.n_tok, mask, level, one_d)
    return loss, (by_unit if gradient == "units" else token_gradient(by_unit)), metrics


# --------------------------------------------------------------------------------------------
# Stage 1: token units and aggregation coefficients.
# --------------------------------------------------------------------------------------------


class Units(NamedTuple):
    """The units of the loss (sequences, or tokens at ``level="token"``), shape ``(B,)`` or
    ``(B, T)``.

    ``log_w``: unit log weights ``l_u`` (``-inf`` is weight 0; a sum of finite token log
    ratios that overflows the dtype is clipped to ``+-max_float``); ``valid``: units that count;
    ``n_tok``: valid tokens per sequence ``(B,)``; ``log_p``: the unit log-probability
    ``log pi_u`` (the REINFORCE form only, else ``None``); ``capped``: units whose summed log
    ratio was clipped (``None``: none was); ``bad``: traced inputs only, units with a NaN or
    ``+inf`` log ratio or a non-finite reward (eager inputs raise instead), else ``None``;
    ``finite``: every log weight is known to be finite and within :func:`spread_bound` (no
    zero weight, nothing clipped); ``top``: the largest unit log weight (0-d) where one host read
    found it positive, so that it is a valid unit's (invalid units hold 0), else ``None``.
    """

    log_w: Array
    valid: Array
    n_tok: Array
    log_p: Array | None
    capped: Array | None
    bad: Array | None
    finite: bool = False
    top: Array | None = None


class Tokens(NamedTuple):
    """The token inputs of the loss: ``logp``, ``logq`` ``(B, T)`` in the compute dtype, the
    rewards ``r`` of :func:`masked_rewards`, the boolean ``mask`` ``(B, T)``, the valid tokens
    per sequence ``n_tok`` and ``rows``: the sequences with one (``n_tok > 0``), ``(B,)``."""

    logp: Array
    logq: Array
    r: Array
    mask: Array
    n_tok: Array
    rows: Array


def token_units(
    xp: Namespace, tokens: Tokens, level: str, form: str, reducer: Reducer | None
) -> tuple[Units, Array]:
    """The units of the token inputs, and ``n_nonfinite``: the valid tokens, over every shard,
    whose log ratio is NaN or ``+inf`` or whose reward is not finite (0 on eager inputs, which
    raise instead).

    Eagerly, the plain sums of :func:`_ordinary_units` wherever one host read finds every unit
    log weight and reward finite and bounded; otherwise :func:`_guarded_units`, which checks the
    inputs, guards the sums against overflow and flags traced NaN inputs."""
    if all(is_concrete(a) for a in tokens[:3]):
        units = _ordinary_units(xp, tokens, level, form)
        if units is not None:
            like = tokens.logp
            return units, xp.zeros((), dtype=like.dtype, device=array_device(like))
    return _guarded_units(xp, tokens, level, form, reducer)


def _ordinary_units(xp: Namespace, tokens: Tokens, level: str, form: str) -> Units | None:
    """The units by plain sums of the masked token log ratios, or ``None`` unless one host read
    finds every reward finite and the squared unit log weights summing to at most the square
    of :func:`spread_bound` (8.6e9 at 64 sequences in float32), so that every one is within it
    (the metrics' variance needs no scaling then). The same read takes the largest unit log
    weight, which the metrics and the search shift by where it is positive (``Units.top``).

    A finite plain sum had no partial sum overflow (an infinite partial sum stays infinite or
    NaN), so it is the guarded sum of :func:`_guarded_units` (which scales only rows that could
    overflow, by a power of 2); finite units also rule out a NaN, ``+inf`` or ``-inf`` token
    log ratio and a ``logq = +inf``, so that no check and no clipping is left to do."""
    logp, logq, r, mask, n_tok, rows = tokens
    # Padding may hold inf - inf (the where discards it); a probe that overflows only sends a
    # finite batch down the guarded path.
    with quiet_overflow(xp):
        token_l = xp.where(mask, logp - logq, 0.0)
        total = xp.sum(token_l, axis=-1) if level != "token" else token_l
        # The sum of squares bounds every |l| (one operator, no array of |l|); NaN or +-inf
        # where a unit or a reward is not finite, or where it overflows. One value per
        # sequence each: in one array, else a reward sum beside.
        if total.ndim == 1 and tuple(r.shape) == tuple(total.shape):
            t = total + r * 0.0
            squares = xp.vecdot(t, t)
        else:
            flat = xp.reshape(total, (-1,))
            squares = xp.vecdot(flat, flat) + xp.sum(r) * 0.0
        if level == "geometric":
            total = total / xp.maximum(n_tok, 1.0)  # a count: 1 where it is 0
        # The largest unit log weight in the same read: the metrics' and the search's shift.
        probe = xp.stack([squares, xp.max(total)])
        read = host_values(probe)
        if not read[0] <= spread_bound(xp, total.dtype, math.prod(total.shape)) ** 2:
            return None
    top = probe[1] if read[1] > 0 else None  # positive: a valid unit's (invalid ones are 0)
    valid = mask if level == "token" else rows
    lp = xp.where(mask, logp, 0.0) if form == "reinforce" else None
    log_p = None if lp is None else unit_log_weights(xp, lp, n_tok, level)
    return Units(total, valid, n_tok, log_p, None, None, finite=True, top=top)


def _guarded_units(
    xp: Namespace, tokens: Tokens, level: str, form: str, reducer: Reducer | None
) -> tuple[Units, Array]:
    """The units of :func:`token_units` for any input: eager ones are checked (and raise),
    sums that could overflow are taken in steps, and traced NaN inputs are flagged.

    Every reduction over the tokens reads them independently of the others (the sums and their
    overflow guard, the test for an infinite token, the count of bad ones), so that a compiler
    takes them in one pass over each sequence."""
    logp, logq, r, mask, n_tok, rows = tokens
    lp = xp.where(mask, logp, 0.0)
    token_l = checked_log_ratio(xp, lp, xp.where(mask, logq, 0.0), check=False)
    if is_concrete(token_l):  # eager inputs raise here (a row max holds any NaN and +inf)
        check_log_weights(xp, xp.max(token_l, axis=-1), "logp - logq")
    check_finite_rewards(xp, r)
    log_p = unit_log_weights(xp, lp, n_tok, level) if form == "reinforce" else None
    if level == "token":
        unit_l, valid, capped = token_l, mask, None
    else:
        unit_l = unit_log_weights(xp, token_l, n_tok, level)
        valid = rows
        # A token that is -inf is a weight 0 (and stays so); a sum of finite ones can overflow.
        # Every token is finite where their scaled sum, which cannot overflow, is.
        capped = valid & xp.isinf(unit_l) & xp.isfinite(scaled_sum(xp, token_l, axis=-1))
        top = xp.asarray(float(xp.finfo(lp.dtype).max), dtype=lp.dtype, device=array_device(lp))
        unit_l = xp.where(capped, xp.where(unit_l > 0, top, -top), unit_l)
    # Traced inputs cannot raise: NaN / +inf log ratios and non-finite rewards make their unit
    # NaN (and every batch statistic they enter), counted in the metrics.
    bad, n_bad = None, xp.zeros((), dtype=lp.dtype, device=array_device(lp))
    if not (is_concrete(token_l) and is_concrete(r)):
        bad, bad_per_row = _bad_tokens(xp, token_l, tokens, level)
        n_bad = reduce_sum(xp, bad_per_row, 0, reducer)
    return Units(unit_l, valid, n_tok, log_p, capped, bad), n_bad


def _bad_tokens(xp: Namespace, token_l: Array, tokens: Tokens, level: str) -> tuple[Array, Array]:
    """Traced inputs: the bad units (the valid tokens at the token level, else the sequences)
    and the bad tokens per sequence: valid tokens whose log ratio is NaN or ``+inf`` or whose
    reward is not finite. A per-sequence reward that is not finite makes every valid token of
    its sequence bad: counted from ``n_tok`` beside the tokens' sum, so that no token-sized
    array depends on the count of the sequence's tokens (a compiler then reads each sequence
    once for every one of its sums)."""
    r, mask, n_tok = tokens.r, tokens.mask, tokens.n_tok
    bad_l = nan_or_plus_inf(xp, token_l) & mask
    if level == "token" or r.ndim == 2:
        r_bad = ~xp.isfinite(r if r.ndim == 2 else r[:, None])
        token_bad = bad_l | (r_bad & mask)
        bad_per_row = xp.sum(xp.astype(token_bad, token_l.dtype), axis=-1)
        return (token_bad if level == "token" else bad_per_row > 0), bad_per_row
    per_row = xp.sum(xp.astype(bad_l, token_l.dtype), axis=-1)
    bad_per_row = xp.where(xp.isfinite(r), per_row, n_tok)
    return bad_per_row > 0, bad_per_row


def masked_rewards(xp: Namespace, r: Array, mask: Array, rows: Array) -> Array:
    """Rewards of :func:`prepare_loss_inputs` (``(B, 1)`` or ``(B, T)``) with those of no valid
    token set to 0 (padding may hold anything, NaN included): per token ``(B, T)``, 0 outside
    the mask, or per sequence ``(B,)``, 0 where ``rows`` (the sequences with a valid token) is
    false. Per-sequence rewards are never broadcast along the tokens."""
    if tuple(r.shape) == tuple(mask.shape):
        return xp.where(mask, r, 0.0)
    return xp.where(rows, r[:, 0], 0.0)


def check_finite_rewards(xp: Namespace, r: Array) -> None:
    """Eager inputs: rewards must be finite (traced ones poison their unit instead)."""
    if is_concrete(r) and not bool(xp.all(xp.isfinite(r))):
        raise ValueError("rewards contain NaN or inf; rewards must be finite")


def aggregation_divisor(
    xp: Namespace,
    n_tok: Array,
    T: int,
    loss_agg_mode: str,
    loss_scale_factor: float | None,
    reducer: Reducer | None,
) -> Array:
    """The divisor ``d_b`` of verl's ``agg_loss``, ``c_bt = m_bt / d_b``: one value (shape
    ``()``) or, for ``seq-mean-token-mean``, one per sequence ``(B,)``.

    ``n_tok`` holds the valid tokens per sequence ``(B,)``; the normalisers (token count,
    sequence count) are global over the shards.
    """
    B, dtype, device = n_tok.shape[0], n_tok.dtype, array_device(n_tok)
    if loss_agg_mode == "token-mean":
        total = reduce_sum(xp, n_tok, 0, reducer)
        d = xp.maximum(total, 1.0)  # a count: 1 where it is 0
    elif loss_agg_mode == "seq-mean-token-sum-norm":  # a constant (the response length T)
        scale = float(T) if loss_scale_factor is None else float(loss_scale_factor)
        d = xp.asarray(scale, dtype=dtype, device=device)
    else:
        d = xp.asarray(B * 1.0, dtype=dtype, device=device)
        if reducer is not None:
            d = reducer.sum(d)
        if loss_agg_mode == "seq-mean-token-mean":
            d = xp.where(n_tok > 0, n_tok, 1.0) * d
    return d


def _per_token(d: Array) -> Array:
    """A divisor of :func:`aggregation_divisor` in a shape that broadcasts to ``(B, T)``."""
    return d if d.ndim == 0 else d[:, None]


def _aggregation_weights(
    xp: Namespace,
    mask: Array,
    dtype: Any,
    loss_agg_mode: str,
    loss_scale_factor: float | None,
    reducer: Reducer | None,
) -> Array:
    """Coefficients ``c`` (B, T) with ``loss = sum c * loss_mat``, as verl's ``agg_loss``."""
    m = xp.astype(mask, dtype)
    n_tok = xp.sum(m, axis=-1)
    d = aggregation_divisor(xp, n_tok, m.shape[-1], loss_agg_mode, loss_scale_factor, reducer)
    return m / _per_token(d)


def unit_coefficients(
    xp: Namespace, r: Array, n_tok: Array, mask: Array, divisor: Array, level: str
) -> Array:
    """``coef_u = sum_t c_bt r_bt`` of each unit, with ``c_bt = m_bt / d_b``: ``r_bt m_bt / d_b``
    per token at ``level="token"``, else ``(sum_t m_bt r_bt) / d_b`` per sequence.

    ``r`` from :func:`masked_rewards`, ``n_tok`` the valid tokens ``(B,)``, ``divisor`` from
    :func:`aggregation_divisor`. A per-sequence reward ``(B,)`` enters as
    ``r_b (n_b / d_b)``: no pass over the tokens."""
    per_token = r.ndim == 2
    d = _per_token(divisor)
    if level == "token":
        return r / d if per_token else xp.where(mask, (r / divisor)[:, None], 0.0)
    # Divided before the sum: r_b n_b or sum_t r_bt may overflow where the coefficient does not.
    if per_token:
        return xp.sum(r / d, axis=-1)
    return r * (n_tok / divisor)


def units_from_row_sums(xp: Namespace, sums: dict[str, Array], form: str) -> Units:
    """The units of a fused token pass (sequence or geometric level) from its per-sequence sums:
    ``unit_l``, ``unit_logp`` (the level's log weight and log-probability), ``n_tok``, and the
    counts of valid tokens with a NaN or ``+inf`` log ratio (``bad_l``) or a non-finite reward
    (``bad_r``), refused with the messages of :func:`is_reshape_loss_and_grad`."""
    unit_l = sums["unit_l"]
    check_log_weights(xp, xp.where(sums["bad_l"] > 0, xp.nan, unit_l), "logp - logq")
    check_finite_rewards(xp, xp.where(sums["bad_r"] > 0, xp.nan, 0.0))
    n_tok = sums["n_tok"]
    valid = n_tok > 0
    log_p = sums["unit_logp"] if form == "reinforce" else None
    return Units(xp.where(valid, unit_l, 0.0), valid, n_tok, log_p, None, None)


def row_coefficients(xp: Namespace, sums: dict[str, Array], T: int, options: dict) -> Array:
    """``coef_b = sum_t c_bt r_bt`` of each sequence of a fused token pass, from its masked
    reward sum ``sums["sum_r"]`` and token count (``options``: the named loss options)."""
    mode, factor = options["loss_agg_mode"], options["loss_scale_factor"]
    return sums["sum_r"] / aggregation_divisor(xp, sums["n_tok"], T, mode, factor, None)


def _given_gamma(
    xp: Namespace, gamma: Array, unit_l: Array, unit_valid: Array, reducer: Reducer | None
) -> tuple[Array, dict[str, Array]]:
    """A precomputed gamma (0-d, per sequence or per token) in a shape that broadcasts to the
    units', and the metrics of the unit weights tempered by it (``gamma``: its mean over the
    valid units)."""
    g = as_compute_array(xp, gamma, unit_l.dtype)
    if g.ndim == 1 and unit_l.ndim == 2:  # one gamma per sequence at the token level
        g = g[:, None]
    masked_l = xp.reshape(xp.where(unit_valid, unit_l, -xp.inf), (1, -1))
    flat_g = xp.reshape(xp.broadcast_to(g, tuple(unit_l.shape)), (1, -1))
    valid = masked_l > -xp.inf
    totals = xp.stack([xp.sum(xp.where(valid, flat_g, 0.0)), count_true(xp, valid, None, g.dtype)])
    if reducer is not None:
        totals = reducer.sum(totals)
    mean_g = totals[0] / xp.where(totals[1] > 0, totals[1], 1.0)
    return g, tempered_metrics(xp, masked_l, flat_g, xp.reshape(mean_g, (1,)), reducer, None)


# --------------------------------------------------------------------------------------------
# Stage 2: gamma, and the unit loss, gradient and metrics.
# --------------------------------------------------------------------------------------------


def unit_gamma(
    xp: Namespace,
    gamma: Any,
    units: Units,
    rho_min: Any,
    group_size: int | None,
    reducer: Reducer | None,
    gamma_options: dict[str, Any],
) -> tuple[Array, dict[str, Array]]:
    """Each unit's gamma (precomputed, fixed, or chosen by a method from the detached unit log
    weights, per batch or per group of ``group_size`` consecutive rows), in a shape that
    broadcasts to the units' (one value, one per sequence, or one per unit), and the metrics
    of the tempered unit weights."""
    unit_l = units.log_w
    if is_array(gamma):
        return _given_gamma(xp, gamma, unit_l, units.valid, reducer)
    if group_size is None:  # one row of every unit: a 0-d gamma, which broadcasts to them
        flat_l, flat_valid = unit_l, units.valid
        if unit_l.ndim > 1:
            flat_l, flat_valid = xp.reshape(unit_l, (-1,)), xp.reshape(units.valid, (-1,))
        # The metrics' and the search's; the plain units' check bounds every |l| of this shard.
        bounded, finite = units.finite and reducer is None, flat_valid if units.finite else None
        search = units.finite and _default_search(gamma, reducer, gamma_options)
        # Token units: their count is the token count (no pass over the mask).
        count = xp.sum(units.n_tok) if finite is not None and unit_l.ndim > 1 else None
        # With the max known, the shift masks the plain log weights itself (no -inf copy).
        top = units.top if bounded else None
        masked_l = flat_l if top is not None else xp.where(flat_valid, flat_l, -xp.inf)
        shifted = shifted_log_weights(
            xp, masked_l, -1, reducer, False, bounded, finite, count, floored=search, top=top
        )
        sums = k_hat = None
        if search:
            g, sums = ess_gamma_of_shifted(xp, masked_l, shifted, rho_min, gamma_options)
        else:
            g, k_hat = choose_gamma(flat_l, flat_valid, rho_min, gamma, reducer, gamma_options)
        unit_g = xp.reshape(g, (1,))
        metrics = tempered_metrics(xp, masked_l, unit_g, g, reducer, None, k_hat, shifted, sums)
        return g, metrics
    # A group lives on one shard.
    shape, stats_reducer, merge_reducer = (unit_l.shape[0] // group_size, -1), None, reducer
    rows_l, rows_valid = xp.reshape(unit_l, shape), xp.reshape(units.valid, shape)
    g, k_hat = choose_gamma(rows_l, rows_valid, rho_min, gamma, stats_reducer, gamma_options)
    masked_l = xp.where(rows_valid, rows_l, -xp.inf)
    metrics = tempered_metrics(xp, masked_l, g[:, None], g, stats_reducer, merge_reducer, k_hat)
    per_row = xp.reshape(xp.broadcast_to(g[:, None], (g.shape[0], group_size)), (-1,))
    return (per_row if unit_l.ndim == 1 else per_row[:, None]), metrics


def _default_search(gamma: Any, reducer: Reducer | None, gamma_options: dict[str, Any]) -> bool:
    """Whether gamma is the ESS search of one local row with number bounds at most, which
    :func:`ess_gamma_of_shifted` runs on the metrics' shifted log weights."""
    return (
        isinstance(gamma, str)
        and gamma == "ess"
        and reducer is None
        and gamma_options.keys() <= {"gamma_min", "gamma_max"}
        and all(isinstance(v, numbers.Real) for v in gamma_options.values())
    )


def unit_loss(
    xp: Namespace,
    units: Units,
    coef: Array,
    grad_dtype: Any,
    gamma: Any,
    rho_min: Any,
    group_size: int | None,
    reducer: Reducer | None,
    gamma_options: dict[str, Any],
) -> tuple[Array, Array, dict[str, Array]]:
    """Stage 2: gamma of every unit, the loss, the unit gradients ``d loss / d l_u`` and the
    metrics (of the tempered weights and of the numerical safety), from the units and their
    coefficients ``coef_u = sum_t c_bt r_bt``, finite and 0 at every invalid unit (as
    :func:`unit_coefficients` and :func:`row_coefficients` give them from masked rewards).
    Shared by every entry point of the loss."""
    unit_g, metrics = unit_gamma(xp, gamma, units, rho_min, group_size, reducer, gamma_options)
    # Terms and gradients must fit the narrower of the compute dtype and logp's (float16: 65504).
    cap = min(_log_max(xp, units.log_w.dtype), _log_max(xp, grad_dtype))
    positive = _positive_by_options(gamma, gamma_options)
    loss, unit_grad, safety = unit_loss_and_grad(xp, units, unit_g, coef, reducer, cap, positive)
    metrics.update(safety)
    return loss, unit_grad, metrics


def _positive_by_options(gamma: Any, gamma_options: dict[str, Any]) -> bool:
    """Whether the fast path may take every gamma as positive: unless the options make a gamma
    of 0 likely (a fixed number that is, or is clipped to, 0; or ``gamma_max = 0``). A chosen or
    precomputed gamma is positive but for the stalest batches, where a 0 only sends the batch
    down the scaled path (``expm1(0) / 0`` fails the fast path's check)."""
    lo, hi = gamma_options.get("gamma_min", 0.0), gamma_options.get("gamma_max", 1.0)
    if not all(isinstance(b, numbers.Real) for b in (lo, hi)):
        return True
    if isinstance(gamma, numbers.Real):
        return min(max(gamma, lo), hi) > 0
    return hi > 0


def unit_loss_and_grad(
    xp: Namespace,
    units: Units,
    unit_g: Array,
    coef: Array,
    reducer: Reducer | None,
    cap: float,
    positive: bool = False,
) -> tuple[Array, Array, dict[str, Array]]:
    """The loss ``-sum_u coef_u h_u`` (over every shard), the unit gradients
    ``-coef_u w_u^gamma`` and the safety metrics ``log_scale`` and ``n_capped``, all finite.

    ``h_u`` is the Box-Cox value ``expm1(g l)/g`` (``l`` at ``g = 0``), or ``w^g log pi_u``
    for the REINFORCE form (``units.log_p`` given). Exact (the plain products) wherever every
    term is representable. Otherwise all terms and gradients are divided by one common factor
    ``e^s``, the smallest that brings the largest term of the ``K`` nonzero ones below
    ``max_float / K`` (so that the sum is finite too); a term whose factors overflow on their own
    is formed in log space (``cap``: the log of ``max_float`` of the narrower of the compute
    dtype and logp's own). ``s`` is reported as ``log_scale``, the number of units whose term
    needed it (or whose summed log weight was clipped) as ``n_capped``. Invalid units count as
    ``coef = 0``: value and gradient exactly 0. ``positive``: every gamma is known to be
    positive (a wrong claim costs only the fast path: ``expm1(0) / 0`` fails its check).
    """
    if units.bad is not None:
        units = units._replace(bad=units.bad | xp.isnan(unit_g))
    elif is_concrete(units.log_w):
        factors = _plain_factors(xp, units, unit_g, positive)
        plain = _plain_loss_and_grad(xp, units, factors, coef, reducer, cap)
        if plain is not None:
            return plain
    return _scaled_loss_and_grad(xp, units, unit_g, coef, reducer, cap)


def _plain_loss_and_grad(
    xp: Namespace,
    units: Units,
    factors: tuple[Array, Array],
    coef: Array,
    reducer: Reducer | None,
    cap: float,
) -> tuple[Array, Array, dict[str, Array]] | None:
    """Eager fast path: the loss and unit gradients by the plain products ``-coef h`` and
    ``-coef w^gamma`` (``factors``: ``(w^gamma, h)`` of :func:`_plain_factors`), or ``None``
    unless one synchronising check proves that they are exactly what
    :func:`_scaled_loss_and_grad` returns (no scale, every factor and product representable):
    every ``|h|`` and ``w^gamma`` at most ``e^(cap - 1)``, and every term and gradient at most
    ``e^(cap - 1) / N`` for ``N`` units over every shard (so that ``s = 0`` there). The margin
    ``e`` covers the rounding of the products and of the log-space scale. Most batches take
    it: one exponential and a few products instead of the log-space terms."""
    with quiet_overflow(xp):  # whatever overflows here fails the check
        # coef is 0 at invalid units (unit_loss); 0 - x: +0 (not -0) at coef = 0.
        neg_c = 0.0 - coef
        e, h = factors
        neg_terms, unit_grad = neg_c * h, neg_c * e
        n_units = float(math.prod(units.log_w.shape))
        if reducer is not None:
            n_units = reducer.sum(xp.asarray(n_units, dtype=e.dtype, device=array_device(e)))
        worst = _plain_peak(xp, neg_c, factors, (neg_terms, unit_grad), n_units)
        if reducer is not None:
            worst = reducer.max(worst)
        if not bool(worst <= math.exp(cap - 1.0)):
            return None
    local_value = xp.sum(neg_terms)
    loss = local_value if reducer is None else reducer.sum(local_value)
    zero = xp.zeros((), dtype=e.dtype, device=array_device(e))
    # A valid unit whose summed log ratio was clipped counts as capped, as in the scaled path.
    n_capped = zero if units.capped is None else count_true(xp, units.capped, None, e.dtype)
    if reducer is not None:  # on every shard: another may hold clipped units
        n_capped = reducer.sum(n_capped)
    return loss, unit_grad, {"n_capped": n_capped, "log_scale": zero}


def _plain_peak(
    xp: Namespace,
    neg_c: Array,
    factors: tuple[Array, Array],
    products: tuple[Array, Array],
    n_units: Any,
) -> Array:
    """The largest of ``|h|``, ``w^gamma`` and ``N`` times every term and gradient (``n_units``
    is ``N``), or beyond many units a bound of it, ``max(|h|, w^gamma) max(N max|coef|, 1)``,
    from reductions rather than copies. NaN wherever a factor or product is NaN; an overflow
    gives ``inf``."""
    e, h = factors
    if not is_large(e):
        neg_terms, unit_grad = products
        return xp.max(xp.abs(xp.stack([h, e, neg_terms * n_units, unit_grad * n_units])))
    factor_peak = xp.maximum(xp.max(xp.abs(h)), xp.max(e))  # e > 0: no array of max(|h|, e)
    return factor_peak * xp.maximum(xp.max(xp.abs(neg_c)) * n_units, 1.0)


def _plain_factors(
    xp: Namespace, units: Units, unit_g: Array, positive: bool
) -> tuple[Array, Array]:
    """``(w^gamma, h)`` of every unit by the plain formulas (``unit_g`` broadcasts to the
    units; ``positive``: every gamma is known to be positive). A zero weight (``l = -inf``)
    needs ``gamma > 0`` for ``z = gamma l``: eagerly one host read of it, where the units may
    hold one and the options do not say. Whatever overflows here fails the caller's check."""
    log_w = units.log_w
    # Without a zero weight g l is plain; with one it needs g > 0 (-inf at weight 0).
    positive = positive or (not units.finite and bool(xp.all(unit_g > 0)))
    with quiet_overflow(xp):
        if units.finite or positive:
            z = unit_g * log_w
        else:
            finite = log_w > -xp.inf
            z = xp.where(finite, unit_g * xp.where(finite, log_w, 0.0), -xp.inf)
        e = xp.exp(z)
        if units.log_p is not None:  # the REINFORCE form: w^g log pi
            return e, e * xp.where(units.valid, units.log_p, 0.0)
        if positive:
            return e, xp.expm1(z) / _full(xp, unit_g, z)
        g_pos = unit_g > 0  # gamma = 0: h is the log weight itself
        den = xp.where(g_pos, unit_g, 1.0)
        return e, xp.where(g_pos, xp.expm1(z) / _full(xp, den, z), log_w)


def _full(xp: Namespace, divisor: Array, like: Array) -> Array:
    """``divisor`` broadcast to ``like``'s shape under JAX, as it is elsewhere (where a division
    by it is correctly rounded already): XLA turns a division by a broadcast value into a
    product with its reciprocal, which is not."""
    if not is_jax_namespace(xp):
        return divisor
    return xp.broadcast_to(divisor, tuple(like.shape))


def _scaled_loss_and_grad(
    xp: Namespace, units: Units, unit_g: Array, coef: Array, reducer: Reducer | None, cap: float
) -> tuple[Array, Array, dict[str, Array]]:
    """The general path of :func:`unit_loss_and_grad`: log-space terms, one common scale."""
    logs = _log_terms(xp, units, unit_g, coef, cap)
    scale, n_capped = _common_scale(xp, logs, units, reducer, cap)
    unit_grad = _unit_gradient(xp, logs, scale, cap)
    neg_terms = _unit_terms(xp, logs, scale, cap)
    if units.bad is not None:
        nan = xp.asarray(xp.nan, dtype=neg_terms.dtype, device=array_device(neg_terms))
        neg_terms = xp.where(units.bad, nan, neg_terms)
        unit_grad = xp.where(units.bad, nan, unit_grad)
    local_value = xp.sum(neg_terms)
    loss = local_value if reducer is None else reducer.sum(local_value)
    return loss, unit_grad, {"n_capped": n_capped, "log_scale": scale}


class _LogTerms(NamedTuple):
    """The factors of the unit terms ``-coef h`` and gradients ``-coef w^gamma``.

    ``z = gamma l`` (clipped to ``+-max/4``, ``-inf`` at weight 0); ``neg_c = -coef`` (``+0``
    on invalid units and at ``coef = 0``) and its sign ``sign_c``; ``log_c = log|coef|``,
    ``log_value = log|coef h|`` and ``log_term``, the larger of it and ``log|coef| + z``
    (``-inf`` for units that take no part in the scale);
    ``fits``: ``h`` is representable (and ``coef != 0``); ``num / den`` is ``h`` there
    (``den = 1`` for the REINFORCE form) and ``num`` has the sign of ``h`` everywhere.
    """

    z: Array
    neg_c: Array
    sign_c: Array
    log_c: Array
    log_value: Array
    log_term: Array
    fits: Array
    num: Array
    den: Array | None


def _log_terms(xp: Namespace, units: Units, unit_g: Array, coef: Array, cap: float) -> _LogTerms:
    """The log-space factors of every unit, with ``log|coef|`` and ``z = gamma l`` formed once;
    ``h`` is formed directly where it fits the narrower dtype (``cap``)."""
    neg_c = 0.0 - coef  # 0 at invalid units (unit_loss); 0 - x: +0 (not -0) at coef = 0
    nonzero = neg_c != 0  # log_abs written out: its mask serves `fits` below
    log_c = xp.where(nonzero, xp.log(xp.abs(xp.where(nonzero, neg_c, 1.0))), -xp.inf)
    finite = units.log_w > -xp.inf
    l0 = xp.where(finite, units.log_w, 0.0)
    # Exponents beyond a quarter of the largest float are weights e^(+-1e37) or more: clip
    # them there, so that no difference below can overflow.
    quarter = float(xp.finfo(l0.dtype).max) / 4.0
    z = xp.where(finite, xp.clip(unit_g * l0, -quarter, quarter), -xp.inf)
    top = _log_max(xp, z.dtype)  # exp of anything up to it is finite in the compute dtype
    if units.log_p is None:
        log_h, num, den = _boxcox_logs(xp, units.log_w, l0, unit_g, z, top)
        fits = (log_h <= cap) & nonzero
    else:
        big = float(xp.finfo(z.dtype).max)  # a sum of log-probabilities may overflow: clip it
        log_p = xp.clip(xp.where(units.valid, units.log_p, 0.0), -big, big)
        log_h, num, den = z + log_abs(xp, log_p), log_p, None  # w = 0: log_h = -inf, term 0
        fits = (log_h <= cap) & (z <= cap) & nonzero
    log_value = log_c + log_h
    log_term = xp.maximum(log_c + z, log_value)
    if units.bad is not None:
        log_term = xp.where(units.bad, -xp.inf, log_term)
    sign_c = sign(xp, neg_c)
    return _LogTerms(z, neg_c, sign_c, log_c, log_value, log_term, fits, num, den)


def _boxcox_logs(
    xp: Namespace, l: Array, l0: Array, g: Array, z: Array, top: float
) -> tuple[Array, Array, Array]:
    """``(log|h|, num, den)`` of the Box-Cox value ``h = num / den``: ``expm1(z) / g``, and
    ``l / 1`` at ``g = 0`` (``-inf`` at weight 0: an infinite term, which gets ``log|h| =
    -inf`` so that it takes no part in the scale; with ``g > 0`` weight 0 gives ``-1/g``)."""
    g_pos = g > 0
    den = xp.where(g_pos, g, 1.0)
    em = xp.expm1(xp.minimum(z, top))
    # log|expm1(z)| is z beyond top (e^-top is below eps), log|em| up to it.
    log_h = log_abs(xp, xp.where(g_pos, em, l0)) + xp.maximum(z - top, 0.0) - xp.log(den)
    return log_h, xp.where(g_pos, em, l), _full(xp, den, z)


def _common_scale(
    xp: Namespace, logs: _LogTerms, units: Units, reducer: Reducer | None, cap: float
) -> tuple[Array, Array]:
    """``s``, the common log scale of every term and gradient over every shard (0 where nothing
    overflows), and ``n_capped``."""
    worst = xp.max(logs.log_term)
    n_terms = count_true(xp, logs.log_term > -xp.inf, None, worst.dtype)
    if reducer is not None:  # one scale for the whole batch: the loss is one sum
        worst, n_terms = reducer.max(worst), reducer.sum(n_terms)
    bound = cap - xp.log(xp.maximum(n_terms, 1.0))  # each term below max / K
    scale = xp.maximum(worst - bound, 0.0)  # 0 without any term (worst = -inf)
    over = logs.log_term > bound
    n_capped = xp.sum(xp.astype(over if units.capped is None else over | units.capped, worst.dtype))
    if reducer is not None:
        n_capped = reducer.sum(n_capped)
    return scale, n_capped


def _unit_gradient(xp: Namespace, logs: _LogTerms, scale: Array, cap: float) -> Array:
    """``-coef e^(z - s)``: the plain product where it and ``e^(z - s)`` are provably finite,
    else ``sign(-coef) e^(log|coef| + z - s)`` (one ``exp`` for both). ``log|coef| + (z - s)``
    is accurate where it matters (``z - s`` is exact near the top), unlike the rounded
    ``log|coef| + z`` of a huge ``z``, so the product never overflows by a rounding."""
    shifted = logs.z - scale
    log_grad = logs.log_c + shifted
    direct = xp.maximum(shifted, log_grad) <= cap
    factor = xp.where(direct, logs.neg_c, logs.sign_c)
    exponent = xp.where(direct, shifted, xp.minimum(log_grad, cap))
    return factor * xp.exp(exponent)


def _unit_terms(xp: Namespace, logs: _LogTerms, scale: Array, cap: float) -> Array:
    """The negated value terms ``-coef h e^-s``: the plain product where ``h`` is
    representable, else formed from ``log|coef h|``."""
    num = xp.where(logs.fits, logs.num, 0.0)
    if logs.den is None:  # REINFORCE: h = w^gamma log pi
        h = xp.exp(xp.minimum(logs.z, cap)) * num
    else:
        h = num / logs.den
    # An infinite value (l = -inf at gamma = 0) stays infinite: inf e^-s would be NaN at e^-s = 0.
    plain = logs.neg_c * (h * xp.where(xp.isinf(h), 1.0, xp.exp(-scale)))
    magnitude = xp.exp(xp.minimum(logs.log_value - scale, cap))
    return xp.where(logs.fits, plain, logs.sign_c * xp.copysign(magnitude, logs.num))


# --------------------------------------------------------------------------------------------
# Stage 3: the gradient scatter.
# --------------------------------------------------------------------------------------------


class UnitGradient(NamedTuple):
    """The loss's gradient before its scatter to the tokens (``gradient="units"`` of
    :func:`is_reshape_loss_and_grad`): ``unit_grad``, ``d loss / d l_u`` of every unit (``(B,)``,
    or ``(B, T)`` at the token level), and what :func:`token_gradient` needs to scatter it:
    ``n_tok`` (valid tokens per sequence), the boolean ``mask`` ``(B, T)``, the ``level`` and
    ``one_d`` (``logp`` was ``(B,)``)."""

    unit_grad: Array
    n_tok: Array
    mask: Array
    level: str
    one_d: bool


def token_gradient(grad: UnitGradient, scale: Array | None = None) -> Array:
    """``d loss / d logp_bt`` (times ``scale``, a cotangent, where given) from the unit gradients:
    ``d l_u / d logp_bt`` is 1 (token, sequence) or ``1 / n_b`` (geometric). Masked tokens get
    exactly 0 whatever ``scale`` is (a where after the product: no ``inf * 0`` can arise).

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core.extend import UnitGradient, token_gradient
    >>> mask = np.array([[True, True, False], [True, False, False]])
    >>> g = UnitGradient(np.array([0.5, -2.0]), np.array([2.0, 1.0]), mask, "geometric", False)
    >>> print(token_gradient(g, np.asarray(2.0)))  # 2 * unit gradient / n_b on valid tokens
    [[ 0.5  0.5  0. ]
     [-4.   0.   0. ]]
    """
    unit_grad, n_tok, mask, level, one_d = grad
    xp = namespace(unit_grad, n_tok, mask)
    if scale is not None:
        unit_grad = scale * unit_grad
    if level == "geometric":
        unit_grad = unit_grad / xp.where(n_tok > 0, n_tok, 1.0)
    out = xp.where(mask, unit_grad if level == "token" else unit_grad[:, None], 0.0)
    return out[:, 0] if one_d else out
