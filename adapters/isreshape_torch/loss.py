"""The IS Reshape loss for PyTorch: the core's value and derivative wired into autograd.

The math lives in :func:`isreshape_core.is_reshape_loss_and_grad`; this module calls it on
detached inputs and attaches its exact gradient with respect to ``logp`` through a
``torch.autograd.Function``. Nothing here pulls a value to the host, so the
loss compiles with ``torch.compile(fullgraph=True)`` and runs under ``torch.func.grad`` and
``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.autograd.function import once_differentiable

from isreshape_core import (
    GAMMA_METHODS,
    LEVELS,
    LOSS_AGG_MODES,
    LOSS_FORMS,
    is_reshape_loss_and_grad,
)

from .distributed import resolve_reducer

__all__ = ["ISReshapeLoss", "is_reshape_loss"]


class _AttachGradient(torch.autograd.Function):
    """``loss`` as a function of ``logp`` whose derivative is the precomputed ``grad_logp``.

    ``loss`` and ``grad_logp`` come from the core on the detached ``logp``; the forward returns
    the value, the backward ``grad_output * grad_logp`` in ``logp``'s dtype. ``setup_context``
    (no ``ctx`` in ``forward``) and ``generate_vmap_rule`` make it usable by ``torch.func``
    transforms. First-order only: the derivative is a constant of the graph, so a second
    derivative would be silently zero; ``once_differentiable`` makes it an error instead.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logp: torch.Tensor, loss: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        logp, _, grad_logp = inputs
        ctx.save_for_backward(grad_logp)
        ctx.logp_dtype = logp.dtype

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (grad_logp,) = ctx.saved_tensors
        return (grad_output * grad_logp).to(ctx.logp_dtype), None, None


def _check_tensor(value: Any, name: str, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        extra = " (rewards are required: there is no r = 1 default)" if name == "rewards" else ""
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {shape_hint}, got "
            f"{type(value).__name__}{extra}"
        )


