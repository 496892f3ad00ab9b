"""Importance log weights ``l = log pi - log mu`` at the sequence, geometric and token levels."""

from __future__ import annotations

from typing import Literal

from ._array import Array, as_compute_array, broadcast_mask, check_log_weights, namespace

__all__ = ["LEVELS", "log_weights"]

LEVELS = ("sequence", "geometric", "token")

Level = Literal["sequence", "geometric", "token"]


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
        On mismatched shapes, an unknown ``level``, or NaN / ``+inf`` log ratios at valid
        positions (eager inputs only).

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
    for name, value in (("logp", logp), ("logq", logq)):
        if not hasattr(value, "shape"):
            raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    if tuple(logp.shape) != tuple(logq.shape):
        raise ValueError(
            f"logp and logq must have the same shape, got {tuple(logp.shape)} and "
            f"{tuple(logq.shape)}"
        )
    xp = namespace(logp, logq, mask)
    logp = as_compute_array(xp, logp)
    logq = as_compute_array(xp, logq, logp.dtype)
    mask = broadcast_mask(xp, mask, logp.shape)
    if mask is not None:
        # Padded positions may hold anything (even -inf - -inf = NaN): remove them first.
        logp = xp.where(mask, logp, 0.0)
        logq = xp.where(mask, logq, 0.0)
    diff = logp - logq
    check_log_weights(xp, diff, "logp - logq")
    if logp.ndim <= 1 or level == "token":
        return diff
    total = xp.sum(diff, axis=-1)
    if level == "sequence":
        return total
    if mask is None:
        return total / logp.shape[-1]
    count = xp.sum(xp.astype(mask, diff.dtype), axis=-1)
    return total / xp.where(count > 0, count, 1.0)
