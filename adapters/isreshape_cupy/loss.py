"""The IS Reshape loss for CuPy: fused token passes, gamma and metrics from the core.

On CuPy arrays at the ``"sequence"`` and ``"geometric"`` levels the tokens are read twice, by the
fused kernels of :mod:`isreshape_cupy.kernels`: one reduction kernel for the per-sequence
statistics (masked sums of ``logp - logq``, of ``logp`` and of the rewards, token counts, NaN
counts), one elementwise kernel for the gradient. Everything in between works on the ``B``
sequence log weights and is done by :func:`isreshape_core.is_reshape_loss_and_grad` itself
(gamma selection, metrics, the loss value, ``d loss / d l_b``): the adapter hands the core the
per-sequence problem, so it re-implements none of the math. Any other array (NumPy, torch, JAX,
array-api-strict), and the ``"token"`` level, goes straight to the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import isreshape_core
from isreshape_core._lib.namespace import Array
from isreshape_core._lib.tracing import is_concrete
from isreshape_core._loss import check_loss_arguments, prepare_loss_inputs

from . import kernels

__all__ = ["is_reshape_loss_and_grad"]

_LEVELS = ("sequence", "geometric", "token")
_FUSED_LEVELS = ("sequence", "geometric")


def _is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked by type name: CuPy need not be importable)."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "shape")


def _check_choice(value: Any, name: str, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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
    fused: bool | None = None,
    **gamma_options: Any,
) -> tuple[Array, Array, dict[str, Array]]:
    r"""The IS Reshape loss, its exact gradient with respect to ``logp``, and metrics.

    The same loss as :func:`isreshape_core.is_reshape_loss_and_grad` and as
    ``isreshape_torch.is_reshape_loss`` (:ref:`theory-objective`): with the
    unit log weights ``l_u`` (a sequence's summed or mean token log-ratio, or one token's), a
    per-token reward ``r_bt`` and verl's aggregation coefficients ``c_bt``,

    .. math::

        \text{loss} = -\sum_{b,t} c_{bt}\, r_{bt}\,
        \frac{\operatorname{expm1}(\gamma l_{u(b,t)})}{\gamma}, \qquad
        \frac{\partial\,\text{loss}}{\partial\,\text{logp}_{bt}}
        = -\sum_{t'} c_{bt'} r_{bt'}\, w_u^{\gamma}\,
        \frac{\partial l_u}{\partial\,\text{logp}_{bt}},

    with ``gamma`` chosen from the detached unit weights and held fixed in the gradient (the
    ``"reinforce"`` form ``-sum c r stop_grad(w^gamma) log pi_u`` has the same gradient). There is
    no autograd in CuPy: the gradient is returned, to be chained by hand (for example
    ``grad_logp`` times the Jacobian of ``logp`` in a custom backward).

    On CuPy arrays at the sequence and geometric levels the token-level work runs as two fused
    kernels (``fused=None`` or ``True``): per-sequence masked sums in one pass, the gradient in a
    second; gamma, the metrics and the loss value are the core's, computed on the ``B`` sequence
    log weights. Elsewhere (``fused=None`` or ``False``) the core runs on the arrays as given.

    Parameters
    ----------
    logp, logq : array (B, T) or (B,)
        Token (or sequence) log-probabilities under the trained and the behaviour policy.
        Half precision is computed in float32.
    rewards : array (B,) or (B, T)
        Rewards or advantages (signed allowed), per sequence or per token. Required.
    mask : bool array broadcastable to (B, T), optional
        Valid (response) tokens.
    gamma : {"ess", "closed_form", "psis", "tail", "combined"}, float or array
        How to choose gamma (:func:`isreshape_core.select_gamma`), a fixed value in [0, 1], or a
        precomputed gamma array of the inputs' library (0-d, ``(B,)``, or ``(B, T)`` at the
        token level; e.g. from :func:`isreshape_core.step_gamma`), used as is.
    rho_min : float
        Target ESS ratio, in (0, 1].
    level : {"sequence", "geometric", "token"}
    loss_agg_mode : str
        One of ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``,
        ``"seq-mean-token-sum-norm"`` (verl's aggregation modes; the last divides by
        ``loss_scale_factor``, default ``T``).
    form : {"objective", "reinforce"}
    group_size : int, optional
        GRPO groups of ``G`` consecutive responses: one gamma per group (``B % G == 0``).
    loss_scale_factor : float, optional
        The divisor of ``seq-mean-token-sum-norm``.
    fused : bool, optional
        ``None`` (default): the fused kernels for CuPy arrays at the sequence and geometric
        levels, the core otherwise. ``True`` requires CuPy arrays and a fused level; ``False``
        always runs the core (the generic path, for comparisons).
    **gamma_options
        Passed to :func:`isreshape_core.select_gamma` (``gamma_min``, ``gamma_max``, ...).

    Returns
    -------
    loss : 0-d array
    grad_logp : array, the shape of ``logp``
        ``d loss / d logp`` in the compute dtype (float32, or float64 for float64 inputs); 0 on
        masked tokens.
    metrics : dict of 0-d arrays
        ``gamma``, ``sigma2``, ``ess_ratio``, ``ess_ratio_at_1``, ``max_weight`` (and ``k_hat``
        for the Pareto methods), as in the core.

    Examples
    --------
    NumPy arrays take the core's path; CuPy arrays on a GPU give the same numbers.

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
    _check_choice(level, "level", _LEVELS)
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    on_cupy = _is_cupy_array(logp)
    if fused is None:
        fused = on_cupy and level in _FUSED_LEVELS
    options = dict(
        gamma=gamma,
        rho_min=rho_min,
        level=level,
        loss_agg_mode=loss_agg_mode,
        form=form,
        group_size=group_size,
        loss_scale_factor=loss_scale_factor,
        **gamma_options,
    )
    if not fused:
        return isreshape_core.is_reshape_loss_and_grad(logp, logq, rewards, mask, **options)
    if not on_cupy:
        raise TypeError(
            f"fused=True needs CuPy arrays (the kernels are CUDA), got {type(logp).__name__}; "
            "pass fused=None or False for other arrays"
        )
    if level not in _FUSED_LEVELS:
        raise ValueError(
            f"fused=True supports level in {_FUSED_LEVELS}, got {level!r}: at the token level "
            "gamma is chosen over every token, so the core runs it; pass fused=None or False"
        )
    return _fused_loss_and_grad(
        logp,
        logq,
        rewards,
        mask,
        row_stats=kernels.row_stats_cupy,
        token_grad=kernels.token_grad_cupy,
        **options,
    )


