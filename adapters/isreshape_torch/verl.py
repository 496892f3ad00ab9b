"""IS Reshape for verl (0.9.x): the policy loss ``is_reshape`` and the step-gamma hook.

Importing this module registers the policy loss ``is_reshape`` in verl's policy-loss registry.
Gamma is chosen **once per optimizer step**: over verl's whole mini-batch on all data-parallel
ranks, before the micro-batch loop, by :func:`prepare_step_gamma` (run by the trainer of
:mod:`isreshape_torch.verl_trainer`), and reaches every micro-batch as a per-sample field
(``is_reshape_gamma``, or the tempered ``rollout_is_weights``) that travels with its row through
``balance_batch``, shuffling and dynamic batch size.

Tested with verl 0.9.1; supports verl >=0.9,<0.10 (``VERL_SUPPORTED``): with another verl (or
none) the import fails with an ``ImportError`` that names this range.

Usage (bypass mode, IS Reshape as the policy loss)::

    export VERL_USE_EXTERNAL_MODULES=isreshape_torch.verl_trainer   # imported by `import verl`
    ISR_CONFIG=isreshape_torch.verl.ISReshapePolicyLossConfig
    python -m verl.trainer.main_ppo ... \\
        trainer.v1.trainer_mode=is_reshape \\
        algorithm.rollout_correction.bypass_mode=true \\
        actor_rollout_ref.rollout.calculate_log_probs=true \\
        actor_rollout_ref.actor.policy_loss.loss_mode=is_reshape \\
        actor_rollout_ref.actor.policy_loss._target_=$ISR_CONFIG \\
        +actor_rollout_ref.actor.policy_loss.is_reshape_gamma=ess \\
        +actor_rollout_ref.actor.policy_loss.is_reshape_rho_min=0.3 \\
        +actor_rollout_ref.actor.policy_loss.is_reshape_group_by=uid

**How the options travel.** verl 0.9 turns the actor's YAML into dataclasses
(``omega_conf_to_dataclass``: hydra ``instantiate`` of each ``_target_``), and its
``PolicyLossConfig`` has no field for extra keys: an unknown key fails there. Pointing
``policy_loss._target_`` at :class:`ISReshapePolicyLossConfig` (a ``PolicyLossConfig`` subclass
with the ``is_reshape_*`` fields) makes them real fields; the ``+`` adds keys that verl's YAML
schema lacks. A ``DictConfig`` or a plain ``dict`` is read the same way, by key. Misspelt
``is_reshape_*`` keys are an error, not ignored.

**Which log weights choose gamma.** With ``loss_mode=is_reshape`` the loss reweights
``pi_theta / mu`` with ``mu`` the ``old_log_prob`` verl hands it (the rollout engine's
log-probabilities in bypass mode). The step's gamma is chosen from those weights at the
parameters of the step, which verl does not have before the micro-batch loop: the hook runs one
extra no-grad forward pass over the mini-batch (the cost of verl's own old-log-prob recompute,
once per optimizer step instead of once per batch; no backward). With
``is_reshape_rollout_correction=true`` (decoupled mode, any of verl's losses) the weights are
verl's behaviour ratio ``pi_old / mu = exp(old_log_probs - rollout_log_probs)``, which verl
already has: no extra cost; the hook writes ``rollout_is_weights = (pi_old / mu)^gamma``, which
verl's losses multiply into their per-token losses (in place of the truncated weights of TIS).

**Aggregation.** The loss is verl's ``agg_loss`` of the IS Reshape loss matrix with verl's
global normalisers (``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``), so it composes with verl's micro-batching, gradient
accumulation and FSDP averaging exactly as verl's built-in losses do. The core computes the loss
with its own (micro-batch) normaliser; this module multiplies value and gradient by the ratio of
verl's normaliser to the core's (the loss is linear in the aggregation coefficients).

See the verl guide (``docs/guides/verl.md``) and the distributed guide. Facts about verl used
here: ``verl/trainer/ppo/core_algos.py`` (``register_policy_loss``, ``agg_loss``,
``compute_policy_loss_vanilla`` for the signature and return convention),
``verl/workers/utils/losses.py`` (``ppo_loss``), ``verl/workers/engine/fsdp/transformer_impl.py``
and ``.../megatron/transformer_impl.py`` (``forward_backward_batch``: the data-parallel
all-reduce of ``batch_num_tokens`` before ``prepare_micro_batches``), verl 0.9.1.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from isreshape_core.extend import require

#: The verl releases this module supports (tested with 0.9.1); on others its import fails.
VERL_SUPPORTED = ">=0.9,<0.10"
require("verl", VERL_SUPPORTED, tested="0.9.1", integration=__name__, extra="verl")

from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config.actor import PolicyLossConfig

import isreshape_core as isr

from .distributed import TorchDistributedReducer
from .loss import is_reshape_loss

__all__ = [
    "GAMMA_FIELD",
    "IS_RESHAPE_OPTIONS",
    "ISReshapePolicyLossConfig",
    "compute_policy_loss_is_reshape",
    "is_reshape_options",
    "is_reshape_ppo_loss",
    "prepare_step_gamma",
    "step_gamma_context",
]

#: verl's loss aggregation modes (verl 0.9.1 ``agg_loss``) that this loss accepts.
VERL_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

#: The per-sample field (one value per row of verl's batch) that carries the step's gamma.
GAMMA_FIELD = "is_reshape_gamma"

#: The policy-loss config keys read by this module, with their defaults.
IS_RESHAPE_OPTIONS: dict[str, Any] = {
    "is_reshape_gamma": "ess",
    "is_reshape_rho_min": 0.3,
    "is_reshape_level": "sequence",
    "is_reshape_form": "objective",
    "is_reshape_group_by": None,
    "is_reshape_gamma_scope": "step",
    "is_reshape_rollout_correction": False,
    "is_reshape_gamma_options": None,
}

_REMOVED_OPTIONS = {
    "is_reshape_group_size": (
        "it grouped consecutive rows, but verl's balance_batch, actor.shuffle and dynamic batch "
        "size reorder rows; set +actor_rollout_ref.actor.policy_loss.is_reshape_group_by=uid "
        "(GRPO groups by verl's uid) instead"
    ),
}


@dataclass
class ISReshapePolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` with the IS Reshape options as fields.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=
    isreshape_torch.verl.ISReshapePolicyLossConfig``; set ``loss_mode="is_reshape"`` (IS Reshape
    as the policy loss) or keep any of verl's losses with ``is_reshape_rollout_correction=true``
    (IS Reshape as the behaviour correction of decoupled PPO).

    Attributes
    ----------
    is_reshape_gamma : str or float
        ``"ess"`` (default, the largest gamma with ESS ratio >= rho_min over the step),
        ``"closed_form"``, ``"psis"``, ``"tail"``, ``"combined"``, or a fixed number in [0, 1].
    is_reshape_rho_min : float
        Least acceptable ESS ratio of the optimizer step, in (0, 1].
    is_reshape_level : str
        ``"sequence"`` (summed token log-ratios), ``"geometric"`` (their mean, GSPO-style) or
        ``"token"``.
    is_reshape_form : str
        ``"objective"`` (Box-Cox value) or ``"reinforce"``; same gradient.
    is_reshape_group_by : str, optional
        ``"uid"``: one gamma per GRPO group (verl's ``uid``, wherever its rows are), else one
        gamma per optimizer step.
    is_reshape_gamma_scope : str
        ``"step"`` (default): gamma over verl's mini-batch on all data-parallel ranks, chosen by
        the IS Reshape trainer (``trainer.v1.trainer_mode=is_reshape``). ``"micro_batch"``: one
        gamma per loss call and rank (smaller batches under-temper: the step's ESS ratio falls
        below ``rho_min``); for use without the trainer.
    is_reshape_rollout_correction : bool
        Decoupled mode: replace verl's ``rollout_is_weights`` by ``(pi_old / mu)^gamma``.
    is_reshape_gamma_options : dict, optional
        Extra keyword arguments of :func:`isreshape_core.step_gamma` (``gamma_min``, ...).

    References
    ----------
    The verl guide (``docs/guides/verl.md``); verl 0.9.1
    ``verl.workers.config.actor.PolicyLossConfig``.

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
    is_reshape_group_by: str | None = None
    is_reshape_gamma_scope: str = "step"
    is_reshape_rollout_correction: bool = False
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
    """The IS Reshape options read from a verl policy-loss config, checked.

    Reads the keys of :data:`IS_RESHAPE_OPTIONS` (with those defaults) from
    ``policy_loss_config`` (an :class:`ISReshapePolicyLossConfig`, a ``DictConfig``, a ``dict``
    or ``None``), and rejects any other key that starts with ``is_reshape_`` (a misspelling, or
    the removed ``is_reshape_group_size``) with the fix in the message.

    Parameters
    ----------
    policy_loss_config : ISReshapePolicyLossConfig, DictConfig, dict or None

    Returns
    -------
    dict
        ``gamma`` (method name or float), ``rho_min``, ``level``, ``form``, ``group_by``,
        ``scope``, ``rollout_correction`` and ``gamma_options`` (a dict).

    References
    ----------
    The verl guide (``docs/guides/verl.md``, options).

    Examples
    --------
    >>> opts = is_reshape_options({"loss_mode": "is_reshape", "is_reshape_gamma": 0.5})
    >>> print(opts["gamma"], opts["rho_min"], opts["level"], opts["scope"])
    0.5 0.3 sequence step
    """
    if policy_loss_config is not None:
        keys = _keys(policy_loss_config)
        for key, why in _REMOVED_OPTIONS.items():
            if key in keys and _get(policy_loss_config, key) is not None:
                raise ValueError(f"actor.policy_loss.{key} is no longer supported: {why}")
        unknown = [
            k
            for k in keys
            if k.startswith("is_reshape_")
            and k not in IS_RESHAPE_OPTIONS
            and k not in _REMOVED_OPTIONS
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
            "actor.policy_loss.is_reshape_gamma_options must be a mapping of step_gamma "
            f"keyword arguments, got {type(gamma_options).__name__}"
        )
    group_by = values["is_reshape_group_by"]
    if group_by not in (None, "uid"):
        raise ValueError(
            "actor.policy_loss.is_reshape_group_by must be 'uid' (one gamma per GRPO group) or "
            f"null (one gamma per optimizer step), got {group_by!r}"
        )
    scope = values["is_reshape_gamma_scope"]
    if scope not in ("step", "micro_batch"):
        raise ValueError(
            "actor.policy_loss.is_reshape_gamma_scope must be 'step' (gamma over the optimizer "
            f"step, with trainer.v1.trainer_mode=is_reshape) or 'micro_batch', got {scope!r}"
        )
    if scope == "micro_batch" and group_by is not None:
        raise ValueError(
            "actor.policy_loss.is_reshape_group_by=uid needs is_reshape_gamma_scope=step: a "
            "micro-batch holds an arbitrary part of a GRPO group"
        )
    return {
        "gamma": gamma,
        "rho_min": float(values["is_reshape_rho_min"]),
        "level": values["is_reshape_level"],
        "form": values["is_reshape_form"],
        "group_by": group_by,
        "scope": scope,
        "rollout_correction": bool(values["is_reshape_rollout_correction"]),
        "gamma_options": dict(gamma_options),
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


_STEP_GAMMA: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "isreshape_verl_step_gamma", default=None
)


@contextlib.contextmanager
def step_gamma_context(gamma: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the ``is_reshape`` policy loss uses ``gamma`` (one value per row).

    verl's ``ppo_loss`` hands the policy loss a fixed set of tensors; the per-sample gamma of
    the step (the ``is_reshape_gamma`` field of the micro-batch) reaches it through this
    context, set by :func:`is_reshape_ppo_loss` around verl's ``ppo_loss``.

    Parameters
    ----------
    gamma : Tensor (bs,) or None
        The step's gamma of each row of the micro-batch, in the micro-batch's row order.

    Examples
    --------
    >>> import torch
    >>> with step_gamma_context(torch.tensor([0.5, 0.5])):
    ...     print(_STEP_GAMMA.get())
    tensor([0.5000, 0.5000])
    >>> print(_STEP_GAMMA.get())
    None
    """
    token = _STEP_GAMMA.set(gamma)
    try:
        yield
    finally:
        _STEP_GAMMA.reset(token)


