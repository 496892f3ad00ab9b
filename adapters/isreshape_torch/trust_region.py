"""Decoupled PPO with an ESS-controlled behaviour correction, for PyTorch.

The math lives in :func:`isreshape_core.decoupled_ppo_loss_and_grad`; this module calls it on
detached tensors and attaches its exact gradient with respect to ``logp`` through the same
``torch.autograd.Function`` as :func:`isreshape_torch.is_reshape_loss`. See the docs page *When
to use IS Reshape*.
"""

from __future__ import annotations

from typing import Any

import torch

from isreshape_core import decoupled_ppo_loss_and_grad

from .loss import exact_gradient_loss

__all__ = ["decoupled_ppo_loss"]


def decoupled_ppo_loss(
    logp: torch.Tensor,
    logp_prox: torch.Tensor,
    logq: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    distributed: Any = "auto",
    scale_by_world_size: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Decoupled PPO-clip on ``pi/pi_prox`` times an ESS-controlled correction of ``pi_prox/mu``.

    .. math::

        \text{loss} = \sum_{b,t} c_{bt}\, b_u\, \max\big(-A\rho_u,\ -A\,
        \mathrm{clip}(\rho_u, 1-\epsilon_l, 1+\epsilon_h)\big), \qquad
        b_u = (\pi_{prox}/\mu)_u^{\gamma}\ \text{or}\ \min((\pi_{prox}/\mu)_u, c)

    with ``gamma`` (or the cap ``c``) chosen so that the ESS of the corrections of the batch (of
    all ranks) meets ``rho_min``; see :func:`isreshape_core.decoupled_ppo_loss_and_grad` for the
    options (``behaviour``, ``gamma``, ``cap``, ``rho_min``, ``clip_ratio``, ``clip_ratio_low``,
    ``clip_ratio_high``, ``level``, ``loss_agg_mode``, ``loss_scale_factor``,
    ``log_ratio_clamp``). **Only** ``logp`` carries gradient; the proximal and the behaviour
    log-probabilities, the advantages and the correction are data. ``distributed`` and
    ``scale_by_world_size`` as in :func:`isreshape_torch.is_reshape_loss`.

    Parameters
    ----------
    logp, logp_prox, logq : Tensor (B, T) or (B,)
        Trained policy (with gradient), proximal policy (verl's ``old_log_prob``), behaviour
        policy (``rollout_log_probs``).
    advantages : Tensor (B,) or (B, T)
    mask : bool Tensor (B, T), optional

    Returns
    -------
    loss : 0-d Tensor
    metrics : dict of 0-d detached Tensors
        ``clip_fraction``, ``ess_ratio``, ``ess_ratio_at_1``, ``max_weight``, and
        ``behaviour_gamma`` or ``behaviour_log_cap``.

    Examples
    --------
    >>> import torch
    >>> logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    >>> logq = torch.log(torch.tensor([[0.25, 0.5]], dtype=torch.float64))
    >>> loss, m = decoupled_ppo_loss(logp, logp.detach(), logq, torch.tensor([1.0]).double(),
    ...                              gamma=1.0)
    >>> loss.backward()
    >>> print(round(loss.item(), 4), logp.grad.tolist())  # -(2 + 1)/2; -c b A
    -1.5 [[-1.0, -0.5]]
    """
    data = {"logp_prox": logp_prox, "logq": logq, "advantages": advantages, "mask": mask}
    hints = {
        "logp_prox": "(B, T) or (B,), like logp",
        "logq": "(B, T) or (B,), like logp",
        "advantages": "(B,) or (B, T)",
    }
    return exact_gradient_loss(
        decoupled_ppo_loss_and_grad, logp, data, hints, distributed, scale_by_world_size, options
    )