def _fused_loss_and_grad(
    logp: Array,
    logq: Array,
    rewards: Array,
    mask: Array | None,
    *,
    row_stats: Callable[..., dict[str, Array]],
    token_grad: Callable[[Array, Array, tuple], Array],
    gamma: str | float,
    rho_min: float,
    level: str,
    loss_agg_mode: str,
    form: str,
    group_size: int | None,
    loss_scale_factor: float | None,
    **gamma_options: Any,
) -> tuple[Array, Array, dict[str, Array]]:
    """The fused path, written against the array API with the two token passes injected.

    ``row_stats(logp, logq, rewards, mask, geometric, out_dtype)`` and
    ``token_grad(mask, scale, shape)`` are the CuPy kernels on a GPU and their NumPy mirrors
    (``kernels._reference_*``) in the CPU tests.
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

    # rewards stay (B, 1) for per-sequence rewards: the kernel broadcasts them along the tokens.
    xp, logp, logq, r, mask, one_d = prepare_loss_inputs(logp, logq, rewards, mask)
    dtype = logp.dtype
    B, T = logp.shape

    if is_concrete(logq) and bool(xp.any(mask & (logq == xp.inf))):
        raise ValueError(
            "logq contains +inf at a valid position (a log-probability above 0 cannot be); "
            "check the behaviour policy's log-probabilities, or use `mask` to drop the token"
        )

    # --- pass 1 over the tokens: per-sequence statistics --------------------------------------
    stats = row_stats(logp, logq, r, mask, level == "geometric", dtype)
    if is_concrete(stats["bad_l"]):
        if bool(xp.any(stats["bad_l"] > 0)):
            raise ValueError(
                "logp - logq contains NaN or +inf; log weights must be finite or -inf (weight 0). "
                "Check logp/logq for NaN or use `mask` to drop those samples."
            )
        if bool(xp.any(stats["bad_r"] > 0)):
            raise ValueError("rewards contain NaN or inf; rewards must be finite")
    n_tok = stats["n_tok"]
    unit_valid = n_tok > 0
    n_safe = xp.where(unit_valid, n_tok, 1.0)

    # --- verl's aggregation, per sequence: c_bt = mask_bt * a_b, so coef_b = a_b sum_t m r ----
    if loss_agg_mode == "token-mean":
        total = xp.sum(n_tok)
        a = 1.0 / xp.where(total > 0, total, 1.0)
    elif loss_agg_mode == "seq-mean-token-sum":
        a = 1.0 / (B * 1.0)
    elif loss_agg_mode == "seq-mean-token-mean":
        a = 1.0 / (n_safe * (B * 1.0))
    else:
        a = 1.0 / (float(T) if loss_scale_factor is None else float(loss_scale_factor))
    coef = a * stats["sum_r"]

    # --- the core on the B sequence log weights: gamma, metrics, value, d loss / d l_b --------
    # One "token" per sequence, coefficient 1 (sum-norm with factor 1), reward coef_b: the
    # core's loss is then -sum_b coef_b h_gamma(l_b), its gradient -coef_b w_b^gamma.
    unit_l = stats["unit_l"]
    value, unit_grad, metrics = isreshape_core.is_reshape_loss_and_grad(
        unit_l,
        xp.zeros_like(unit_l),
        coef,
        unit_valid,
        gamma=gamma,
        rho_min=rho_min,
        level="sequence",
        loss_agg_mode="seq-mean-token-sum-norm",
        form="objective",
        group_size=group_size,
        loss_scale_factor=1.0,
        **gamma_options,
    )
    if form == "reinforce":
        # -sum_b coef_b stop_grad(w_b^gamma) logp_b, and -coef_b w_b^gamma is unit_grad.
        value = xp.sum(unit_grad * xp.where(unit_valid, stats["unit_logp"], 0.0))

    # --- pass 2 over the tokens: the gradient ------------------------------------------------
    scale = unit_grad if level == "sequence" else unit_grad / n_safe
    grad = token_grad(mask, scale[:, None], (B, T))
    if one_d:
        grad = grad[:, 0]
    return value, grad, metrics
