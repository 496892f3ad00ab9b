"""Experiment 4: a tiny language model trained from stale samples with TRL's GRPOTrainer.

Usage: ``python benchmarks/experiments/exp4_tiny_lm.py [--smoke | --step-gamma | --composition]
[--seeds N ...] [--levels NAME ...] [--resume RUNS.jsonl] [--out DIR]``.

**Task.** Single-digit addition: the 100 prompts ``"a+b="`` (a, b in 0..9); a completion is the
answer's digits followed by ``<eos>`` (2 or 3 tokens, ``max_completion_length`` 3); the reward is 1
when the completion's token ids are exactly those, else 0. A policy's expected reward on a prompt
is therefore the probability of that one completion, the product of its teacher-forced token
probabilities: :func:`expected_rewards` computes it for all prompts in one forward pass, with no
sampling noise, and the figures are its mean over the 100 prompts. TRL samples with temperature 1,
``top_k=0``, ``top_p=1`` (the plain softmax, the distribution evaluated; the JSON records a Monte
Carlo check of this against ``model.generate`` with the trainer's generation config).

**Model and behaviour policy.** A 2-layer GPT-2 (width 32, 2 heads, no dropout) built from a
config, with a character tokenizer made with ``tokenizers`` (15 tokens); nothing is downloaded.
For each seed it is first trained by plain cross-entropy on noisy labels (every step, every prompt
gets the correct answer with probability 0.5, otherwise a uniformly drawn wrong one in 0..18;
Adam, lr 3e-3, 500 full-batch steps), which leaves an expected reward of about 0.25-0.3.

**RL from stale samples.** Then 300 optimiser steps of TRL 1.16's ``GRPOTrainer`` (4 prompts x 8
completions = 32 completions a step, as 4 micro-batches of 8 (``gradient_accumulation_steps`` 4),
group-normalised advantages, Adam with constant learning rate, gradient clipping at 1, ``beta=0``,
float32). Staleness comes from TRL's ``steps_per_generation`` (4 S micro-batches): one generation
batch of 32·S completions, sampled by the current policy, is shuffled and split over the next S
optimiser steps, so the k-th slice is k updates stale; TRL computes ``old_per_token_logps`` with
the sampling model at generation time, so every loss's ratio is exactly ``pi_theta / mu`` with
``mu`` the policy that sampled the data. Two levels: ``mild`` S = 4 (lags 0-3) and ``strong`` S =
300, i.e. never refreshed: one batch of 9600 completions sampled from the behaviour policy at step
0 feeds all 300 updates (lags 0-299; learning from a fixed log of the behaviour policy). Every
completion is used once (``num_iterations=1``), so both levels see the same number of samples and
updates.

**Methods.** Ours: ``ISReshapeGRPOTrainer`` with gamma ``"ess"`` and ``rho_min`` 0.3 (the
defaults), TRL's ``dapo`` token normaliser, at the ``sequence`` level (the default): the reward is
a sequence reward, and ``prod_t pi/mu`` is the importance weight that makes it unbiased; one gamma
per optimiser step (``is_reshape_gamma_scope="step"``, the default). Ablations: gamma chosen by
each loss call from its micro-batch of 8 (``"micro_batch"``), and gamma fixed at 1 (plain
sequence-level importance sampling), which shows what the adaptive choice of gamma adds. Baselines:
``GRPOTrainer`` with ``loss_type`` ``grpo`` (token-level clip, epsilon 0.2), ``dapo`` (clip-higher,
epsilons 0.2/0.28 as the DAPO paper recommends), ``cispo`` (weights capped at ``epsilon_high`` 5,
the value TRL's documentation recommends; TRL's default cap would be 0.2) and ``vespo`` (TRL's
defaults; token log-ratios summed into a sequence weight). Everything else is TRL's default and
identical across methods.

**Tuning and seeds.** For each (method, staleness) the learning rate is chosen from
:data:`FULL` ``lr_grid`` = (2.5e-4, 5e-4, 1e-3, 2e-3), the same grid for every method, by the
mean exact expected reward over the last quarter of training on a tuning seed (1000) distinct
from the evaluation seeds; the chosen rate is then run on evaluation seeds 0, 1, 2 (each seed:
its own behaviour model, TRL sampling seed and prompt order, shared by all methods). Reported:
the exact expected reward after the last step, mean, standard deviation and min-max over the 3
seeds; the curves (every 10 steps); for ours the logged gamma and ESS ratios.

Writes ``exp4_tiny_lm.{md,json,png}`` to ``--out`` (default ``benchmarks/experiments/results``).
Runtime: the full run is now 112 training runs (8 methods x 2 staleness levels x (4 tuning + 3
evaluation)); its last measurement, 1037 s (17.3 minutes) on 2 CPU cores with one torch thread, was
of 84 runs with one micro-batch of 32 a step, before the micro-batches of 8 and the per-micro-batch
ablation (the full run has not been repeated since; one strong-staleness run of ours now takes
about 2 minutes: the step gamma's extra forward pass over each reused step). The ``strong`` runs
take about 3.5 times as long per step as the ``mild`` ones: TRL's dataloader fetches the whole
generation batch (32·S prompts) at every optimiser step. ``--smoke``: a few seconds.
``--step-gamma`` reruns the three IS Reshape rows only, at the learning rates the full run's tuning
chose, and records the pooled ESS/n of every optimiser step (``exp4_tiny_lm_step_gamma.*``).
``--composition`` (``exp4_tiny_lm_composition.*``): TRL's own ``dapo`` and ``cispo`` losses behind
a :class:`LaggingEngine` (an inference engine whose weights are synced every S optimiser steps, S =
8 or never), each with TRL's vLLM correction (its default ``sequence_mask`` at 3) or with
``ISReshapeCorrectionGRPOTrainer``'s tempered correction ``(pi_old/mu)^gamma``; 6 seeds (0-5),
the learning rates tuned for those losses in the full run; per column, each tempered row's paired
difference (same seeds) to the best TRL row and to the same loss with TRL's correction, with a
percentile bootstrap 90 % interval (:func:`compare`). One composition run takes 0.5-1.5 minutes.

``--seeds`` and ``--levels`` replace the evaluation seeds and keep a subset of the staleness
columns; ``--resume FILE`` appends every finished run to a JSON-lines file and reads those already
there back instead of repeating them, so that an interrupted run resumes, and columns run
separately can be reported together (the header then states the runs' own summed times)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

torch.set_num_threads(1)

import datasets  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# run as a script from a checkout, installed or not; the bandit experiment's interval helper
for _path in (ROOT, ROOT / "adapters", Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from exp5_when_to_use import paired_interval  # noqa: E402

from isreshape_torch.trl import (  # noqa: E402
    ISReshapeCorrectionGRPOConfig,
    ISReshapeCorrectionGRPOTrainer,
    ISReshapeGRPOConfig,
    ISReshapeGRPOTrainer,
)

NAME = "exp4_tiny_lm"
SPECIALS = ("<pad>", "<eos>", "<unk>")
ALPHABET = "0123456789+="
PROMPTS: tuple[str, ...] = tuple(f"{a}+{b}=" for a in range(10) for b in range(10))
ANSWERS: tuple[str, ...] = tuple(str(a + b) for a in range(10) for b in range(10))
MAX_COMPLETION_LENGTH = 3  # the longest correct completion: two digits and <eos>
DATASET_REPEATS = 64  # 6400 rows: TRL's sampler drops partial generation batches of prompts

#: (key, label, trainer class, config keywords beyond the shared ones)
METHODS: tuple[tuple[str, str, type, dict[str, Any]], ...] = (
    (
        "isreshape",
        "IS Reshape, ESS gamma, sequence level (ours)",
        ISReshapeGRPOTrainer,
        {"is_reshape_gamma": "ess", "is_reshape_rho_min": 0.3, "is_reshape_level": "sequence"},
    ),
    (
        "isreshape_micro",
        "IS Reshape, ESS gamma per micro-batch of 8 (ablation)",
        ISReshapeGRPOTrainer,
        {
            "is_reshape_gamma": "ess",
            "is_reshape_rho_min": 0.3,
            "is_reshape_level": "sequence",
            "is_reshape_gamma_scope": "micro_batch",
        },
    ),
    (
        "isreshape_gamma1",
        "IS Reshape, gamma fixed at 1, sequence level (ablation)",
        ISReshapeGRPOTrainer,
        {"is_reshape_gamma": "1.0", "is_reshape_level": "sequence"},
    ),
    ("grpo", "TRL grpo (clip 0.2)", GRPOTrainer, {"loss_type": "grpo"}),
    ("dapo", "TRL dapo (clip 0.2/0.28)", GRPOTrainer, {"loss_type": "dapo", "epsilon_high": 0.28}),
    ("cispo", "TRL cispo (cap 5)", GRPOTrainer, {"loss_type": "cispo", "epsilon_high": 5.0}),
    (
        "vespo",
        "TRL vespo (defaults)",
        GRPOTrainer,
        {"loss_type": "vespo", "importance_sampling_level": "token"},
    ),
)

FULL: dict[str, Any] = {
    "behaviour_steps": 500,
    "behaviour_lr": 3e-3,
    "p_correct": 0.5,
    "width": 32,
    "steps": 300,
    "eval_every": 10,
    "batch": 32,
    "accumulation": 4,  # micro-batches of 8 completions
    "generations": 8,
    "staleness": {"mild": 4, "strong": 300},  # strong: one generation batch for all 300 steps
    "lr_grid": (2.5e-4, 5e-4, 1e-3, 2e-3),
    "tune_seeds": (1000,),
    "eval_seeds": (0, 1, 2),
    "mc_samples_per_prompt": 200,
}


class LaggingEngine:
    """A stand-in for an inference engine (vLLM) whose weights lag the trainer's.

    Passed to TRL as ``rollout_func`` (TRL's hook for custom generation): it samples the
    completions of every prompt from its own copy of the policy at temperature 1 (the plain
    softmax, as TRL's sampling here) and returns their log-probabilities, which TRL keeps as
    ``sampling_per_token_logps``. Its weights are copied from the trainer every ``sync_every``
    optimiser steps, so the completions come from a policy up to ``sync_every - 1`` updates old
    (asynchronous RL), while TRL's ``old_per_token_logps`` are the current policy's: TRL's vLLM
    correction ``pi_old / mu`` carries all the staleness.
    """

    def __init__(self, model: torch.nn.Module, sync_every: int, seed: int):
        import copy

        self.model = copy.deepcopy(model).eval()
        self.sync_every, self.synced_at = sync_every, 0
        self.generator = torch.Generator().manual_seed(10_000 + seed)

    def sync_weights(self) -> None:  # TRL calls this before generating; syncing is ours
        pass

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], trainer: GRPOTrainer) -> dict[str, Any]:
        step = trainer.state.global_step
        if step - self.synced_at >= self.sync_every:
            self.model.load_state_dict(trainer.model.state_dict())
            self.synced_at = step
        prompt_ids = [encode(p) for p in prompts]
        seq = torch.tensor(prompt_ids)  # every prompt "a+b=" has 4 tokens
        done = torch.zeros(len(prompts), dtype=torch.bool)
        tokens, logps = [], []
        for _ in range(MAX_COMPLETION_LENGTH):
            logp = torch.log_softmax(self.model(input_ids=seq).logits[:, -1].float(), -1)
            tok = torch.multinomial(logp.exp(), 1, generator=self.generator)[:, 0]
            tokens.append(tok), logps.append(logp.gather(-1, tok[:, None])[:, 0])
            seq = torch.cat([seq, tok[:, None]], 1)
            done = done | (tok == EOS)
            if bool(done.all()):
                break
        completions, completion_logps = [], []
        for i in range(len(prompts)):
            ids, lps = [], []
            for tok, lp in zip(tokens, logps, strict=True):
                ids.append(int(tok[i])), lps.append(float(lp[i]))
                if ids[-1] == EOS:
                    break
            completions.append(ids), completion_logps.append(lps)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completions,
            "logprobs": completion_logps,
        }


class _EngineMixin:
    """TRL applies its vLLM correction only with ``use_vllm``: the lagging engine plays vLLM."""

    def __init__(self, *args: Any, engine: LaggingEngine, **kwargs: Any):
        super().__init__(*args, rollout_func=engine, **kwargs)
        self.use_vllm, self.vllm_generation, self._last_loaded_step = True, engine, -1


class EngineGRPOTrainer(_EngineMixin, GRPOTrainer):
    """TRL's trainer, loss and vLLM correction, with completions from a :class:`LaggingEngine`."""


class EngineCorrectionTrainer(_EngineMixin, ISReshapeCorrectionGRPOTrainer):
    """TRL's loss with the tempered correction, completions from a :class:`LaggingEngine`."""


#: Item 3 of the composition: TRL's own losses with TRL's vLLM correction (its default
#: ``sequence_mask``: a sequence whose ratio pi_old/mu lies outside [0, 3] is dropped) against the
#: same losses with the tempered correction (pi_old/mu)^gamma, gamma from the ESS of the step.
COMPOSITION_METHODS: tuple[tuple[str, str, type, dict[str, Any]], ...] = (
    (
        "dapo_trl_is",
        "TRL dapo + TRL's correction (sequence_mask, 3)",
        EngineGRPOTrainer,
        {"loss_type": "dapo", "epsilon_high": 0.28},
    ),
    (
        "dapo_tempered",
        "TRL dapo + tempered correction (ours)",
        EngineCorrectionTrainer,
        {"loss_type": "dapo", "epsilon_high": 0.28, "is_reshape_rho_min": 0.3},
    ),
    (
        "cispo_trl_is",
        "TRL cispo + TRL's correction (sequence_mask, 3)",
        EngineGRPOTrainer,
        {"loss_type": "cispo", "epsilon_high": 5.0},
    ),
    (
        "cispo_tempered",
        "TRL cispo + tempered correction (ours)",
        EngineCorrectionTrainer,
        {"loss_type": "cispo", "epsilon_high": 5.0, "is_reshape_rho_min": 0.3},
    ),
)
#: ``--composition``: a lagging inference engine (weights synced every S optimiser steps), TRL's
#: losses at the learning rates the full run's tuning chose for them (dapo 1e-3, cispo 5e-4).
COMPOSITION: dict[str, Any] = {
    **FULL,
    "method_table": "composition",
    "staleness": {"lag 8": 8, "never synced": 300},
    "tune_seeds": (),
    "eval_seeds": (0, 1, 2, 3, 4, 5),
    "lr_grid": (5e-4, 1e-3),
    "lr_fixed": {
        f"{m}/{lv}": (1e-3 if m.startswith("dapo") else 5e-4)
        for m, *_ in COMPOSITION_METHODS
        for lv in ("lag 8", "never synced")
    },
}

#: ``--step-gamma``: the IS Reshape rows only, at the learning rates that the tuning of the full
#: run chose (the micro-batch ablation takes ours'); the TRL rows are those of the full run.
STEP_GAMMA: dict[str, Any] = {
    **FULL,
    "methods": ("isreshape", "isreshape_micro", "isreshape_gamma1"),
    "tune_seeds": (),
    "lr_grid": (5e-4, 1e-3),
    "lr_fixed": {
        "isreshape/mild": 5e-4,
        "isreshape/strong": 1e-3,
        "isreshape_micro/mild": 5e-4,
        "isreshape_micro/strong": 1e-3,
        "isreshape_gamma1/mild": 5e-4,
        "isreshape_gamma1/strong": 5e-4,
    },
}
SMOKE: dict[str, Any] = {
    "behaviour_steps": 20,
    "behaviour_lr": 3e-3,
    "p_correct": 0.5,
    "width": 16,
    "steps": 4,
    "eval_every": 2,
    "batch": 16,
    "accumulation": 2,
    "generations": 4,
    "staleness": {"mild": 2, "strong": 4},  # strong: never refreshed, as in FULL
    "lr_grid": (1e-2,),  # a single rate: no tuning runs
    "tune_seeds": (1000,),
    "eval_seeds": (0, 1),
    "mc_samples_per_prompt": 20,
}


# ----------------------------------------------------------------------------------------------
# tokenizer, model, task


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, ``+`` and ``=`` (built locally, nothing fetched)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *ALPHABET])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


