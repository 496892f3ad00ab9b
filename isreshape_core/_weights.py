"""Importance log weights ``l = log pi - log mu`` at the sequence, geometric and token levels."""

from __future__ import annotations

import math
from typing import Any, Literal

from ._lib.checks import (
    check_gamma,
    check_log_weights,
    check_mask_type,
    check_real_floating,
    check_same_shape,
)
from ._lib.dtypes import as_compute_array
from ._lib.dtypes import log_max as _log_max
from ._lib.inputs import broadcast_mask
from ._lib.namespace import Array, Namespace, namespace
from ._lib.numerics import safe_sum, tempered_log_weights
from ._lib.reduce import count_true
from ._lib.tracing import is_concrete

__all__ = ["LEVELS", "log_weights", "tempered_weights"]

LEVELS = ("sequence", "geometric", "token")

Level = Literal["sequence", "geometric", "token"]


def check_logq(xp: Namespace, logq: Array) -> bool:
    """Refuse ``logq = +inf`` (a probability above 1, padding already removed) on eager inputs;
    ``False`` where ``logq`` is traced and nothing can raise (the caller makes those NaN)."""
    # One max-reduction: +inf is the largest value (a NaN is left to the log ratio's check).
    if not is_concrete(logq) or math.prod(tuple(logq.shape)) == 0:
        return is_concrete(logq)
    refused = xp.max(logq) == xp.inf
    if not is_concrete(refused):
        return False
    if bool(refused):
        raise ValueError(
            "logq contains +inf at a valid position (a log-probability above 0 cannot be); "
            "check the behaviour policy's log-probabilities, or use `mask` to drop the token"
        )
    return True


def checked_log_ratio(xp: Namespace, logp: Array, logq: Array, *, check: bool = True) -> Array:
    """``logp - logq`` (padding already removed) with the checks of :func:`log_weights`.

    ``logq = +inf`` claims a probability above 1: it is refused (eager) or made NaN (traced),
    never the weight 0 that ``logp - inf`` would silently give. ``check=False`` leaves the
    NaN / ``+inf`` check of the difference to the caller (which takes it on row maxima).
    """
    if check_logq(xp, logq):
        diff = logp - logq
    else:
        diff = xp.where(logq == xp.inf, xp.nan, logp - logq)
    if check:
        check_log_weights(xp, diff, "logp - logq")
    return diff