def is_reshape_loss(
    logp: torch.Tensor,
    logq: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: str | float = "ess",
    rho_min: float = 0.3,
    level: Literal["sequence", "geometric", "token"] = "sequence",
    loss_agg_mode: str = "token-mean",
    form: Literal["objective", "reinforce"] = "objective",
    group_size: int | None = None,
    loss_scale_factor: float | None = None,
    distributed: Any = "auto",
    scale_by_world_size: bool = False,
    **gamma_options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The IS Reshape loss ``-L_gamma`` with its exact gradient, and 0-d metrics.

    With unit log weights ``l_u = log pi/mu`` (per sequence, geometric mean per token, or per
    token: ``level``), rewards ``r`` and verl's aggregation coefficients ``c`` (``loss_agg_mode``),

    .. math::

        \text{loss} = -\sum_{b,t} c_{bt}\, r_{bt}\, \frac{\operatorname{expm1}(\gamma\, l_u)}
        {\gamma}, \qquad
        \frac{\partial\,\text{loss}}{\partial \log\pi_{bt}} =
        -\sum_{t'} c_{bt'}\, r_{bt'}\, w_u^{\gamma}\, \frac{\partial l_u}{\partial \log\pi_{bt}}

    (``form="objective"``, the Box-Cox form of :ref:`theory-objective`; ``gamma = 0`` is the limit
    ``-sum c r l_u``, reward-weighted SFT). ``form="reinforce"`` is
    ``-sum c r stop_grad(w_u^gamma) log pi_u``, with the same gradient. ``gamma`` is chosen per
    batch (or per GRPO group) from the *detached* log weights (default: the largest gamma whose
    ESS ratio is at least ``rho_min``) and carries no gradient. The gradient is the core's exact
    derivative rule ``r w^gamma`` (:ref:`theory-objective`), registered in a
    ``torch.autograd.Function``: no ``1/gamma``, exact at ``gamma = 0``.

    **Only** ``logp`` **carries gradient**: ``logq``, ``rewards`` and ``mask`` are detached and
    treated as constants (the behaviour policy and the advantages are data), and so is gamma.
    The gradient is first order (a second derivative raises an error).

    Parameters
    ----------
    logp : Tensor (B, T) or (B,), floating
        Token (or sequence) log-probabilities of the trained policy. float16/bfloat16 (as a model
        returns them) are computed in float32; the gradient reaching ``logp`` has its dtype.
    logq : Tensor, the shape of ``logp``
        Behaviour (rollout / inference engine / old policy) log-probabilities.
    rewards : Tensor (B,) or (B, T)
        Rewards or advantages (signed allowed), per sequence or per token. Required.
    mask : bool Tensor (B, T), optional
        Valid (response) tokens; a 0/1 float mask must be converted (``mask > 0``).
    gamma : {"ess", "closed_form", ...}, float in [0, 1] or Tensor
        How to choose gamma (:func:`isreshape_core.select_gamma`), a fixed value, or a
        precomputed gamma Tensor on ``logp``'s device (0-d, ``(B,)``, or ``(B, T)`` at the token
        level), e.g. the optimizer step's gamma from :func:`isreshape_core.step_gamma`; it is
        detached and used as is (see :func:`isreshape_core.is_reshape_loss_and_grad`).
    rho_min : float in (0, 1]
        Least acceptable ESS ratio.
    level : {"sequence", "geometric", "token"}
    loss_agg_mode : str
        One of ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``,
        ``"seq-mean-token-sum-norm"`` (verl's aggregation modes; the last divides by
        ``loss_scale_factor``, default ``T``).
    form : {"objective", "reinforce"}
    group_size : int, optional
        One gamma per group of ``G`` consecutive responses (GRPO); ``B % G == 0``.
    loss_scale_factor : float, optional
        The constant divisor of ``seq-mean-token-sum-norm``.
    distributed : "auto", bool, ProcessGroup or Reducer
        ``"auto"`` (default): when ``torch.distributed`` is initialised with several ranks, gamma,
        the statistics and the normalisers (token or sequence counts) are those of the global
        batch of all ranks (partial statistics merged by all-reduce, see
        :class:`TorchDistributedReducer`), so every rank uses the same gamma and returns the same
        loss: the single-process loss of the whole batch. ``False``: rank-local. A
        ``ProcessGroup``: reduce over that group. Every rank must call the loss (collectives).
        With ``group_size``, a group must lie on one rank: gamma is per group, the normalisers
        are still global.
    scale_by_world_size : bool
        Multiply the loss (value and gradient) by the world size. With ``distributed``, the
        returned loss is the *global* loss, and ``backward`` gives each rank the gradient of the
        global loss with respect to its own slice. The gradient of the global loss with respect
        to the parameters is the **sum** over ranks of these contributions, but DDP and FSDP
        **average** gradients over ranks, which divides it by the world size. Pass ``True``
        under DDP/FSDP to undo that (as verl multiplies its globally normalised loss by
        ``dp_size``); the logged value is then ``world_size`` times the loss.
    **gamma_options
        Passed to :func:`isreshape_core.select_gamma` (``gamma_min``, ``gamma_max``,
        ``max_iter``, ...).

    Returns
    -------
    loss : 0-d Tensor
        Float32 for half-precision inputs, else ``logp``'s dtype; on ``logp``'s device.
    metrics : dict of 0-d detached Tensors (never Python floats)
        ``gamma`` (mean over groups), ``sigma2`` (variance of the unit log weights),
        ``ess_ratio`` (at gamma), ``ess_ratio_at_1``, ``max_weight`` (largest normalised unit
        weight), ``k_hat`` where the gamma method computes it.

    References
    ----------
    :ref:`theory-objective`, :ref:`theory-gamma-ess`, :ref:`theory-groups`;
    verl ``core_algos.agg_loss`` for the aggregation modes.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.5]], dtype=torch.float64)
    >>> logp = torch.log(probs).requires_grad_()
    >>> logq = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=torch.float64))
    >>> rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> loss, metrics = is_reshape_loss(logp, logq, rewards, gamma=0.0,
    ...                                 loss_agg_mode="seq-mean-token-sum")
    >>> # each of the 2 tokens of sequence b carries -r_b l_b; sum over tokens, mean over B = 2
    >>> print(np.round(loss.item(), 4))  # -(2 (1)(log 2) + 2 (2)(-log 2)) / 2 = log 2
    0.6931
    >>> loss.backward()
    >>> print(logp.grad.tolist())  # -(T_b / B) r_b w^0 on every token at gamma = 0
    [[-1.0, -1.0], [-2.0, -2.0]]
    >>> print(sorted(metrics))
    ['ess_ratio', 'ess_ratio_at_1', 'gamma', 'max_weight', 'sigma2']
    """
    _check_tensor(logp, "logp", "(B, T) or (B,)")
    _check_tensor(logq, "logq", "(B, T) or (B,), like logp")
    _check_tensor(rewards, "rewards", "(B,) or (B, T)")
    if mask is not None:
        _check_tensor(mask, "mask", "(B, T), boolean")
    if not logp.dtype.is_floating_point:
        raise TypeError(f"logp must have a floating dtype to carry gradient, got {logp.dtype}")
    if hasattr(gamma, "shape"):
        _check_tensor(gamma, "gamma", "() or (B,) (a precomputed gamma)")
        gamma = gamma.detach()
    tensors = (("logq", logq), ("rewards", rewards), ("mask", mask))
    for name, value in (*tensors, ("gamma", gamma if hasattr(gamma, "shape") else None)):
        if value is not None and value.device != logp.device:
            raise ValueError(
                f"{name} is on {value.device} but logp is on {logp.device}; move every input "
                "to logp's device"
            )
    if not isinstance(scale_by_world_size, bool):
        raise TypeError(f"scale_by_world_size must be a bool, got {scale_by_world_size!r}")
    reducer, world = resolve_reducer(distributed, logp.device)
    if scale_by_world_size and world is None:
        raise ValueError(
            "scale_by_world_size=True needs a known world size: pass distributed='auto', True or "
            "a ProcessGroup rather than a custom reducer"
        )
    loss, grad_logp, metrics = is_reshape_loss_and_grad(
        logp.detach(),
        logq.detach(),
        rewards.detach(),
        None if mask is None else mask.detach(),
        gamma=gamma,
        rho_min=rho_min,
        level=level,
        loss_agg_mode=loss_agg_mode,
        form=form,
        group_size=group_size,
        loss_scale_factor=loss_scale_factor,
        reducer=reducer,
        **gamma_options,
    )
    if scale_by_world_size and world != 1:
        loss = loss * world
        grad_logp = grad_logp * world
    return _AttachGradient.apply(logp, loss, grad_logp), metrics


class ISReshapeLoss(torch.nn.Module):
    """:func:`is_reshape_loss` as an ``nn.Module``: the options fixed at construction.

    ``forward(logp, logq, rewards, mask=None)`` returns ``(loss, metrics)``; see
    :func:`is_reshape_loss` for the formula, the shapes, the options and the treatment of
    ``torch.distributed`` (only ``logp`` carries gradient). The module has no parameters or
    buffers. Reference: :ref:`theory-objective`.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> criterion = ISReshapeLoss(gamma=0.5, level="token")
    >>> logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    >>> logq = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    >>> loss, metrics = criterion(logp, logq, torch.tensor([1.0], dtype=torch.float64))
    >>> l = np.array([0.5, -1.0])  # -mean(expm1(0.5 l) / 0.5)
    >>> print(np.round(loss.item(), 4), np.round(-np.mean(np.expm1(0.5 * l) / 0.5), 4))
    0.1094 0.1094
    >>> print(metrics["gamma"].dtype, metrics["gamma"].tolist())
    torch.float64 0.5
    """

    def __init__(
        self,
        *,
        gamma: str | float = "ess",
        rho_min: float = 0.3,
        level: Literal["sequence", "geometric", "token"] = "sequence",
        loss_agg_mode: str = "token-mean",
        form: Literal["objective", "reinforce"] = "objective",
        group_size: int | None = None,
        loss_scale_factor: float | None = None,
        distributed: Any = "auto",
        scale_by_world_size: bool = False,
        **gamma_options: Any,
    ) -> None:
        super().__init__()
        # Fail at construction for a misspelt choice; the core validates the rest on call.
        for name, value, choices in (
            ("level", level, LEVELS),
            ("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES),
            ("form", form, LOSS_FORMS),
        ):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if isinstance(gamma, str) and gamma not in GAMMA_METHODS:
            raise ValueError(
                f"gamma must be one of {GAMMA_METHODS} or a number in [0, 1], got {gamma!r}"
            )
        self.options: dict[str, Any] = {
            "gamma": gamma,
            "rho_min": rho_min,
            "level": level,
            "loss_agg_mode": loss_agg_mode,
            "form": form,
            "group_size": group_size,
            "loss_scale_factor": loss_scale_factor,
            "distributed": distributed,
            "scale_by_world_size": scale_by_world_size,
            **gamma_options,
        }

    def forward(
        self,
        logp: torch.Tensor,
        logq: torch.Tensor,
        rewards: torch.Tensor,
        mask: torch.Tensor | None = None,
        gamma: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``is_reshape_loss(logp, logq, rewards, mask, **options)``; a ``gamma`` Tensor given
        here (the step's gamma) replaces the configured gamma for this call."""
        if gamma is None:
            return is_reshape_loss(logp, logq, rewards, mask, **self.options)
        return is_reshape_loss(logp, logq, rewards, mask, **{**self.options, "gamma": gamma})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
