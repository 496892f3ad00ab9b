"""A real TRL run that records how ISReshapeGRPOTrainer chooses and uses the step's gamma.

Used by ``test_trl.py`` in-process (one process) and as a script under ``torchrun`` (two CPU
processes, gloo): ``python -m torch.distributed.run --nproc_per_node 2 _trl_step_gamma_run.py OUT
SCOPE LEVEL``. Every process saves ``OUT/rank{r}.pt``: what each step's gamma was chosen from
(``selection``), what every loss call used (``calls``) and TRL's log history.

**Fake inference engine.** Without vLLM (not installable on CPU) TRL has no sampling
log-probabilities, and with neither sampling nor stale old log-probs every weight is 1. To make
the weights non-trivial, :class:`RecordingTrainer` adds ``sampling_per_token_logps`` as an
inference engine whose numerics differ from the trainer's would: TRL's old log-probs plus
Gaussian noise (sd ``NOISE`` per token, a seeded generator per process and generation). With
``num_iterations=2`` the second optimizer step on each generation batch is also off-policy for
real (the policy has moved).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (HERE, ROOT, ROOT / "adapters"):  # as a script: the checkout's sources first
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import datasets  # noqa: E402
import torch  # noqa: E402
from _trl_models import char_tokenizer, count_a, reference_logps, tiny_gpt2  # noqa: E402

from isreshape_torch.trl import ISReshapeGRPOConfig, ISReshapeGRPOTrainer, _loss_mask  # noqa: E402

NOISE = 0.5
ACCUMULATION = 4
RHO_MIN = 0.9


class RecordingTrainer(ISReshapeGRPOTrainer):
    """Records the step gamma's inputs and every loss call; adds fake engine log-probs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selection: list[dict] = []
        self.calls: list[dict] = []
        self._generations = 0

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        old = out["old_per_token_logps"]  # num_iterations=2: TRL computes them
        seed = 1000 + 100 * self.accelerator.process_index + self._generations
        self._generations += 1
        noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
        out["sampling_per_token_logps"] = old + NOISE * noise.to(old.dtype)
        return out

    def _current_log_probs(self, inputs):
        logps = super()._current_log_probs(inputs)
        self.selection.append(
            {
                "step": self._step // ACCUMULATION,
                "current": logps.detach().clone(),
                "behaviour": self._behavior_log_probs(inputs, logps).clone(),
                "mask": _loss_mask(inputs).clone(),
                "group": inputs["is_reshape_group_id"].clone(),
            }
        )
        return logps

    def _compute_loss(self, model, inputs):
        with torch.no_grad():
            logp = reference_logps(
                self.model,
                inputs["prompt_ids"],
                inputs["prompt_mask"],
                inputs["completion_ids"],
                inputs["completion_mask"],
            )
        record = {
            "step": self._step // ACCUMULATION,
            "logp": logp,
            "behaviour": self._behavior_log_probs(inputs, logp).clone(),
            "mask": _loss_mask(inputs).clone(),
            "group": inputs["is_reshape_group_id"].clone(),
            "prompt_ids": inputs["prompt_ids"].clone(),
            "gamma": inputs.get("is_reshape_gamma"),
        }
        loss = super()._compute_loss(model, inputs)
        record["logged_gamma"] = self._metrics["train"]["is_reshape/gamma"][-1]
        self.calls.append(record)
        return loss


def run(out_dir: str, scope: str, level: str, max_steps: int = 4) -> RecordingTrainer:
    """Trains ``max_steps`` optimizer steps of 4 micro-batches (4 completions each) a process."""
    tokenizer = char_tokenizer()
    args = ISReshapeGRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=ACCUMULATION,  # steps_per_generation = 4 too (TRL's default)
        num_iterations=2,
        max_completion_length=6,
        max_steps=max_steps,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        is_reshape_gamma="ess",
        is_reshape_rho_min=RHO_MIN,
        is_reshape_level=level,
        is_reshape_gamma_scope=scope,
    )
    trainer = RecordingTrainer(
        model=tiny_gpt2(tokenizer),
        reward_funcs=count_a,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8}),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def main() -> None:
    out, scope, level = sys.argv[1:4]
    torch.set_num_threads(1)
    trainer = run(out, scope, level)
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "world": trainer.accelerator.num_processes,
            "selection": trainer.selection,
            "calls": trainer.calls,
            "log_history": trainer.state.log_history,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
