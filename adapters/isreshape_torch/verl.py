"""The IS Reshape policy loss for verl (0.9.x): importing this module registers ``is_reshape``.

Tested with verl 0.9.1; supports verl >=0.9,<0.10 (``VERL_SUPPORTED``): with another verl (or
none) the import fails with an ``ImportError`` that names this range.

Usage (verl's PPO/GRPO trainer; options in the actor's policy-loss config)::

    export VERL_USE_EXTERNAL_MODULES=isreshape_torch.verl   # imported by `import verl`
    ISR_CONFIG=isreshape_torch.verl.ISReshapePolicyLossConfig
    python -m verl.trainer.main_ppo ... \\
        algorithm.rollout_correction.bypass_mode=true \\
        actor_rollout_ref.rollout.calculate_log_probs=true \\
        actor_rollout_ref.actor.policy_loss.loss_mode=is_reshape \\
        actor_rollout_ref.actor.policy_loss._target_=$ISR_CONFIG \\
        +actor_rollout_ref.actor.policy_loss.is_reshape_gamma=ess \\
        +actor_rollout_ref.actor.policy_loss.is_reshape_rho_min=0.3 \\
        +actor_rollout_ref.actor.policy_loss.is_reshape_level=sequence

**How the options travel.** verl 0.9 turns the actor's YAML into dataclasses
(``omega_conf_to_dataclass``: hydra ``instantiate`` of each ``_target_``), and its
``PolicyLossConfig`` has no field for extra keys: an unknown key fails there. Pointing
``policy_loss._target_`` at :class:`ISReshapePolicyLossConfig` (a ``PolicyLossConfig`` subclass
with the ``is_reshape_*`` fields) makes them real fields; the ``+`` adds keys that verl's YAML
schema lacks. A policy-loss config that is still an ``omegaconf.DictConfig`` or a plain ``dict``
(older worker code, tests) is read the same way, by key. Misspelt ``is_reshape_*`` keys are an
error, not ignored.

**Behaviour log-probabilities.** IS Reshape reweights by ``pi_theta / mu`` with ``mu`` the
policy that sampled the data. verl hands the loss ``old_log_prob``: in bypass mode
(``algorithm.rollout_correction.bypass_mode=true``) that is the rollout engine's log-probs, which
is what IS Reshape wants; in decoupled mode it is the recomputed old policy, and verl's
``rollout_is_weights`` (if enabled) multiply the per-token losses as in verl's own losses (here:
they scale the advantages, which is the same thing since the loss is linear in them). Note: in
verl 0.9.1, ``apply_bypass_mode`` writes ``loss_mode = "bypass_mode"`` into the *driver's*
policy-loss config; the workers build their loss from their own copy, made at start-up.

**Aggregation.** The loss is verl's ``agg_loss`` of the IS Reshape loss matrix with verl's
global normalisers (``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``), so it composes with verl's micro-batching, gradient
accumulation and FSDP averaging exactly as verl's built-in losses do. The core computes the loss
with its own (micro-batch) normaliser; this module multiplies value and gradient by the ratio of
verl's normaliser to the core's (the loss is linear in the aggregation coefficients).

**Scope of gamma.** gamma is chosen per call, i.e. per micro-batch on each rank (or per GRPO group
with ``is_reshape_group_size``, when groups are contiguous), not over verl's whole mini-batch:
verl calls the loss once per micro-batch and ranks may run different numbers of micro-batches
(dynamic batch size), so no collective runs here.

Reference: DESIGN.md section 6; verl ``verl/trainer/ppo/core_algos.py`` (``register_policy_loss``,
``agg_loss``, ``compute_policy_loss_vanilla`` for the signature and return convention) and
``verl/workers/config/actor.py`` (``PolicyLossConfig``), verl 0.9.1.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from isreshape_core._versions import require

#: The verl releases this module supports (tested with 0.9.1); on others its import fails.
VERL_SUPPORTED = ">=0.9,<0.10"
require("verl", VERL_SUPPORTED, tested="0.9.1", integration=__name__, extra="verl")

from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config.actor import PolicyLossConfig

from .loss import is_reshape_loss

__all__ = [
    "IS_RESHAPE_OPTIONS",
    "ISReshapePolicyLossConfig",
    "compute_policy_loss_is_reshape",
    "is_reshape_options",
]

#: verl's loss aggregation modes (verl 0.9.1 ``agg_loss``) that this loss accepts.
VERL_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

#: The policy-loss config keys read by the loss, with their defaults.
IS_RESHAPE_OPTIONS: dict[str, Any] = {
    "is_reshape_gamma": "ess",
    "is_reshape_rho_min": 0.3,
    "is_reshape_level": "sequence",
    "is_reshape_form": "objective",
    "is_reshape_group_size": None,
    "is_reshape_gamma_options": None,
}


@dataclass
class ISReshapePolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` with the IS Reshape options as fields.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=
    isreshape_torch.verl.ISReshapePolicyLossConfig`` and set ``loss_mode="is_reshape"``.

    Attributes
    ----------
    is_reshape_gamma : str or float
        ``"ess"`` (default, the largest gamma with ESS ratio >= rho_min), ``"closed_form"``,
        ``"psis"``, ``"tail"``, ``"combined"``, or a fixed number in [0, 1].
    is_reshape_rho_min : float
        Least acceptable ESS ratio, in (0, 1].
    is_reshape_level : str
        ``"sequence"`` (summed token log-ratios), ``"geometric"`` (their mean, GSPO-style) or
        ``"token"``.
    is_reshape_form : str
        ``"objective"`` (Box-Cox value) or ``"reinforce"``; same gradient.
    is_reshape_group_size : int, optional
        One gamma per ``G`` consecutive responses (verl's ``rollout.n``), if micro-batches keep
        groups together (``actor.shuffle=false``); else one gamma per micro-batch.
    is_reshape_gamma_options : dict, optional
        Extra keyword arguments of :func:`isreshape_core.select_gamma` (``gamma_min``,
        ``gamma_max``, ...).

    References
    ----------
    DESIGN.md sections 3 and 6; verl 0.9.1 ``verl.workers.config.actor.PolicyLossConfig``.

    Examples
    --------
    >>> cfg = ISReshapePolicyLossConfig(loss_mode="is_reshape", is_reshape_rho_min=0.5)
    >>> print(is_reshape_options(cfg)["rho_min"], cfg.is_reshape_level)
    0.5 sequence
    """

    # `Any`: a method name or a number (OmegaConf's structured configs reject `str | float`).
    is_reshape_gamma: Any = "ess"
    is_reshape_rho_min: float = 0.3
    is_reshape_level: str = "sequence"
    is_reshape_form: str = "objective"
    is_reshape_group_size: int | None = None
    is_reshape_gamma_options: dict = field(default_factory=dict)


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dataclass config (verl's ``BaseConfig``), a DictConfig or a dict."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, TypeError, KeyError):
            pass
    return getattr(config, key, default)


def _keys(config: Any) -> list[str]:
    if isinstance(config, Mapping) or hasattr(config, "keys"):
        return [str(k) for k in config.keys()]
    return [k for k in vars(config) if not k.startswith("_")]


def is_reshape_options(policy_loss_config: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`is_reshape_loss` read from a verl policy-loss config.

    Reads ``is_reshape_gamma``, ``is_reshape_rho_min``, ``is_reshape_level``,
    ``is_reshape_form``, ``is_reshape_group_size`` and ``is_reshape_gamma_options`` (defaults in
    :data:`IS_RESHAPE_OPTIONS`) from ``policy_loss_config`` (an
    :class:`ISReshapePolicyLossConfig`, a ``DictConfig``, a ``dict`` or ``None``), and rejects
    any other key that starts with ``is_reshape_`` (a misspelling).

    Parameters
    ----------
    policy_loss_config : ISReshapePolicyLossConfig, DictConfig, dict or None

    Returns
    -------
    dict
        ``gamma``, ``rho_min``, ``level``, ``form``, ``group_size`` and the gamma options.

    References
    ----------
    DESIGN.md section 6 (verl integration).

    Examples
    --------
    >>> opts = is_reshape_options({"loss_mode": "is_reshape", "is_reshape_gamma": 0.5})
    >>> print(opts["gamma"], opts["rho_min"], opts["level"])
    0.5 0.3 sequence
    """
    if policy_loss_config is not None:
        unknown = [
            k
            for k in _keys(policy_loss_config)
            if k.startswith("is_reshape_") and k not in IS_RESHAPE_OPTIONS
        ]
        if unknown:
            raise ValueError(
                f"unknown IS Reshape option(s) {unknown} in actor.policy_loss; the options are "
                f"{sorted(IS_RESHAPE_OPTIONS)}"
            )
    values = {k: _get(policy_loss_config, k, d) for k, d in IS_RESHAPE_OPTIONS.items()}
    gamma = values["is_reshape_gamma"]
    if isinstance(gamma, str):
        try:  # a number given on the command line may arrive as a string
            gamma = float(gamma)
        except ValueError:
            pass
    gamma_options = values["is_reshape_gamma_options"] or {}
    if not isinstance(gamma_options, Mapping):
        raise TypeError(
            "actor.policy_loss.is_reshape_gamma_options must be a mapping of select_gamma "
            f"keyword arguments, got {type(gamma_options).__name__}"
        )
    group_size = values["is_reshape_group_size"]
    if group_size is not None and (
        not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool)
    ):
        raise TypeError(
            f"actor.policy_loss.is_reshape_group_size must be an int or null, got {group_size!r}"
        )
    return {
        "gamma": gamma,
        "rho_min": float(values["is_reshape_rho_min"]),
        "level": values["is_reshape_level"],
        "form": values["is_reshape_form"],
        "group_size": group_size,
        **dict(gamma_options),
    }


def _verl_rescale(
    mask: torch.Tensor,
    loss_agg_mode: str,
    global_batch_info: Mapping,
    loss_scale_factor: float | None,
) -> tuple[str, float | None, torch.Tensor]:
    """The core's mode, its ``loss_scale_factor``, and the factor that turns its loss into verl's.

    verl's ``agg_loss`` is ``sum c_verl * loss_mat`` with ``c_verl = m * k`` (``m`` the mask);
    the core's is ``sum c_core * loss_mat``; for each mode below ``c_verl = factor * c_core``.
    """
    m = mask.to(torch.float64)
    B, T = mask.shape
    dp = float(global_batch_info.get("dp_size", 1) or 1)
    nonempty = (m.sum(-1) > 0).to(torch.float64).sum()

    def per(value: Any, fallback: torch.Tensor) -> torch.Tensor:
        total = fallback if value is None else torch.as_tensor(float(value), dtype=torch.float64)
        return torch.where(total > 0, total, torch.ones_like(total)).to(mask.device)

    needs = {"token-mean": "batch_num_tokens"}.get(loss_agg_mode)
    if loss_agg_mode.startswith("seq-mean"):
        needs = "global_batch_size"
    if dp > 1 and needs is not None and global_batch_info.get(needs) is None:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} with dp_size={dp:g} needs "
            f"config.global_batch_info[{needs!r}] (over all data-parallel ranks), as verl's "
            "agg_loss does"
        )
    if loss_agg_mode == "token-mean":
        local = m.sum()
        local = torch.where(local > 0, local, torch.ones_like(local))
        bnt = per(global_batch_info.get("batch_num_tokens"), m.sum())
        return "token-mean", None, (local * dp / bnt)
    if loss_agg_mode == "token-sum":
        return "seq-mean-token-sum-norm", 1.0, torch.tensor(dp, dtype=torch.float64)
    gbs = per(global_batch_info.get("global_batch_size"), nonempty)
    if loss_agg_mode == "seq-mean-token-sum":
        return "seq-mean-token-sum", None, (B * dp / gbs)
    if loss_agg_mode == "seq-mean-token-mean":
        return "seq-mean-token-mean", None, (B * dp / gbs)
    # seq-mean-token-sum-norm: verl 0.9 divides the sequence mean by loss_scale_factor (default T)
    lsf = float(T) if loss_scale_factor is None else float(loss_scale_factor)
    return "seq-mean-token-sum-norm", lsf, (dp / gbs)


@register_policy_loss("is_reshape")
def compute_policy_loss_is_reshape(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""verl policy loss ``is_reshape``: ``-L_gamma`` aggregated with verl's ``agg_loss`` rules.

    With unit log weights ``l_u`` of ``log_prob - old_log_prob`` at ``is_reshape_level``,
    advantages ``A`` (times ``rollout_is_weights`` when given) and gamma chosen from the detached
    weights, the per-token loss matrix is ``-A_bt expm1(gamma l_u)/gamma`` (``-A_bt l_u`` at
    ``gamma = 0``) and the loss is verl's
    ``agg_loss(loss_mat, response_mask, loss_agg_mode, **config.global_batch_info)``; its
    gradient with respect to ``log_prob`` is the exact ``-c A w_u^gamma dl_u/dlog_prob``
    (seed Theorem 2.1) computed by :func:`isreshape_torch.is_reshape_loss`.

    Parameters
    ----------
    old_log_prob : Tensor (bs, response_length)
        Behaviour log-probabilities (the rollout engine's, in verl's bypass mode).
    log_prob : Tensor (bs, response_length)
        Current policy log-probabilities; the only input that carries gradient.
    advantages : Tensor (bs, response_length)
        Advantages (signed allowed).
    response_mask : Tensor (bs, response_length)
        Valid response tokens (bool, or 0/1).
    loss_agg_mode : str
        verl's: ``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
        ``seq-mean-token-sum-norm``.
    config : ActorConfig, DictConfig or dict
        The actor config: ``policy_loss`` holds the ``is_reshape_*`` options
        (:class:`ISReshapePolicyLossConfig`), ``global_batch_info`` verl's normalisers,
        ``loss_scale_factor`` the divisor of ``seq-mean-token-sum-norm``.
    rollout_is_weights : Tensor (bs, response_length), optional
        verl's rollout-correction weights; they multiply the per-token losses.

    Returns
    -------
    loss : 0-d Tensor
    metrics : dict of 0-d detached Tensors
        ``actor/is_reshape/gamma``, ``.../ess_ratio``, ``.../ess_ratio_at_1``, ``.../sigma2``,
        ``.../max_weight`` (and ``.../k_hat`` for the Pareto methods), and ``actor/ppo_kl``
        (the masked mean of ``old_log_prob - log_prob``, as verl's losses report).

    References
    ----------
    DESIGN.md sections 3 and 6; verl 0.9.1 ``core_algos.agg_loss`` and
    ``compute_policy_loss_vanilla`` (signature, ``(loss, metrics)`` return convention).

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]])).requires_grad_()
    >>> old = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    >>> adv = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    >>> cfg = {"policy_loss": {"is_reshape_gamma": 0.0}}
    >>> loss, metrics = compute_policy_loss_is_reshape(
    ...     old, logp, adv, torch.ones(2, 2, dtype=torch.bool), "seq-mean-token-sum", cfg)
    >>> # gamma = 0: -(1/B) sum_b sum_t A_bt l_b = -(2 log 2 - 4 log 2) / 2 = log 2
    >>> print(np.round(loss.item(), 4), metrics["actor/is_reshape/gamma"].item())
    0.6931 0.0
    """
    policy_loss_config = _get(config, "policy_loss")
    options = is_reshape_options(policy_loss_config)
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode must be one of {VERL_LOSS_AGG_MODES} for loss_mode='is_reshape', "
            f"got {loss_agg_mode!r}"
        )
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(
            f"response_mask must be a torch.Tensor (bs, response_length), got "
            f"{type(response_mask).__name__}"
        )
    mask = response_mask if response_mask.dtype == torch.bool else response_mask > 0
    global_batch_info = _get(config, "global_batch_info") or {}
    # As verl's losses: agg_loss(..., **config.global_batch_info), which carries
    # loss_scale_factor (verl's ppo_loss copies config.loss_scale_factor there).
    core_mode, core_lsf, factor = _verl_rescale(
        mask, loss_agg_mode, global_batch_info, global_batch_info.get("loss_scale_factor")
    )
    rewards = advantages.detach()
    if rollout_is_weights is not None:
        rewards = rewards * rollout_is_weights.detach()
    loss, metrics = is_reshape_loss(
        log_prob,
        old_log_prob,
        rewards,
        mask,
        loss_agg_mode=core_mode,
        loss_scale_factor=core_lsf,
        distributed=False,
        **options,
    )
    loss = loss * factor.to(device=loss.device, dtype=loss.dtype)
    out = {f"actor/is_reshape/{k}": v.detach() for k, v in metrics.items()}
    with torch.no_grad():
        m = mask.to(log_prob.dtype)
        kl = ((old_log_prob - log_prob) * m).sum() / m.sum().clamp(min=1.0)
    out["actor/ppo_kl"] = kl.detach()
    return loss, out
