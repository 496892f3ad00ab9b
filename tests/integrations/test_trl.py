"""Tests of adapters/isreshape_torch/trl.py against TRL itself (1.x, installed for real).

A tiny GPT-2 (2 layers, built from a config) with a character tokenizer (``tokenizers``) trains
offline on CPU for a few real ``GRPOTrainer`` steps; ``_compute_loss`` is checked, value and
parameter gradient, against the loss written out here in plain torch (log-softmax of the logits,
``expm1(gamma l)/gamma``, TRL's normalisers), and gamma against a NumPy ESS computation.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

from isreshape_torch.trl import ISReshapeGRPOConfig, ISReshapeGRPOTrainer  # noqa: E402

ALPHABET = "abc"


def char_tokenizer():
    """A character-level PreTrainedTokenizerFast built with ``tokenizers`` (nothing downloaded)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(ALPHABET))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def tiny_gpt2(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,  # deterministic forward passes: the reference recomputes them
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_a(completions, **kwargs):
    return [float(c.count("a")) for c in completions]


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        steps_per_generation=2,  # old_per_token_logps are computed; the 2nd step is off-policy
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return ISReshapeGRPOConfig(**kwargs)


def make_trainer(tmp_path, **overrides):
    tokenizer = char_tokenizer()
    model = tiny_gpt2(tokenizer)
    dataset = datasets.Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 4})
    return ISReshapeGRPOTrainer(
        model=model,
        reward_funcs=count_a,
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = make_trainer(
        tmp_path_factory.mktemp("grpo"), is_reshape_gamma="ess", is_reshape_rho_min=0.99
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def test_trains_a_few_real_steps_and_logs(trained):
    trainer, before = trained
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)
    logs = [entry for entry in trainer.state.log_history if "is_reshape/gamma" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert 0.0 <= entry["is_reshape/gamma"] <= 1.0
        assert 0.0 < entry["is_reshape/ess_ratio"] <= 1.0
        assert 0.0 < entry["is_reshape/ess_ratio_at_1"] <= entry["is_reshape/ess_ratio"]
        assert "entropy" in entry and math.isfinite(entry["entropy"])
        assert math.isfinite(entry["loss"])
    # step 2 reuses the generation batch of step 1 after an update (steps_per_generation=2):
    # off-policy, so the weights spread and gamma drops below 1 to keep ESS/n >= 0.99
    off = logs[1]
    assert off["is_reshape/sigma2"] > 0 and off["is_reshape/ess_ratio_at_1"] < 0.99
    assert off["is_reshape/gamma"] < 1.0 and off["is_reshape/ess_ratio"] >= 0.99 - 1e-5


# ----------------------------------------------------------------------------------------------
# _compute_loss against a plain-torch reference


def synthetic_inputs(trainer, seed=0, B=4, P=3, T=5, stale=0.4):
    """A micro-batch as TRL's _generate_and_score_completions builds it."""
    rng = np.random.default_rng(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.tensor(rng.integers(3, vocab, (B, P)))
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # left padding
    completion_ids = torch.tensor(rng.integers(3, vocab, (B, T)))
    lengths = np.array([T, 2, 4, 1])[:B]
    completion_mask = torch.tensor((np.arange(T)[None, :] < lengths[:, None]).astype(np.int64))
    with torch.no_grad():
        current = reference_logps(
            trainer.model, prompt_ids, prompt_mask, completion_ids, completion_mask
        )
    old = current + torch.tensor(rng.normal(0, stale, (B, T)), dtype=current.dtype)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(rng.normal(0, 1, B), dtype=torch.float32),
        "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(3 * completion_mask.sum())),
    }


def reference_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Per-token log-probs of the completion tokens: log-softmax of the shifted logits."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    T = completion_ids.shape[1]
    logits = logits[:, -T - 1 : -1, :]
    return torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None])[..., 0]


def reference_loss(trainer, inputs, gamma, level, agg, accumulation, lsf=None):
    m = inputs["completion_mask"].float()
    logp = reference_logps(
        trainer.model,
        inputs["prompt_ids"],
        inputs["prompt_mask"],
        inputs["completion_ids"],
        inputs["completion_mask"],
    )
    tok = (logp - inputs["old_per_token_logps"]) * m
    if level == "token":
        lu = tok
    else:
        lu = tok.sum(-1, keepdim=True)
        if level == "geometric":
            lu = lu / m.sum(-1, keepdim=True)
    h = lu if gamma == 0 else torch.expm1(gamma * lu) / gamma
    mat = -inputs["advantages"][:, None] * h * m
    T = m.shape[1]
    if agg == "dapo":
        normalizer = inputs["num_items_in_batch"] * accumulation / trainer.args.steps_per_generation
        return mat.sum() / normalizer
    if agg == "token-mean":
        loss = mat.sum() / m.sum()
    elif agg == "seq-mean-token-mean":
        loss = (mat.sum(-1) / m.sum(-1)).mean()
    elif agg == "seq-mean-token-sum":
        loss = mat.sum(-1).mean()
    else:
        loss = mat.sum() / (T if lsf is None else lsf)
    return loss / accumulation


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    # float32 (TRL's default config autocasts to bfloat16 on CPU too; the trained fixture keeps it)
    t = make_trainer(tmp_path_factory.mktemp("direct"), bf16=False)
    t.model.train()
    t.current_gradient_accumulation_steps = 2
    return t


