"""verl's v1 trainer with IS Reshape's gamma chosen once per optimizer step (``is_reshape``).

Importing this module (``VERL_USE_EXTERNAL_MODULES=isreshape_torch.verl_trainer``: ``import
verl`` imports it in the driver and in every worker) registers the policy loss ``is_reshape``
(:mod:`isreshape_torch.verl`) and the trainer ``is_reshape`` (``trainer.v1.trainer_mode=
is_reshape``): verl's synchronous trainer whose actor worker, for every mini-batch (one optimizer
step) and before verl splits it into micro-batches, runs :func:`isreshape_torch.verl.
prepare_step_gamma` over verl's data-parallel group, and whose loss function
(:func:`isreshape_torch.verl.is_reshape_ppo_loss`, installed with verl's ``set_loss_fn``) hands
each micro-batch's per-sample gamma to the loss. Everything else is verl's.

Extension points used (verl 0.9.1): ``register_trainer`` (``verl/trainer/ppo/v1/
trainer_base.py``), the trainer's worker mapping (``_init_resource_pool_mgr``), the actor
worker's ``actor_worker_cls`` and ``set_loss_fn`` (``verl/workers/engine_workers.py``), and the
engine's ``infer_batch`` and ``get_data_parallel_group`` (``verl/workers/engine/base.py``).

Parallelism. The statistics are all-reduced over ``engine.get_data_parallel_group()``: with FSDP
(and Ulysses) the ``dp`` mesh dimension, with Megatron the data-parallel group of the rank's
(tensor, pipeline, context) coordinates, whose members all hold the whole mini-batch between
them, so tensor-, pipeline- and context-parallel ranks do not count twice. With
``loss_mode=is_reshape`` the extra no-grad forward pass yields log-probabilities only where
Megatron computes the loss (the last pipeline stage); the other stages skip the hook (they never
call the loss) and the collective runs among the last stage's data-parallel group. Megatron's
dynamic context parallelism (one replicated batch over the DP x CP plane) is refused.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import ray
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from .verl import is_reshape_options, is_reshape_ppo_loss, prepare_step_gamma

__all__ = ["ISReshapeActorRolloutRefWorker", "ISReshapeTrainer", "ISReshapeTrainingWorker"]


def _needs_forward(policy_loss_config: Any) -> bool:
    options = is_reshape_options(policy_loss_config)
    loss_mode = policy_loss_config.get("loss_mode", "vanilla")
    fixed = isinstance(options["gamma"], numbers.Real) and options["group_by"] is None
    return (
        loss_mode == "is_reshape"
        and not options["rollout_correction"]
        and options["scope"] == "step"
        and not fixed
    )


class ISReshapeTrainingWorker(TrainingWorker):
    """verl's ``TrainingWorker`` that chooses the step's gamma before each mini-batch."""

    policy_loss_config: Any = None  # the actor's policy_loss, set by the outer worker

    def train_batch(self, data: Any) -> Any:
        """The step hook, then verl's ``train_batch``; the step's metrics join verl's."""
        metrics = {} if self.policy_loss_config is None else self._prepare_step(data)
        output = super().train_batch(data)
        if output is not None and metrics:
            merged = dict(tu.get(output, "metrics"))
            merged.update(metrics)
            tu.assign_non_tensor(output, metrics=merged)
        return output

    def _prepare_step(self, data: Any) -> dict[str, float]:
        if getattr(self.engine_config, "dynamic_context_parallel", False):
            raise ValueError(
                "IS Reshape's step gamma does not support Megatron's dynamic context parallelism "
                "(actor.megatron.dynamic_context_parallel): its batch is replicated over the data- "
                "and context-parallel plane; disable it"
            )
        log_prob = None
        if _needs_forward(self.policy_loss_config):
            log_prob = self._current_log_prob(data)
            if log_prob is None:  # this rank does not compute the loss (not Megatron's last stage)
                return {}
        return prepare_step_gamma(
            data,
            self.policy_loss_config,
            dp_group=self.engine.get_data_parallel_group(),
            log_prob=log_prob,
        )

    def _current_log_prob(self, data: Any) -> Any:
        """One no-grad forward pass of the mini-batch at the step's parameters (padded)."""
        probe = data.copy()
        defaults = dict(  # the keys that verl's train_batch fills in, so the split is the same
            use_remove_padding=self.model_config.get("use_remove_padding", False),
            use_dynamic_bsz=self.engine_config.use_dynamic_bsz,
            max_token_len_per_gpu=self.engine_config.max_token_len_per_gpu,
            micro_batch_size_per_gpu=self.engine_config.micro_batch_size_per_gpu,
            use_fused_kernels=self.engine_config.use_fused_kernels,
        )
        for key, val in defaults.items():
            if key not in probe.keys():
                tu.assign_non_tensor(probe, **{key: val})
        tu.assign_non_tensor(probe, calculate_entropy=False)
        with self.engine.eval_mode(disable_auto_offload=True):
            output = self.engine.infer_batch(probe, loss_function=None)
        model_output = output.get("model_output", {}) if isinstance(output, dict) else {}
        if "log_probs" not in model_output:
            return None
        return no_padding_2_padding(model_output["log_probs"], data)


class ISReshapeActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout worker with :class:`ISReshapeTrainingWorker` as its actor."""

    actor_worker_cls = ISReshapeTrainingWorker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """verl's ``init_model``; then the actor's loss becomes :func:`is_reshape_ppo_loss`."""
        super().init_model()
        if self.actor is None:
            return
        loss_fn = self.loss_fn
        if not (isinstance(loss_fn, partial) and loss_fn.func is ppo_loss):
            raise ValueError(
                "trainer.v1.trainer_mode=is_reshape wraps verl's ppo_loss; distillation "
                "(distillation.enabled) installs another loss: disable one of them"
            )
        config = loss_fn.keywords["config"]
        self.actor.policy_loss_config = config.policy_loss
        self.loss_fn = partial(is_reshape_ppo_loss, config=config)
        self.actor.set_loss_fn(self.loss_fn)


@register_trainer("is_reshape")
class ISReshapeTrainer(PPOTrainerSync):
    """verl's synchronous v1 trainer with the IS Reshape actor worker (``trainer_mode=is_reshape``).

    Checks the configuration at start-up (errors name the key and the fix), swaps the actor
    worker for :class:`ISReshapeActorRolloutRefWorker`, and logs the behaviour-correction metrics
    under verl's ``rollout_corr/`` names.
    """

    def _build_replay_buffer(self) -> Any:
        # verl's code compares trainer_mode with "sync"; this trainer is the sync one.
        self.trainer_mode = "sync"
        sync = self.config.trainer.v1.get("sync", {}) or {}
        self.parameter_sync_step = sync.get("parameter_sync_step", 1)
        _check_config(self.config)
        return super()._build_replay_buffer()

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        for role in list(self.role_worker_mapping):
            if role != Role.Critic:
                self.role_worker_mapping[role] = ray.remote(ISReshapeActorRolloutRefWorker)

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        batch = super()._update_actor(batch, metrics=metrics)
        for key in [k for k in metrics if k.startswith("actor/rollout_corr/")]:
            metrics[key[len("actor/") :]] = metrics.pop(key)
        return batch


def _check_config(config: Any) -> None:
    """Configuration errors of the IS Reshape trainer, each naming the key and the fix."""
    actor = config.actor_rollout_ref.actor
    options = is_reshape_options(actor.policy_loss)
    rc = config.algorithm.get("rollout_correction", None) or {}
    bypass = bool(rc.get("bypass_mode", False))
    if options["rollout_correction"]:
        if bypass:
            raise ValueError(
                "is_reshape_rollout_correction=true tempers pi_old / mu of verl's decoupled mode: "
                "set algorithm.rollout_correction.bypass_mode=false"
            )
        if rc.get("rollout_is", None) is not None:
            raise ValueError(
                "is_reshape_rollout_correction=true replaces verl's truncated IS weights: set "
                "algorithm.rollout_correction.rollout_is=null"
            )
        if not config.actor_rollout_ref.rollout.get("calculate_log_probs", False):
            raise ValueError(
                "is_reshape_rollout_correction=true needs the rollout's log-probabilities: set "
                "actor_rollout_ref.rollout.calculate_log_probs=true"
            )
    if actor.policy_loss.get("loss_mode", "vanilla") == "is_reshape" and bypass:
        if not config.actor_rollout_ref.rollout.get("calculate_log_probs", False):
            raise ValueError(
                "loss_mode=is_reshape in bypass mode reweights against the rollout's "
                "log-probabilities: set actor_rollout_ref.rollout.calculate_log_probs=true"
            )
