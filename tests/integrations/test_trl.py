"""Tests of adapters/isreshape_torch/trl.py against TRL itself (1.x, installed for real).

A tiny GPT-2 (2 layers, built from a config) with a character tokenizer (``tokenizers``) trains
offline on CPU for a few real ``GRPOTrainer`` steps; ``_compute_loss`` is checked, value and
parameter gradient, against the loss written out here in plain torch (log-softmax of the logits,
``expm1(gamma l)/gamma``, TRL's normalisers), and gamma against a NumPy ESS computation. The step
gamma (one per optimizer step of 4 micro-batches, over 1 and 2 processes) is checked against the
core's :func:`isreshape_core.step_gamma` of the whole step in one process
(``_trl_step_gamma_run.py`` runs and records the training).
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

from _trl_models import char_tokenizer, count_a, reference_logps, tiny_gpt2  # noqa: E402

from isreshape_torch.trl import ISReshapeGRPOConfig, ISReshapeGRPOTrainer  # noqa: E402


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
    # Each call chooses its gamma (the step scopes read it from the inputs: tested below).
    t = make_trainer(
        tmp_path_factory.mktemp("direct"), bf16=False, is_reshape_gamma_scope="micro_batch"
    )
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


def test_compute_loss_uses_the_stored_gamma(trainer):
    """With a step scope the loss takes gamma from inputs["is_reshape_gamma"], as is."""
    trainer.args.is_reshape_gamma_scope = "step"
    trainer.args.is_reshape_loss_agg_mode = "dapo"
    trainer.args.is_reshape_level = "sequence"
    trainer.args.is_reshape_gamma = "ess"
    try:
        inputs = synthetic_inputs(trainer, seed=4, stale=0.8)
        with pytest.raises(KeyError, match="is_reshape_gamma"):
            trainer._compute_loss(trainer.model, inputs)
        inputs["is_reshape_gamma"] = torch.full((4,), 0.37)
        inputs["is_reshape_group_id"] = torch.zeros(4, dtype=torch.long)
        loss = trainer._compute_loss(trainer.model, inputs)
        assert trainer._metrics["train"]["is_reshape/gamma"][-1] == pytest.approx(0.37)
        ref = reference_loss(trainer, inputs, 0.37, "sequence", "dapo", accumulation=2)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    finally:
        trainer.args.is_reshape_gamma_scope = "micro_batch"
        trainer._is_reshape_step_units = []


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


# ----------------------------------------------------------------------------------------------
# One gamma per optimizer step (gradient_accumulation_steps=4), over 1 and 2 processes


def _units(record, logp_key, level):
    """Unit log weights, validity and group ids of one recorded micro-batch (plain torch)."""
    m = record["mask"]
    d = torch.where(m, record[logp_key] - record["behaviour"], 0.0)
    if level == "token":
        return d.reshape(-1), m.reshape(-1), record["group"][:, None].expand_as(m).reshape(-1)
    return d.sum(-1), m.any(-1), record["group"]


def _gathered(ranks, logp_key, level):
    """Each rank's units padded to the longest and concatenated in rank order, as gathered."""
    parts = [
        [torch.cat(x) for x in zip(*(_units(r, logp_key, level) for r in recs), strict=True)]
        for recs in ranks
    ]
    longest = max(p[0].numel() for p in parts)
    padded = [[torch.nn.functional.pad(t, (0, longest - t.numel())) for t in p] for p in parts]
    return [torch.cat(x) for x in zip(*padded, strict=True)]