@pytest.mark.parametrize(
    "agg",
    ["dapo", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"],
)
@pytest.mark.parametrize("level", ["sequence", "geometric", "token"])
def test_compute_loss_matches_reference(trainer, agg, level):
    trainer.args.is_reshape_loss_agg_mode = agg
    trainer.args.is_reshape_level = level
    trainer.args.is_reshape_gamma = "ess"
    trainer.args.is_reshape_rho_min = 0.8
    inputs = synthetic_inputs(trainer, seed=1, stale=0.8)
    loss = trainer._compute_loss(trainer.model, inputs)
    gamma = trainer._metrics["train"]["is_reshape/gamma"][-1]
    ref = reference_loss(trainer, inputs, gamma, level, agg, accumulation=2)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads(trainer.model, loss), grads(trainer.model, ref), strict=True):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_ess_gamma_is_the_largest_feasible(trainer):
    trainer.args.is_reshape_loss_agg_mode = "dapo"
    trainer.args.is_reshape_level = "sequence"
    trainer.args.is_reshape_gamma = "ess"
    trainer.args.is_reshape_rho_min = 0.9
    inputs = synthetic_inputs(trainer, seed=2, stale=1.0)
    trainer._compute_loss(trainer.model, inputs)
    gamma = trainer._metrics["train"]["is_reshape/gamma"][-1]
    with torch.no_grad():
        logp = reference_logps(
            trainer.model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
        )
    m = inputs["completion_mask"].numpy()
    lu = ((logp - inputs["old_per_token_logps"]).numpy() * m).sum(-1).astype(np.float64)

    def ess_ratio(g):
        w = np.exp(g * (lu - lu.max()))
        return w.sum() ** 2 / (w**2).sum() / lu.size

    assert 0.0 < gamma < 1.0
    assert ess_ratio(gamma) >= 0.9 - 1e-5
    assert ess_ratio(min(1.0, gamma + 0.02)) < 0.9


def test_behaviour_log_probs_choice(trainer):
    """With sampling log-probs (vLLM), "auto" uses them (NaN tokens fall back to the old ones);
    "old" ignores them; "sampling" without them is an error."""
    trainer.args.is_reshape_loss_agg_mode = "token-mean"
    trainer.args.is_reshape_level = "token"
    trainer.args.is_reshape_gamma = 1.0
    inputs = synthetic_inputs(trainer, seed=3)
    sampling = inputs["old_per_token_logps"] - 0.3
    sampling[0, 1] = float("nan")
    with_sampling = dict(inputs, sampling_per_token_logps=sampling)
    trainer.args.is_reshape_behavior = "auto"
    loss_auto = trainer._compute_loss(trainer.model, with_sampling)
    expected_q = torch.where(torch.isnan(sampling), inputs["old_per_token_logps"], sampling)
    ref = reference_loss(
        trainer,
        dict(inputs, old_per_token_logps=expected_q),
        1.0,
        "token",
        "token-mean",
        accumulation=2,
    )
    torch.testing.assert_close(loss_auto, ref, rtol=1e-5, atol=1e-7)
    trainer.args.is_reshape_behavior = "old"
    loss_old = trainer._compute_loss(trainer.model, with_sampling)
    ref_old = reference_loss(trainer, inputs, 1.0, "token", "token-mean", accumulation=2)
    torch.testing.assert_close(loss_old, ref_old, rtol=1e-5, atol=1e-7)
    trainer.args.is_reshape_behavior = "sampling"
    with pytest.raises(ValueError, match="sampling_per_token_logps"):
        trainer._compute_loss(trainer.model, inputs)
    trainer.args.is_reshape_behavior = "auto"


def test_config_validation(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert ISReshapeGRPOConfig(**base, is_reshape_gamma="0.25").is_reshape_gamma == 0.25
    with pytest.raises(ValueError, match="is_reshape_gamma"):
        ISReshapeGRPOConfig(**base, is_reshape_gamma="fast")
    with pytest.raises(ValueError, match="is_reshape_gamma"):
        ISReshapeGRPOConfig(**base, is_reshape_gamma=1.5)
    with pytest.raises(ValueError, match="is_reshape_level"):
        ISReshapeGRPOConfig(**base, is_reshape_level="sentence")
    with pytest.raises(ValueError, match="is_reshape_rho_min"):
        ISReshapeGRPOConfig(**base, is_reshape_rho_min=0.0)
    with pytest.raises(ValueError, match="beta"):
        ISReshapeGRPOConfig(**base, beta=0.04)
    # Settings that only TRL's own losses read would be silently ignored: an error instead.
    for name, value, hint in [
        ("loss_type", "grpo", "is_reshape_loss_agg_mode"),
        ("importance_sampling_level", "sequence", "is_reshape_level"),
        ("epsilon", 0.1, "clip"),
        ("epsilon_high", 0.28, "clip"),
        ("vespo_k_pos", 4.0, "VESPO"),
    ]:
        with pytest.raises(ValueError, match=f"ignores {name}=.*{hint}"):
            ISReshapeGRPOConfig(**base, **{name: value})
    with pytest.raises(TypeError, match="ISReshapeGRPOConfig"):
        from trl import GRPOConfig

        tok = char_tokenizer()
        ISReshapeGRPOTrainer(
            model=tiny_gpt2(tok),
            reward_funcs=count_a,
            args=GRPOConfig(**base),
            processing_class=tok,
        )