def log_weights(
    logp: Array, logq: Array, mask: Array | None = None, *, level: Level = "sequence"
) -> Array:
    r"""Log importance weights ``l = log pi_theta - log mu`` of sampled sequences or tokens.

    With token log-probabilities ``logp``, ``logq`` and a validity ``mask`` of shape ``(..., T)``
    (tokens along the last axis):

    - ``"sequence"``: :math:`l_b = \sum_t m_{bt} (\log p_{bt} - \log q_{bt})`, shape ``(...)``;
    - ``"geometric"``: :math:`l_b = \sum_t m_{bt}(\log p_{bt} - \log q_{bt}) / \sum_t m_{bt}`
      (the GSPO-style per-token geometric mean), shape ``(...)``;
    - ``"token"``: :math:`l_{bt} = \log p_{bt} - \log q_{bt}`, shape ``(..., T)``, one per token.

    Padded positions (``mask`` false) never enter a sum and are 0 in the token-level
    output; pass the same ``mask`` to the reductions (:func:`ess`, :func:`gamma_ess`, ...) so that
    they are not counted. A sequence with no valid token gets ``l = 0``; drop it downstream with
    ``mask=any(mask, axis=-1)``. For sequence-level inputs of shape ``(B,)`` every level is the
    plain difference ``logp - logq``.

    Parameters
    ----------
    logp, logq : array, same shape ``(..., T)`` or ``(B,)``
        Log-probabilities of the sampled tokens under the trained policy and the behaviour policy.
        Half-precision inputs are promoted to float32 before the subtraction.
    mask : bool array broadcastable to ``logp.shape``, optional
        True for valid (response) tokens.
    level : {"sequence", "geometric", "token"}

    Returns
    -------
    array
        The log weights, float32 or float64, in the namespace of the inputs (:ref:`theory-levels`).

    Raises
    ------
    ValueError
        On mismatched shapes, an unknown ``level``, or at a valid position a NaN or ``+inf``
        log ratio or a ``logq = +inf`` (a probability above 1, which would otherwise be a
        silent weight 0); eager inputs only. Traced (``jax.jit``, ``torch.compile``), where
        nothing can raise, such a position gives NaN (and so does its sequence's sum).
    TypeError
        For bool, integer or complex ``logp`` / ``logq`` (convert them explicitly).

    Examples
    --------
    >>> import numpy as np
    >>> logp = np.log(np.array([[0.5, 0.25, 0.9], [0.2, 0.2, 0.2]]))
    >>> logq = np.log(np.array([[0.25, 0.25, 0.1], [0.4, 0.1, 0.5]]))
    >>> mask = np.array([[True, True, False], [True, True, True]])
    >>> print(np.round(log_weights(logp, logq, mask, level="sequence"), 4))
    [ 0.6931 -0.9163]
    >>> print(np.round(log_weights(logp, logq, mask, level="geometric"), 4))
    [ 0.3466 -0.3054]
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    check_same_shape({"logp": logp, "logq": logq})
    check_mask_type(mask)
    xp = namespace(logp, logq, mask)
    check_real_floating(xp, logp, "logp")
    check_real_floating(xp, logq, "logq")
    logp = as_compute_array(xp, logp)
    logq = as_compute_array(xp, logq, logp.dtype)
    mask = broadcast_mask(xp, mask, logp.shape)
    if mask is not None:
        # Padded positions may hold anything (even -inf - -inf = NaN): remove them first.
        logp = xp.where(mask, logp, 0.0)
        logq = xp.where(mask, logq, 0.0)
    diff = checked_log_ratio(xp, logp, logq)
    if logp.ndim <= 1:
        return diff
    if mask is None:
        count = xp.sum(xp.ones_like(diff), axis=-1)
    else:
        count = count_true(xp, mask, -1, diff.dtype)
    return unit_log_weights(xp, diff, count, level)


def unit_log_weights(xp: Namespace, token_l: Array, n_tok: Array, level: str) -> Array:
    """Unit log weights from token log ratios ``token_l`` (``(..., T)``, 0 at padding) and the
    valid-token counts ``n_tok`` (``(...)``): the tokens themselves, their sum, or their mean.

    A sum is ``+-inf`` only where it is out of range; the mean is then taken term by term, so a
    geometric mean of finite tokens is always finite. Also used on token log-probabilities (the
    unit log-probability of the REINFORCE form).
    """
    if level == "token":
        return token_l
    total = safe_sum(xp, token_l, axis=-1)  # +-inf only where out of range
    if level == "sequence":
        return total
    n_safe = xp.where(n_tok > 0, n_tok, 1.0)
    per_token = safe_sum(xp, token_l / n_safe[..., None], axis=-1)
    return xp.where(xp.isinf(total), per_token, total / n_safe)


def tempered_weights(log_w: Array, gamma: Any, *, mask: Array | None = None) -> Array:
    r"""Tempered importance weights :math:`w^\gamma = \exp(\gamma l)`, finite for every input.

    The behaviour correction of decoupled PPO with IS Reshape: verl, AReaL and TRL multiply their
    trust-region loss by a correction ``pi_old / mu`` truncated at a fixed cap; tempering it by a
    gamma chosen from the ESS of the step (:func:`step_gamma`) bounds its variance instead. The
    exponent ``gamma * l`` is capped a little below ``log(finfo(dtype).max)`` (about 88.7 in
    float32, 709.8 in float64), so the result is finite; the value is exact wherever
    ``w^gamma`` is representable. ``-inf`` log weights and masked entries give 0 (``0^0`` is 0
    here: a sample of weight 0 never counts).

    Parameters
    ----------
    log_w : array
        Log importance weights ``l`` (e.g. ``log_weights(old_logp, rollout_logp, mask)``).
    gamma : float or array broadcastable to ``log_w``, in [0, 1]
        Exponent, e.g. the per-unit gamma of :func:`step_gamma`.
    mask : bool array broadcastable to ``log_w``, optional
        Valid entries; the others give 0.

    Returns
    -------
    array, ``log_w``'s shape, float32 or float64
        ``w^gamma``, carrying no information about ``gamma``'s gradient (treat it as data).

    Examples
    --------
    >>> import numpy as np
    >>> print(tempered_weights(np.log(np.array([4.0, 0.25, 1.0])), 0.5))
    [2.  0.5 1. ]
    >>> w = tempered_weights(np.array([1000.0, -np.inf]), 1.0)  # capped, and weight 0
    >>> print(np.isfinite(w), w[0] > 1e308, w[1])
    [ True  True] True 0.0
    """
    if not hasattr(log_w, "shape"):
        raise TypeError(f"log_w must be an array, got {type(log_w).__name__}")
    check_gamma(gamma, "gamma")
    check_mask_type(mask)
    xp = namespace(log_w, mask)
    check_real_floating(xp, log_w)
    l = as_compute_array(xp, log_w)
    mask = broadcast_mask(xp, mask, l.shape)
    if mask is not None:
        l = xp.where(mask, l, -xp.inf)
    check_log_weights(xp, l, "log_w")
    g = as_compute_array(xp, gamma, l.dtype, like=l)
    z = tempered_log_weights(xp, l, g)
    if not is_concrete(l):  # traced: +inf is not capped to a plausible finite weight
        z = xp.where(l == xp.inf, xp.nan, z)
    return xp.exp(xp.minimum(z, _log_max(xp, l.dtype)))
