"""Tests of adapters/isreshape_jax/tunix.py against Tunix itself (google-tunix 0.1.x, installed).

A tiny Qwen3 (one layer, built from Tunix's ``ModelConfig``) with a character tokenizer trains
offline on CPU for a few real GRPO optimizer steps through Tunix's ``RLCluster`` and learner,
two micro-batches per optimizer step and two iterations per generated batch (the second one
off-policy). A spy on the cluster records each micro-batch as the trainer receives it and the
parameters at that time; the step's gamma is checked against a NumPy ESS computation over all
the step's samples, with log-probabilities recomputed here from the model's logits, and the
loss (value and parameter gradient) against the loss written out in plain JAX with Tunix's own
aggregation (``tunix.rl.common.aggregate_loss``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

jax = pytest.importorskip("jax")
pytest.importorskip("tunix")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402
from tunix.rl import common, function_registry  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402

from isreshape_jax import tunix as isr_tunix  # noqa: E402
from isreshape_jax.tunix import (  # noqa: E402
    ISReshapeGRPOConfig,
    ISReshapeGRPOLearner,
    ISReshapeTrainExample,
)

ALPHABET = "abc"
RHO = 0.99
TEMPERATURE = 0.9
NUM_GENERATIONS = 2
PROMPTS = ["ab", "ba", "cab", "bc"]


class CharTokenizer:
    """One token per character, with pad / bos / eos (Tunix's tokenizer protocol)."""

    specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self) -> None:
        self.itos = [*self.specials, *ALPHABET]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def encode(self, text, **kwargs):
        return [self.stoi[c] for c in text]

    def decode(self, ids, **kwargs):
        return "".join(self.itos[i] for i in ids if i >= len(self.specials))

    def pad_id(self):
        return 0

    def bos_id(self):
        return 1

    def eos_id(self):
        return 2


def tiny_qwen3(seed=0):
    config = qwen3.ModelConfig(
        num_layers=1,
        vocab_size=len(CharTokenizer().itos),
        embed_dim=16,
        hidden_dim=32,
        num_heads=2,
        head_dim=8,
        num_kv_heads=1,
        rope_theta=10_000,
        norm_eps=1e-6,
    )
    return qwen3.Qwen3(config, rngs=nnx.Rngs(seed))


def count_a(prompts, completions, **kwargs):
    return [float(c.count("a")) for c in completions]


def make_learner(mini_batch_size=4, train_micro_batch_size=2, max_steps=4, **config):
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adam(3e-2),
        eval_every_n_steps=1000,
        max_steps=max_steps,
        mini_batch_size=mini_batch_size,
        train_micro_batch_size=train_micro_batch_size,
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=tiny_qwen3(),
        reference=None,
        tokenizer=CharTokenizer(),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh=dict.fromkeys(roles, mesh),
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=training,
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=6,
                max_prompt_length=4,
                kv_cache_size=16,
                temperature=TEMPERATURE,
            ),
        ),
    )
    options = dict(num_generations=NUM_GENERATIONS, num_iterations=2, is_reshape_rho_min=RHO)
    options.update(config)
    learner = ISReshapeGRPOLearner(
        rl_cluster=cluster, algo_config=ISReshapeGRPOConfig(**options), reward_fns=count_a
    )
    return learner, cluster


@pytest.fixture(scope="module")
def trained():
    """Two generated batches of 4 prompts x 2 responses, each trained for 2 iterations of one
    optimizer step (2 micro-batches of 2 prompts): 4 optimizer steps, 8 micro-batches."""
    learner, cluster = make_learner()
    model = cluster.actor_trainer.model
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    records = []
    update_actor = cluster.update_actor

    def spy(train_ds, eval_ds, skip_jit=False):
        examples = list(train_ds)  # the trainer's own first step: iterate the queued item
        params = jax.tree.map(np.array, nnx.state(model, nnx.Param))
        records.extend((ex, params) for ex in examples)
        return update_actor(examples, eval_ds, skip_jit)

    cluster.update_actor = spy
    learner.train([{"prompts": PROMPTS} for _ in range(2)])
    return learner, cluster, before, records


# ----------------------------------------------------------------------------------------------
# references, written out here