def check_step_gamma(runs, scope, level, accumulation=4, rho_min=0.9, generations=4):
    """The properties of the step gamma on the records of every process (``runs``, rank order)."""
    from isreshape_core import step_gamma

    steps = sorted({c["step"] for c in runs[0]["calls"]})
    assert len(steps) == 4
    by_group = scope == "group"
    num_groups = 4 * len(runs)  # each process's 16 rows are 4 prompts x 4 completions
    for s in steps:
        sel = [[r for r in run["selection"] if r["step"] == s] for run in runs]
        calls = [[c for c in run["calls"] if c["step"] == s] for run in runs]
        assert all(len(x) == accumulation for x in sel + calls)
        # The core's gamma of the whole step in one process, over the gathered batch.
        l_all, valid, groups = _gathered(sel, "current", level)
        ref, _ = step_gamma(
            l_all,
            rho_min,
            method="ess",
            mask=valid,
            group_ids=groups if by_group else None,
            num_groups=num_groups if by_group else None,
        )
        table = {int(g): float(v) for g, v, ok in zip(groups, ref, valid, strict=True) if ok}
        used = []
        for rank_calls in calls:
            for c in rank_calls:
                expected = torch.tensor(
                    [table[int(g)] if by_group else float(ref[valid][0]) for g in c["group"]],
                    dtype=torch.float64,
                )
                torch.testing.assert_close(c["gamma"].double(), expected, rtol=0, atol=1e-12)
                used.append(c["gamma"])
        for i in range(accumulation):  # logged per call: the mean over processes of their means
            means = [float(rc[i]["gamma"][rc[i]["mask"].any(-1)].double().mean()) for rc in calls]
            assert all(rc[i]["logged_gamma"] == pytest.approx(np.mean(means)) for rc in calls)
        used = torch.cat(used)
        if not by_group:
            assert torch.unique(used).numel() == 1  # the same gamma in every micro-batch
        else:
            assert torch.unique(used).numel() > 1  # groups differ (noisy weights)
        assert float(used.min()) < 1.0  # the weights are not trivial
        # Gamma was chosen from the weights the loss calls used (same micro-batches, in order).
        l_loss, valid_loss, groups_loss = _gathered(calls, "logp", level)
        torch.testing.assert_close(l_loss, l_all, rtol=0, atol=2e-5)
        assert torch.equal(valid_loss, valid) and torch.equal(groups_loss, groups)
        # GRPO groups survive TRL's shuffling and splitting: a group is one prompt, and the step
        # (here the whole generation batch) holds its `generations` completions.
        prompts: dict[int, set] = {}
        for rank_calls in calls:
            for c in rank_calls:
                for g, p in zip(c["group"].tolist(), c["prompt_ids"].tolist(), strict=True):
                    prompts.setdefault(g, set()).add(tuple(p))
        assert all(len(p) == 1 for p in prompts.values())
        ids = torch.cat([c["group"] for rank_calls in calls for c in rank_calls])
        assert sorted(torch.bincount(ids).tolist()) == [generations] * num_groups
        assert any(
            not torch.equal(c["group"], c["group"].sort().values) or c["group"].unique().numel() > 1
            for rank_calls in calls
            for c in rank_calls
        )  # micro-batches mix groups: the rows were shuffled, groups are not consecutive rows
        # The ESS/n that the loss calls realised over the whole step (logged once per step).
        g_units = []
        for rank_calls in calls:
            for c in rank_calls:
                g = c["gamma"].double()
                g_units.append(
                    g[:, None].expand_as(c["mask"]).reshape(-1) if level == "token" else g
                )
        g_units = _gathered_like(g_units, calls, level)
        x = (g_units * l_loss.double())[valid].numpy()
        w = np.exp(x - x.max())
        pooled = w.sum() ** 2 / (w**2).sum() / x.size
        logged = [
            e["is_reshape/ess_ratio_pooled"]
            for e in runs[0]["log_history"]
            if "is_reshape/ess_ratio_pooled" in e
        ]
        assert logged[steps.index(s)] == pytest.approx(pooled, rel=1e-5)
        if not by_group:
            assert pooled >= rho_min - 1e-5
        else:  # each group's ESS/n at its gamma
            for k in torch.unique(groups[valid]).tolist():
                mk = (groups == k) & valid
                xk = (g_units * l_loss.double())[mk].numpy()
                wk = np.exp(xk - xk.max())
                assert wk.sum() ** 2 / (wk**2).sum() / xk.size >= rho_min - 1e-4
    for run in runs[1:]:
        assert [e.get("is_reshape/gamma") for e in run["log_history"]] == [
            e.get("is_reshape/gamma") for e in runs[0]["log_history"]
        ]