TOKENIZER = char_tokenizer()
EOS = TOKENIZER.eos_token_id
PAD = TOKENIZER.pad_token_id


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added)."""
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


PROMPT_IDS: tuple[tuple[int, ...], ...] = tuple(tuple(encode(p)) for p in PROMPTS)
#: The one rewarded completion of each prompt: the answer's digits, then <eos>.
TARGET_IDS: tuple[tuple[int, ...], ...] = tuple((*encode(a), EOS) for a in ANSWERS)
_TARGET_BY_PROMPT = dict(zip(PROMPTS, TARGET_IDS, strict=True))
_ANSWER_IDS = tuple((*encode(str(s)), EOS) for s in range(19))


def build_model(seed: int, width: int = 32) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 built from a config (no dropout), initialised from ``seed``."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(TOKENIZER),
        n_positions=16,
        n_embd=width,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def exact_match_reward(
    prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **_
) -> list[float]:
    """TRL reward function: 1.0 where the completion's ids are the answer's digits then <eos>."""
    return [
        float(tuple(ids) == _TARGET_BY_PROMPT[p])
        for p, ids in zip(prompts, completion_ids, strict=True)
    ]


def completion_log_probs(
    model: torch.nn.Module, completions: Sequence[Sequence[int]]
) -> torch.Tensor:
    """``log pi(completion_i | prompt_i)`` for the 100 prompts, by teacher forcing (one batch)."""
    seqs = [(*p, *c) for p, c in zip(PROMPT_IDS, completions, strict=True)]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    scored = torch.zeros((len(seqs), length - 1))
    for i, (p, s) in enumerate(zip(PROMPT_IDS, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        scored[i, len(p) - 1 : len(s) - 1] = 1.0  # the logits at t predict token t + 1
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (token * scored).sum(-1)


def expected_rewards(model: torch.nn.Module) -> np.ndarray:
    """Exact expected reward on each prompt: the probability of its correct completion."""
    with torch.no_grad():
        return completion_log_probs(model, TARGET_IDS).exp().double().numpy()


def sampled_rewards(
    model: torch.nn.Module, generation_config: Any, per_prompt: int, seed: int
) -> np.ndarray:
    """Monte Carlo rewards per prompt from ``model.generate`` with ``generation_config``."""
    torch.manual_seed(seed)
    ids = torch.tensor(PROMPT_IDS).repeat_interleave(per_prompt, 0)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation_config
        )
    completions = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = row.index(EOS) + 1 if EOS in row else len(row)  # TRL keeps up to the first <eos>
        completions.append(row[:cut])
    prompts = [p for p in PROMPTS for _ in range(per_prompt)]
    rewards = exact_match_reward(prompts, [""] * len(prompts), completions)
    return np.asarray(rewards).reshape(len(PROMPTS), per_prompt).mean(1)


def train_behaviour(setting: dict[str, Any], seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Cross-entropy on noisy labels: the behaviour policy of ``seed`` and its expected reward."""
    model = build_model(seed, setting["width"])
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=setting["behaviour_lr"])
    correct = np.array([a + b for a in range(10) for b in range(10)])
    for _ in range(setting["behaviour_steps"]):
        wrong = rng.integers(0, 18, correct.size)
        wrong = wrong + (wrong >= correct)  # uniform over the 18 wrong sums
        labels = np.where(rng.random(correct.size) < setting["p_correct"], correct, wrong)
        loss = -completion_log_probs(model, [_ANSWER_IDS[y] for y in labels]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, float(expected_rewards(model).mean())


# ----------------------------------------------------------------------------------------------
# RL runs


class ExactRewardCallback(transformers.TrainerCallback):
    """Records the exact mean expected reward at step 0, every ``every`` steps and at the end."""

    def __init__(self, every: int):
        self.every = every
        self.steps: list[int] = []
        self.rewards: list[float] = []

    def _record(self, step: int, model: torch.nn.Module) -> None:
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
            self.rewards.append(float(expected_rewards(model).mean()))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._record(state.global_step, model)


def make_trainer(
    method: str,
    staleness: int,
    lr: float,
    seed: int,
    behaviour: dict[str, torch.Tensor],
    setting: dict[str, Any],
    output_dir: str,
    callbacks: Sequence[transformers.TrainerCallback] = (),
) -> GRPOTrainer:
    """A TRL trainer for ``method`` starting from the behaviour policy, ``staleness`` = S."""
    _, _, trainer_cls, extra = next(m for m in METHODS + COMPOSITION_METHODS if m[0] == method)
    engine = issubclass(trainer_cls, _EngineMixin)
    model = build_model(seed, setting["width"])
    model.load_state_dict(behaviour)
    shared = {
        "output_dir": output_dir,
        "per_device_train_batch_size": setting["batch"] // setting["accumulation"],
        "gradient_accumulation_steps": setting["accumulation"],
        "num_generations": setting["generations"],
        # S optimiser steps per generation batch, each of `accumulation` micro-batches
        # (with an engine, S is its sync interval and every step generates)
        "steps_per_generation": (1 if engine else staleness) * setting["accumulation"],
        "num_iterations": 1,
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "max_steps": setting["steps"],
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "beta": 0.0,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "bf16": False,
        "use_cpu": True,
        "seed": seed,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    config_cls = {
        ISReshapeGRPOTrainer: ISReshapeGRPOConfig,
        EngineCorrectionTrainer: ISReshapeCorrectionGRPOConfig,
    }.get(trainer_cls, GRPOConfig)
    args = config_cls(**shared, **extra)
    engine_kwargs = {"engine": LaggingEngine(model, staleness, seed)} if engine else {}
    dataset = datasets.Dataset.from_dict({"prompt": list(PROMPTS) * DATASET_REPEATS})
    trainer = trainer_cls(
        model=model,
        reward_funcs=exact_match_reward,
        args=args,
        train_dataset=dataset,
        processing_class=TOKENIZER,
        callbacks=list(callbacks),
        **engine_kwargs,
    )
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def train_once(
    method: str,
    staleness: int,
    lr: float,
    seed: int,
    behaviour: dict[str, torch.Tensor],
    setting: dict[str, Any],
    workdir: str,
) -> dict[str, Any]:
    """One training run; its exact-reward curve and, for ours, the logged gamma and ESS."""
    start = time.perf_counter()
    callback = ExactRewardCallback(setting["eval_every"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            method, staleness, lr, seed, behaviour, setting, workdir, callbacks=[callback]
        )
        trainer.train()
    logs = [e for e in trainer.state.log_history if "is_reshape/gamma" in e]
    out: dict[str, Any] = {
        "method": method,
        "staleness": staleness,
        "lr": lr,
        "seed": seed,
        "steps": callback.steps,
        "curve": callback.rewards,
        "final": callback.rewards[-1],
        "last_quarter": float(np.mean(_last_quarter(callback.steps, callback.rewards))),
    }
    if logs:
        gamma = np.array([e["is_reshape/gamma"] for e in logs])
        out["gamma_mean"] = float(gamma.mean())
        out["gamma_below_1_share"] = float((gamma < 1.0 - 1e-6).mean())
        out["ess_ratio_min"] = float(min(e["is_reshape/ess_ratio"] for e in logs))
        # ESS/n of the tempered weights of each whole optimiser step, from the loss calls
        pooled = [e["is_reshape/ess_ratio_pooled"] for e in logs]
        out["ess_pooled_per_step"] = pooled
        out["ess_pooled_min"] = float(min(pooled))
        out["ess_pooled_mean"] = float(np.mean(pooled))
        out["steps_below_rho_min"] = int(sum(p < 0.3 - 1e-6 for p in pooled))
        out["ess_ratio_at_1_mean"] = float(np.mean([e["is_reshape/ess_ratio_at_1"] for e in logs]))
        out["ess_ratio_at_1_min"] = float(min(e["is_reshape/ess_ratio_at_1"] for e in logs))
    corr = [e for e in trainer.state.log_history if "sampling/is_reshape/gamma" in e]
    if corr:
        out["correction_gamma_mean"] = float(
            np.mean([e["sampling/is_reshape/gamma"] for e in corr])
        )
        out["correction_ess_min"] = float(min(e["sampling/is_reshape/ess_ratio"] for e in corr))
        out["correction_ess_at_1_mean"] = float(
            np.mean([e["sampling/is_reshape/ess_ratio_at_1"] for e in corr])
        )
    ratio = [e for e in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in e]
    if ratio:
        out["ratio_mean"] = float(
            np.mean([e["sampling/importance_sampling_ratio/mean"] for e in ratio])
        )
    out["seconds"] = time.perf_counter() - start
    return out


def _last_quarter(steps: Sequence[int], values: Sequence[float]) -> list[float]:
    cut = 0.75 * steps[-1]
    return [v for s, v in zip(steps, values, strict=True) if s >= cut]


def _run_log(path: Path | None) -> Callable[..., dict[str, Any]]:
    """:func:`train_once`, remembered one JSON line per finished run in ``path`` (if given).

    A run already in the file (same method, staleness, learning rate and seed) is read back, not
    repeated, so that an interrupted experiment resumes where it stopped.
    """
    done: dict[tuple[str, int, float, int], dict[str, Any]] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["staleness"], r["lr"], r["seed"])] = r

    def train(method: str, staleness: int, lr: float, seed: int, *args: Any) -> dict[str, Any]:
        key = (method, staleness, lr, seed)
        if key not in done:
            done[key] = train_once(method, staleness, lr, seed, *args)
            if path is not None:
                with path.open("a") as f:
                    f.write(json.dumps(done[key]) + "\n")
        return done[key]

    return train


def run(
    setting: dict[str, Any],
    progress: Callable[[str], None] = print,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Behaviour models, learning-rate tuning and evaluation runs; rows per (method, staleness).

    ``resume``: a JSON-lines file of finished runs, appended to as runs finish (:func:`_run_log`).
    """
    train_run = _run_log(resume)
    seeds = sorted({*setting["tune_seeds"], *setting["eval_seeds"]})
    behaviours: dict[int, dict[str, torch.Tensor]] = {}
    behaviour_reward: dict[int, float] = {}
    for seed in seeds:
        start = time.perf_counter()
        behaviours[seed], behaviour_reward[seed] = train_behaviour(setting, seed)
        progress(
            f"behaviour seed {seed}: exact expected reward {behaviour_reward[seed]:.3f} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    rows, runs, mc_checks = [], [], []
    tune = len(setting["lr_grid"]) > 1
    with tempfile.TemporaryDirectory() as workdir:
        # The evaluation is exact; check the distribution TRL samples from is the one evaluated.
        for seed in setting["eval_seeds"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer = make_trainer("dapo", 1, 1e-3, seed, behaviours[seed], setting, workdir)
            mc = sampled_rewards(
                trainer.model, trainer.generation_config, setting["mc_samples_per_prompt"], seed
            )
            exact = expected_rewards(trainer.model)
            se = float(np.sqrt((exact * (1 - exact)).sum() / setting["mc_samples_per_prompt"]))
            mc_checks.append(
                {
                    "seed": seed,
                    "exact": float(exact.mean()),
                    "sampled": float(mc.mean()),
                    "standard_error": se / len(PROMPTS),
                }
            )
        for level, staleness in setting["staleness"].items():
            for method, label, _, _ in _methods(setting):
                spent = 0.0  # the runs' own times (a run read back by --resume kept its own)
                scores: dict[str, float] = {}
                fixed = setting.get("lr_fixed", {}).get(f"{method}/{level}")
                if fixed is not None:
                    lr = float(fixed)
                elif tune:
                    for lr in setting["lr_grid"]:
                        tuned = [
                            train_run(method, staleness, lr, s, behaviours[s], setting, workdir)
                            for s in setting["tune_seeds"]
                        ]
                        runs.extend(dict(r, role="tune", level=level) for r in tuned)
                        spent += sum(r["seconds"] for r in tuned)
                        scores[repr(lr)] = float(np.mean([r["last_quarter"] for r in tuned]))
                    lr = float(max(setting["lr_grid"], key=lambda x: scores[repr(x)]))
                else:
                    lr = float(setting["lr_grid"][0])
                evaluated = [
                    train_run(method, staleness, lr, s, behaviours[s], setting, workdir)
                    for s in setting["eval_seeds"]
                ]
                runs.extend(dict(r, role="eval", level=level) for r in evaluated)
                final = np.array([r["final"] for r in evaluated])
                row: dict[str, Any] = {
                    "method": method,
                    "label": label,
                    "level": level,
                    "steps_per_generation": staleness,
                    "lr": lr,
                    "tuning_score": scores,
                    "final_per_seed": final.tolist(),
                    "final_mean": float(final.mean()),
                    "final_std": float(final.std(ddof=1)) if final.size > 1 else 0.0,
                    "final_min": float(final.min()),
                    "final_max": float(final.max()),
                    "curve_steps": evaluated[0]["steps"],
                    "curve_mean": np.mean([r["curve"] for r in evaluated], 0).tolist(),
                    "seconds": spent + sum(r["seconds"] for r in evaluated),
                }
                for key in (
                    "gamma_mean",
                    "gamma_below_1_share",
                    "ess_ratio_at_1_mean",
                    "ess_pooled_mean",
                    "correction_gamma_mean",
                    "correction_ess_at_1_mean",
                    "ratio_mean",
                ):
                    if key in evaluated[0]:
                        row[key] = float(np.mean([r[key] for r in evaluated]))
                for key in (
                    "ess_ratio_min",
                    "ess_ratio_at_1_min",
                    "ess_pooled_min",
                    "correction_ess_min",
                ):
                    if key in evaluated[0]:
                        row[key] = float(min(r[key] for r in evaluated))
                if "steps_below_rho_min" in evaluated[0]:
                    row["steps_below_rho_min"] = int(
                        sum(r["steps_below_rho_min"] for r in evaluated)
                    )
                    row["steps_logged"] = int(sum(len(r["ess_pooled_per_step"]) for r in evaluated))
                rows.append(row)
                progress(
                    f"{level:>6} (S={staleness:>2})  {label:<46} lr {lr:g}  final "
                    f"{row['final_mean']:.3f} ± {row['final_std']:.3f}  ({row['seconds']:.1f} s)"
                )
    return {
        "behaviour_reward": {str(k): v for k, v in behaviour_reward.items()},
        "mc_check": mc_checks,
        "rows": rows,
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------
# report

BOOTSTRAP = {"level": 0.9, "n_boot": 10_000, "seed": 0}


def _is_ours(method: str) -> bool:
    return method.startswith("isreshape") or method.endswith("_tempered")


def _paired(row: dict[str, Any], other: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """The paired difference ``row - other`` of the final rewards on the same seeds."""
    a, b = np.array(row["final_per_seed"]), np.array(other["final_per_seed"])
    mean, lo, hi = paired_interval(a, b, **BOOTSTRAP)
    return {
        "method": row["method"],
        "against": other["method"],
        "seeds": list(seeds),
        "method_per_seed": a.tolist(),
        "against_per_seed": b.tolist(),
        "difference_per_seed": (a - b).tolist(),
        "mean": mean,
        "lo": lo,
        "hi": hi,
    }


def compare(result: dict[str, Any], setting: dict[str, Any]) -> list[dict[str, Any]]:
    """Per staleness column, each of our rows against the best other row (highest mean final
    reward) and, for a tempered correction, against the same loss with TRL's correction: paired
    differences on the evaluation seeds with a percentile bootstrap interval (:data:`BOOTSTRAP`)."""
    out = []
    for level in setting["staleness"]:
        col = {r["method"]: r for r in result["rows"] if r["level"] == level}
        others = [r for m, r in col.items() if not _is_ours(m)]
        if not others or len(setting["eval_seeds"]) < 2:
            continue
        best = max(others, key=lambda r: r["final_mean"])
        for method, row in col.items():
            if not _is_ours(method):
                continue
            same = col.get(method.replace("_tempered", "_trl_is"))
            entry = {"level": level, "best_other": _paired(row, best, setting["eval_seeds"])}
            if same is not None and same is not row:
                entry["same_loss"] = _paired(row, same, setting["eval_seeds"])
            out.append(entry)
    return out


def _comparison_lines(comparisons: Sequence[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    level = BOOTSTRAP["level"]
    lines = [
        "",
        f"Paired differences of the final reward, ours minus another row on the same seeds: mean "
        f"[{100 * level:.0f} % percentile bootstrap interval over seeds, {BOOTSTRAP['n_boot']} "
        f"resamples, RNG seed {BOOTSTRAP['seed']}].",
        "",
        "| ours | staleness | best other row | ours - best other | same loss, TRL's correction "
        "| ours - it |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for c in comparisons:
        cells = [labels[c["best_other"]["method"]], c["level"]]
        for key in ("best_other", "same_loss"):
            d = c.get(key)
            cells += (
                [labels[d["against"]], f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"]
                if d
                else ["-", "-"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any], setting: dict[str, Any]) -> str:
    """The results table, then the gamma/ESS table of ours."""
    levels = list(setting["staleness"])
    rows = result["rows"]
    header = "| method | " + " | ".join(f"{lv} (S = {setting['staleness'][lv]})" for lv in levels)
    lines = [header + " |", "| --- |" + " ---: |" * len(levels)]
    mu = [result["behaviour_reward"][str(s)] for s in setting["eval_seeds"]]
    cell = f"{np.mean(mu):.3f} ± {_std(mu):.3f} [{min(mu):.3f}, {max(mu):.3f}]"
    lines.append("| behaviour policy mu (start) | " + " | ".join([cell] * len(levels)) + " |")
    for method, label, _, _ in _methods(setting):
        cells = []
        for lv in levels:
            r = next(x for x in rows if x["method"] == method and x["level"] == lv)
            cells.append(
                f"{r['final_mean']:.3f} ± {r['final_std']:.3f} [{r['final_min']:.3f}, "
                f"{r['final_max']:.3f}] (lr {r['lr']:g})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result.get("comparisons"):
        labels = {m: label for m, label, _, _ in _methods(setting)}
        lines += _comparison_lines(result["comparisons"], labels)
    if any("gamma_mean" in r for r in rows):
        lines += [
            "",
            "| ours | staleness | mean gamma | steps with gamma < 1 | mean ESS/n at gamma 1 | "
            "least ESS/n at gamma 1 | pooled ESS/n of a step: mean | least | steps below "
            "rho_min |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for r in rows:
        if "gamma_mean" in r:
            lines.append(
                f"| {r['label']} | {r['level']} | {r['gamma_mean']:.3f} | "
                f"{100 * r['gamma_below_1_share']:.1f}% | {r['ess_ratio_at_1_mean']:.3f} | "
                f"{r['ess_ratio_at_1_min']:.3f} | {r['ess_pooled_mean']:.3f} | "
                f"{r['ess_pooled_min']:.3f} | {r['steps_below_rho_min']} of "
                f"{r['steps_logged']} |"
            )
    if any("ratio_mean" in r for r in rows):
        lines += [
            "",
            "| correction | staleness | mean correction weight | mean gamma | mean ESS/n at "
            "gamma 1 | least ESS/n of a step at its gamma |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            if "ratio_mean" in r:
                tempered = "correction_gamma_mean" in r
                lines.append(
                    f"| {r['label']} | {r['level']} | {r['ratio_mean']:.3f} | "
                    + (
                        f"{r['correction_gamma_mean']:.3f} | {r['correction_ess_at_1_mean']:.3f} | "
                        f"{r['correction_ess_min']:.3f} |"
                        if tempered
                        else "- | - | - |"
                    )
                )
    return "\n".join(lines)


def _methods(setting: dict[str, Any]) -> tuple[tuple[str, str, type, dict[str, Any]], ...]:
    """The rows of :data:`METHODS` that ``setting`` runs (all unless it names them)."""
    keep = setting.get("methods")
    table = COMPOSITION_METHODS if setting.get("method_table") == "composition" else METHODS
    return tuple(m for m in table if keep is None or m[0] in keep)


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def plot(result: dict[str, Any], setting: dict[str, Any], path: Path) -> None:
    """Exact expected reward against training step, mean over the evaluation seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(setting["staleness"])
    fig, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4.5), sharey=True)
    mu = np.mean([result["behaviour_reward"][str(s)] for s in setting["eval_seeds"]])
    for ax, lv in zip(np.atleast_1d(axes), levels, strict=True):
        for method, label, _, _ in _methods(setting):
            r = next(x for x in result["rows"] if x["method"] == method and x["level"] == lv)
            per_seed = np.array(
                [
                    run["curve"]
                    for run in result["runs"]
                    if run["role"] == "eval" and run["method"] == method and run["level"] == lv
                ]
            )
            style = "-" if method == "isreshape" else "--"
            (line,) = ax.plot(r["curve_steps"], r["curve_mean"], style, label=f"{label}")
            ax.fill_between(
                r["curve_steps"],
                per_seed.min(0),
                per_seed.max(0),
                color=line.get_color(),
                alpha=0.08,
            )
        ax.axhline(mu, color="grey", lw=0.8, ls=":", label="behaviour policy mu")
        ax.set(
            title=f"staleness {lv}: steps_per_generation {setting['staleness'][lv]}"
            + (" (never refreshed)" if setting["staleness"][lv] >= setting["steps"] else ""),
            xlabel="optimiser step",
            ylim=(0, 1),
        )
    np.atleast_1d(axes)[0].set_ylabel("exact expected reward (mean of seeds, min-max band)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Experiment 4: tiny GPT-2 on a+b=, {len(setting['eval_seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(setting: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}


def _override(
    setting: dict[str, Any], seeds: Sequence[int] | None, levels: Sequence[str] | None
) -> dict[str, Any]:
    """``setting`` with other evaluation seeds and a subset of its staleness columns."""
    unknown = sorted(set(levels or ()) - set(setting["staleness"]))
    if unknown:
        raise SystemExit(f"--levels: unknown {unknown}; choose from {list(setting['staleness'])}")
    out = dict(setting)
    if seeds:
        out["eval_seeds"] = tuple(seeds)
    if levels:
        out["staleness"] = {lv: s for lv, s in setting["staleness"].items() if lv in levels}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny setting (a few seconds)")
    parser.add_argument(
        "--step-gamma",
        action="store_true",
        help="the IS Reshape rows only, at the full run's tuned learning rates",
    )
    parser.add_argument(
        "--composition",
        action="store_true",
        help="TRL's losses with TRL's or the tempered correction, behind a lagging engine",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="evaluation seeds (default: the setting's)"
    )
    parser.add_argument(
        "--levels", nargs="+", help="staleness columns to run, by name (default: all)"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        help="JSON-lines file of finished runs: appended to as runs finish, read back on restart",
    )
    args = parser.parse_args(argv)
    setting = (
        SMOKE
        if args.smoke
        else STEP_GAMMA
        if args.step_gamma
        else COMPOSITION
        if args.composition
        else FULL
    )
    setting = _override(setting, args.seeds, args.levels)
    name = (
        f"{NAME}_step_gamma"
        if args.step_gamma
        else f"{NAME}_composition"
        if args.composition
        else NAME
    )
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    result = run(setting, resume=args.resume)
    result["comparisons"] = compare(result, setting)
    elapsed = time.perf_counter() - start
    # with --resume, runs read back cost nothing now: their own times are the experiment's cost
    run_seconds = sum(r["seconds"] for r in result["runs"])
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result, setting)
    lr_note = (
        "learning rates fixed at those the full run's tuning chose (not tuned here)"
        if "lr_fixed" in setting
        else f"learning rate tuned per cell from {list(setting['lr_grid'])} on seed(s) "
        f"{list(setting['tune_seeds'])} (mean of the last quarter of the curve)"
        if len(setting["lr_grid"]) > 1
        else f"learning rate {setting['lr_grid'][0]:g} (not tuned)"
    )
    s_note = (
        "S = the lagging engine's weight-sync interval (every optimiser step samples a fresh "
        "batch from the engine, whose weights are copied from the trainer every S steps, so "
        f"samples are up to S - 1 updates old; S = {setting['steps']}, the number of steps: the "
        "engine keeps the behaviour policy mu throughout)"
        if setting.get("method_table") == "composition"
        else "S = TRL steps_per_generation (the k-th update on a generation batch uses samples k "
        f"updates old; S = {setting['steps']}, the number of steps: the behaviour policy is "
        "never refreshed)"
    )
    meta = (
        f"Exact expected reward (mean over the 100 prompts a+b=) after {setting['steps']} GRPO "
        f"steps from stale samples, mean ± std [min, max] over evaluation seeds "
        f"{list(setting['eval_seeds'])}; {lr_note}. {s_note}. Training runs "
        f"{run_seconds:.0f} s in all ({len(result['runs'])} runs), this invocation "
        f"{elapsed:.0f} s, on {platform.machine()} ({platform.python_version()}, torch "
        f"{torch.__version__}, 1 thread, {os.cpu_count()} CPUs)."
    )
    (args.out / f"{name}.md").write_text(f"{meta}\n\n{table}\n")
    payload = {
        "setting": _jsonable(setting),
        "methods": {key: {"label": label, **extra} for key, label, _, extra in _methods(setting)},
        "seconds": elapsed,
        "run_seconds": run_seconds,
        "bootstrap": BOOTSTRAP,
        "platform": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": __import__("trl").__version__,
            "torch_threads": torch.get_num_threads(),
        },
        **result,
    }
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    plot(result, setting, args.out / f"{name}.png")
    print(meta)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
