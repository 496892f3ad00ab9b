"""The IS Reshape objective ``L_gamma`` and its derivatives (:ref:`theory-objective`).

``L_gamma = mean(r * expm1(gamma * l) / gamma)`` with ``l = log w = logp - logq``. It equals the
paper's ``(E[w**gamma r] - E[r]) / gamma`` (its section 2.5) and is continuous at ``gamma = 0``,
where it is ``mean(r * l)``. Its derivative with respect to ``l`` is exactly ``r * w**gamma`` for
every ``gamma`` in ``[0, 1]`` (the paper's Theorem 2.1), so no ``1/gamma`` appears in any gradient.

The core exposes values and derivatives only; the adapters register the derivatives with their
autograd and detach ``gamma`` and the REINFORCE weights ``w**gamma``.
"""

from __future__ import annotations

from typing import Any, Literal

from ._lib.checks import check_gamma, check_real_floating
from ._lib.inputs import broadcast_rewards, prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device, namespace
from ._lib.numerics import expm1_capped as _expm1_capped
from ._lib.numerics import log_abs, logsumexp, safe_sum, tempered_log_weights
from ._lib.reduce import sample_count
from ._lib.rows import row_param as _per_row
from ._lib.saturate import divide_or_inf, exp_factors, times_exp, times_factors, times_or_inf
from ._lib.tracing import is_concrete

__all__ = [
    "objective",
    "objective_grad",
    "reinforce_objective",
    "reinforce_objective_grad",
]

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: Any) -> None:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS!r}, got {reduction!r}; use 'mean' for the "
            "loss, 'sum' for a sum along axis, 'none' for the elementwise terms"
        )


def _prepare(
    log_w: Array,
    rewards: Array,
    gamma: Any,
    axis: int,
    mask: Array | None,
    reduction: Any,
) -> tuple[Namespace, Array, Array, Array, Array | None, int]:
    """Validate the common arguments; returns ``(xp, l, r, g, mask, axis)``.

    ``l`` is ``-inf`` and ``r`` is 0 on masked samples; ``g`` is expanded at ``axis``.
    """
    _check_reduction(reduction)
    if rewards is None:
        raise TypeError(
            "rewards are required (there is no r = 1 default, which would silently train pure "
            "SFT); pass an array of rewards or advantages broadcastable to log_w"
        )
    check_gamma(gamma)
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    if hasattr(rewards, "shape"):
        namespace(l, rewards)  # one namespace for all arrays (TypeError otherwise)
    r = broadcast_rewards(xp, rewards, l)
    if mask is not None:
        r = xp.where(mask, r, 0.0)
    g = _per_row(xp, gamma, axis, l, "gamma")
    return xp, l, r, g, mask, axis


def _traced_poison(xp: Namespace, l: Array, r: Array, value: Array) -> Array:
    """Traced only (eager inputs raise): NaN at the samples whose log weight is NaN or ``+inf``
    or whose reward is NaN or inf, so that a reduction over them is NaN too, never a plausible
    finite number (``0 * inf`` would be 0 here)."""
    if is_concrete(l):
        return value
    bad = xp.isnan(l) | (l == xp.inf) | xp.isnan(r) | (xp.abs(r) == xp.inf)
    return xp.where(bad, xp.nan, value)


def _times_nonzero(xp: Namespace, r: Array, value: Array) -> Array:
    """``r * value`` with ``0 * (+-inf) = 0``: a sample of reward 0 contributes 0; ``+-inf``
    (no overflow warning) where the product is out of range."""
    return times_or_inf(xp, r, xp.where(r == 0, 0.0, value))