def _gamma_for_call(options: Mapping, batch_size: int) -> tuple[Any, bool]:
    """The ``gamma=`` for the core and whether it was precomputed for the step."""
    step = _STEP_GAMMA.get()
    if step is not None:
        if step.shape != (batch_size,):
            raise ValueError(
                f"the step's gamma field {GAMMA_FIELD!r} has shape {tuple(step.shape)}, but the "
                f"micro-batch has {batch_size} rows"
            )
        return step.detach(), True
    gamma = options["gamma"]
    if isinstance(gamma, numbers.Real) or options["scope"] == "micro_batch":
        return gamma, False
    raise ValueError(
        f"actor.policy_loss.is_reshape_gamma={gamma!r} is chosen once per optimizer step (over "
        "verl's mini-batch on all data-parallel ranks) by the IS Reshape trainer, which did not "
        "run here: launch with VERL_USE_EXTERNAL_MODULES=isreshape_torch.verl_trainer and "
        "trainer.v1.trainer_mode=is_reshape, or set a fixed is_reshape_gamma, or accept one "
        "gamma per loss call with +actor_rollout_ref.actor.policy_loss."
        "is_reshape_gamma_scope=micro_batch (the step's ESS ratio then falls below rho_min)"
    )


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
    advantages ``A`` (times ``rollout_is_weights`` when given) and gamma, the per-token loss
    matrix is ``-A_bt expm1(gamma_b l_u)/gamma_b`` (``-A_bt l_u`` at ``gamma = 0``) and the loss
    is verl's ``agg_loss(loss_mat, response_mask, loss_agg_mode, **config.global_batch_info)``;
    its gradient with respect to ``log_prob`` is the exact ``-c A w_u^gamma dl_u/dlog_prob``
    computed by :func:`isreshape_torch.is_reshape_loss` (the derivative rule of the concepts
    page, ``docs/concepts.md``).

    gamma is, in this order: the step's gamma of each row, set by :func:`step_gamma_context`
    (from the micro-batch's ``is_reshape_gamma`` field, see :func:`is_reshape_ppo_loss`); a fixed
    ``is_reshape_gamma``; with ``is_reshape_gamma_scope=micro_batch``, chosen from this call's
    detached weights. A gamma method without the step's gamma and without that opt-in is an
    error (the per-call gamma under-tempers: the step's ESS ratio falls below ``rho_min``).

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
        ``actor/ppo_kl`` (the masked mean of ``old_log_prob - log_prob``, as verl's losses
        report); with a gamma chosen here, also this call's ``actor/is_reshape/gamma``,
        ``.../ess_ratio``, ``.../ess_ratio_at_1``, ``.../sigma2``, ``.../max_weight`` (and
        ``.../k_hat`` for the Pareto methods). The step's are reported by
        :func:`prepare_step_gamma`.

    References
    ----------
    The verl guide (``docs/guides/verl.md``); verl 0.9.1 ``core_algos.agg_loss`` and
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
    gamma, precomputed = _gamma_for_call(options, mask.shape[0])
    select = {} if precomputed else {"rho_min": options["rho_min"], **options["gamma_options"]}
    loss, metrics = is_reshape_loss(
        log_prob,
        old_log_prob,
        rewards,
        mask,
        gamma=gamma,
        level=options["level"],
        form=options["form"],
        loss_agg_mode=core_mode,
        loss_scale_factor=core_lsf,
        distributed=False,
        **select,
    )
    loss = loss * factor.to(device=loss.device, dtype=loss.dtype)
    # With the step's gamma, the step's statistics are reported once per step by
    # prepare_step_gamma; the micro-batch's own would be the misleading per-call ones.
    out = {} if precomputed else {f"actor/is_reshape/{k}": v.detach() for k, v in metrics.items()}
    with torch.no_grad():
        m = mask.to(log_prob.dtype)
        kl = ((old_log_prob - log_prob) * m).sum() / m.sum().clamp(min=1.0)
    out["actor/ppo_kl"] = kl.detach()
    return loss, out


# ----------------------------------------------------------------------------------------------
# gamma once per optimizer step


def is_reshape_ppo_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None) -> Any:
    """verl's ``ppo_loss`` with the micro-batch's step gamma handed to the ``is_reshape`` loss.

    The loss function that the IS Reshape trainer installs on verl's actor (``set_loss_fn``): it
    reads the micro-batch's per-sample ``is_reshape_gamma`` field (written for the whole
    mini-batch by :func:`prepare_step_gamma`, carried with each row through verl's micro-batch
    split) and calls verl's own ``ppo_loss`` inside :func:`step_gamma_context`, so entropy, KL
    and metric handling stay verl's.

    Parameters
    ----------
    config : ActorConfig
    model_output : dict
        The engine's model output (``log_probs``, ...).
    data : TensorDict
        The micro-batch.
    dp_group : ProcessGroup, optional
        Passed on to ``ppo_loss``.

    Returns
    -------
    (loss, metrics)
        As verl's ``ppo_loss``.

    Examples
    --------
    The IS Reshape trainer installs it on verl's actor engine; by hand (``engine`` a verl
    training engine, after :func:`prepare_step_gamma` wrote the step's gamma into the batch):

    >>> engine.set_loss_fn(is_reshape_ppo_loss)  # doctest: +SKIP
    """
    from verl.workers.utils.losses import ppo_loss

    gamma = data[GAMMA_FIELD] if GAMMA_FIELD in data.keys() else None
    with step_gamma_context(gamma):
        return ppo_loss(config, model_output, data, dp_group=dp_group)


def _padded(data: Any, keys: list[str]) -> dict[str, torch.Tensor]:
    """The response fields ``keys`` of verl's batch as padded ``(bs, response_length)`` tensors."""
    missing = [k for k in keys if k not in data.keys()]
    if missing:
        raise KeyError(missing)
    sub = data.select(*keys)
    if any(getattr(sub[k], "is_nested", False) for k in keys):
        sub = sub.to_padded_tensor()
    return {k: sub[k] for k in keys}


def _like(reference: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """``padded`` (bs, T) in the layout of ``reference`` (jagged nested, as verl's, or dense)."""
    if not getattr(reference, "is_nested", False):
        return padded
    offsets = reference.offsets()
    lengths = offsets.diff()
    keep = torch.arange(padded.shape[-1], device=padded.device)[None, :] < lengths[:, None]
    return torch.nested.nested_tensor_from_jagged(padded[keep], offsets=offsets)


def _dp_reducer(dp_group: Any, device: torch.device) -> Any:
    if dp_group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(dp_group) == 1:
        return None
    return TorchDistributedReducer(dp_group, device)


def _global_group_ids(data: Any, dp_group: Any, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group ids of the rows from verl's ``uid``, the same on every data-parallel rank."""
    if "uid" not in data.keys():
        raise ValueError(
            "actor.policy_loss.is_reshape_group_by=uid needs verl's 'uid' field in the actor's "
            "batch (the v1 trainer stores it with every trajectory); set is_reshape_group_by=null "
            "for one gamma per optimizer step"
        )
    raw = data["uid"]
    values = raw.tolist() if hasattr(raw, "tolist") else list(raw)
    local = [str(v) for v in values]
    names = sorted(set(local))
    if dp_group is not None and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(gathered, names, group=dp_group)
        names = sorted(set().union(*gathered))
    index = {name: i for i, name in enumerate(names)}
    ids = torch.tensor([index[u] for u in local], dtype=torch.int64, device=device)
    return ids, len(names)


def _step_gamma_of_units(
    log_w: torch.Tensor, mask: torch.Tensor, options: Mapping, data: Any, dp_group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Flat unit log weights, their mask and gamma over the step, and the step's metrics."""
    B = mask.shape[0]
    token = options["level"] == "token"
    flat = log_w.reshape(-1) if token else log_w
    unit_mask = mask.reshape(-1) if token else mask.any(-1)
    group_ids, num_groups = None, None
    if options["group_by"] == "uid":
        rows, num_groups = _global_group_ids(data, dp_group, log_w.device)
        group_ids = rows[:, None].expand(B, mask.shape[1]).reshape(-1) if token else rows
    if isinstance(options["gamma"], numbers.Real):
        gamma = torch.full_like(flat, float(options["gamma"]))
        return flat, unit_mask, gamma, {"gamma": float(options["gamma"])}
    gamma, metrics = isr.step_gamma(
        flat,
        options["rho_min"],
        method=options["gamma"],
        mask=unit_mask,
        group_ids=group_ids,
        num_groups=num_groups,
        reducer=_dp_reducer(dp_group, log_w.device),
        **options["gamma_options"],
    )
    return flat, unit_mask, gamma, {k: float(v) for k, v in metrics.items()}


def _rows(gamma: torch.Tensor, level: str, shape: tuple[int, int]) -> torch.Tensor:
    """One gamma per row (a group's or the step's: the same for every token of a row)."""
    if level != "token":
        return gamma
    B, T = shape
    return gamma.reshape(B, T)[:, 0] if T else gamma.new_ones(B)


def _verl_metric_name(name: str) -> str:
    """The name under which verl reduces the metric ``name`` as the core merges it.

    verl's ``reduce_metrics`` takes the maximum of the values of a key that contains ``"max"``
    and the mean of any other; a metric that :data:`isreshape_core.METRIC_MERGE` merges by its
    maximum (``k_hat``, as ``max_weight``) gets the suffix ``_max`` where its name lacks it.
    """
    return f"{name}_max" if isr.metric_reduction(name) == "max" and "max" not in name else name


_ROLLOUT_CORR_METRICS = {
    "gamma": "rollout_is_gamma",
    "ess_ratio_pooled": "rollout_is_eff_sample_size",
    "ess_ratio": "rollout_is_ess_ratio",
    "ess_ratio_at_1": "rollout_is_eff_sample_size_at_1",
    "sigma2": "rollout_is_sigma2",
    "max_weight": "rollout_is_max",
    "k_hat": "rollout_is_k_hat_max",
}


def prepare_step_gamma(
    data: Any,
    policy_loss_config: Any,
    *,
    dp_group: Any = None,
    log_prob: torch.Tensor | None = None,
) -> dict[str, float]:
    r"""Choose gamma over one optimizer step and write it into verl's mini-batch, per sample.

    Run on every data-parallel rank with its shard of verl's mini-batch, before verl splits it
    into micro-batches. The unit log weights ``l_u`` (at ``is_reshape_level``) of the shard go
    to :func:`isreshape_core.step_gamma`, whose statistics are all-reduced over ``dp_group``, so
    gamma (per step, or per GRPO group with ``is_reshape_group_by=uid``: a group's rows may lie
    on several ranks) is the gamma one process would choose on the whole mini-batch.

    - ``loss_mode=is_reshape``: ``l_u`` from ``log_prob - old_log_probs`` (``log_prob``: the
      current policy's, from a no-grad forward pass at the step's parameters); writes
      ``data["is_reshape_gamma"]`` (bs,), read by :func:`is_reshape_ppo_loss`.
    - ``is_reshape_rollout_correction=true`` (decoupled mode, any other ``loss_mode``): ``l_u``
      from ``old_log_probs - rollout_log_probs``; writes
      ``data["rollout_is_weights"] = exp(gamma l_u)`` (:func:`isreshape_core.tempered_weights`,
      0 on padding), which verl's losses multiply into their per-token losses.

    Nothing is written for a fixed ``is_reshape_gamma`` with ``loss_mode=is_reshape``, with
    ``is_reshape_gamma_scope=micro_batch``, or for other losses without the rollout correction.

    Parameters
    ----------
    data : TensorDict
        This rank's part of the mini-batch, as verl's actor receives it (``old_log_probs``,
        ``response_mask``, ``rollout_log_probs``, ``uid``; jagged nested or padded).
    policy_loss_config : ISReshapePolicyLossConfig, DictConfig or dict
        ``actor.policy_loss``.
    dp_group : ProcessGroup, optional
        verl's data-parallel group (``engine.get_data_parallel_group()``), not the world under
        tensor, pipeline or context parallelism; ``None``: this process holds the whole step.
    log_prob : Tensor (bs, response_length), optional
        The current policy's log-probabilities, padded as ``old_log_probs``; needed with
        ``loss_mode=is_reshape``.

    Returns
    -------
    dict of float
        The step's metrics over all ranks (``step_gamma``'s: gamma, the ESS ratios, ``sigma2``,
        ``max_weight`` and ``k_hat`` as maxima): ``actor/is_reshape/...`` (loss) or verl's
        ``rollout_corr/rollout_is_...`` names (rollout correction).

    Examples
    --------
    >>> import torch
    >>> from tensordict import TensorDict
    >>> old = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5], [0.5, 0.125]]))
    >>> rollout = torch.log(torch.full((3, 2), 0.5))
    >>> data = TensorDict({"old_log_probs": old, "rollout_log_probs": rollout,
    ...                    "response_mask": torch.ones(3, 2, dtype=torch.bool)}, batch_size=[3])
    >>> cfg = {"loss_mode": "vanilla", "is_reshape_rollout_correction": True,
    ...        "is_reshape_gamma": 0.5}
    >>> metrics = prepare_step_gamma(data, cfg)
    >>> print(data["rollout_is_weights"][:, 0])  # (pi_old / mu)^0.5 of each sequence
    tensor([1.0000, 0.7071, 0.5000])
    """
    options = is_reshape_options(policy_loss_config)
    loss_mode = _get(policy_loss_config, "loss_mode", "vanilla")
    if options["rollout_correction"]:
        if loss_mode == "is_reshape":
            raise ValueError(
                "actor.policy_loss.is_reshape_rollout_correction=true tempers verl's behaviour "
                "weights for verl's own losses; with loss_mode=is_reshape the loss already "
                "reweights by the behaviour policy: set is_reshape_rollout_correction=false, or "
                "keep verl's loss_mode (vanilla, gspo, ...)"
            )
        return _rollout_correction_step(data, options, dp_group)
    if loss_mode != "is_reshape" or options["scope"] == "micro_batch":
        return {}
    if isinstance(options["gamma"], numbers.Real) and options["group_by"] is None:
        return {}
    if log_prob is None:
        raise ValueError(
            "prepare_step_gamma with loss_mode=is_reshape needs log_prob, the current policy's "
            "log-probabilities of the mini-batch at the step's parameters"
        )
    fields = _padded(data, ["old_log_probs", "response_mask"])
    mask = fields["response_mask"].to(torch.bool)
    old = fields["old_log_probs"].to(torch.float64)
    log_w = isr.log_weights(log_prob.detach().to(torch.float64), old, mask, level=options["level"])
    _, _, gamma, metrics = _step_gamma_of_units(log_w, mask, options, data, dp_group)
    data[GAMMA_FIELD] = _rows(gamma, options["level"], tuple(mask.shape))
    return {f"actor/is_reshape/{_verl_metric_name(k)}": v for k, v in metrics.items()}


def _rollout_correction_step(data: Any, options: Mapping, dp_group: Any) -> dict[str, float]:
    keys = ["old_log_probs", "rollout_log_probs", "response_mask"]
    if "rollout_log_probs" not in data.keys():
        raise ValueError(
            "actor.policy_loss.is_reshape_rollout_correction=true needs rollout_log_probs in the "
            "actor's batch: set actor_rollout_ref.rollout.calculate_log_probs=true"
        )
    fields = _padded(data, keys)
    mask = fields["response_mask"].to(torch.bool)
    old = fields["old_log_probs"]
    log_w = isr.log_weights(
        old.to(torch.float64),
        fields["rollout_log_probs"].to(torch.float64),
        mask,
        level=options["level"],
    )
    flat, unit_mask, gamma, metrics = _step_gamma_of_units(log_w, mask, options, data, dp_group)
    weights = isr.tempered_weights(flat, gamma, mask=unit_mask)
    if options["level"] == "token":
        weights = weights.reshape(mask.shape)
    else:
        weights = weights[:, None] * mask
    data["rollout_is_weights"] = _like(data["old_log_probs"], weights.to(old.dtype))
    return {f"rollout_corr/{_ROLLOUT_CORR_METRICS.get(k, k)}": v for k, v in metrics.items()}