def _gathered_like(per_call, calls, level):
    """Per-call unit tensors laid out as :func:`_gathered` lays out the units."""
    it = iter(per_call)
    parts = [torch.cat([next(it) for _ in rank_calls]) for rank_calls in calls]
    longest = max(p.numel() for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, longest - p.numel())) for p in parts])


@pytest.mark.parametrize(
    "scope, level", [("step", "sequence"), ("group", "sequence"), ("step", "token")]
)
def test_one_gamma_per_optimizer_step_one_process(tmp_path, scope, level):
    import _trl_step_gamma_run as runner

    trainer = runner.run(str(tmp_path), scope, level)
    check_step_gamma(
        [
            {
                "selection": trainer.selection,
                "calls": trainer.calls,
                "log_history": trainer.state.log_history,
            }
        ],
        scope,
        level,
    )


def test_micro_batch_scope_is_the_ablation(tmp_path):
    """Per-call gammas (the earlier behaviour) differ within one optimizer step."""
    import _trl_step_gamma_run as runner

    trainer = runner.run(str(tmp_path), "micro_batch", "sequence")
    spread = []
    for s in range(4):
        gammas = [c["logged_gamma"] for c in trainer.calls if c["step"] == s]
        assert len(gammas) == 4
        spread.append(max(gammas) - min(gammas))
    assert max(spread) > 0.05
    logged = [
        e["is_reshape/ess_ratio_pooled"]
        for e in trainer.state.log_history
        if "is_reshape/ess_ratio_pooled" in e
    ]
    assert len(logged) == 4