def _reduce(
    xp: Namespace,
    terms: Array,
    log_abs_terms: Array,
    l: Array,
    mask: Array | None,
    axis: int,
    reduction: str,
) -> Array:
    """The terms, their sum or their mean along ``axis``, finite for every finite input.

    ``log_abs_terms`` is ``log|term|`` computed in log space (finite where a term is finite in
    exact arithmetic, ``+inf`` where it is infinite by definition). Where the plain result is
    finite it is returned as is; where a term or the sum overflows, the result is formed in
    log space (positive and negative terms apart) and saturates at ``+-max_float``.
    """
    exact_inf = ~(log_abs_terms < xp.inf) & (terms != 0)  # infinite by definition, or NaN
    if reduction == "none":  # a term that overflowed on the way is taken from its logarithm
        from_log, _ = times_exp(xp, sign(xp, terms), log_abs_terms)
        return xp.where(exact_inf | xp.isfinite(terms), terms, from_log)
    finite = xp.isfinite(terms)
    total = safe_sum(xp, xp.where(finite, terms, 0.0), axis=axis)
    n = sample_count(xp, l, mask, axis)
    n_safe = xp.where(n > 0, n, 1.0)
    plain = total if reduction == "sum" else total / n_safe
    log_n = xp.zeros_like(total) if reduction == "sum" else xp.log(n_safe)
    sign_s, log_s = _signed_exp_sum(xp, terms, xp.where(exact_inf, -xp.inf, log_abs_terms), axis)
    saturated, _ = times_exp(xp, sign_s, log_s - log_n)
    fits = xp.isfinite(total) & xp.all(finite, axis=axis)
    return xp.where(xp.any(exact_inf, axis=axis), _sum_of_infinite(xp, terms, exact_inf, axis),
                    xp.where(fits, plain, saturated))  # fmt: skip


def _sum_of_infinite(xp: Namespace, terms: Array, exact_inf: Array, axis: int) -> Array:
    """The sum of terms among which some are infinite by definition (or NaN): ``+-inf``, or
    NaN for a NaN or for ``+inf`` and ``-inf`` together."""
    pos = xp.any(exact_inf & (terms > 0), axis=axis)
    neg = xp.any(exact_inf & (terms < 0), axis=axis)
    nan = xp.any(xp.isnan(terms), axis=axis) | (pos & neg)
    inf = xp.asarray(xp.inf, dtype=terms.dtype, device=array_device(terms))
    return xp.where(nan, xp.nan, xp.where(pos, inf, -inf))


def _signed_exp_sum(xp: Namespace, terms: Array, log_abs: Array, axis: int) -> tuple:
    """``(sign, log|sum|)`` of the terms along ``axis`` from their signs and ``log|term|``:
    ``log(e^P - e^N)`` with ``P``, ``N`` the log-sum-exps of the positive and negative terms."""
    pos = logsumexp(xp, xp.where(terms > 0, log_abs, -xp.inf), axis)
    neg = logsumexp(xp, xp.where(terms < 0, log_abs, -xp.inf), axis)
    hi, lo = xp.maximum(pos, neg), xp.minimum(pos, neg)
    any_term = hi > -xp.inf
    ratio = xp.exp(xp.where(any_term, lo - xp.where(any_term, hi, 0.0), -xp.inf))  # in [0, 1]
    cancels = ratio >= 1.0
    log_mag = hi + xp.log1p(-xp.where(cancels, 0.0, ratio))
    sign_s = xp.astype(pos >= neg, terms.dtype) * 2.0 - 1.0
    return sign_s, xp.where(cancels | ~any_term, -xp.inf, log_mag)


def _log_abs_boxcox_terms(xp: Namespace, l: Array, r: Array, g: Array) -> Array:
    """``log|r expm1(g l) / g|`` in log space (see :func:`objective`'s limits)."""
    finite = l != -xp.inf
    l0 = xp.where(finite, l, 0.0)
    g_pos = g > 0
    log_h = log_abs_boxcox(xp, l0, g, g * l0)
    log_h = xp.where(finite, log_h, xp.where(g_pos, -xp.log(xp.where(g_pos, g, 1.0)), xp.inf))
    return log_abs(xp, r) + xp.where(r == 0, 0.0, log_h)  # r = 0: the term is 0


def sign(xp: Namespace, x: Array) -> Array:
    """-1, 0 or 1; NaN at NaN (0 under torch), where every caller's result is NaN anyway."""
    return xp.sign(x)


