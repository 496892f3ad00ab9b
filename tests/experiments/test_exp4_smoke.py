"""Smoke test of experiment 4 (a tiny GPT-2 trained from stale samples with TRL's GRPOTrainer).

The full experiment (minutes) is not part of the test run. Here it runs end to end on a tiny
setting, and its exact evaluation (the expected reward as the teacher-forced probability of the
correct completion) is checked against a brute-force enumeration of every completion TRL could
sample, scored with the experiment's own reward function.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

NAME = "exp4_tiny_lm"
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments" / f"{NAME}.py"


@pytest.fixture(scope="module")
def exp4():
    spec = importlib.util.spec_from_file_location(NAME, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(exp4, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp4")
    assert exp4.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads((out / f"{NAME}.json").read_text())


def test_writes_table_json_and_figure(smoke, exp4):
    out, data = smoke
    assert (out / f"{NAME}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / f"{NAME}.md").read_text()
    for _, label, _, _ in exp4.METHODS:
        assert label in table
    assert table.count("\n| ") >= len(exp4.METHODS) + 1
    assert data["seconds"] > 0 and data["platform"]["torch_threads"] == 1


def test_every_method_staleness_and_seed_is_reported(smoke, exp4):
    _, data = smoke
    setting = data["setting"]
    levels = set(setting["staleness"])
    methods = {key for key, _, _, _ in exp4.METHODS}
    assert {(r["method"], r["level"]) for r in data["rows"]} == {
        (m, lv) for m in methods for lv in levels
    }
    evals = [r for r in data["runs"] if r["role"] == "eval"]
    keys = [(r["method"], r["level"], r["seed"]) for r in evals]
    assert sorted(keys) == sorted(
        (m, lv, s) for m in methods for lv in levels for s in setting["eval_seeds"]
    )
    for row in data["rows"]:
        finals = np.array(row["final_per_seed"])
        assert finals.size == len(setting["eval_seeds"])
        assert np.all((finals >= 0.0) & (finals <= 1.0))
        assert row["final_mean"] == pytest.approx(finals.mean())
        assert row["final_min"] <= row["final_mean"] <= row["final_max"]
        assert row["lr"] in setting["lr_grid"]
        if row["method"].startswith("isreshape"):
            assert 0.0 <= row["gamma_mean"] <= 1.0
            assert 0.0 < row["ess_ratio_min"] <= 1.0
            if row["method"] == "isreshape_gamma1":  # the ablation never tempers
                assert row["gamma_mean"] == 1.0 and row["gamma_below_1_share"] == 0.0
            # the ESS/n of every whole optimiser step is recorded; ours keeps it >= rho_min
            assert row["steps_logged"] == setting["steps"] * len(setting["eval_seeds"])
            assert 0.0 < row["ess_pooled_min"] <= row["ess_pooled_mean"] <= 1.0
            if row["method"] == "isreshape":
                assert row["steps_below_rho_min"] == 0 and row["ess_pooled_min"] >= 0.3 - 1e-6
        else:
            assert "gamma_mean" not in row
    for run in evals:
        curve = np.array(run["curve"])
        assert run["steps"][0] == 0 and run["steps"][-1] == setting["steps"]
        assert np.all((curve >= 0.0) & (curve <= 1.0))
        # every run starts from its seed's behaviour policy
        assert curve[0] == pytest.approx(data["behaviour_reward"][str(run["seed"])], rel=1e-5)
    # the runs really train: the policy moves
    assert any(abs(r["curve"][-1] - r["curve"][0]) > 1e-4 for r in evals)


def test_sampling_distribution_is_the_evaluated_one(smoke):
    """Monte Carlo rewards from model.generate with TRL's generation config agree with the exact
    expected reward (recorded by the run)."""
    _, data = smoke
    for check in data["mc_check"]:
        assert abs(check["sampled"] - check["exact"]) <= 5 * check["standard_error"] + 1e-3


def test_reward_is_exact_match_of_ids(exp4):
    eos, pad = exp4.EOS, exp4.PAD
    nine = exp4.encode("9")[0]
    one, eight = exp4.encode("18")
    got = exp4.exact_match_reward(
        ["9+9="] * 5 + ["4+5="],
        [""] * 6,
        [
            [one, eight, eos],
            [one, eight],
            [one, pad, eight],
            [one, eight, nine],
            [eight, eos],
            [nine, eos],
        ],
    )
    assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def _enumerate_expected_reward(exp4, model, index: int) -> tuple[float, float]:
    """Sum of P(c) r(c) and of P(c) over every completion c TRL can produce for one prompt:
    sampling stops at <eos> or after MAX_COMPLETION_LENGTH tokens; plain unpadded forward passes."""
    prompt = list(exp4.PROMPT_IDS[index])
    frontier = [([], 0.0)]  # unfinished completions and their log-probabilities
    finished = []
    for depth in range(exp4.MAX_COMPLETION_LENGTH):
        ids = torch.tensor([prompt + c for c, _ in frontier])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].double()
        logp = torch.log_softmax(logits, -1).numpy()
        nxt = []
        for (c, lp), row in zip(frontier, logp, strict=True):
            for token, lpt in enumerate(row):
                item = ([*c, token], lp + lpt)
                last = token == exp4.EOS or depth + 1 == exp4.MAX_COMPLETION_LENGTH
                (finished if last else nxt).append(item)
        frontier = nxt
    completions = [c for c, _ in finished]
    probs = np.exp([lp for _, lp in finished])
    prompts = [exp4.PROMPTS[index]] * len(completions)
    rewards = np.array(exp4.exact_match_reward(prompts, [""] * len(prompts), completions))
    return float(probs @ rewards), float(probs.sum())


@pytest.mark.parametrize("trained", [False, True])
def test_expected_reward_matches_brute_force_enumeration(exp4, trained):
    setting = dict(exp4.SMOKE, behaviour_steps=60)
    model = exp4.build_model(7, setting["width"])
    if trained:  # a behaviour policy, so that the correct completion carries real mass
        state, reward = exp4.train_behaviour(setting, 7)
        model.load_state_dict(state)
    exact = exp4.expected_rewards(model)
    assert exact.shape == (100,) and np.all((exact >= 0) & (exact <= 1))
    if trained:
        assert exact.mean() == pytest.approx(reward)
        assert exact.mean() > 0.01  # far above the uniform policy's (1/15)^2 or (1/15)^3
    for index in (0, 23, 37, 99):  # answers 0, 5, 10, 18: one and two digits
        expected, total = _enumerate_expected_reward(exp4, model, index)
        assert total == pytest.approx(1.0, abs=1e-9)
        assert exact[index] == pytest.approx(expected, rel=1e-5, abs=1e-9)


def _exact_bootstrap_cdf(d: np.ndarray, x: float) -> tuple[float, float]:
    """P(mean < x) and P(mean <= x) under the exact bootstrap distribution of the mean of ``d``:
    every one of the n^n equally likely resamples (ordered index tuples), enumerated."""
    n = d.size
    grids = np.meshgrid(*[np.arange(n)] * n, indexing="ij")
    means = d[np.stack([g.ravel() for g in grids], 1)].mean(1)
    return float((means < x - 1e-12).mean()), float((means <= x + 1e-12).mean())


@pytest.mark.parametrize("seed", [0, 3])
def test_paired_interval_matches_the_exact_bootstrap_distribution(exp4, seed):
    """The 90 % percentile interval of the paired difference sits at the 5 % and 95 % points of
    the exact bootstrap distribution (all 5^5 resamples of 5 seeds), up to Monte Carlo error."""
    rng = np.random.default_rng(seed)
    a, b = rng.random(5), rng.random(5)
    mean, lo, hi = exp4.paired_interval(a, b, **exp4.BOOTSTRAP)
    assert mean == pytest.approx((a - b).mean())
    assert lo <= mean <= hi
    tol = 0.01  # 10,000 resamples: the standard error of a 5 % point's probability is 0.002
    for x, p in ((lo, 0.05), (hi, 0.95)):
        below, at_or_below = _exact_bootstrap_cdf(a - b, x)
        assert below <= p + tol and at_or_below >= p - tol


def test_compare_pairs_seeds_and_picks_the_best_other_row(exp4):
    setting = dict(exp4.COMPOSITION, eval_seeds=(0, 1, 2), staleness={"never synced": 300})
    finals = {
        "dapo_trl_is": [0.50, 0.52, 0.54],
        "dapo_tempered": [0.60, 0.50, 0.58],
        "cispo_trl_is": [0.61, 0.63, 0.65],
        "cispo_tempered": [0.62, 0.62, 0.66],
    }
    rows = [
        {"method": m, "level": "never synced", "final_per_seed": v, "final_mean": np.mean(v)}
        for m, v in finals.items()
    ]
    got = {c["best_other"]["method"]: c for c in exp4.compare({"rows": rows}, setting)}
    assert set(got) == {"dapo_tempered", "cispo_tempered"}
    for method, c in got.items():
        assert c["best_other"]["against"] == "cispo_trl_is"
        assert c["same_loss"]["against"] == method.replace("_tempered", "_trl_is")
        diff = np.subtract(finals[method], finals["cispo_trl_is"])
        assert c["best_other"]["difference_per_seed"] == pytest.approx(diff)
        assert c["best_other"]["seeds"] == [0, 1, 2]
    assert got["dapo_tempered"]["same_loss"]["mean"] == pytest.approx(0.04)
