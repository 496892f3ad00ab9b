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
applied on top (it would correct twice).

**Aggregation** (``is_reshape_loss_agg_mode``): ``"dapo"`` (default, TRL's default loss type):
the token sum divided by the number of completion tokens of the whole generation batch over all
processes, per accumulation window (TRL's ``num_items_in_batch`` normaliser); or one of verl's
modes computed by the core on the micro-batch (``"token-mean"``, ``"seq-mean-token-mean"``,
``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"``), divided by the gradient accumulation
steps as TRL's ``bnpo``/``grpo`` losses are.

**Scope of gamma**: one gamma per micro-batch on each process (TRL shuffles the generation batch,
so GRPO groups are not contiguous in a micro-batch). Not supported (an error at configuration):
``beta != 0`` (KL term), the entropy bonus, ``top_entropy_quantile < 1`` and
``off_policy_mask_threshold``; and, since only TRL's own losses read them, a non-default
``loss_type``, ``importance_sampling_level`` (use ``is_reshape_level``), clip (``epsilon``,
``epsilon_high``, ``delta``) or SAPO/VESPO setting.

Reference: DESIGN.md section 6; TRL 1.16 ``trl/trainer/grpo_trainer.py``
(``GRPOTrainer._compute_loss``, whose structure this follows) and ``grpo_config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from isreshape_core._versions import require

#: The TRL releases this module supports (tested with 1.16.0); on others its import fails.
TRL_SUPPORTED = ">=1.16,<1.17"
require("trl", TRL_SUPPORTED, tested="1.16.0", integration=__name__, extra="trl")

from trl import GRPOConfig, GRPOTrainer

from isreshape_core import GAMMA_METHODS, LEVELS, LOSS_AGG_MODES, LOSS_FORMS

from .loss import is_reshape_loss

__all__ = ["ISReshapeGRPOConfig", "ISReshapeGRPOTrainer"]

#: Values of ``ISReshapeGRPOConfig.is_reshape_loss_agg_mode``.
TRL_LOSS_AGG_MODES = ("dapo", *LOSS_AGG_MODES)
#: Values of ``ISReshapeGRPOConfig.is_reshape_behavior``.
BEHAVIORS = ("auto", "sampling", "old")

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
    gamma chosen per micro-batch from their effective sample size (DESIGN.md 3, items 1-4).

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
        Bounds on gamma passed to :func:`isreshape_core.select_gamma`.

    References
    ----------
    DESIGN.md sections 3 and 6; TRL 1.16 ``GRPOConfig``.

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

    def __post_init__(self) -> None:
        super().__post_init__()
        gamma = self.is_reshape_gamma
        if isinstance(gamma, str) and gamma not in GAMMA_METHODS:
            try:
                gamma = float(gamma)
            except ValueError:
                raise ValueError(
                    f"is_reshape_gamma must be one of {GAMMA_METHODS} or a number in [0, 1], got "
                    f"{gamma!r}"
                ) from None
        if not isinstance(gamma, str):
            if isinstance(gamma, bool) or not isinstance(gamma, int | float):
                raise TypeError(f"is_reshape_gamma must be a str or a number, got {gamma!r}")
            if not (0.0 <= float(gamma) <= 1.0):
                raise ValueError(f"is_reshape_gamma must lie in [0, 1], got {gamma!r}")
            gamma = float(gamma)
        self.is_reshape_gamma = gamma
        if not (0.0 < float(self.is_reshape_rho_min) <= 1.0):
            raise ValueError(
                f"is_reshape_rho_min must lie in (0, 1], got {self.is_reshape_rho_min!r}"
            )
        for name, choices in (
            ("is_reshape_level", LEVELS),
            ("is_reshape_form", LOSS_FORMS),
            ("is_reshape_loss_agg_mode", TRL_LOSS_AGG_MODES),
            ("is_reshape_behavior", BEHAVIORS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
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
        defaults = GRPOConfig.__dataclass_fields__
        for name, instead in _IGNORED_GRPO_FIELDS.items():
            if name in defaults and getattr(self, name) != defaults[name].default:
                raise ValueError(
                    f"ISReshapeGRPOConfig ignores {name}={getattr(self, name)!r}: the IS Reshape "
                    f"loss replaces TRL's clipped losses ({instead}); leave {name} at its default "
                    f"{defaults[name].default!r}"
                )


class ISReshapeGRPOTrainer(GRPOTrainer):
    r"""TRL's ``GRPOTrainer`` trained with the IS Reshape loss.

    Same constructor as ``GRPOTrainer``; ``args`` must be an :class:`ISReshapeGRPOConfig`
    (``None`` gives its defaults). Per micro-batch, with per-token log-probs ``log pi`` (TRL's
    helper), behaviour log-probs ``log mu`` (see the module notes), advantages ``A`` (B,) or
    (B, T) and the completion mask, the loss is
    ``is_reshape_loss(log pi, log mu, A, mask, ...)`` (gradient ``-c A w_u^gamma grad log pi``,
    seed Theorem 2.1), normalised as ``is_reshape_loss_agg_mode`` says. Logged per step (means
    over processes; ``max_weight`` the maximum): ``is_reshape/gamma``, ``is_reshape/ess_ratio``,
    ``is_reshape/ess_ratio_at_1``, ``is_reshape/sigma2``, ``is_reshape/max_weight``,
    ``is_reshape/k_hat`` (Pareto methods), and TRL's ``entropy``.

    References
    ----------
    DESIGN.md sections 3 and 6; TRL 1.16 ``GRPOTrainer._compute_loss``.

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
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _MODEL_INPUT_KEYS},
        )
        logq = self._behavior_log_probs(inputs, per_token_logps)
        gamma_options = {}
        if args.is_reshape_gamma_min is not None:
            gamma_options["gamma_min"] = args.is_reshape_gamma_min
        if args.is_reshape_gamma_max is not None:
            gamma_options["gamma_max"] = args.is_reshape_gamma_max
        agg = args.is_reshape_loss_agg_mode
        bool_mask = mask > 0
        loss, metrics = is_reshape_loss(
            per_token_logps,
            logq,
            inputs["advantages"],
            bool_mask,
            gamma=args.is_reshape_gamma,
            rho_min=args.is_reshape_rho_min,
            level=args.is_reshape_level,
            form=args.is_reshape_form,
            loss_agg_mode="token-mean" if agg == "dapo" else agg,
            loss_scale_factor=args.is_reshape_loss_scale_factor,
            distributed=False,
            **gamma_options,
        )
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if agg == "dapo":
            # TRL's dapo normaliser (GRPOTrainer._compute_loss): the tokens of the generation
            # batch over all processes, per accumulation window. The core's token-mean divides
            # by this micro-batch's tokens: rescale (the loss is linear in the coefficients).
            normalizer = (
                inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            )
            if mode == "train":
                normalizer = normalizer * accumulation / args.steps_per_generation
            local = bool_mask.sum().to(loss.dtype).clamp(min=1.0)
            loss = loss * (local / normalizer.to(loss.dtype))
        else:
            loss = loss / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        self._log_is_reshape_metrics(mode, metrics, entropies, bool_mask)
        return loss

    def _log_is_reshape_metrics(
        self,
        mode: str,
        metrics: dict[str, torch.Tensor],
        entropies: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        for name, value in metrics.items():
            gathered = self.accelerator.gather(value.detach().float().reshape(1))
            reduced = gathered.max() if name == "max_weight" else gathered.nanmean()
            self._metrics[mode][f"is_reshape/{name}"].append(reduced.item())
        m = mask.to(entropies.dtype)
        totals = self.accelerator.reduce(
            torch.stack([(entropies.detach() * m).sum(), m.sum()]), reduction="sum"
        )
        entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        self._metrics[mode]["entropy"].append(entropy if math.isfinite(entropy) else float("nan"))
