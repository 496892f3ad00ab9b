"""The IS Reshape loss for PyTorch: the core's value and derivative wired into autograd.

The math lives in :func:`isreshape_core.is_reshape_loss_and_grad`; this module calls it on
detached inputs and attaches its exact gradient with respect to ``logp`` through a
``torch.autograd.Function``. Nothing here pulls a value to the host, so the
loss compiles with ``torch.compile(fullgraph=True)`` and runs under ``torch.func.grad`` and
``torch.func.vmap``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from isreshape_core import is_reshape_loss_and_grad
from isreshape_core.extend import UnitGradient, check_loss_options, is_array, token_gradient

from .distributed import resolve_reducer

__all__ = ["ISReshapeLoss", "is_reshape_loss"]


_SECOND_ORDER_MESSAGE = (
    "is_reshape_loss is first-order only: its gradient with respect to logp is computed by the "
    "core and enters the graph as a constant, so a second derivative (backward with "
    "create_graph=True followed by another backward, torch.autograd.grad of a gradient, "
    "torch.func.hessian) would be silently wrong; differentiate the loss once"
)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a gradient, whose own derivative raises :data:`_SECOND_ORDER_MESSAGE`.

    ``anchor`` (``logp``) only makes the output require grad, so that a second backward reaches
    this node whether or not the incoming ``grad_output`` requires grad."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return grad.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple:
        raise RuntimeError(_SECOND_ORDER_MESSAGE)


class _AttachGradient(torch.autograd.Function):
    """``loss`` as a function of ``logp`` whose derivative is the precomputed gradient.

    ``loss`` and the gradient come from the core on the detached ``logp``: either the
    ``logp``-shaped ``grad_logp``, or (``level`` given) the unit gradients ``grad_logp`` with
    the ``n_tok`` and ``mask`` of a :class:`~isreshape_core.extend.UnitGradient`, which the
    backward scatters to the tokens (:func:`~isreshape_core.extend.token_gradient`) after the
    product with ``grad_output``: a sequence-level loss keeps a ``(B,)`` array between the
    passes and writes the tokens' gradient once. The forward returns the value, the backward
    ``grad_output * d loss / d logp`` in ``logp``'s dtype. ``setup_context`` (no ``ctx`` in
    ``forward``) and ``generate_vmap_rule`` make it usable by ``torch.func`` transforms.
    First-order only: the derivative is a constant of the graph, so a second derivative would be
    silently zero; it raises a clear error instead (``_FirstOrderOnly``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logp: torch.Tensor,
        loss: torch.Tensor,
        grad_logp: torch.Tensor,
        n_tok: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        level: str | None = None,
        one_d: bool = False,
    ) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        logp, _, grad_logp, n_tok, mask, level, one_d = inputs
        ctx.save_for_backward(grad_logp, logp, n_tok, mask)
        ctx.logp_dtype, ctx.level, ctx.one_d = logp.dtype, level, one_d

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad_logp, logp, n_tok, mask = ctx.saved_tensors
        with torch.no_grad():
            if ctx.level is None:
                grad = grad_output * grad_logp
            else:
                by_unit = UnitGradient(grad_logp, n_tok, mask, ctx.level, ctx.one_d)
                grad = token_gradient(by_unit, grad_output)
            grad = grad.to(ctx.logp_dtype)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            grad = _FirstOrderOnly.apply(grad, logp)
        return grad, None, None, None, None, None, None


# torch's Function.apply binds the arguments to forward's signature on every call where
# setup_context is defined; inspect reads a stored __signature__ instead of building it anew.
_AttachGradient.forward.__signature__ = inspect.signature(_AttachGradient.forward)


def _check_tensor(value: Any, name: str, shape_hint: str) -> None:
    if not isinstance(value, torch.Tensor):
        extra = " (rewards are required: there is no r = 1 default)" if name == "rewards" else ""
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {shape_hint}, got "
            f"{type(value).__name__}{extra}"
        )