def reference_logps(params, example, temperature=TEMPERATURE):
    """Completion-token log-probs under ``params`` (a model or its parameter state): log-softmax
    of the model's shifted logits, with the positions and causal padding mask of the prompt +
    completion tokens."""
    if isinstance(params, nnx.Module):
        model = params
    else:
        model = tiny_qwen3()
        nnx.update(model, params)
    tokens = jnp.concatenate([example.prompt_ids, example.completion_ids], axis=1)
    valid = tokens != CharTokenizer().pad_id()
    count = jnp.cumsum(valid, axis=-1)
    positions = count - (count >= 1)
    L = tokens.shape[1]
    attention = valid[:, None, :] & jnp.tril(jnp.ones((L, L), dtype=bool))[None]
    logits, _ = model(tokens, positions, None, attention)
    T = example.completion_ids.shape[1]
    logits = logits[:, -T - 1 : -1, :] / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, example.completion_ids[..., None], axis=-1)[..., 0]


def unit_log_weights(logp, example, level):
    m = np.asarray(example.completion_mask, dtype=np.float64)
    tok = (np.asarray(logp, np.float64) - np.asarray(example.old_per_token_logps)) * m
    if level == "token":
        return tok, m > 0
    seq = tok.sum(-1)
    if level == "geometric":
        seq = seq / np.maximum(m.sum(-1), 1)
    return seq, m.sum(-1) > 0


def ess_ratio(l, gamma):
    w = np.exp(gamma * (l - l.max()))
    return w.sum() ** 2 / (w**2).sum() / l.size


def ess_gamma(l, rho):
    """The largest gamma on a fine grid whose ESS ratio is at least rho (brute force)."""
    grid = np.linspace(0.0, 1.0, 20001)
    ok = np.array([ess_ratio(l, g) >= rho for g in grid])
    return grid[ok].max()


def steps_of(records):
    return [records[i : i + 2] for i in range(0, len(records), 2)]


# ----------------------------------------------------------------------------------------------
# real training


def test_trains_real_steps_and_logs_metrics(trained):
    _, cluster, before, records = trained
    trainer = cluster.actor_trainer
    assert trainer.train_steps == 4 and len(records) == 8
    after = jax.tree.map(np.array, nnx.state(trainer.model, nnx.Param))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert any(changed)
    logger, prefix = trainer.metrics_logger, trainer.metrics_prefix
    gamma = logger.get_metric_history(prefix, "is_reshape/gamma", "train")
    ess = logger.get_metric_history(prefix, "is_reshape/ess_ratio", "train")
    ess1 = logger.get_metric_history(prefix, "is_reshape/ess_ratio_at_1", "train")
    assert len(gamma) == len(ess) == len(ess1) == 4
    assert np.all((gamma >= 0) & (gamma <= 1)) and np.all(ess >= RHO - 1e-5)
    assert np.all(np.isfinite(logger.get_metric_history(prefix, "loss", "train")))
    # the logged gamma of each step is the one its micro-batches trained with
    used = [float(step[0][0].is_reshape_gamma[0]) for step in steps_of(records)]
    np.testing.assert_allclose(gamma, used, rtol=1e-6)
    # steps 1 and 3 retrain their batch after an update: off-policy, gamma < 1
    assert gamma[1] < 1.0 and gamma[3] < 1.0 and ess1[1] < RHO


def test_one_gamma_per_optimizer_step_from_all_its_samples(trained):
    _, _, _, records = trained
    split_differs = False
    for index, step in enumerate(steps_of(records)):
        (ex0, p0), (ex1, p1) = step
        # gradient accumulation: the parameters do not move inside a step
        for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
            np.testing.assert_array_equal(a, b)
        assert isinstance(ex0, ISReshapeTrainExample) and ex0.is_reshape_gamma.shape == (4,)
        g = np.concatenate([np.asarray(ex0.is_reshape_gamma), np.asarray(ex1.is_reshape_gamma)])
        assert np.all(g == g[0])
        parts = []
        for ex in (ex0, ex1):
            l, valid = unit_log_weights(reference_logps(p0, ex), ex, "sequence")
            parts.append(l[valid])  # empty completions are no samples
        if index % 2 == 0:
            # the first iteration on a batch is on-policy: the old log-probs are the current
            # policy's at the sampling temperature, so every weight is 1
            np.testing.assert_allclose(np.concatenate(parts), 0.0, atol=1e-4)
        expected = ess_gamma(np.concatenate(parts), RHO)
        assert abs(g[0] - expected) <= 2e-4
        split_differs |= any(abs(ess_gamma(part, RHO) - g[0]) > 1e-2 for part in parts)
    # the micro-batches alone would have chosen another gamma: the step's is not theirs
    assert split_differs


