"""The IS Reshape loss in TRL (1.x): :class:`ISReshapeGRPOTrainer` and its config.

``ISReshapeGRPOTrainer`` is TRL's ``GRPOTrainer`` with ``_compute_loss`` replaced: it computes
the per-token log-probabilities with TRL's own helper (``_get_per_token_logps_and_entropies``,
so temperature, chunking and multimodal inputs behave as in TRL), takes the behaviour
log-probabilities that TRL already gathered, and hands both to
:func:`isreshape_torch.is_reshape_loss`. Everything else (generation, rewards, group-normalised
advantages, vLLM, logging) is TRL's.

Tested with TRL 1.16.0; supports TRL >=1.16,<1.17 (``TRL_SUPPORTED``: the trainer overrides
TRL's private ``_compute_loss``): with another TRL (or none) the import fails with an
``ImportError`` that names this range.

Usage::

    from isreshape_torch.trl import ISReshapeGRPOConfig, ISReshapeGRPOTrainer

    args = ISReshapeGRPOConfig(output_dir="out", is_reshape_gamma="ess", is_reshape_rho_min=0.3,
                               is_reshape_level="sequence")
    trainer = ISReshapeGRPOTrainer(model=model, reward_funcs=reward_fn, args=args,
                                   train_dataset=dataset)
    trainer.train()

**Behaviour policy** (``is_reshape_behavior``): with vLLM, TRL keeps the inference engine's
log-probabilities (``sampling_per_token_logps``), the policy that really sampled the data, and
``"auto"`` uses them; without them, the old policy's (``old_per_token_logps``, computed when
generation and optimisation steps are misaligned) and otherwise the current policy's detached
log-probs (on-policy: ``w = 1``, the loss is REINFORCE). Tokens whose sampling log-prob is NaN
(vLLM could not score them) take the old/current log-prob instead (ratio 1, as TRL does). IS
Reshape *is* the importance correction: TRL's ``vllm_importance_sampling_correction`` ratio is not
applied on top (it would correct twice). To keep TRL's own loss and replace only its vLLM
correction by a tempered weight, see :class:`ISReshapeCorrectionGRPOTrainer`.

**Scope of gamma** (``is_reshape_gamma_scope``). ``"step"`` (default): one gamma per optimizer
step, chosen before its first micro-batch from the unit log weights of *all* its
``gradient_accumulation_steps`` micro-batches on all processes (gathered), from the weights the
loss will use: the current policy (it does not change during gradient accumulation) against the
behaviour policy. ``"group"``: one gamma per GRPO group (the ``num_generations`` completions of
one prompt, identified by their row in TRL's generation batch, so they stay a group through TRL's
shuffling and splitting), over the group's completions in the step. ``"micro_batch"``: each loss
call chooses its own gamma on its own process (the behaviour of earlier versions; an ablation).
The step's gamma reaches every micro-batch as a per-sample field ``is_reshape_gamma``. Choosing
it costs nothing extra on the first optimizer step after a generation (the current policy is the
one that computed TRL's ``old_per_token_logps``, or, with neither old nor sampling
log-probabilities, the one that sampled: ``w = 1``); on the later steps that reuse a generation
batch (``steps_per_generation > gradient_accumulation_steps`` or ``num_iterations > 1``), and with
sampling log-probs but no old ones, it costs one forward pass without gradient over the step's
rows.

**Aggregation** (``is_reshape_loss_agg_mode``): ``"dapo"`` (default, TRL's default loss type):
the token sum divided by the number of completion tokens of the whole generation batch over all
processes, per accumulation window (TRL's ``num_items_in_batch`` normaliser); or one of verl's
modes computed by the core on the micro-batch (``"token-mean"``, ``"seq-mean-token-mean"``,
``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"``), divided by the gradient accumulation
steps as TRL's ``bnpo``/``grpo`` losses are.

Not supported (an error at configuration): ``beta != 0`` (KL term), the entropy bonus,
``top_entropy_quantile < 1`` and ``off_policy_mask_threshold``; and, since only TRL's own losses
read them, a non-default ``loss_type``, ``importance_sampling_level`` (use ``is_reshape_level``),
clip (``epsilon``, ``epsilon_high``, ``delta``) or SAPO/VESPO setting.

See the docs pages ``guides/trl.md`` and ``concepts.md``. Reference: TRL 1.16
``trl/trainer/grpo_trainer.py`` (``GRPOTrainer._prepare_inputs``, whose buffering of
``steps_per_generation`` micro-batches the step gamma follows, and ``GRPOTrainer._compute_loss``,
whose structure the loss follows) and ``grpo_config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from isreshape_core.extend import check_choice, check_rho_min, require

#: The TRL releases this module supports (tested with 1.16.0); on others its import fails.
TRL_SUPPORTED = ">=1.16,<1.17"
require("trl", TRL_SUPPORTED, tested="1.16.0", integration=__name__, extra="trl")

from trl import GRPOConfig, GRPOTrainer

from isreshape_core import (
    GAMMA_METHODS,
    LEVELS,
    LOSS_AGG_MODES,
    LOSS_FORMS,
    ess_ratio,
    log_weights,
    metric_reduction,
    step_gamma,
    tempered_weights,
)

from .distributed import TorchDistributedReducer
from .loss import is_reshape_loss

__all__ = [
    "ISReshapeCorrectionGRPOConfig",
    "ISReshapeCorrectionGRPOTrainer",
    "ISReshapeGRPOConfig",
    "ISReshapeGRPOTrainer",
]

#: Values of ``ISReshapeGRPOConfig.is_reshape_loss_agg_mode``.
TRL_LOSS_AGG_MODES = ("dapo", *LOSS_AGG_MODES)
#: Values of ``ISReshapeGRPOConfig.is_reshape_behavior``.
BEHAVIORS = ("auto", "sampling", "old")
#: Values of ``ISReshapeGRPOConfig.is_reshape_gamma_scope``.
GAMMA_SCOPES = ("step", "group", "micro_batch")

# How the processes' values of a metric combine in the logs (isreshape_core.METRIC_MERGE).
_GATHER_REDUCTIONS = {"mean": torch.nanmean, "max": torch.max, "sum": torch.nansum}

# Inputs that TRL's own _compute_loss forwards to _get_per_token_logps_and_entropies.
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


# GRPOConfig fields that only TRL's own losses read: a value other than the default would be
# silently ignored by the IS Reshape loss, so it is an error (with what to use instead).
_IGNORED_GRPO_FIELDS = {
    "loss_type": "set is_reshape_loss_agg_mode for the aggregation",
    "importance_sampling_level": "set is_reshape_level",
    "epsilon": "gamma, not a clip, bounds the weights",
    "epsilon_high": "gamma, not a clip, bounds the weights",
    "delta": "gamma, not a clip, bounds the weights",
    "sapo_temperature_pos": "no SAPO gate",
    "sapo_temperature_neg": "no SAPO gate",
    "vespo_k_pos": "no VESPO gate",
    "vespo_lambda_pos": "no VESPO gate",
    "vespo_k_neg": "no VESPO gate",
    "vespo_lambda_neg": "no VESPO gate",
}


@dataclass
class ISReshapeGRPOConfig(GRPOConfig):
    r"""TRL's ``GRPOConfig`` with the IS Reshape options.

    The loss is ``-L_gamma`` with ``L_gamma = agg(A · expm1(gamma l_u)/gamma)``, ``l_u`` the log
    importance weights of the policy against the behaviour policy at ``is_reshape_level``, and
    gamma chosen from their effective sample size over each optimizer step (or each GRPO group
    of the step, or each micro-batch: ``is_reshape_gamma_scope``); see ``concepts.md`` and
    ``choosing-gamma.md`` in the docs.

    Attributes
    ----------
    is_reshape_gamma : str or float
        ``"ess"`` (default), ``"closed_form"``, ``"psis"``, ``"tail"``, ``"combined"``, or a
        fixed gamma in [0, 1] (a numeric string from the command line is read as a number).
    is_reshape_rho_min : float
        Least acceptable ESS ratio, in (0, 1].
    is_reshape_level : str
        ``"sequence"``, ``"geometric"`` (GSPO-style mean) or ``"token"``.
    is_reshape_form : str
        ``"objective"`` (Box-Cox value) or ``"reinforce"``; the same gradient.
    is_reshape_loss_agg_mode : str
        ``"dapo"`` (TRL's global token normaliser) or one of the core's
        ``LOSS_AGG_MODES`` (micro-batch normaliser, divided by the accumulation steps).
    is_reshape_loss_scale_factor : float, optional
        Divisor of ``"seq-mean-token-sum-norm"`` (default: the padded completion length).
    is_reshape_behavior : str
        ``"auto"``, ``"sampling"`` (the inference engine's log-probs; an error without vLLM) or
        ``"old"`` (the old policy's, as TRL's ratio uses).
    is_reshape_gamma_min, is_reshape_gamma_max : float, optional
        Bounds on gamma passed to :func:`isreshape_core.step_gamma` (or, per micro-batch,
        :func:`isreshape_core.select_gamma`).
    is_reshape_gamma_scope : str
        ``"step"`` (default: one gamma per optimizer step over all its micro-batches and
        processes), ``"group"`` (one per GRPO group of the step) or ``"micro_batch"`` (each loss
        call its own, on its own process). ``"step"`` and ``"group"`` need
        ``steps_per_generation`` to be a multiple of ``gradient_accumulation_steps`` (TRL's
        default makes them equal), so that every micro-batch of a step is generated before the
        step begins.

    References
    ----------
    TRL 1.16 ``GRPOConfig``.

    Examples
    --------
    >>> args = ISReshapeGRPOConfig(output_dir="/tmp/isr", is_reshape_gamma="0.5", use_cpu=True,
    ...                            report_to="none")
    >>> print(args.is_reshape_gamma, args.is_reshape_loss_agg_mode)
    0.5 dapo
    """

    # `str` for HfArgumentParser (no unions); a number is accepted and kept as a float.
    is_reshape_gamma: str = field(
        default="ess",
        metadata={"help": f"Gamma method {GAMMA_METHODS} or a fixed gamma in [0, 1]."},
    )
    is_reshape_rho_min: float = field(
        default=0.3, metadata={"help": "Least acceptable ESS ratio, in (0, 1]."}
    )
    is_reshape_level: str = field(
        default="sequence", metadata={"help": f"Importance-weight level, one of {LEVELS}."}
    )
    is_reshape_form: str = field(
        default="objective", metadata={"help": f"Loss form, one of {LOSS_FORMS}."}
    )
    is_reshape_loss_agg_mode: str = field(
        default="dapo", metadata={"help": f"Loss aggregation, one of {TRL_LOSS_AGG_MODES}."}
    )
    is_reshape_loss_scale_factor: float | None = field(
        default=None, metadata={"help": "Divisor of seq-mean-token-sum-norm (default: T)."}
    )
    is_reshape_behavior: str = field(
        default="auto", metadata={"help": f"Behaviour log-probs, one of {BEHAVIORS}."}
    )
    is_reshape_gamma_min: float | None = field(
        default=None, metadata={"help": "Lower bound on gamma."}
    )
    is_reshape_gamma_max: float | None = field(
        default=None, metadata={"help": "Upper bound on gamma."}
    )
    is_reshape_gamma_scope: str = field(
        default="step", metadata={"help": f"Where gamma is chosen, one of {GAMMA_SCOPES}."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.is_reshape_gamma = _parse_gamma(self.is_reshape_gamma)
        check_rho_min(float(self.is_reshape_rho_min), "is_reshape_rho_min")
        check_choice(self.is_reshape_level, "is_reshape_level", LEVELS)
        check_choice(self.is_reshape_form, "is_reshape_form", LOSS_FORMS)
        check_choice(self.is_reshape_loss_agg_mode, "is_reshape_loss_agg_mode", TRL_LOSS_AGG_MODES)
        check_choice(self.is_reshape_behavior, "is_reshape_behavior", BEHAVIORS)
        check_choice(self.is_reshape_gamma_scope, "is_reshape_gamma_scope", GAMMA_SCOPES)
        self._check_unsupported()
        self._check_step_scope()
        self._check_ignored_fields()

    def _check_ignored_fields(self) -> None:
        """GRPOConfig fields that only TRL's own losses read must keep their defaults."""
        defaults = GRPOConfig.__dataclass_fields__
        for name, instead in _IGNORED_GRPO_FIELDS.items():
            if name in defaults and getattr(self, name) != defaults[name].default:
                raise ValueError(
                    f"ISReshapeGRPOConfig ignores {name}={getattr(self, name)!r}: the IS Reshape "
                    f"loss replaces TRL's clipped losses ({instead}); leave {name} at its default "
                    f"{defaults[name].default!r}"
                )

    def _check_unsupported(self) -> None:
        """TRL options the IS Reshape loss does not implement."""
        unsupported = {
            "beta": (self.beta != 0.0, "0.0 (no KL term in the IS Reshape loss)"),
            "entropy_coef": (self.entropy_coef != 0.0, "0.0 (no entropy bonus)"),
            "use_adaptive_entropy": (bool(self.use_adaptive_entropy), "False"),
            "top_entropy_quantile": (self.top_entropy_quantile < 1.0, "1.0"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "None"),
        }
        for name, (bad, fix) in unsupported.items():
            if bad:
                raise ValueError(
                    f"ISReshapeGRPOConfig does not support {name}={getattr(self, name)!r}; set "
                    f"{name}={fix}"
                )

    def _check_step_scope(self) -> None:
        """A step's gamma is chosen before its first micro-batch: all must be generated."""
        accumulation = self.gradient_accumulation_steps
        if (
            self.is_reshape_gamma_scope != "micro_batch"
            and self.steps_per_generation % accumulation != 0
        ):
            raise ValueError(
                f"is_reshape_gamma_scope={self.is_reshape_gamma_scope!r} chooses gamma before an "
                "optimizer step over all its micro-batches, so every micro-batch must be generated "
                f"by then: steps_per_generation ({self.steps_per_generation}) must be a multiple "
                f"of gradient_accumulation_steps ({accumulation}); set steps_per_generation="
                f"{accumulation} (TRL's default) or is_reshape_gamma_scope='micro_batch'"
            )


def _parse_gamma(gamma: Any) -> str | float:
    """``is_reshape_gamma``: a method name, or a number in [0, 1] (a numeric string too)."""
    if isinstance(gamma, str) and gamma not in GAMMA_METHODS:
        try:
            gamma = float(gamma)
        except ValueError:
            raise ValueError(
                f"is_reshape_gamma must be one of {GAMMA_METHODS} or a number in [0, 1], got "
                f"{gamma!r}"
            ) from None
    if isinstance(gamma, str):
        return gamma
    if isinstance(gamma, bool) or not isinstance(gamma, int | float):
        raise TypeError(f"is_reshape_gamma must be a str or a number, got {gamma!r}")
    if not (0.0 <= float(gamma) <= 1.0):
        raise ValueError(f"is_reshape_gamma must lie in [0, 1], got {gamma!r}")
    return float(gamma)


class ISReshapeGRPOTrainer(GRPOTrainer):
    r"""TRL's ``GRPOTrainer`` trained with the IS Reshape loss.

    Same constructor as ``GRPOTrainer``; ``args`` must be an :class:`ISReshapeGRPOConfig`
    (``None`` gives its defaults). Per micro-batch, with per-token log-probs ``log pi`` (TRL's
    helper), behaviour log-probs ``log mu`` (see the module notes), advantages ``A`` (B,) or
    (B, T) and the completion mask, the loss is
    ``is_reshape_loss(log pi, log mu, A, mask, gamma=...)`` (gradient
    ``-c A w_u^gamma grad log pi``), normalised as ``is_reshape_loss_agg_mode`` says. Gamma is the
    step's (or the GRPO group's), chosen in ``_prepare_inputs`` before the step's first
    micro-batch by :func:`isreshape_core.step_gamma` over the unit log weights of the whole step
    gathered from every process, and stored per sample as ``inputs["is_reshape_gamma"]``
    (``is_reshape_gamma_scope="micro_batch"``: chosen by each loss call instead).

    Logged: ``is_reshape/gamma`` once per loss call (the gamma that call used, mean over
    processes); once per optimizer step, ``is_reshape/ess_ratio_pooled`` (ESS/n of the tempered
    weights ``w_u^gamma_u`` of every unit of the step on every process, computed from the
    log-probabilities of the loss calls themselves) and, with the step scopes, the selection's
    ``is_reshape/ess_ratio`` and ``is_reshape/ess_ratio_at_1`` (means over groups),
    ``is_reshape/sigma2``, ``is_reshape/max_weight`` (maximum) and ``is_reshape/k_hat`` (Pareto
    methods); with ``"micro_batch"``, those of every call (means over processes, ``max_weight``
    the maximum). And TRL's ``entropy``.

    References
    ----------
    TRL 1.16 ``GRPOTrainer._prepare_inputs`` and ``GRPOTrainer._compute_loss``; the docs pages
    ``guides/trl.md`` and ``concepts.md``.

    Examples
    --------
    Training needs a model and data (see the module notes); the class is a ``GRPOTrainer``:

    >>> from trl import GRPOTrainer
    >>> print(issubclass(ISReshapeGRPOTrainer, GRPOTrainer))
    True
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, **kwargs: Any):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ISReshapeGRPOConfig(f"{str(name).split('/')[-1]}-ISReshape-GRPO")
        if not isinstance(args, ISReshapeGRPOConfig):
            raise TypeError(
                "args must be an isreshape_torch.trl.ISReshapeGRPOConfig (it carries the IS "
                f"Reshape options), got {type(args).__name__}"
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)
        # True from a new generation batch until the step that starts on it has chosen gamma:
        # until then the policy is the one that computed the batch's log-probs.
        self._is_reshape_fresh = False
        # (tempered unit log weights, their mask) of the current step's loss calls.
        self._is_reshape_step_units: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- the step's gamma ----------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        return _add_group_ids(self, super()._generate_and_score_completions(inputs))

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        if not (self.model.training and self._step_scoped()):
            return super()._prepare_inputs(generation_batch)
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not buffered:
            self._is_reshape_fresh = True
        accumulation = self.args.gradient_accumulation_steps
        if self._step % accumulation == 0:
            first = self._step % self.args.steps_per_generation
            self._set_step_gamma(self._buffered_inputs[first : first + accumulation])
            self._is_reshape_fresh = False
        return inputs

    def _current_log_probs(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The current policy's per-token log-probs of a buffered micro-batch, without gradient."""
        old = inputs.get("old_per_token_logps")
        if self._is_reshape_fresh and old is not None:
            return old
        if self._is_reshape_fresh and inputs.get("sampling_per_token_logps") is None:
            # The policy sampled these completions and has not changed since: w = 1.
            return torch.zeros(inputs["completion_ids"].shape, device=self.accelerator.device)
        completion_ids = inputs["completion_ids"]
        with torch.no_grad(), self.compute_loss_context_manager():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                completion_ids.size(1),
                batch_size=self.args.per_device_train_batch_size,
                **{k: inputs.get(k) for k in _MODEL_INPUT_KEYS},
            )
        return logps

    def _unit_log_weights(
        self, inputs: dict[str, Any], logp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat unit log weights ``log pi - log mu``, their mask and group ids (detached)."""
        mask = _loss_mask(inputs)
        logp = logp.detach()
        level = self.args.is_reshape_level
        l_u = log_weights(logp, self._behavior_log_probs(inputs, logp), mask, level=level)
        groups = inputs.get("is_reshape_group_id")
        if groups is None:  # not from a generation batch (only the ESS of the step is needed)
            groups = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        if level == "token":
            valid, groups = mask, groups[:, None].expand_as(mask)
        else:
            valid = mask.any(-1)
        return l_u.reshape(-1), valid.reshape(-1), groups.reshape(-1)

    def _set_step_gamma(self, batches: list[dict[str, Any]]) -> None:
        """Chooses the step's gamma over ``batches`` on every process; stores it per sample."""
        parts = [self._unit_log_weights(b, self._current_log_probs(b)) for b in batches]
        l_u, valid, groups = (torch.cat(p) for p in zip(*parts, strict=True))
        by_group = self.args.is_reshape_gamma_scope == "group"
        gamma, metrics = _choose_gamma(self, l_u, valid, groups, by_group)
        token = self.args.is_reshape_level == "token"
        start = 0
        for b in batches:
            shape = b["completion_mask"].shape
            n = shape[0] * shape[1] if token else shape[0]
            # every unit of a row has the row's group's (or the step's) gamma
            b["is_reshape_gamma"] = (
                gamma[start : start + n].reshape(shape)[:, 0]
                if token
                else (gamma[start : start + n])
            )
            start += n
        for name, value in metrics.items():
            if name not in ("gamma", "ess_ratio_pooled"):  # logged per call / from the loss calls
                self._metrics["train"][f"is_reshape/{name}"].append(float(value))

    def _step_scoped(self) -> bool:
        """Whether gamma is chosen per step (or group) before the step; a fixed number is not."""
        args = self.args
        return args.is_reshape_gamma_scope != "micro_batch" and isinstance(
            args.is_reshape_gamma, str
        )

    def _gamma_options(self) -> dict[str, float]:
        options = {}
        if self.args.is_reshape_gamma_min is not None:
            options["gamma_min"] = self.args.is_reshape_gamma_min
        if self.args.is_reshape_gamma_max is not None:
            options["gamma_max"] = self.args.is_reshape_gamma_max
        return options

    # -- the loss ------------------------------------------------------------------------------

    def _behavior_log_probs(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor
    ) -> torch.Tensor:
        current = per_token_logps.detach()
        old = inputs.get("old_per_token_logps")
        sampling = inputs.get("sampling_per_token_logps")
        choice = self.args.is_reshape_behavior
        if choice == "sampling" and sampling is None:
            raise ValueError(
                "is_reshape_behavior='sampling' needs the inference engine's log-probs "
                "(sampling_per_token_logps, with use_vllm=True); use 'auto' or 'old'"
            )
        fallback = current if old is None else old
        if choice == "old" or sampling is None:
            return fallback
        return torch.where(torch.isnan(sampling), fallback, sampling)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        args = self.args
        mode = "train" if self.model.training else "eval"
        per_token_logps, entropies, aux_loss = self._policy_log_probs(model, inputs)
        bool_mask = _loss_mask(inputs)
        scoped = mode == "train" and self._step_scoped()
        agg = args.is_reshape_loss_agg_mode
        loss, metrics = is_reshape_loss(
            per_token_logps,
            self._behavior_log_probs(inputs, per_token_logps),
            inputs["advantages"],
            bool_mask,
            level=args.is_reshape_level,
            form=args.is_reshape_form,
            loss_agg_mode="token-mean" if agg == "dapo" else agg,
            loss_scale_factor=args.is_reshape_loss_scale_factor,
            distributed=False,
            **self._gamma_kwargs(inputs, scoped),
        )
        loss = self._normalise(loss, inputs, bool_mask, mode)
        if self.aux_loss_enabled:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        if scoped:
            valid_rows = bool_mask.any(-1)
            used = inputs["is_reshape_gamma"].detach().float()
            used = torch.where(valid_rows, used, torch.nan).nanmean()
            self._log_reduced(mode, {"gamma": used})
            gamma_used = inputs["is_reshape_gamma"]
        else:
            self._log_reduced(mode, metrics)
            gamma_used = metrics["gamma"]
        if mode == "train":
            self._record_step_units(inputs, per_token_logps, gamma_used)
        self._log_entropy(mode, entropies, bool_mask)
        return loss

    def _policy_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple:
        """Per-token log-probs, entropies and auxiliary loss by TRL's own helper."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _MODEL_INPUT_KEYS},
        )

    def _gamma_kwargs(self, inputs: dict[str, Any], scoped: bool) -> dict[str, Any]:
        """The loss's gamma: the step's (stored per sample) or the configured rule."""
        args = self.args
        if not scoped:
            return {
                "gamma": args.is_reshape_gamma,
                "rho_min": args.is_reshape_rho_min,
                **self._gamma_options(),
            }
        if "is_reshape_gamma" not in inputs:
            raise KeyError(
                "inputs['is_reshape_gamma'] is missing: with is_reshape_gamma_scope="
                f"{args.is_reshape_gamma_scope!r} ISReshapeGRPOTrainer._prepare_inputs sets "
                "it before the step's first micro-batch; call _compute_loss on inputs it "
                "returned, or use is_reshape_gamma_scope='micro_batch'"
            )
        return {"gamma": inputs["is_reshape_gamma"]}

    def _normalise(
        self, loss: torch.Tensor, inputs: dict[str, Any], mask: torch.Tensor, mode: str
    ) -> torch.Tensor:
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.args.is_reshape_loss_agg_mode != "dapo":
            return loss / accumulation
        # TRL's dapo normaliser (GRPOTrainer._compute_loss): the tokens of the generation batch
        # over all processes, per accumulation window. The core's token-mean divides by this
        # micro-batch's tokens: rescale (the loss is linear in the coefficients).
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        local = mask.sum().to(loss.dtype).clamp(min=1.0)
        return loss * (local / normalizer.to(loss.dtype))

    def _record_step_units(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor, gamma: torch.Tensor
    ) -> None:
        """Keeps this call's tempered weights; after the step's last call, logs their ESS/n."""
        l_u, valid, _ = self._unit_log_weights(inputs, per_token_logps)
        gamma = gamma.detach().to(l_u.dtype)
        if gamma.ndim == 1 and self.args.is_reshape_level == "token":
            gamma = gamma[:, None].expand(inputs["completion_mask"].shape)
        self._is_reshape_step_units.append((gamma.reshape(-1) * l_u, valid))
        if (self._step + 1) % self.args.gradient_accumulation_steps != 0:
            return
        tempered, valid = (torch.cat(p) for p in zip(*self._is_reshape_step_units, strict=True))
        self._is_reshape_step_units = []
        reducer = TorchDistributedReducer() if self.accelerator.num_processes > 1 else None
        pooled = ess_ratio(tempered, mask=valid, reducer=reducer)
        self._metrics["train"]["is_reshape/ess_ratio_pooled"].append(float(pooled))

    def _log_reduced(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            gathered = self.accelerator.gather(value.detach().float().reshape(1))
            reduced = _GATHER_REDUCTIONS[metric_reduction(name)](gathered)
            self._metrics[mode][f"is_reshape/{name}"].append(reduced.item())

    def _log_entropy(self, mode: str, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(entropies.dtype)
        totals = self.accelerator.reduce(
            torch.stack([(entropies.detach() * m).sum(), m.sum()]), reduction="sum"
        )
        entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        self._metrics[mode]["entropy"].append(entropy if math.isfinite(entropy) else float("nan"))


def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
    """The tokens TRL's loss counts: the completion mask, times the tool mask if any (bool)."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    return mask > 0


def _add_group_ids(trainer: GRPOTrainer, output: dict[str, Any]) -> dict[str, Any]:
    """Adds ``is_reshape_group_id``: each row's GRPO group, an index that survives shuffling.

    TRL normalises rewards over rows ``[G k, G (k+1))`` of the batch gathered from every process
    (process ``p`` holds rows ``p B .. p B + B - 1``): that row index ``// G`` is the group.
    """
    mode = "train" if trainer.model.training else "eval"
    size = trainer.num_generations if mode == "train" else trainer.num_generations_eval
    rows = output["prompt_ids"].shape[0]
    first = trainer.accelerator.process_index * rows
    index = torch.arange(first, first + rows, device=output["prompt_ids"].device)
    output["is_reshape_group_id"] = torch.div(index, size, rounding_mode="floor")
    return output


def _gather_padded(trainer: GRPOTrainer, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each process's 1-d tensors padded to the longest and concatenated in process order."""
    out = []
    for t in tensors:
        t = trainer.accelerator.pad_across_processes(t, dim=0, pad_index=0)
        out.append(trainer.accelerator.gather(t))
    return out


def _choose_gamma(
    trainer: GRPOTrainer,
    l_u: torch.Tensor,
    valid: torch.Tensor,
    groups: torch.Tensor,
    by_group: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gamma of each local unit, chosen over the units of every process (gathered), by
    :func:`isreshape_core.step_gamma` per step or per group present; and the step's metrics."""
    args = trainer.args
    l_all, valid_all, groups_all = _gather_padded(trainer, l_u, valid, groups)
    if by_group:  # the groups present, numbered 0 .. K-1 (the same on every process)
        present, ids = torch.unique(groups_all, return_inverse=True)
        num_groups = present.numel()
    else:
        ids, num_groups = torch.zeros_like(groups_all), 1
    options = {}
    if args.is_reshape_gamma_min is not None:
        options["gamma_min"] = args.is_reshape_gamma_min
    if args.is_reshape_gamma_max is not None:
        options["gamma_max"] = args.is_reshape_gamma_max
    gamma, metrics = step_gamma(
        l_all,
        args.is_reshape_rho_min,
        method=args.is_reshape_gamma,
        mask=valid_all,
        group_ids=ids if by_group else None,
        num_groups=num_groups if by_group else None,
        **options,
    )
    n_max = l_all.shape[0] // trainer.accelerator.num_processes
    start = trainer.accelerator.process_index * n_max
    return gamma[start : start + l_u.shape[0]], metrics


@dataclass
class ISReshapeCorrectionGRPOConfig(GRPOConfig):
    r"""TRL's ``GRPOConfig`` with the tempered behaviour correction of IS Reshape.

    TRL's own loss (``loss_type``: ``grpo``, ``dapo``, ``cispo``, ``sapo``, ``vespo``, ... with
    its clip or gate, ``importance_sampling_level`` ``"sequence"`` for GSPO) is kept; only its
    vLLM importance-sampling correction ``pi_old / mu`` (``vllm_importance_sampling_correction``,
    truncated or masked at ``vllm_importance_sampling_clip_max``) is replaced by the tempered
    weight ``(pi_old / mu)^gamma``, gamma chosen from the effective sample size of these weights
    over each optimizer step (all its micro-batches and processes). The level follows
    ``vllm_importance_sampling_mode``: ``token_*`` one weight per token, ``sequence_*`` one per
    sequence; its truncate/mask part and the clip bounds do not apply (an error if set).

    Attributes
    ----------
    is_reshape_gamma : str
        ``"ess"`` (default), ``"closed_form"``, ``"psis"``, ``"tail"`` or ``"combined"``.
    is_reshape_rho_min : float
        Least acceptable ESS ratio of the step's behaviour weights, in (0, 1].
    is_reshape_gamma_scope : str
        ``"step"`` (default) or ``"group"`` (one gamma per GRPO group of the step).
    is_reshape_gamma_min, is_reshape_gamma_max : float, optional
        Bounds on gamma.

    Examples
    --------
    >>> args = ISReshapeCorrectionGRPOConfig(output_dir="/tmp/isrc", use_cpu=True,
    ...                                      report_to="none")
    >>> print(args.is_reshape_gamma, args.vllm_importance_sampling_mode)
    ess sequence_mask
    """

    is_reshape_gamma: str = field(
        default="ess", metadata={"help": f"Gamma method, one of {GAMMA_METHODS}."}
    )
    is_reshape_rho_min: float = field(
        default=0.3, metadata={"help": "Least acceptable ESS ratio, in (0, 1]."}
    )
    is_reshape_gamma_scope: str = field(
        default="step", metadata={"help": "Where gamma is chosen: 'step' or 'group'."}
    )
    is_reshape_gamma_min: float | None = field(
        default=None, metadata={"help": "Lower bound on gamma."}
    )
    is_reshape_gamma_max: float | None = field(
        default=None, metadata={"help": "Upper bound on gamma."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_reshape_gamma not in GAMMA_METHODS:
            raise ValueError(
                f"is_reshape_gamma must be one of {GAMMA_METHODS}, got {self.is_reshape_gamma!r}"
            )
        if not (0.0 < float(self.is_reshape_rho_min) <= 1.0):
            raise ValueError(
                f"is_reshape_rho_min must lie in (0, 1], got {self.is_reshape_rho_min!r}"
            )
        if self.is_reshape_gamma_scope not in ("step", "group"):
            raise ValueError(
                "is_reshape_gamma_scope must be 'step' or 'group', got "
                f"{self.is_reshape_gamma_scope!r}"
            )
        if not self.vllm_importance_sampling_correction:
            raise ValueError(
                "ISReshapeCorrectionGRPOConfig tempers TRL's vLLM importance-sampling correction; "
                "set vllm_importance_sampling_correction=True (or use GRPOConfig without it)"
            )
        defaults = GRPOConfig.__dataclass_fields__
        for name in ("vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min"):
            if getattr(self, name) != defaults[name].default:
                raise ValueError(
                    f"ISReshapeCorrectionGRPOConfig ignores {name}={getattr(self, name)!r}: gamma, "
                    "not a clip, bounds the behaviour weights (set is_reshape_rho_min); leave "
                    f"{name} at its default {defaults[name].default!r}"
                )
        if self.steps_per_generation % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) so that each "
                "optimizer step lies in one generation batch; set steps_per_generation="
                f"{self.gradient_accumulation_steps} (TRL's default)"
            )


class ISReshapeCorrectionGRPOTrainer(GRPOTrainer):
    r"""TRL's ``GRPOTrainer`` and its loss, with ``(pi_old/mu)^gamma`` as the vLLM correction.

    TRL computes, per generation batch, the behaviour log-ratio ``l = log pi_old - log mu`` of
    the trainer's recomputed log-probs (``old_per_token_logps``) against the inference engine's
    (``sampling_per_token_logps``), and multiplies its per-token loss by
    ``inputs["importance_sampling_ratio"]`` (``GRPOTrainer._compute_loss``). This trainer
    overrides only ``_prepare_inputs``: after TRL has shuffled and split a new generation batch,
    it replaces that ratio in every micro-batch by ``exp(gamma l_u)`` (token or sequence units,
    as ``vllm_importance_sampling_mode`` says; NaN sampling log-probs count 0, as in TRL), with
    one gamma per optimizer step (or per GRPO group of the step), chosen by
    :func:`isreshape_core.step_gamma` from the step's ``l_u`` on all processes. These weights do
    not depend on the current policy, so gamma is exact for every step that reuses the batch
    (``num_iterations > 1``), and choosing it costs no forward pass. ``_compute_loss`` is TRL's.

    Logged once per optimizer step: ``sampling/is_reshape/gamma``,
    ``sampling/is_reshape/ess_ratio`` (pooled ESS/n of the step's tempered weights),
    ``sampling/is_reshape/ess_ratio_at_1`` and ``sampling/is_reshape/max_weight``; TRL's
    ``sampling/importance_sampling_ratio/{min,mean,max}`` describe the tempered weights. Needs
    TRL's correction (``use_vllm=True``, ``vllm_importance_sampling_correction=True``).

    Examples
    --------
    >>> from trl import GRPOTrainer
    >>> print(issubclass(ISReshapeCorrectionGRPOTrainer, GRPOTrainer))
    True
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: Any = None, **kwargs: Any):
        if not isinstance(args, ISReshapeCorrectionGRPOConfig):
            raise TypeError(
                "args must be an isreshape_torch.trl.ISReshapeCorrectionGRPOConfig, got "
                f"{type(args).__name__}"
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        return _add_group_ids(self, super()._generate_and_score_completions(inputs))

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        if not self.model.training:
            inputs = super()._prepare_inputs(generation_batch)
            self._drop_trl_ratio_stats("eval")
            self._log_correction("eval", self._temper([inputs]))
            return inputs
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not buffered:
            self._drop_trl_ratio_stats("train")
            accumulation = self.args.gradient_accumulation_steps
            self._is_reshape_step_metrics = {
                first: self._temper(self._buffered_inputs[first : first + accumulation])
                for first in range(0, self.args.steps_per_generation, accumulation)
            }
        if self._step % self.args.gradient_accumulation_steps == 0:  # a step starts: its metrics
            first = self._step % self.args.steps_per_generation
            self._log_correction("train", self._is_reshape_step_metrics[first])
        return inputs

    def _drop_trl_ratio_stats(self, mode: str) -> None:
        """Removes the entries TRL just logged for its own (truncated) ratio."""
        for name in ("min", "mean", "max"):
            entries = self._metrics[mode].get(f"sampling/importance_sampling_ratio/{name}")
            if entries:
                entries.pop()

    def _temper(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Replaces TRL's ratio in ``batches`` (one optimizer step) by the tempered weight;
        returns the step's metrics."""
        token = self.vllm_importance_sampling_mode.startswith("token")
        units, valid, groups = [], [], []
        for b in batches:
            if "importance_sampling_ratio" not in b:
                raise ValueError(
                    "TRL computed no importance_sampling_ratio: ISReshapeCorrectionGRPOTrainer "
                    "needs use_vllm=True and vllm_importance_sampling_correction=True"
                )
            mask = _loss_mask(b)
            diff = torch.nan_to_num(
                (b["old_per_token_logps"] - b["sampling_per_token_logps"]) * mask, nan=0.0
            )
            b["_is_reshape_log_ratio"] = diff if token else diff.sum(-1)
            units.append(b["_is_reshape_log_ratio"].reshape(-1))
            valid.append((mask if token else mask.any(-1)).reshape(-1))
            g = b["is_reshape_group_id"]
            groups.append((g[:, None].expand_as(mask) if token else g).reshape(-1))
        l_u, ok = torch.cat(units), torch.cat(valid)
        by_group = self.args.is_reshape_gamma_scope == "group"
        gamma, metrics = _choose_gamma(self, l_u, ok, torch.cat(groups), by_group)
        tempered = tempered_weights(l_u, gamma, mask=ok)
        start = 0
        for b in batches:
            l_b = b.pop("_is_reshape_log_ratio")
            w = tempered[start : start + l_b.numel()].reshape(l_b.shape)
            start += l_b.numel()
            b["importance_sampling_ratio"] = w if token else w[:, None]
        w = tempered[ok] if bool(ok.any()) else tempered.new_full((1,), torch.nan)
        gather = self.accelerator.gather
        return {
            "sampling/is_reshape/gamma": float(metrics["gamma"]),
            "sampling/is_reshape/ess_ratio": float(metrics["ess_ratio_pooled"]),
            "sampling/is_reshape/ess_ratio_at_1": float(metrics["ess_ratio_at_1"]),
            "sampling/is_reshape/max_weight": float(metrics["max_weight"]),
            # TRL's names, for the tempered weights
            "sampling/importance_sampling_ratio/min": float(gather(w.min().reshape(1)).min()),
            "sampling/importance_sampling_ratio/mean": float(gather(w.mean().reshape(1)).mean()),
            "sampling/importance_sampling_ratio/max": float(gather(w.max().reshape(1)).max()),
        }

    def _log_correction(self, mode: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
