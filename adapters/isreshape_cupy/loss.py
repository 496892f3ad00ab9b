"""The IS Reshape loss for CuPy: the core's pipeline with its two token passes fused.

:func:`isreshape_core.is_reshape_loss_and_grad` reads the tokens in two stages: the units (the
per-sequence sums of ``logp - logq``, of ``logp`` and of the rewards, the token counts) and the
gradient scatter. On CuPy arrays at the ``"sequence"`` and ``"geometric"`` levels each runs as one
kernel of ``isreshape_cupy.kernels``; the stages in between (gamma, the unit loss, gradient
and metrics) are the core's own functions, on the ``B`` sequences. Any other array (NumPy, torch,
JAX, array-api-strict), and the ``"token"`` level, goes straight to the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import isreshape_core
from isreshape_core.extend import (
    Array,
    array_device,
    check_logq,
    check_loss_arguments,
    prepare_loss_inputs,
    row_coefficients,
    split_loss_options,
    unit_loss,
    units_from_row_sums,
)

from . import kernels

__all__ = ["is_reshape_loss_and_grad"]

_FUSED_LEVELS = ("sequence", "geometric")


def _is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked by type name: CuPy need not be importable)."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "shape")


def is_reshape_loss_and_grad(
    logp: Array,
    logq: Array,
    rewards: Array,
    mask: Array | None = None,
    *,
    fused: bool | None = None,
    **options: Any,
) -> tuple[Array, Array, dict[str, Array]]:
    r"""The IS Reshape loss, its gradient with respect to ``logp``, and metrics, on CuPy.

    The loss, its arguments, shapes and metrics are those of
    :func:`isreshape_core.is_reshape_loss_and_grad` (:ref:`theory-objective`); there is no
    autograd in CuPy, so the gradient is returned, to be chained by hand. On CuPy arrays at the
    sequence and geometric levels the two token passes of the core's pipeline run as fused
    kernels (``isreshape_cupy.kernels``: the per-sequence sums in one pass, the gradient
    scatter in a second); everything in between is the core's, on the ``B`` sequences.

    Parameters
    ----------
    logp, logq, rewards, mask : CuPy or other arrays
        As in :func:`isreshape_core.is_reshape_loss_and_grad`.
    fused : bool, optional
        ``None`` (default): the fused kernels for CuPy arrays at the sequence and geometric
        levels, the core otherwise. ``True`` requires CuPy arrays and a fused level; ``False``
        always runs the core (the generic path, for comparisons).
    **options
        The core's options (``gamma``, ``rho_min``, ``level``, ``loss_agg_mode``, ``form``,
        ``group_size``, ``loss_scale_factor`` and the gamma method's options), as in
        :func:`isreshape_core.is_reshape_loss_and_grad`.

    Returns
    -------
    loss, grad_logp, metrics
        As in :func:`isreshape_core.is_reshape_loss_and_grad`.

    Examples
    --------
    NumPy arrays take the core's path; CuPy arrays on a GPU give the same numbers.

    >>> import numpy as np
    >>> logp = np.log(np.array([[0.5, 0.5], [0.25, 0.5]]))
    >>> logq = np.log(np.array([[0.5, 0.25], [0.5, 0.5]]))
    >>> loss, grad, metrics = is_reshape_loss_and_grad(
    ...     logp, logq, np.array([1.0, 2.0]), gamma=0.0, loss_agg_mode="seq-mean-token-sum")
    >>> print(np.round(loss, 4), grad[1])
    0.6931 [-2. -2.]
    """
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    on_cupy = _is_cupy_array(logp)
    level = options.get("level", "sequence")
    if fused is None:
        fused = on_cupy and level in _FUSED_LEVELS
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
    **options: Any,
) -> tuple[Array, Array, dict[str, Array]]:
    """The core's loss pipeline with its token passes fused: ``row_stats`` (the per-sequence
    sums) and ``token_grad`` (the gradient scatter), injected so that the CPU tests can run
    NumPy mirrors of the kernels."""
    opts, gamma_options = split_loss_options(options)
    check_loss_arguments(logp, logq, rewards, mask=mask, **opts)
    level = opts["level"]
    grad_dtype = logp.dtype
    # rewards stay (B, 1) for per-sequence rewards: the kernel broadcasts them along the tokens.
    xp, logp, logq, r, mask, one_d = prepare_loss_inputs(logp, logq, rewards, mask)
    check_logq(xp, xp.where(mask, logq, 0.0))
    sums = row_stats(logp, logq, r, mask, level == "geometric", logp.dtype)  # token pass 1
    units = units_from_row_sums(xp, sums, opts["form"])
    coef = row_coefficients(xp, sums, logp.shape[1], opts)
    loss, unit_grad, metrics = unit_loss(
        xp, units, coef, grad_dtype, opts["gamma"], opts["rho_min"], opts["group_size"], None,
        gamma_options,
    )  # fmt: skip
    metrics["n_nonfinite"] = xp.zeros((), dtype=loss.dtype, device=array_device(loss))
    if level == "geometric":
        unit_grad = unit_grad / xp.where(units.n_tok > 0, units.n_tok, 1.0)
    grad = token_grad(mask, unit_grad[:, None], tuple(logp.shape))  # token pass 2
    return loss, (grad[:, 0] if one_d else grad), metrics