@pytest.mark.parametrize(
    ("level", "per_group"), [("token", False), ("geometric", False), ("sequence", True)]
)
def test_step_gamma_levels_and_groups(trained, monkeypatch, level, per_group):
    """The step gamma at every level, and per GRPO group (the num_generations consecutive
    responses to one prompt), against brute-force ESS searches over the step's units."""
    learner, cluster, _, records = trained
    (ex0, params), (ex1, _) = steps_of(records)[3]
    config = ISReshapeGRPOConfig(
        num_generations=NUM_GENERATIONS,
        num_iterations=2,
        is_reshape_level=level,
        is_reshape_per_group=per_group,
        is_reshape_rho_min=0.9,
    )
    config.temperature = TEMPERATURE
    monkeypatch.setattr(learner, "algo_config", config)
    model = cluster.actor_trainer.model
    saved = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    nnx.update(model, params)
    try:
        gammas, metrics = learner._step_gamma([ex0, ex1])
    finally:
        nnx.update(model, saved)
    units = [unit_log_weights(reference_logps(params, ex), ex, level) for ex in (ex0, ex1)]
    g = np.concatenate([np.asarray(x).reshape(-1) for x in gammas])
    l = np.concatenate([u[0].reshape(-1) for u in units])
    valid = np.concatenate([u[1].reshape(-1) for u in units])
    if not per_group:
        assert gammas[0].shape == np.shape(units[0][0]) and np.all(g == g[0])
        assert abs(g[0] - ess_gamma(l[valid], 0.9)) <= 2e-4
        assert float(metrics["gamma"]) == pytest.approx(g[0])
        return
    chosen = []
    for group in range(len(l) // NUM_GENERATIONS):
        rows = slice(group * NUM_GENERATIONS, (group + 1) * NUM_GENERATIONS)
        assert np.all(g[rows] == g[rows][0])
        if valid[rows].any():
            assert abs(g[rows][0] - ess_gamma(l[rows][valid[rows]], 0.9)) <= 2e-4
            chosen.append(g[rows][0])
    assert len(set(np.round(chosen, 4))) > 1  # the groups differ


# ----------------------------------------------------------------------------------------------
# the registered loss against a plain-JAX reference


def reference_loss(params, example, gamma, level, mode):
    logp = reference_logps(params, example)
    m = example.completion_mask.astype(jnp.float32)
    tok = (logp - example.old_per_token_logps) * m
    if level == "token":
        lu = tok
    else:
        lu = tok.sum(-1, keepdims=True)
        if level == "geometric":
            lu = lu / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
    h = lu if gamma == 0 else jnp.expm1(gamma * lu) / gamma
    per_token = jnp.broadcast_to(-example.advantages[:, None] * h, m.shape)
    return common.aggregate_loss(per_token, m, mode)


def loss_and_grad(fn, params):
    model = tiny_qwen3()
    nnx.update(model, params)
    (loss, aux), grads = nnx.value_and_grad(fn, has_aux=True)(model)
    return loss, aux, jax.tree.leaves(nnx.state(grads, nnx.Param))


def off_policy_example(records):
    example, params = steps_of(records)[1][0]
    fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
    fields.pop("is_reshape_gamma"), fields.pop("is_reshape_metrics")
    return grpo_learner.TrainExample(**fields), params


@pytest.mark.parametrize(
    ("mode", "level"),
    [(mode, "sequence") for mode in isr_tunix.TUNIX_LOSS_AGG_MODES]
    + [("token-mean", "geometric"), ("sequence-mean-token-mean", "token")],
)
def test_loss_matches_reference(trained, mode, level):
    *_, records = trained
    example, params = off_policy_example(records)
    # the last completion empty: Tunix's normalisers count the non-empty rows only
    mask = np.asarray(example.completion_mask).copy()
    mask[-1] = False
    example = example.replace(completion_mask=jnp.asarray(mask))
    config = ISReshapeGRPOConfig(
        num_generations=NUM_GENERATIONS,
        num_iterations=2,
        loss_agg_mode=mode,
        is_reshape_level=level,
        is_reshape_rho_min=0.9,
    )
    config.temperature = TEMPERATURE
    loss_fn = function_registry.get_policy_loss_fn("is_reshape")
    pad, eos = CharTokenizer().pad_id(), CharTokenizer().eos_id()
    loss, aux, grads = loss_and_grad(lambda m: loss_fn(m, example, config, pad, eos), params)
    gamma = float(aux["is_reshape/gamma"])
    if level == "sequence":  # the micro-batch's own ESS gamma (no step gamma attached)
        l, valid = unit_log_weights(reference_logps(params, example), example, level)
        assert abs(gamma - ess_gamma(l[valid], 0.9)) <= 2e-4
    ref, _, ref_grads = loss_and_grad(
        lambda m: (reference_loss(m, example, gamma, level, mode), {}),
        params,
    )
    np.testing.assert_allclose(loss, ref, rtol=2e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)


def test_on_policy_without_old_log_probs_is_reinforce(trained):
    """num_iterations=1: Tunix computes no old log-probs; w = 1 and the gradient is that of
    -A log pi(sequence) aggregated (REINFORCE), whatever gamma."""
    *_, records = trained
    example, params = off_policy_example(records)
    example = example.replace(old_per_token_logps=None)
    config = ISReshapeGRPOConfig(
        num_generations=NUM_GENERATIONS, loss_agg_mode="token-mean", is_reshape_gamma=0.5
    )
    config.temperature = TEMPERATURE
    pad, eos = CharTokenizer().pad_id(), CharTokenizer().eos_id()
    loss_fn = isr_tunix.is_reshape_policy_loss_fn
    _, aux, grads = loss_and_grad(lambda m: loss_fn(m, example, config, pad, eos), params)
    assert float(aux["is_reshape/ess_ratio"]) == pytest.approx(1.0)

    def reinforce(m):
        logp = reference_logps(m, example)
        mask = example.completion_mask.astype(jnp.float32)
        # the sequence's log-prob on each of its tokens (sequence level: l_b = sum_t log pi)
        seq_logp = jnp.sum(logp * mask, axis=-1, keepdims=True)
        per_token = jnp.broadcast_to(-example.advantages[:, None] * seq_logp, mask.shape)
        return common.aggregate_loss(per_token, mask, "token-mean"), {}

    _, _, ref_grads = loss_and_grad(reinforce, params)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# configuration and versions


def test_config_validation():
    base = dict(num_generations=2)
    assert ISReshapeGRPOConfig(**base).policy_loss_fn == "is_reshape"
    assert ISReshapeGRPOConfig(**base, is_reshape_gamma=1).is_reshape_gamma == 1.0
    for kwargs, match in [
        (dict(is_reshape_gamma="fast"), "is_reshape_gamma"),
        (dict(is_reshape_gamma=1.5), "is_reshape_gamma"),
        (dict(is_reshape_level="sentence"), "is_reshape_level"),
        (dict(is_reshape_rho_min=0.0), "is_reshape_rho_min"),
        (dict(loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(beta=0.04), "beta"),
        (dict(policy_loss_fn="grpo"), "policy_loss_fn"),
        (dict(epsilon=0.1), "ignores epsilon=.*clip"),
        (dict(loss_algo="gspo-token"), "ignores loss_algo=.*geometric"),
    ]:
        with pytest.raises(ValueError, match=match):
            ISReshapeGRPOConfig(**base, **kwargs)


def test_learner_checks_its_config(trained):
    _, cluster, *_ = trained
    with pytest.raises(TypeError, match="ISReshapeGRPOConfig"):
        ISReshapeGRPOLearner(
            rl_cluster=cluster,
            algo_config=grpo_learner.GRPOConfig(num_generations=2),
            reward_fns=count_a,
        )


def test_version_check(monkeypatch):
    assert isr_tunix.TUNIX_SUPPORTED == ">=0.1.7,<0.1.8" and isr_tunix.TUNIX_TESTED == "0.1.7"
    assert isr_tunix.TUNIX_VERSION == importlib.metadata.version("google-tunix")
    real = importlib.metadata.version
    origin = importlib.util.find_spec("isreshape_jax.tunix").origin
    for bad in ["0.1.6", "0.1.8", "0.2.0"]:
        monkeypatch.setattr(
            importlib.metadata, "version", lambda d, v=bad: v if d == "google-tunix" else real(d)
        )
        # a fresh copy of the module (the imported one stays registered with Tunix)
        spec = importlib.util.spec_from_file_location("isreshape_jax.tunix_probe", origin)
        probe = importlib.util.module_from_spec(spec)
        with pytest.raises(ImportError) as info:
            spec.loader.exec_module(probe)
        message = str(info.value)
        assert "supports google-tunix >=0.1.7,<0.1.8 (tested with 0.1.7)" in message
        assert f"found google-tunix {bad}" in message and "isreshape[tunix]" in message
        assert not hasattr(probe, "ISReshapeGRPOLearner")  # stopped before Tunix is imported