def boxcox(xp: Namespace, l: Array, g: Array) -> Array:
    """The Box-Cox value ``expm1(g l) / g`` elementwise, with its limits: ``l`` at ``g = 0``,
    ``-1/g`` at ``l = -inf`` (``-inf`` where that overflows), ``+inf`` where the value overflows.

    The one implementation of the value, used by :func:`objective` on log weights and by the
    loss on unit log weights; :func:`log_abs_boxcox` is its logarithm where it overflows.
    """
    finite = l != -xp.inf
    l0 = xp.where(finite, l, 0.0)
    positive = g > 0
    g_safe = xp.where(positive, g, 1.0)
    # gamma > 0: expm1(g*l)/g (no cancellation: expm1 is accurate near 0); l = -inf gives -1/g,
    # which is -inf (without an overflow warning) for a subnormal gamma below 1/max.
    value = divide_or_inf(xp, _expm1_capped(xp, g * l0), g_safe)
    in_range = g_safe * float(xp.finfo(l.dtype).max) >= 1.0  # finfo: dtype metadata, not data
    at_zero_w = -1.0 / xp.where(in_range, g_safe, 1.0)
    value = xp.where(finite, value, xp.where(in_range, at_zero_w, -xp.inf))
    # gamma = 0: the limit l (``-inf`` stays ``-inf``).
    return xp.where(positive, value, l)


def log_abs_boxcox(xp: Namespace, l: Array, g: Array, z: Array) -> Array:
    """``log|expm1(g l) / g|`` (``log|l|`` at ``g = 0``) for finite ``l``, ``z = g l``, exact
    where the value itself overflows: ``z + log(1 - e^-z)`` for ``z > 0``."""
    positive = z > 0
    zs = xp.where(positive, -z, z)  # <= 0: expm1 cannot overflow
    log_e = xp.where(positive, z, 0.0) + log_abs(xp, xp.expm1(zs))
    g_pos = g > 0
    return xp.where(g_pos, log_e - xp.log(xp.where(g_pos, g, 1.0)), log_abs(xp, l))


def _boxcox_terms(xp: Namespace, l: Array, r: Array, g: Array) -> Array:
    """Elementwise ``r * expm1(g*l)/g`` with its limits (see :func:`objective`)."""
    return _times_nonzero(xp, r, boxcox(xp, l, g))


def _tempered_reward(xp: Namespace, l: Array, r: Array, g: Array) -> Array:
    """Elementwise ``r * w**g`` (``w**0 = 1`` for finite ``l``, 0 for ``l = -inf``) as in
    :func:`objective_grad`, but ``+-inf`` where that saturates: a factor of the REINFORCE
    terms, which are then formed in log space (a saturated factor times ``logp`` is wrong)."""
    value, capped = times_exp(xp, r, tempered_log_weights(xp, l, g))
    inf = xp.full_like(value, xp.inf)
    return xp.where(capped, xp.where(value > 0, inf, -inf), value)


def _gradient(
    xp: Namespace,
    l: Array,
    r: Array,
    g: Array,
    mask: Array | None,
    axis: int,
    reduction: str,
    poison_l: Array,
) -> Array:
    """``r w**g`` (``/ n`` for ``"mean"``) saturating at ``+-max_float`` (see
    :func:`objective_grad`); traced NaN where ``poison_l`` or ``r`` is not finite."""
    factors = exp_factors(xp, tempered_log_weights(xp, l, g))
    grad, capped = times_factors(xp, r, factors)
    if reduction == "mean":
        n = sample_count(xp, l, mask, axis)
        n = xp.expand_dims(xp.where(n > 0, n, 1.0), axis=axis)
        per_n, _ = times_factors(xp, r / n, factors)  # in range where r w**g may not be
        grad = xp.where(capped, per_n, grad / n)
    return _traced_poison(xp, poison_l, r, grad)


# --------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------