def _data(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as data: detached where it is part of a graph (a detach is one more operator, the
    identity on a tensor that requires no gradient)."""
    return x.detach() if x is not None and x.requires_grad else x


def is_reshape_loss(
    logp: torch.Tensor,
    logq: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    distributed: Any = "auto",
    scale_by_world_size: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The IS Reshape loss ``-L_gamma`` with its exact gradient in autograd, and 0-d metrics.

    The loss of :func:`isreshape_core.is_reshape_loss_and_grad` (:ref:`theory-objective`), its
    options (``gamma``, ``rho_min``, ``level``, ``loss_agg_mode``, ``form``, ``group_size``,
    ``loss_scale_factor``, gamma options), shapes and metrics; see there. The core runs on the
    detached tensors and its exact gradient with respect to ``logp`` enters autograd through a
    ``torch.autograd.Function``: **only** ``logp`` carries gradient (``logq``, ``rewards``,
    ``mask`` and a gamma Tensor are data), first order only (a second derivative raises).
    Nothing is pulled to the host: it compiles with ``torch.compile(fullgraph=True)`` and runs
    under ``torch.func.grad`` and ``torch.func.vmap``.

    Parameters
    ----------
    logp, logq, rewards, mask : Tensor
        As in :func:`isreshape_core.is_reshape_loss_and_grad`, on one device; ``logp`` floating
        (half precision is computed in float32; the gradient reaching ``logp`` has its dtype).
    distributed : "auto", bool, ProcessGroup or Reducer
        ``"auto"`` (default): when ``torch.distributed`` is initialised with several ranks, gamma,
        the statistics and the normalisers are those of the global batch of all ranks
        (:class:`TorchDistributedReducer`), so every rank returns the single-process loss of the
        whole batch. ``False``: rank-local. A ``ProcessGroup``: reduce over that group. Every
        rank must call the loss (collectives). With ``group_size``, a group must lie on one rank.
    scale_by_world_size : bool
        Multiply the loss (value and gradient) by the world size: DDP and FSDP **average**
        gradients over ranks, while the gradient of the global loss is their **sum**; pass
        ``True`` under DDP/FSDP (as verl multiplies its globally normalised loss by
        ``dp_size``). The logged value is then ``world_size`` times the loss.
    **options
        The options of :func:`isreshape_core.is_reshape_loss_and_grad`.

    Returns
    -------
    loss : 0-d Tensor
        Float32 for half-precision inputs, else ``logp``'s dtype; on ``logp``'s device.
    metrics : dict of 0-d detached Tensors (never Python floats)
        As in :func:`isreshape_core.is_reshape_loss_and_grad`.

    Examples
    --------
    >>> import torch
    >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.5]], dtype=torch.float64)
    >>> logp = torch.log(probs).requires_grad_()
    >>> logq = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=torch.float64))
    >>> rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> loss, metrics = is_reshape_loss(logp, logq, rewards, gamma=0.0,
    ...                                 loss_agg_mode="seq-mean-token-sum")
    >>> loss.backward()
    >>> print(round(loss.item(), 4), logp.grad.tolist())
    0.6931 [[-1.0, -1.0], [-2.0, -2.0]]
    >>> print(sorted(metrics))  # doctest: +NORMALIZE_WHITESPACE
    ['ess_ratio', 'ess_ratio_at_1', 'gamma', 'log_scale', 'max_weight', 'n_capped',
     'n_nonfinite', 'sigma2']
    """
    data = {"logq": logq, "rewards": rewards, "mask": mask}
    hints = {"logq": "(B, T) or (B,), like logp", "rewards": "(B,) or (B, T)"}
    if "gradient" in options:
        raise TypeError(
            "is_reshape_loss takes no 'gradient' option: autograd computes the gradient (it is "
            "an option of isreshape_core.is_reshape_loss_and_grad)"
        )
    return exact_gradient_loss(
        is_reshape_loss_and_grad,
        logp,
        data,
        hints,
        distributed,
        scale_by_world_size,
        {**options, "gradient": "units"},
    )


def exact_gradient_loss(
    core: Any,
    logp: torch.Tensor,
    data: dict[str, torch.Tensor | None],
    hints: dict[str, str],
    distributed: Any,
    scale_by_world_size: bool,
    options: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``core(logp, *data, reducer=..., **options)`` on detached tensors, its exact gradient
    with respect to ``logp`` attached through :class:`_AttachGradient`: the wiring that the
    IS Reshape loss and decoupled PPO share (``data`` in the core's argument order, ``hints``
    the expected shapes for the error messages)."""
    _check_tensor(logp, "logp", "(B, T) or (B,)")
    for name, value in data.items():
        if value is not None or name != "mask":
            _check_tensor(value, name, hints.get(name, "(B, T), boolean"))
    if not logp.dtype.is_floating_point:
        raise TypeError(f"logp must have a floating dtype to carry gradient, got {logp.dtype}")
    gamma = options.get("gamma")
    if is_array(gamma):
        _check_tensor(gamma, "gamma", "() or (B,) (a precomputed gamma)")
        options["gamma"] = gamma = gamma.detach()
    for name, value in (*data.items(), ("gamma", gamma if is_array(gamma) else None)):
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
    args = (_data(x) for x in data.values())
    loss, grad, metrics = core(logp.detach(), *args, reducer=reducer, **options)
    by_unit = isinstance(grad, UnitGradient)
    grad_logp = grad.unit_grad if by_unit else grad
    if scale_by_world_size and world != 1:
        loss, grad_logp = loss * world, grad_logp * world
    if by_unit:
        scatter = (grad.n_tok, grad.mask, grad.level, grad.one_d)
        return _AttachGradient.apply(logp, loss, grad_logp, *scatter), metrics
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

    def __init__(self, **options: Any) -> None:
        super().__init__()
        check_loss_options(**options)  # a misspelt choice fails at construction
        self.options: dict[str, Any] = options

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
