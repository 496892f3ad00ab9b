"""The IS Reshape loss in Tunix (``google-tunix`` 0.1.x): a GRPO learner trained with it.

Tunix's GRPO learner takes its policy loss from a registry (``tunix.rl.function_registry``,
looked up by ``GRPOConfig.policy_loss_fn``). Importing this module registers
:func:`is_reshape_policy_loss_fn` there under the name ``"is_reshape"``: per micro-batch it
computes the per-token log-probabilities with Tunix's own helper
(``tunix.rl.common.compute_per_token_logps``, at the rollout temperature, as Tunix's GRPO loss
does) and hands them, the behaviour log-probabilities Tunix gathered and the group advantages to
:func:`isreshape_jax.is_reshape_loss`. Generation, rewards, advantages, gradient accumulation,
checkpoints and logging stay Tunix's.

Usage::

    from isreshape_jax.tunix import ISReshapeGRPOConfig, ISReshapeGRPOLearner

    algo_config = ISReshapeGRPOConfig(num_generations=4, num_iterations=2,
                                      is_reshape_gamma="ess", is_reshape_rho_min=0.3)
    learner = ISReshapeGRPOLearner(rl_cluster=cluster, algo_config=algo_config,
                                   reward_fns=reward_fn)
    learner.train(dataset)

**Behaviour policy.** With ``num_iterations > 1`` Tunix scores every generated batch with the
policy that sampled it (``old_per_token_logps``), and each batch serves ``num_iterations``
optimizer steps: the later ones are off-policy and IS Reshape weighs them by
``w = pi / pi_old``. With ``num_iterations == 1`` Tunix computes no old log-probabilities; the
data are on-policy, ``w = 1`` and the loss is REINFORCE.

**One gamma per optimizer step.** An optimizer step of Tunix is ``mini_batch_size`` prompts,
trained as ``mini_batch_size / train_micro_batch_size`` micro-batches with gradient
accumulation. With more than one micro-batch and an adaptive gamma, the learner computes the
step's gamma before the step's first micro-batch: the current policy's log-probabilities of
all the step's samples (one forward pass each, no gradient), their log weights, and
:func:`isreshape_core.step_gamma`; every micro-batch's loss then uses that gamma. With one
micro-batch per step the loss chooses gamma itself, from the same samples.

**Aggregation.** ``GRPOConfig.loss_agg_mode`` is honoured with Tunix's normalisers
(``tunix.rl.common.aggregate_loss``): ``token-mean``, ``sequence-mean-token-mean``,
``seq-mean-token-sum``, ``sequence-mean-token-scale``, ``sequence-mean-token-sum-norm``.

**Not supported** (an error when the config is made): ``beta != 0`` (the KL term; Tunix's
default is 0.04, this config's is 0), and non-default values of the settings that only Tunix's
clipped losses read (``epsilon``, ``epsilon_high``, ``epsilon_c``, ``loss_algo``); and, at the
learner, sequence packing (``max_seq_token_per_tpu``).

Tested with google-tunix 0.1.7; supports google-tunix >=0.1.7,<0.1.8 (``TUNIX_SUPPORTED``: the
learner hooks into Tunix's data queue, not a public interface); with another version, or none,
importing this module raises ``ImportError`` naming the range. See the docs page *Tunix*.

References: Tunix 0.1.7 ``tunix/rl/algo_core.py`` (``grpo_loss_fn``, whose structure the loss
follows; ``aggregate_loss`` in ``tunix/rl/common.py``), ``tunix/rl/rl_learner.py``
(``_prepare_data``, ``_run_all_micro_batch_steps``: where the step's micro-batches are queued)
and ``tunix/sft/peft_trainer.py`` (gradient accumulation with ``optax.MultiSteps``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isreshape_core import (
    GAMMA_METHODS,
    LEVELS,
    LOSS_FORMS,
    log_weights,
    metric_reduction,
    step_gamma,
)
from isreshape_core.extend import check_choice, check_rho_min, require

from .loss import is_reshape_loss

# How the micro-batches' values of a metric combine in Tunix's logs (isreshape_core.METRIC_MERGE).
_LOG_REDUCTIONS = {"mean": np.mean, "max": np.max, "sum": np.sum}

#: The Tunix release this integration is tested with.
TUNIX_TESTED = "0.1.7"
#: The Tunix releases this module supports; on others its import fails. The learner hooks into
#: Tunix's data queue (``RLLearner._prepare_data``), which is not a public interface and changed
#: between 0.1.x releases, so only the tested release series is admitted.
TUNIX_SUPPORTED = ">=0.1.7,<0.1.8"
TUNIX_VERSION = require(
    "google-tunix",
    TUNIX_SUPPORTED,
    tested=TUNIX_TESTED,
    integration=__name__,
    extra="tunix",
    module="tunix",
)

from tunix.rl import common, function_registry  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402

__all__ = [
    "POLICY_LOSS_NAME",
    "TUNIX_LOSS_AGG_MODES",
    "TUNIX_SUPPORTED",
    "TUNIX_TESTED",
    "ISReshapeGRPOConfig",
    "ISReshapeGRPOLearner",
    "ISReshapeTrainExample",
    "is_reshape_policy_loss_fn",
]

#: The name under which the loss is registered in Tunix's policy-loss registry.
POLICY_LOSS_NAME = "is_reshape"

#: Tunix's ``loss_agg_mode`` values -> (the core's mode, divide by the non-empty rows, the
#: core's ``loss_scale_factor``: None for the response length T).
_AGG = {
    "token-mean": ("token-mean", False, None),
    "sequence-mean-token-mean": ("seq-mean-token-mean", True, None),
    "seq-mean-token-sum": ("seq-mean-token-sum", True, None),
    "sequence-mean-token-scale": ("seq-mean-token-sum-norm", True, None),
    "sequence-mean-token-sum-norm": ("seq-mean-token-sum-norm", True, 1.0),
}
#: Values of ``GRPOConfig.loss_agg_mode`` the IS Reshape loss supports (all of Tunix's).
TUNIX_LOSS_AGG_MODES = tuple(_AGG)
_PARETO_METHODS = ("psis", "tail", "combined")
# Settings only Tunix's own clipped GRPO loss reads, and what to do instead.
_IGNORED_FIELDS = {
    "epsilon": "gamma, not a clip, bounds the weights",
    "epsilon_high": "gamma, not a clip, bounds the weights",
    "epsilon_c": "gamma, not a clip, bounds the weights",
    "loss_algo": "set is_reshape_level='geometric' for GSPO-style sequence weights",
}


@dataclasses.dataclass(kw_only=True)
class ISReshapeGRPOConfig(grpo_learner.GRPOConfig):
    r"""Tunix's ``GRPOConfig`` with the IS Reshape options (``policy_loss_fn="is_reshape"``).

    The loss is ``-L_gamma`` with ``L_gamma = agg(A · expm1(gamma l_u)/gamma)``, ``l_u`` the log
    importance weights of the policy against the old (sampling) policy at ``is_reshape_level``,
    ``A`` Tunix's advantages, ``agg`` Tunix's ``loss_agg_mode``, and gamma chosen once per
    optimizer step from the effective sample size of the step's weights (docs: *Choosing
    gamma*).

    Attributes
    ----------
    is_reshape_gamma : str or float
        ``"ess"`` (default), ``"closed_form"``, ``"psis"``, ``"tail"``, ``"combined"``, or a
        fixed gamma in [0, 1].
    is_reshape_rho_min : float
        Least acceptable ESS ratio, in (0, 1].
    is_reshape_level : str
        ``"sequence"`` (default), ``"geometric"`` (GSPO-style mean per token) or ``"token"``.
    is_reshape_form : str
        ``"objective"`` (Box-Cox value) or ``"reinforce"``; the same gradient.
    is_reshape_per_group : bool
        One gamma per GRPO group (the ``num_generations`` responses to one prompt) instead of
        one for the whole step.
    is_reshape_gamma_min, is_reshape_gamma_max : float, optional
        Bounds on gamma (:func:`isreshape_core.select_gamma`).

    Examples
    --------
    >>> config = ISReshapeGRPOConfig(num_generations=4, num_iterations=2,
    ...                              is_reshape_gamma="ess", is_reshape_rho_min=0.5)
    >>> print(config.policy_loss_fn, config.beta, config.is_reshape_level)
    is_reshape 0.0 sequence
    """

    policy_loss_fn: str = POLICY_LOSS_NAME
    beta: float = 0.0
    is_reshape_gamma: str | float = "ess"
    is_reshape_rho_min: float = 0.3
    is_reshape_level: str = "sequence"
    is_reshape_form: str = "objective"
    is_reshape_per_group: bool = False
    is_reshape_gamma_min: float | None = None
    is_reshape_gamma_max: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        gamma = self.is_reshape_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, str | int | float):
            raise TypeError(f"is_reshape_gamma must be a method name or a number, got {gamma!r}")
        if isinstance(gamma, str) and gamma not in GAMMA_METHODS:
            raise ValueError(
                f"is_reshape_gamma must be one of {GAMMA_METHODS} or a number in [0, 1], got "
                f"{gamma!r}"
            )
        if not isinstance(gamma, str):
            if not 0.0 <= float(gamma) <= 1.0:
                raise ValueError(f"is_reshape_gamma must lie in [0, 1], got {gamma!r}")
            self.is_reshape_gamma = float(gamma)
        check_rho_min(float(self.is_reshape_rho_min), "is_reshape_rho_min")
        check_choice(self.is_reshape_level, "is_reshape_level", LEVELS)
        check_choice(self.is_reshape_form, "is_reshape_form", LOSS_FORMS)
        check_choice(self.loss_agg_mode, "loss_agg_mode", TUNIX_LOSS_AGG_MODES)
        if self.policy_loss_fn != POLICY_LOSS_NAME:
            raise ValueError(
                f"ISReshapeGRPOConfig trains with policy_loss_fn={POLICY_LOSS_NAME!r}, got "
                f"{self.policy_loss_fn!r}; use Tunix's GRPOConfig for its own losses"
            )
        if self.beta != 0.0:
            raise ValueError(
                f"ISReshapeGRPOConfig does not support beta={self.beta!r} (a KL term); set beta=0.0"
            )
        self._check_ignored_fields()

    def _check_ignored_fields(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(grpo_learner.GRPOConfig)}
        for name, instead in _IGNORED_FIELDS.items():
            default = defaults.get(name)
            value = getattr(self, name, default)
            if value != default:
                raise ValueError(
                    f"ISReshapeGRPOConfig ignores {name}={value!r}: the IS Reshape loss replaces "
                    f"Tunix's clipped loss ({instead}); leave {name} at {default!r}"
                )

    @property
    def is_reshape_metric_names(self) -> tuple[str, ...]:
        """The metrics the loss reports (``is_reshape/<name>`` in Tunix's logs)."""
        names = ("gamma", "ess_ratio", "ess_ratio_at_1", "sigma2", "max_weight")
        if self.is_reshape_gamma in _PARETO_METHODS:
            names = (*names, "k_hat")
        return names

    def gamma_options(self) -> dict[str, float]:
        """``gamma_min`` / ``gamma_max`` where they are set."""
        options = {}
        if self.is_reshape_gamma_min is not None:
            options["gamma_min"] = float(self.is_reshape_gamma_min)
        if self.is_reshape_gamma_max is not None:
            options["gamma_max"] = float(self.is_reshape_gamma_max)
        return options


@flax.struct.dataclass(frozen=True)
class ISReshapeTrainExample(grpo_learner.TrainExample):
    """Tunix's ``TrainExample`` with its optimizer step's gamma and metrics.

    Attributes
    ----------
    is_reshape_gamma : jax.Array (B,) or (B, T)
        The step's gamma for each sequence (token at ``level="token"``), from
        :func:`isreshape_core.step_gamma`.
    is_reshape_metrics : dict of 0-d jax.Arrays
        The step's metrics (``gamma``, ``ess_ratio``, ...), reported by every micro-batch.

    Examples
    --------
    >>> import dataclasses
    >>> print([f.name for f in dataclasses.fields(ISReshapeTrainExample)][-2:])
    ['is_reshape_gamma', 'is_reshape_metrics']
    """

    is_reshape_gamma: jax.Array | None = None
    is_reshape_metrics: dict[str, jax.Array] | None = None


def _token_logps(
    model: Any,
    prompt_ids: jax.Array,
    completion_ids: jax.Array,
    *,
    pad_id: int,
    eos_id: int,
    temperature: float,
    stop_gradient: bool,
) -> jax.Array:
    """The per-token log-probabilities of the completions under ``model`` at ``temperature``,
    by Tunix's own ``compute_per_token_logps``, in float32."""
    graphdef, state = nnx.split(model)
    logp = common.compute_per_token_logps(
        graphdef,
        state,
        prompt_ids,
        completion_ids,
        pad_id=pad_id,
        eos_id=eos_id,
        stop_gradient=stop_gradient,
        temperature=temperature,
    )
    return jnp.astype(logp, jnp.float32)


@function_registry.register_policy_loss_fn(POLICY_LOSS_NAME)
def is_reshape_policy_loss_fn(
    model: nnx.Module,
    train_example: Any,
    algo_config: ISReshapeGRPOConfig,
    pad_id: int,
    eos_id: int,
    **kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Tunix policy loss ``"is_reshape"``: the IS Reshape loss of one micro-batch.

    With per-token log-probabilities ``log pi`` of ``model`` (Tunix's
    ``compute_per_token_logps``), the old policy's ``log mu`` (``old_per_token_logps``;
    ``stop_gradient(log pi)`` when Tunix computed none: on-policy, ``w = 1``), Tunix's
    advantages ``A`` (B,) and the completion mask, the loss is
    ``is_reshape_loss(log pi, log mu, A, mask, ...)``, gradient ``-c A w_u^gamma grad log pi``,
    normalised as Tunix's ``loss_agg_mode``. Gamma is the example's precomputed step gamma
    (:class:`ISReshapeTrainExample`) when it has one, else chosen from this micro-batch.
    Train through :class:`ISReshapeGRPOLearner`, which attaches the step gamma and logs the
    metrics this loss returns.

    Parameters
    ----------
    model : nnx.Module
        The policy being trained.
    train_example : TrainExample or ISReshapeTrainExample
        One micro-batch, as Tunix's GRPO learner builds it.
    algo_config : ISReshapeGRPOConfig
    pad_id, eos_id : int
        The tokenizer's ids (Tunix passes them).
    **kwargs
        Ignored (Tunix's policy-loss signature).

    Returns
    -------
    loss : 0-d jax.Array (float32)
    aux : dict of 0-d jax.Arrays
        ``is_reshape/gamma``, ``is_reshape/ess_ratio``, ``is_reshape/ess_ratio_at_1``,
        ``is_reshape/sigma2``, ``is_reshape/max_weight`` (and ``is_reshape/k_hat`` for the
        Pareto methods): the optimizer step's values when the step gamma was precomputed.

    Examples
    --------
    Tunix looks the loss up by name once this module is imported:

    >>> from tunix.rl import function_registry
    >>> function_registry.get_policy_loss_fn("is_reshape") is is_reshape_policy_loss_fn
    True
    """
    if not isinstance(algo_config, ISReshapeGRPOConfig):
        raise TypeError(
            "the is_reshape policy loss needs an isreshape_jax.tunix.ISReshapeGRPOConfig, got "
            f"{type(algo_config).__name__}"
        )
    if getattr(train_example, "segment_ids", None) is not None:
        raise ValueError("the is_reshape policy loss does not support packed sequences")
    logp = _token_logps(
        model,
        train_example.prompt_ids,
        train_example.completion_ids,
        pad_id=pad_id,
        eos_id=eos_id,
        temperature=algo_config.temperature,
        stop_gradient=False,
    )
    old = train_example.old_per_token_logps
    logq = jax.lax.stop_gradient(logp) if old is None else jnp.astype(old, jnp.float32)
    mask = jnp.asarray(train_example.completion_mask) > 0
    advantages = jnp.astype(train_example.advantages, jnp.float32)
    precomputed = getattr(train_example, "is_reshape_gamma", None)
    mode, per_row, scale = _AGG[algo_config.loss_agg_mode]
    per_group = algo_config.is_reshape_per_group and precomputed is None
    if precomputed is None and isinstance(algo_config.is_reshape_gamma, float):
        per_group = False  # a fixed number is the same for every group
    loss, metrics = is_reshape_loss(
        logp,
        logq,
        advantages,
        mask,
        gamma=algo_config.is_reshape_gamma if precomputed is None else precomputed,
        rho_min=algo_config.is_reshape_rho_min,
        level=algo_config.is_reshape_level,
        loss_agg_mode=mode,
        form=algo_config.is_reshape_form,
        group_size=algo_config.num_generations if per_group else None,
        loss_scale_factor=scale,
        **({} if precomputed is not None else algo_config.gamma_options()),
    )
    if per_row:
        # Tunix divides by the sequences holding a token (aggregate_loss), the core by B (or
        # not at all, for the token-sum modes): rescale, the loss is linear in the weights.
        rows = mask.shape[0] if mode in ("seq-mean-token-mean", "seq-mean-token-sum") else 1
        non_empty = jnp.maximum(jnp.sum(jnp.any(mask, axis=-1)), 1).astype(loss.dtype)
        loss = loss * (rows / non_empty)
    step_metrics = getattr(train_example, "is_reshape_metrics", None)
    if step_metrics is not None:
        metrics = step_metrics
    aux = {f"is_reshape/{k}": metrics[k] for k in algo_config.is_reshape_metric_names}
    return loss, aux


class _StepMicroBatch:
    """One queued micro-batch; iterating it (when Tunix's trainer takes it) yields the example
    with its optimizer step's gamma, computed on first use with the parameters of that time."""

    def __init__(self, step: _OptimizerStep, index: int) -> None:
        self._step, self._index = step, index

    def __iter__(self) -> Iterator[ISReshapeTrainExample]:
        yield self._step.example(self._index)


class _OptimizerStep:
    """The micro-batches of one optimizer step and, once computed, their step gamma."""

    def __init__(self, learner: ISReshapeGRPOLearner, examples: list[Any]) -> None:
        self._learner, self.examples = learner, examples
        self._gammas: list[jax.Array] | None = None
        self._metrics: dict[str, jax.Array] | None = None

    def example(self, index: int) -> ISReshapeTrainExample:
        if self._gammas is None:
            self._gammas, self._metrics = self._learner._step_gamma(self.examples)
        ex = self.examples[index]
        fields = {f.name: getattr(ex, f.name) for f in dataclasses.fields(ex)}
        fields.update(is_reshape_gamma=self._gammas[index], is_reshape_metrics=self._metrics)
        return ISReshapeTrainExample(**fields)


class _StepQueue:
    """Wraps Tunix's training data queue: groups each optimizer step's ``steps`` micro-batches
    (put one by one as ``[example]``) into one :class:`_OptimizerStep`."""

    def __init__(self, queue: Any, learner: ISReshapeGRPOLearner, steps: int) -> None:
        self._queue, self._learner, self._steps = queue, learner, steps
        self._pending: list[Any] = []

    def put(self, item: Any) -> None:
        if item is None:
            self._flush()
            self._queue.put(None)
            return
        self._pending.extend(item)
        if len(self._pending) >= self._steps:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        step = _OptimizerStep(self._learner, self._pending)
        self._pending = []
        for i in range(len(step.examples)):
            self._queue.put(_StepMicroBatch(step, i))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


@functools.partial(nnx.jit, static_argnames=("pad_id", "eos_id", "temperature"))
def _detached_logps(model, prompt_ids, completion_ids, *, pad_id, eos_id, temperature):
    """:func:`_token_logps` without gradient, compiled: a scoring pass outside the loss."""
    return _token_logps(
        model,
        prompt_ids,
        completion_ids,
        pad_id=pad_id,
        eos_id=eos_id,
        temperature=temperature,
        stop_gradient=True,
    )


class ISReshapeGRPOLearner(grpo_learner.GRPOLearner):
    r"""Tunix's ``GRPOLearner`` trained with the IS Reshape loss, one gamma per optimizer step.

    Same constructor as ``GRPOLearner``; ``algo_config`` must be an
    :class:`ISReshapeGRPOConfig`. The loss is :func:`is_reshape_policy_loss_fn` (registered
    as ``"is_reshape"``). When an optimizer step spans several micro-batches
    (``mini_batch_size > train_micro_batch_size``), the data are off-policy
    (``num_iterations > 1``) and gamma is adaptive, the step's gamma is computed just before
    the step's first micro-batch trains: the current policy's log-probabilities of every sample
    of the step, their unit log weights against Tunix's ``old_per_token_logps``, and
    :func:`isreshape_core.step_gamma` over all of them (per GRPO group with
    ``is_reshape_per_group``); each micro-batch's loss uses it and reports the step's metrics.

    Logged with Tunix's actor metrics, per optimizer step: ``is_reshape/gamma``,
    ``is_reshape/ess_ratio``, ``is_reshape/ess_ratio_at_1``, ``is_reshape/sigma2``,
    ``is_reshape/max_weight`` and, for the Pareto methods, ``is_reshape/k_hat``.

    Examples
    --------
    Training needs a cluster, a model and data (see the docs page *Tunix*):

    >>> from tunix.rl.grpo.grpo_learner import GRPOLearner
    >>> print(issubclass(ISReshapeGRPOLearner, GRPOLearner))
    True
    """

    def __init__(
        self,
        rl_cluster: rl_cluster_lib.RLCluster,
        algo_config: ISReshapeGRPOConfig,
        reward_fns: Any,
        metric_fns: Any = None,
        data_shuffle_seed: int | None = None,
    ) -> None:
        if not isinstance(algo_config, ISReshapeGRPOConfig):
            raise TypeError(
                "algo_config must be an isreshape_jax.tunix.ISReshapeGRPOConfig (it carries the "
                f"IS Reshape options), got {type(algo_config).__name__}"
            )
        packing = rl_cluster.cluster_config.training_config.max_seq_token_per_tpu
        if packing is not None:
            raise ValueError(
                f"ISReshapeGRPOLearner does not support sequence packing "
                f"(max_seq_token_per_tpu={packing!r}); set max_seq_token_per_tpu=None"
            )
        super().__init__(
            rl_cluster=rl_cluster,
            algo_config=algo_config,
            reward_fns=reward_fns,
            metric_fns=metric_fns,
            data_shuffle_seed=data_shuffle_seed,
        )
        names = algo_config.is_reshape_metric_names
        self.rl_cluster.actor_trainer.with_rl_metrics_to_log(
            {f"is_reshape/{n}": _LOG_REDUCTIONS[metric_reduction(n)] for n in names}
        )
        self.rl_cluster.actor_trainer.with_tqdm_metrics_to_display(["is_reshape/gamma"])

    def _generate_and_compute_advantage(
        self, training_input: Any, mode: rl_cluster_lib.Mode = rl_cluster_lib.Mode.TRAIN
    ) -> Any:
        example = super()._generate_and_compute_advantage(training_input, mode)
        temperature = self.rl_cluster.get_rollout_config(mode=mode).temperature
        if (
            example.old_per_token_logps is None
            or temperature in (0.0, 1.0)
            or self.rl_cluster.cluster_config.rollout_engine != "vanilla"
        ):
            return example
        # Tunix 0.1.7's vanilla rollout scores the old log-probs at temperature 1
        # (VanillaRollout.get_per_token_logps), while it samples, and the loss scores, at the
        # rollout temperature: the weights would carry that mismatch (a ratio != 1 before any
        # update). Rescore with the sampler's parameters at its temperature.
        model = self.rl_cluster.rollout.model()
        rows = example.prompt_ids.shape[0]
        size = (self._compute_logps_micro_batch_size or rows) * self.algo_config.num_generations
        old = [
            self._score(
                model,
                example.prompt_ids[lo : lo + size],
                example.completion_ids[lo : lo + size],
                temperature,
            )
            for lo in range(0, rows, size)
        ]
        return example.replace(old_per_token_logps=jnp.concatenate(old, axis=0))

    def _score(
        self, model: Any, prompt_ids: jax.Array, completion_ids: jax.Array, temperature: float
    ) -> jax.Array:
        """Detached log-probabilities of the completions under ``model``, with the rollout's
        pad and end-of-sequence ids."""
        rollout = self.rl_cluster.rollout
        return _detached_logps(
            model,
            prompt_ids,
            completion_ids,
            pad_id=rollout.pad_id(),
            eos_id=rollout.eos_id(),
            temperature=temperature,
        )

    def _needs_step_gamma(self, micro_batches_per_step: int) -> bool:
        cfg = self.algo_config
        return (
            micro_batches_per_step > 1
            and isinstance(cfg.is_reshape_gamma, str)
            and cfg.num_iterations > 1  # else Tunix has no old log-probs: on-policy, w = 1
        )

    def _prepare_data(
        self,
        iterator: Any,
        proceed_num_steps: int,
        sample_repeat: int,
        batch_repeat: int,
        service_target_batch_size: int,
        data_queue: Any,
        async_loading: bool = False,
        mode: rl_cluster_lib.Mode = rl_cluster_lib.Mode.TRAIN,
    ) -> None:
        # For training, Tunix queues one optimizer step's micro-batches (proceed_num_steps of
        # them, each repeated num_iterations times, in order) before the trainer takes them.
        if mode == rl_cluster_lib.Mode.TRAIN and self._needs_step_gamma(proceed_num_steps):
            data_queue = _StepQueue(data_queue, self, proceed_num_steps)
        return super()._prepare_data(
            iterator,
            proceed_num_steps,
            sample_repeat,
            batch_repeat,
            service_target_batch_size,
            data_queue,
            async_loading=async_loading,
            mode=mode,
        )

    def _step_gamma(self, examples: list[Any]) -> tuple[list[jax.Array], dict[str, jax.Array]]:
        """The optimizer step's gamma for each of its micro-batches, and the step's metrics."""
        cfg = self.algo_config
        token = cfg.is_reshape_level == "token"
        model = self.rl_cluster.actor_trainer.model
        units, valid, groups, shapes = [], [], [], []
        num_groups = 0
        for ex in examples:
            logp = self._score(model, ex.prompt_ids, ex.completion_ids, cfg.temperature)
            mask = jnp.asarray(ex.completion_mask) > 0
            logq = jnp.astype(ex.old_per_token_logps, jnp.float32)
            l = log_weights(logp, logq, mask, level=cfg.is_reshape_level)
            rows = l.shape[0]
            ids = num_groups + jnp.arange(rows) // cfg.num_generations
            num_groups += rows // cfg.num_generations
            if token:
                ids = jnp.broadcast_to(ids[:, None], l.shape)
            shapes.append(l.shape)
            units.append(jnp.reshape(l, (-1,)))
            valid.append(jnp.reshape(mask if token else jnp.any(mask, axis=-1), (-1,)))
            groups.append(jnp.reshape(ids, (-1,)))
        gamma, metrics = _jitted_step_gamma(
            jnp.concatenate(units),
            jnp.concatenate(valid),
            jnp.concatenate(groups) if cfg.is_reshape_per_group else None,
            rho_min=float(cfg.is_reshape_rho_min),
            method=cfg.is_reshape_gamma,
            num_groups=num_groups if cfg.is_reshape_per_group else None,
            options=tuple(sorted(cfg.gamma_options().items())),
        )
        bounds = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        gammas = [
            jnp.reshape(gamma[lo:hi], shape)
            for lo, hi, shape in zip(bounds[:-1], bounds[1:], shapes, strict=True)
        ]
        return gammas, {k: metrics[k] for k in cfg.is_reshape_metric_names}


@functools.partial(jax.jit, static_argnames=("rho_min", "method", "num_groups", "options"))
def _jitted_step_gamma(log_w, mask, group_ids, *, rho_min, method, num_groups, options):
    return step_gamma(
        log_w,
        rho_min,
        method=method,
        mask=mask,
        group_ids=group_ids,
        num_groups=num_groups,
        **dict(options),
    )