def objective(
    log_w: Array,
    rewards: Array,
    gamma: Any,
    *,
    axis: int = -1,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    r"""The IS Reshape objective ``L_gamma`` (to maximise; the loss is ``-L_gamma``).

    .. math::

        L_\gamma = \frac{1}{n}\sum_i r_i\,\frac{\operatorname{expm1}(\gamma l_i)}{\gamma}
        = \frac{1}{\gamma}\Big(\frac{1}{n}\sum_i w_i^\gamma r_i - \frac{1}{n}\sum_i r_i\Big),
        \qquad L_0 = \frac{1}{n}\sum_i r_i l_i ,

    with ``l = log w``. The Box-Cox form is continuous at ``gamma = 0`` (reward-weighted SFT up
    to a constant), ``gamma = 1`` gives ``mean(r (w - 1))`` (importance-sampled policy gradient
    up to a constant), and ``d L / d l_i = r_i w_i**gamma / n`` for every ``gamma`` in ``[0, 1]``
    (see :func:`objective_grad`).

    Limits, elementwise: a sample with ``r = 0`` contributes 0, also where ``l = -inf``; with
    ``gamma > 0`` a sample with ``l = -inf`` contributes ``-r/gamma``; with ``gamma = 0`` it
    contributes ``-inf * sign(r)`` (the log-likelihood of a sample the policy cannot produce).
    Numerical safety: for every finite input the value is finite, with no floating-point
    warning. Where every factor, term and the sum fit the dtype it is the plain formula, bit
    for bit. A term whose factor overflows (``gamma * l`` beyond ``log`` of the largest float,
    88.7 in float32) although the term may not (a small reward) is taken from its logarithm,
    within about ``|log r| + |gamma l|`` times eps relative. Where a term or the sum is out of
    range, the sum is formed in log space, positive and negative terms apart, so that huge
    terms of both signs cancel (to about eps of the largest, not to the small remainder), and
    saturates at ``+-finfo(dtype).max`` with the sign of the exact value, the rule of
    :func:`objective_grad` (:ref:`numerical-safety`). Terms that are infinite by definition
    (``l = -inf`` at ``gamma = 0``) stay infinite, and ``+inf`` with ``-inf`` among them is NaN.

    Parameters
    ----------
    log_w : array ``(..., n, ...)``
        Log importance weights ``logp - logq``; ``-inf`` is weight 0. NaN and ``+inf`` raise
        (eager inputs). Half precision is computed in float32.
    rewards : array broadcastable to ``log_w.shape``
        Rewards or signed advantages; required (there is no ``r = 1`` default). NaN and inf raise
        (eager inputs).
    gamma : float or array broadcastable to the batch shape (``log_w.shape`` without ``axis``)
        Reshaping exponent in ``[0, 1]``, e.g. one per GRPO group for ``log_w`` of shape
        ``(groups, G)``. Treated as a constant (adapters detach it).
    axis : int
        The sample axis; the other axes are batch axes.
    mask : bool array broadcastable to ``log_w.shape``, optional
        False removes a sample: its term is 0 and it does not count in ``n``.
    reduction : {"mean", "sum", "none"}
        ``"mean"``: the masked mean along ``axis`` (``L_gamma``); ``"sum"``: the masked sum;
        ``"none"``: the elementwise terms (masked entries 0).

    Returns
    -------
    array
        The batch shape for ``"mean"`` and ``"sum"``, ``log_w.shape`` for ``"none"``, in the
        compute dtype. A row without any unmasked sample gives 0 for ``"mean"``.

    References
    ----------
    :ref:`theory-objective`; the paper's section 2.5 (``L_gamma``, Theorem 2.1); the Box-Cox
    transform ``(w**gamma - 1)/gamma`` (Box & Cox, 1964).

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([0.5, 1.0, 2.0]))
    >>> r = np.array([1.0, -1.0, 2.0])
    >>> print(np.round(objective(l, r, 1.0), 4))  # mean(r * (w - 1))
    0.5
    >>> print(np.round(objective(l, r, 0.0), 4))  # mean(r * l) = log(2) / 3
    0.231
    >>> print(np.round(objective(l, r, 1e-9), 4))  # continuous at gamma = 0
    0.231
    >>> w = np.array([0.25, 2.25, 4.0])
    >>> print(np.round(objective(np.log(w), r, 0.5, reduction="none"), 4))  # r (sqrt(w) - 1) / 0.5
    [-1. -1.  4.]
    """
    xp, l, r, g, mask, axis = _prepare(log_w, rewards, gamma, axis, mask, reduction)
    terms = _traced_poison(xp, l, r, _boxcox_terms(xp, l, r, g))
    log_abs_terms = _log_abs_boxcox_terms(xp, l, r, g)
    return _reduce(xp, terms, log_abs_terms, l, mask, axis, reduction)


def objective_grad(
    log_w: Array,
    rewards: Array,
    gamma: Any,
    *,
    axis: int = -1,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    r"""Derivative of :func:`objective` with respect to ``log_w``.

    .. math::

        \frac{\partial L_\gamma}{\partial l_i} = \frac{r_i\, w_i^\gamma}{n}
        \quad(\text{"mean"}), \qquad r_i\, w_i^\gamma \quad(\text{"sum"}, \text{"none"}),

    exact for every ``gamma`` in ``[0, 1]``, computed as ``r * exp(gamma * l)`` (no
    ``1/gamma``). At ``gamma = 0``, ``w**0`` is 1 for finite ``l`` and 0 for ``l = -inf`` or a
    masked sample (``0**0`` is not 1 here). With ``"none"`` each entry is the derivative of its
    own term. Chain rule for the policy: ``d l / d logp = 1``, so the policy gradient is
    ``mean(r w**gamma grad log pi)`` (the paper's Theorem 2.1).

    Saturation: for every finite input every entry is finite, with no floating-point warning.
    Where ``w**gamma`` is a normal float and the product fits, an entry is the plain
    ``r * exp(gamma l)`` (``/ n``), bit for bit. Where ``w**gamma`` alone overflows (``gamma l``
    above ``log`` of the largest float, 88.7 in float32) but ``r w**gamma`` fits, as with a
    small reward, or where ``w**gamma`` is subnormal and the product is not, the product is
    formed from two (four) factors ``exp(gamma l / 2)`` (``/ 4``), within 2 (4) ulp of the exact
    value plus the error of the backend's ``exp``. Where the exact value is out of range (or
    within 2 ulp of the largest float), the entry saturates at ``sign(r) * finfo(dtype).max``,
    the rule of :func:`objective` and :func:`reinforce_objective`; ``"mean"`` divides by ``n``
    first, so ``r w**gamma / n`` does not saturate wherever it fits. The saturated entries are
    those equal to ``+-finfo(dtype).max``; this function returns no count. The loss
    (:func:`is_reshape_loss_and_grad`) never saturates a gradient: it rescales all of them by
    one factor and reports that factor as ``log_scale`` and the units it concerns as
    ``n_capped`` (:ref:`numerical-safety`).

    Parameters
    ----------
    log_w, rewards, gamma, axis, mask, reduction
        As in :func:`objective`.

    Returns
    -------
    array ``log_w.shape``
        The derivative, in the compute dtype; 0 on masked samples and where ``r = 0``.

    References
    ----------
    :ref:`theory-objective`; the paper's Theorem 2.1.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([0.25, 1.0, 4.0]))
    >>> r = np.array([1.0, -1.0, 2.0])
    >>> print(np.round(objective_grad(l, r, 0.5, reduction="sum"), 4))  # r * sqrt(w)
    [ 0.5 -1.   4. ]
    >>> print(np.round(objective_grad(l, r, 0.0), 4))  # r / n
    [ 0.3333 -0.3333  0.6667]
    """
    xp, l, r, g, mask, axis = _prepare(log_w, rewards, gamma, axis, mask, reduction)
    return _gradient(xp, l, r, g, mask, axis, reduction, l)


def _prepare_logp(xp: Namespace, logp: Array, l: Array, mask: Array | None) -> Array:
    if not hasattr(logp, "shape"):
        raise TypeError(f"logp must be an array, got {type(logp).__name__}")
    namespace(l, logp)
    if tuple(logp.shape) != tuple(l.shape):
        raise ValueError(
            f"logp of shape {tuple(logp.shape)} must have log_w's shape {tuple(l.shape)}: one "
            "log-probability per importance weight"
        )
    check_real_floating(xp, logp, "logp")
    lp = xp.astype(logp, l.dtype) if logp.dtype != l.dtype else logp
    if mask is not None:
        lp = xp.where(mask, lp, 0.0)
    if is_concrete(lp) and bool(xp.any(xp.isnan(lp) | (lp == xp.inf))):
        raise ValueError(
            "logp contains NaN or +inf; log-probabilities must be finite or -inf. Use `mask` "
            "to drop those samples."
        )
    return lp


def reinforce_objective(
    log_w: Array,
    logp: Array,
    rewards: Array,
    gamma: Any,
    *,
    axis: int = -1,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    r"""The REINFORCE form of the objective: ``mean(w**gamma * r * logp)``.

    .. math::

        L^{\mathrm{RF}}_\gamma = \frac{1}{n}\sum_i \mathrm{sg}\big(w_i^\gamma\big)\, r_i \log p_i

    where ``sg`` is a stop-gradient. The core has no stop-gradient: it returns the value and
    :func:`reinforce_objective_grad`, the derivative with respect to ``logp`` with ``w**gamma``
    held constant; the adapters detach ``w**gamma`` (and ``gamma``). Its gradient equals that
    of :func:`objective` because ``d l / d logp = 1`` (``l = logp - logq``); its value does not
    equal ``L_gamma`` (:ref:`theory-objective`; the paper's section 2.6, form B).

    A term is 0 where ``w**gamma = 0`` (``l = -inf`` or masked), where ``r = 0`` or where
    ``logp = 0``; elsewhere ``logp = -inf`` gives ``-inf * sign(r)``. For every finite input
    the value is finite, with no floating-point warning: the factor ``r w**gamma`` is that of
    :func:`reinforce_objective_grad`, and a term or sum that overflows is formed from its
    logarithm and saturates at ``+-finfo(dtype).max`` as in :func:`objective`.

    Parameters
    ----------
    log_w, rewards, gamma, axis, mask, reduction
        As in :func:`objective`.
    logp : array ``log_w.shape``
        Log-probabilities of the samples under the trained policy; NaN and ``+inf`` raise
        (eager inputs).

    Returns
    -------
    array
        The batch shape for ``"mean"`` and ``"sum"``, ``log_w.shape`` for ``"none"``.

    References
    ----------
    :ref:`theory-objective`; the paper's section 2.6 (form B); Williams (1992) REINFORCE.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([0.25, 1.0, 4.0]))
    >>> logp = np.array([-1.0, -2.0, -0.5])
    >>> r = np.array([1.0, -1.0, 2.0])
    >>> print(np.round(reinforce_objective(l, logp, r, 0.5, reduction="none"), 4))
    [-0.5  2.  -2. ]
    """
    xp, l, r, g, mask, axis = _prepare(log_w, rewards, gamma, axis, mask, reduction)
    lp = _prepare_logp(xp, logp, l, mask)
    coef = _tempered_reward(xp, l, r, g)
    # 0 * (-inf) and inf * 0 both count as 0: a term with a zero factor contributes nothing.
    lp_safe = xp.where(coef == 0, 0.0, lp)
    coef_safe = xp.where(lp_safe == 0, 0.0, coef)
    terms = times_or_inf(xp, coef_safe, lp_safe)
    terms = _traced_poison(xp, l + xp.where(lp == -xp.inf, 0.0, lp), r, terms)
    log_w_g = tempered_log_weights(xp, l, g)
    zero = (log_w_g == -xp.inf) | (r == 0)  # the term is 0 whatever logp is
    log_abs_terms = log_abs(xp, r) + log_w_g + xp.where(zero, 0.0, log_abs(xp, lp))
    return _reduce(xp, terms, log_abs_terms, l, mask, axis, reduction)


def reinforce_objective_grad(
    log_w: Array,
    logp: Array,
    rewards: Array,
    gamma: Any,
    *,
    axis: int = -1,
    mask: Array | None = None,
    reduction: Reduction = "mean",
) -> Array:
    r"""Derivative of :func:`reinforce_objective` with respect to ``logp``, ``w**gamma`` held fixed.

    .. math::

        \frac{\partial L^{\mathrm{RF}}_\gamma}{\partial \log p_i} = \frac{r_i\, w_i^\gamma}{n}
        \quad(\text{"mean"}), \qquad r_i\, w_i^\gamma \quad(\text{"sum"}, \text{"none"}),

    identical to :func:`objective_grad` (``d l / d logp = 1``), saturation included: finite
    for every finite input, ``+-finfo(dtype).max`` where the exact value is out of range.
    ``logp`` is validated but does not enter the value.

    Parameters
    ----------
    log_w, logp, rewards, gamma, axis, mask, reduction
        As in :func:`reinforce_objective`.

    Returns
    -------
    array ``log_w.shape``
        The derivative, in the compute dtype; 0 on masked samples.

    References
    ----------
    :ref:`theory-objective`; the paper's Theorem 2.1 and section 2.6.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([0.25, 1.0, 4.0]))
    >>> logp = np.array([-1.0, -2.0, -0.5])
    >>> r = np.array([1.0, -1.0, 2.0])
    >>> print(np.round(reinforce_objective_grad(l, logp, r, 0.5, reduction="sum"), 4))
    [ 0.5 -1.   4. ]
    """
    xp, l, r, g, mask, axis = _prepare(log_w, rewards, gamma, axis, mask, reduction)
    lp = _prepare_logp(xp, logp, l, mask)
    return _gradient(xp, l, r, g, mask, axis, reduction, l + xp.where(lp == -xp.inf, 0.0, lp))
