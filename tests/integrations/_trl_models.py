"""A tiny GPT-2 and a character tokenizer for the TRL tests (built from configs, nothing
downloaded), the reward they train on and the reference per-token log-probabilities; shared by
``test_trl.py`` and the script it runs under ``torchrun`` (``_trl_step_gamma_run.py``)."""

from __future__ import annotations

import tokenizers
import torch
import transformers

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


def reference_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Per-token log-probs of the completion tokens: log-softmax of the shifted logits."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    T = completion_ids.shape[1]
    logits = logits[:, -T - 1 : -1, :]
    return torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None])[..., 0]