def test_one_gamma_per_optimizer_step_two_processes(tmp_path):
    """Two CPU processes (torchrun, gloo): the same gamma on both, that of the gathered step."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_trl_step_gamma_run.py")
    for scope in ("step", "group"):
        out = tmp_path / scope
        out.mkdir()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            str(script),
            str(out),
            scope,
            "sequence",
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
        assert all(r["world"] == 2 for r in runs)
        check_step_gamma(runs, scope, "sequence")


# ----------------------------------------------------------------------------------------------
# The tempered behaviour correction (pi_old/mu)^gamma under TRL's own loss


class FakeEngine:
    """Stands in for vLLM (not installable on CPU), through TRL's ``rollout_func`` hook.

    The engine is a copy of the initial policy with perturbed weights (as an inference engine
    with other numerics, or weights synced late, would be): it samples the completions and
    returns their log-probabilities, so TRL's ``sampling_per_token_logps`` differ from its
    recomputed ``old_per_token_logps`` and TRL's vLLM correction ``pi_old/mu`` is not 1.
    """

    def __init__(self, model, tokenizer, max_length, noise=0.3, seed=0):
        import copy

        self.model = copy.deepcopy(model).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
        self.tokenizer, self.max_length, self.gen = tokenizer, max_length, gen
        self.sync_weights = lambda: None  # the engine keeps its own weights

    @torch.no_grad()
    def __call__(self, prompts, trainer):
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        eos = self.tokenizer.eos_token_id
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            seq, comp, lps = list(ids), [], []
            for _ in range(self.max_length):
                logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
                seq.append(tok), comp.append(tok), lps.append(float(logp[tok]))
                if tok == eos:
                    break
            out["prompt_ids"].append(ids)
            out["completion_ids"].append(comp)
            out["logprobs"].append(lps)
        return out


def correction_trainer(tmp_path, mode, scope="step"):
    from isreshape_torch.trl import ISReshapeCorrectionGRPOConfig, ISReshapeCorrectionGRPOTrainer

    class Recording(ISReshapeCorrectionGRPOTrainer):
        def __init__(self, *a, engine, **k):
            super().__init__(*a, rollout_func=engine, **k)
            # TRL applies its correction only with vLLM: the fake engine plays vLLM's part.
            self.use_vllm, self.vllm_generation, self._last_loaded_step = True, engine, -1
            self.calls = []

        def _compute_loss(self, model, inputs):
            keys = ("importance_sampling_ratio", "old_per_token_logps", "sampling_per_token_logps")
            record = {k: inputs[k].clone() for k in keys}
            record.update(step=self._step // 2, mask=inputs["completion_mask"] > 0)
            record["group"] = inputs["is_reshape_group_id"].clone()
            self.calls.append(record)
            return super()._compute_loss(model, inputs)

    tokenizer = char_tokenizer()
    model = tiny_gpt2(tokenizer)
    args = ISReshapeCorrectionGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_completion_length=6,
        max_steps=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        vllm_importance_sampling_mode=mode,
        is_reshape_rho_min=0.9,
        is_reshape_gamma_scope=scope,
    )
    return Recording(
        model=model,
        reward_funcs=count_a,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["ab", "ba", "cab", "bc"] * 8}),
        processing_class=tokenizer,
        engine=FakeEngine(model, tokenizer, 6),
    )


@pytest.mark.parametrize("mode", ["sequence_mask", "token_truncate"])
def test_tempered_behaviour_correction_under_trls_loss(tmp_path, mode):
    from trl import GRPOTrainer

    from isreshape_core import step_gamma
    from isreshape_torch.trl import ISReshapeCorrectionGRPOTrainer

    # TRL's loss is kept as is: only the ratio it multiplies by is replaced.
    assert ISReshapeCorrectionGRPOTrainer._compute_loss is GRPOTrainer._compute_loss
    trainer = correction_trainer(tmp_path, mode)
    trainer.train()
    token = mode.startswith("token")
    gammas = []
    for s in range(4):
        calls = [c for c in trainer.calls if c["step"] == s]
        assert len(calls) == 2
        diffs = [
            torch.nan_to_num(
                (c["old_per_token_logps"] - c["sampling_per_token_logps"]) * c["mask"], nan=0.0
            )
            for c in calls
        ]
        units = [d if token else d.sum(-1) for d in diffs]
        valid = [c["mask"] if token else c["mask"].any(-1) for c in calls]
        l_all = torch.cat([u.reshape(-1) for u in units])
        v_all = torch.cat([v.reshape(-1) for v in valid])
        ref, _ = step_gamma(l_all, 0.9, mask=v_all)  # the whole step in one process
        g = float(ref[0])
        gammas.append(g)
        for c, u, v in zip(calls, units, valid, strict=True):
            expected = torch.where(v, torch.exp(g * u), 0.0)
            ratio = c["importance_sampling_ratio"]
            torch.testing.assert_close(ratio if token else ratio[:, 0], expected, rtol=1e-6, atol=0)
        x = (g * l_all[v_all]).double().numpy()
        w = np.exp(x - x.max())
        assert w.sum() ** 2 / (w**2).sum() / x.size >= 0.9 - 1e-5
    assert min(gammas) < 1.0  # the engine's weights are not trivial: gamma binds
    assert gammas[0] == gammas[1] and gammas[2] == gammas[3]  # num_iterations=2 reuses a step
    logs = [e for e in trainer.state.log_history if "sampling/is_reshape/gamma" in e]
    assert len(logs) == 4
    for e, g in zip(logs, gammas, strict=True):
        assert e["sampling/is_reshape/gamma"] == pytest.approx(g)
        assert e["sampling/is_reshape/ess_ratio"] >= 0.9 - 1e-5


def test_correction_config_validation(tmp_path):
    from isreshape_torch.trl import ISReshapeCorrectionGRPOConfig

    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction=True"):
        ISReshapeCorrectionGRPOConfig(**base, vllm_importance_sampling_correction=False)
    with pytest.raises(ValueError, match="ignores vllm_importance_sampling_clip_max"):
        ISReshapeCorrectionGRPOConfig(**base, vllm_importance_sampling_clip_max=5.0)
    with pytest.raises(ValueError, match="is_reshape_gamma"):
        ISReshapeCorrectionGRPOConfig(**base, is_reshape_gamma="0.5")
    with pytest.raises(ValueError, match="steps_per_generation"):
        ISReshapeCorrectionGRPOConfig(**base, gradient_accumulation_steps=4, steps_per_generation=2)
