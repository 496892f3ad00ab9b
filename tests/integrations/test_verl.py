"""Tests of adapters/isreshape_torch/verl.py against verl itself (0.9.x, installed for real).

The loss registered as ``is_reshape`` is checked, value and gradient, against verl's own
``agg_loss`` applied to the IS Reshape loss matrix written out here in plain torch (autograd
through ``expm1(gamma l)/gamma``), for every verl aggregation mode, with and without verl's global
normalisers; gamma against a NumPy ESS computation; the registration through
``VERL_USE_EXTERNAL_MODULES``; the options through verl's own config conversion; and gamma
once per optimizer step over 2 gloo ranks through verl's partitioning, mini-batch iterator and
dynamic micro-batch split, against the core's ``step_gamma`` of the whole step in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
torch.set_num_threads(1)

from isreshape_torch import is_reshape_loss  # noqa: E402
from isreshape_torch.verl import (  # noqa: E402
    ISReshapePolicyLossConfig,
    compute_policy_loss_is_reshape,
    is_reshape_options,
    prepare_step_gamma,
)

F64 = torch.float64
VERL_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
LEVELS = ("sequence", "geometric", "token")
REPO = Path(__file__).resolve().parents[2]


def make_batch(seed=0, B=6, T=5, noise=0.3, empty_row=False, dtype=F64):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    old = logp + rng.normal(0, noise, (B, T))
    lengths = rng.integers(1, T + 1, B)
    if empty_row:
        lengths[1] = 0
    mask = np.arange(T)[None, :] < lengths[:, None]
    adv = rng.normal(0, 1, (B, T))
    return (
        torch.tensor(old, dtype=dtype),
        torch.tensor(logp, dtype=dtype, requires_grad=True),
        torch.tensor(adv, dtype=dtype),
        torch.tensor(mask),
    )


def reference_loss_mat(old, logp, adv, mask, gamma, level):
    """The IS Reshape per-token loss matrix in plain torch: ``-A expm1(gamma l_u)/gamma``."""
    m = mask.to(logp.dtype)
    tok = (logp - old) * m
    if level == "token":
        lu = tok
    else:
        lu = tok.sum(-1, keepdim=True)
        if level == "geometric":
            lu = lu / m.sum(-1, keepdim=True).clamp(min=1.0)
        lu = lu.expand_as(tok)
    h = lu if gamma == 0 else torch.expm1(gamma * lu) / gamma
    return -adv * h


def verl_reference(old, logp, adv, mask, gamma, level, mode, info, weights=None):
    """verl's agg_loss on the reference matrix; returns (loss, grad wrt logp)."""
    lp = logp.detach().clone().requires_grad_()
    mat = reference_loss_mat(old, lp, adv, mask, gamma, level)
    if weights is not None:
        mat = mat * weights
    loss = core_algos.agg_loss(loss_mat=mat, loss_mask=mask, loss_agg_mode=mode, **info)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


def ours(old, logp, adv, mask, mode, config, weights=None):
    lp = logp.detach().clone().requires_grad_()
    loss, metrics = compute_policy_loss_is_reshape(
        old_log_prob=old,
        log_prob=lp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=weights,
    )
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def config_for(gamma, level, info=None, **extra):
    """A per-call gamma (``is_reshape_gamma_scope=micro_batch``), as these tests call the loss
    directly, outside the step hook."""
    return {
        "policy_loss": {
            "loss_mode": "is_reshape",
            "is_reshape_gamma": gamma,
            "is_reshape_level": level,
            "is_reshape_gamma_scope": "micro_batch",
            **extra,
        },
        "global_batch_info": dict(info or {}),
    }


# ----------------------------------------------------------------------------------------------
# registration


def test_registered_in_verl_registry():
    assert core_algos.get_policy_loss_fn("is_reshape") is compute_policy_loss_is_reshape


def test_registration_through_verl_use_external_modules():
    """A fresh interpreter: ``import verl`` imports the module named in the variable, which
    registers the loss, as a verl worker process does."""
    env = dict(os.environ)
    env["VERL_USE_EXTERNAL_MODULES"] = "isreshape_torch.verl"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "adapters")])
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "fn = get_policy_loss_fn('is_reshape')\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["isreshape_torch.verl", "compute_policy_loss_is_reshape"]


# ----------------------------------------------------------------------------------------------
# value and gradient against verl's agg_loss


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_matches_verl_agg_loss_local(mode, level, gamma):
    old, logp, adv, mask = make_batch(seed=1, empty_row=True)
    ref_loss, ref_grad = verl_reference(old, logp, adv, mask, gamma, level, mode, {})
    loss, grad, metrics = ours(old, logp, adv, mask, mode, config_for(gamma, level))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert float(metrics["actor/is_reshape/gamma"]) == gamma


GLOBAL_INFOS = [
    {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 16, "loss_scale_factor": None},
    {"dp_size": 4, "batch_num_tokens": 101, "global_batch_size": 24, "loss_scale_factor": 9},
    {"dp_size": 1, "batch_num_tokens": 40, "global_batch_size": 12},
]


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS)
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_matches_verl_agg_loss_with_global_batch_info(mode, info, level):
    """verl's micro-batch loss with the global normalisers of the mini-batch (dp_size,
    batch_num_tokens, global_batch_size, loss_scale_factor)."""
    old, logp, adv, mask = make_batch(seed=2, B=5, T=7)
    ref_loss, ref_grad = verl_reference(old, logp, adv, mask, 0.7, level, mode, info)
    loss, grad, _ = ours(old, logp, adv, mask, mode, config_for(0.7, level, info))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", LEVELS)
def test_ess_gamma_value_gradient_and_constraint(level):
    """gamma="ess": the loss is verl's agg_loss of the matrix at the reported gamma, and that gamma
    is the largest with ESS/n >= rho_min (checked with NumPy on the unit log weights)."""
    rho_min = 0.9
    old, logp, adv, mask = make_batch(seed=3, B=8, T=6, noise=1.0)
    loss, grad, metrics = ours(
        old, logp, adv, mask, "token-mean", config_for("ess", level, is_reshape_rho_min=rho_min)
    )
    gamma = float(metrics["actor/is_reshape/gamma"])
    assert 0.0 < gamma < 1.0
    ref_loss, ref_grad = verl_reference(old, logp, adv, mask, gamma, level, "token-mean", {})
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)

    m = mask.numpy()
    tok = (logp.detach().numpy() - old.numpy()) * m
    if level == "token":
        lu = tok[m]
    else:
        lu = tok.sum(-1)
        if level == "geometric":
            lu = lu / m.sum(-1)

    def ess_ratio(g):
        w = np.exp(g * (lu - lu.max()))
        return w.sum() ** 2 / (w**2).sum() / lu.size

    assert ess_ratio(gamma) >= rho_min - 1e-9
    assert ess_ratio(min(1.0, gamma + 0.01)) < rho_min
    np.testing.assert_allclose(float(metrics["actor/is_reshape/ess_ratio"]), ess_ratio(gamma))
    np.testing.assert_allclose(float(metrics["actor/is_reshape/ess_ratio_at_1"]), ess_ratio(1.0))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_rollout_is_weights_multiply_the_token_losses(mode):
    old, logp, adv, mask = make_batch(seed=4)
    weights = torch.tensor(np.random.default_rng(5).uniform(0.2, 2.0, adv.shape), dtype=F64)
    ref_loss, ref_grad = verl_reference(old, logp, adv, mask, 0.6, "sequence", mode, {}, weights)
    loss, grad, _ = ours(old, logp, adv, mask, mode, config_for(0.6, "sequence"), weights)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_same_as_is_reshape_loss_through_the_registry():
    """Called through verl's registry, as verl's ppo_loss does, with verl's default (empty)
    global batch info: the same loss, gradient and metrics as isreshape_torch.is_reshape_loss."""
    old, logp, adv, mask = make_batch(seed=6, noise=0.6)
    fn = core_algos.get_policy_loss_fn("is_reshape")
    lp1 = logp.detach().clone().requires_grad_()
    loss1, metrics1 = fn(
        old_log_prob=old,
        log_prob=lp1,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=config_for("ess", "geometric"),
        rollout_is_weights=None,
    )
    loss1.backward()
    lp2 = logp.detach().clone().requires_grad_()
    loss2, metrics2 = is_reshape_loss(
        lp2, old, adv, mask, level="geometric", loss_agg_mode="token-mean", distributed=False
    )
    loss2.backward()
    torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=0, atol=0)
    for k, v in metrics2.items():
        torch.testing.assert_close(metrics1[f"actor/is_reshape/{k}"], v, rtol=0, atol=0)
    m = mask.to(F64)
    kl = ((old - logp.detach()) * m).sum() / m.sum()
    torch.testing.assert_close(metrics1["actor/ppo_kl"], kl)


def test_float_mask_and_on_policy_reinforce_gradient():
    """A 0/1 float response mask acts as the boolean one; with old_log_prob == log_prob (w = 1)
    the gradient is verl's REINFORCE gradient -c A for every gamma and form."""
    _, logp, adv, mask = make_batch(seed=7)
    old = logp.detach().clone()
    for form in ("objective", "reinforce"):
        cfg = config_for("ess", "sequence", is_reshape_form=form)
        loss_b, grad_b, _ = ours(old, logp, adv, mask, "seq-mean-token-sum", cfg)
        loss_f, grad_f, _ = ours(old, logp, adv, mask.to(F64), "seq-mean-token-sum", cfg)
        torch.testing.assert_close(grad_b, grad_f, rtol=0, atol=0)
        torch.testing.assert_close(loss_b, loss_f, rtol=0, atol=0)
        B = mask.shape[0]
        # d/dlogp of -(1/B) sum_b (sum_t m A_bt) l_b at w = 1: -(1/B) sum_t' m A_bt' on each token
        expected = -(adv * mask).sum(-1, keepdim=True) * mask.to(F64) / B
        torch.testing.assert_close(grad_b, expected, rtol=1e-12, atol=1e-12)


def test_bfloat16_log_probs():
    old, logp, adv, mask = make_batch(seed=8, dtype=torch.float32)
    lp16 = logp.detach().to(torch.bfloat16).requires_grad_()
    loss, _ = compute_policy_loss_is_reshape(
        old.to(torch.bfloat16), lp16, adv, mask, "token-mean", config_for(0.5, "token")
    )
    loss.backward()
    assert loss.dtype == torch.float32 and lp16.grad.dtype == torch.bfloat16
    ref_loss, ref_grad = verl_reference(
        old.to(torch.bfloat16).float(),
        lp16.detach().float(),
        adv,
        mask,
        0.5,
        "token",
        "token-mean",
        {},
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp16.grad.float(), ref_grad, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# options and errors


def test_options_through_verl_config_conversion():
    """verl's own YAML, with policy_loss._target_ pointing at ISReshapePolicyLossConfig and
    `+` keys, converted by verl's omega_conf_to_dataclass as the actor worker does."""
    pytest.importorskip("hydra")
    import verl
    from omegaconf import OmegaConf, open_dict
    from verl.utils.config import omega_conf_to_dataclass

    path = Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml"
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    actor = cfg.actor_rollout_ref.actor
    actor.policy_loss.loss_mode = "is_reshape"
    actor.policy_loss._target_ = "isreshape_torch.verl.ISReshapePolicyLossConfig"
    actor.ppo_micro_batch_size_per_gpu = 2
    with open_dict(cfg):  # what hydra's `+key=value` overrides do
        actor.rollout_n = 4
        actor.policy_loss.is_reshape_gamma = "closed_form"
        actor.policy_loss.is_reshape_rho_min = 0.5
        actor.policy_loss.is_reshape_level = "token"
        actor.policy_loss.is_reshape_gamma_options = {"gamma_min": 0.1}
        actor.policy_loss.is_reshape_gamma_scope = "micro_batch"
    actor_config = omega_conf_to_dataclass(actor)
    assert isinstance(actor_config.policy_loss, ISReshapePolicyLossConfig)
    assert is_reshape_options(actor_config.policy_loss) == {
        "gamma": "closed_form",
        "rho_min": 0.5,
        "level": "token",
        "form": "objective",
        "group_by": None,
        "scope": "micro_batch",
        "rollout_correction": False,
        "gamma_options": {"gamma_min": 0.1},
    }
    # and the loss reads them: closed-form gamma clip(sqrt(-log 0.5 / sigma^2), 0.1, 1)
    old, logp, adv, mask = make_batch(seed=9, noise=1.5)
    _, _, metrics = ours(old, logp, adv, mask, "token-mean", actor_config)
    lu = ((logp.detach() - old)[mask]).numpy()
    expected = np.clip(np.sqrt(-np.log(0.5) / lu.var(ddof=1)), 0.1, 1.0)
    np.testing.assert_allclose(float(metrics["actor/is_reshape/gamma"]), expected, rtol=1e-10)


def test_dictconfig_options_and_defaults():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"policy_loss": {"loss_mode": "is_reshape", "is_reshape_gamma": "0.25"}})
    opts = is_reshape_options(cfg.policy_loss)
    assert opts["gamma"] == 0.25 and opts["rho_min"] == 0.3 and opts["level"] == "sequence"
    assert is_reshape_options(None)["gamma"] == "ess"


def test_errors():
    old, logp, adv, mask = make_batch(seed=10)
    # today's per-call gamma is no longer silent: a gamma method needs the step (or the opt-in)
    cfg = {"policy_loss": {"loss_mode": "is_reshape", "is_reshape_gamma": "ess"}}
    with pytest.raises(ValueError, match=r"trainer_mode=is_reshape.*is_reshape_gamma_scope"):
        ours(old, logp, adv, mask, "token-mean", cfg)
    # consecutive-row groups are wrong after balance_batch: an error that names the fix
    cfg = {"policy_loss": {"loss_mode": "is_reshape", "is_reshape_group_size": 4}}
    with pytest.raises(ValueError, match="is_reshape_group_by=uid"):
        ours(old, logp, adv, mask, "token-mean", cfg)
    with pytest.raises(ValueError, match="is_reshape_group_by"):
        is_reshape_options({"is_reshape_group_by": "prompt"})
    with pytest.raises(ValueError, match="is_reshape_rollout_correction=false"):
        prepare_step_gamma(None, {"loss_mode": "is_reshape", "is_reshape_rollout_correction": True})
    with pytest.raises(ValueError, match="is_reshape_rhomin"):
        ours(old, logp, adv, mask, "token-mean", {"policy_loss": {"is_reshape_rhomin": 0.5}})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ours(old, logp, adv, mask, "seq-sum", config_for(0.5, "token"))
    with pytest.raises(ValueError, match="level"):
        ours(old, logp, adv, mask, "token-mean", config_for(0.5, "sentence"))
    # verl's agg_loss refuses dp_size > 1 without the global count; so does this loss
    info = {"dp_size": 2}
    with pytest.raises(ValueError, match="batch_num_tokens"):
        core_algos.agg_loss(adv, mask, "token-mean", **info)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        ours(old, logp, adv, mask, "token-mean", config_for(0.5, "token", info))
    with pytest.raises(ValueError, match="global_batch_size"):
        ours(old, logp, adv, mask, "seq-mean-token-mean", config_for(0.5, "token", info))


# ----------------------------------------------------------------------------------------------
# gamma once per optimizer step: verl's partitioning, mini-batch iterator and micro-batch split,
# 2 gloo ranks, against the core's step_gamma on the whole step in one process

import socket  # noqa: E402

import isreshape_core as isr  # noqa: E402

N_ROWS, T_RESP, G = 32, 6, 4  # 8 GRPO groups of 4


def step_batch():
    rng = np.random.default_rng(11)
    lengths = rng.integers(1, T_RESP + 1, N_ROWS)
    mask = np.arange(T_RESP)[None, :] < lengths[:, None]
    rollout = np.log(rng.uniform(0.05, 1.0, (N_ROWS, T_RESP)))
    old = rollout + rng.normal(0, 0.8, (N_ROWS, T_RESP))
    logp = old + rng.normal(0, 1.0, (N_ROWS, T_RESP))
    adv = np.repeat(rng.normal(0, 1, (N_ROWS, 1)), T_RESP, 1)
    uid = [f"prompt-{i // G}" for i in range(N_ROWS)]
    return lengths, mask, rollout, old, logp, adv, uid


def _nested(rows, lengths):
    return torch.nested.nested_tensor(
        [torch.as_tensor(r[:n]) for r, n in zip(rows, lengths, strict=True)], layout=torch.jagged
    )


def _rank_td(idx, lengths, mask, rollout, old, logp, adv, uid):
    from verl.utils import tensordict_utils as tu

    ln = lengths[idx]
    fields = {
        "row": torch.as_tensor(idx),
        "input_ids": _nested([np.zeros(T_RESP + 1, dtype=np.int64)] * len(idx), ln + 1),
        "response_mask": _nested(mask[idx], ln),
        "rollout_log_probs": _nested(rollout[idx], ln),
        "old_log_probs": _nested(old[idx], ln),
        "advantages": _nested(adv[idx], ln),
    }
    return tu.get_tensordict(tensor_dict={**fields, "uid": [uid[i] for i in idx]})


def _step_worker(rank, world, port, out_dir, case):
    import torch.distributed as tdist
    from verl.utils import tensordict_utils as tu
    from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions, rearrange_micro_batches

    from isreshape_torch.verl import GAMMA_FIELD, prepare_step_gamma, step_gamma_context

    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    lengths, mask, rollout, old, logp, adv, uid = step_batch()
    # verl's balance_batch: length-balanced partitions, ignoring uid (groups land on both ranks)
    parts = get_seqlen_balanced_partitions(list(lengths + 10), k_partitions=world, equal_size=True)
    td = _rank_td(np.array(sorted(parts[rank])), lengths, mask, rollout, old, logp, adv, uid)
    cfg = {"loss_mode": "vanilla" if case["rc"] else "is_reshape", **case["cfg"]}
    out = []
    minibatches = tu.make_iterator(
        td, mini_batch_size=len(td) // 2, epochs=1, seed=rank, dataloader_kwargs={"shuffle": True}
    )
    for mb in minibatches:
        rows = mb["row"].numpy()
        lp = None
        if not case["rc"]:
            lp = torch.tensor(np.where(mask[rows], logp[rows], 0.0))[:, : int(lengths[rows].max())]
        metrics = prepare_step_gamma(mb, cfg, dp_group=tdist.group.WORLD, log_prob=lp)
        # dp_group=None: verl syncs the micro-batch count on the accelerator (CUDA) only
        micro, _ = rearrange_micro_batches(mb, max_token_len=2 * (T_RESP + 1), dp_group=None)
        for m in micro:
            mrows = m["row"].numpy()
            rec = {"rows": mrows, "metrics": metrics}
            if case["rc"]:
                rec["weights"] = m["rollout_is_weights"].to_padded_tensor(0.0).numpy()
            else:
                gamma = m[GAMMA_FIELD]
                rec["gamma"] = gamma.numpy()
                o = torch.tensor(old[mrows])
                lpm = torch.tensor(logp[mrows], requires_grad=True)
                with step_gamma_context(gamma):
                    loss, _ = compute_policy_loss_is_reshape(
                        o,
                        lpm,
                        torch.tensor(adv[mrows]),
                        torch.tensor(mask[mrows]),
                        "seq-mean-token-sum",
                        {"policy_loss": cfg},
                    )
                rec["loss"] = loss.item()
            out.append(rec)
        out[-1]["step_rows"] = rows
    tdist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEP_CASES = {
    "loss_uid": {
        "rc": False,
        "cfg": {"is_reshape_gamma": "ess", "is_reshape_group_by": "uid", "is_reshape_rho_min": 0.9},
    },
    "loss_step_token": {
        "rc": False,
        "cfg": {"is_reshape_gamma": "ess", "is_reshape_level": "token", "is_reshape_rho_min": 0.6},
    },
    "rollout_correction_uid": {
        "rc": True,
        "cfg": {
            "is_reshape_rollout_correction": True,
            "is_reshape_group_by": "uid",
            "is_reshape_rho_min": 0.9,
        },
    },
}


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_one_gamma_per_step_over_two_ranks(name, tmp_path):
    """Every micro-batch of a step (2 gloo ranks, verl's balanced partitions, shuffled
    mini-batches, dynamic micro-batches) uses the gamma that the core's step_gamma chooses on the
    whole step in one process, per uid group (groups split over ranks and reordered)."""
    import torch.multiprocessing as mp

    case = STEP_CASES[name]
    mp.spawn(_step_worker, args=(2, _free_port(), str(tmp_path), case), nprocs=2)
    recs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    _, mask, rollout, old, logp, adv, uid = step_batch()
    opts = is_reshape_options({"loss_mode": "x", **case["cfg"]})
    level = opts["level"]
    for step in range(2):
        # the rows of step `step` on both ranks: each rank's records, split at its step ends
        per_rank = []
        for r in range(2):
            ends = [i for i, rec in enumerate(recs[r]) if "step_rows" in rec]
            lo = 0 if step == 0 else ends[0] + 1
            per_rank.append(recs[r][lo : ends[step] + 1])
        rows = np.concatenate([rr[-1]["step_rows"] for rr in per_rank])
        q = torch.tensor(rollout[rows] if case["rc"] else old[rows])
        p = torch.tensor(old[rows] if case["rc"] else logp[rows])
        m = torch.tensor(mask[rows])
        lw = isr.log_weights(p, q, m, level=level)
        names = sorted({uid[i] for i in rows})
        gid = torch.tensor([names.index(uid[i]) for i in rows])
        flat = lw.reshape(-1) if level == "token" else lw
        umask = m.reshape(-1) if level == "token" else m.any(-1)
        if level == "token":
            gid = gid[:, None].expand(m.shape).reshape(-1)
        kw = {"group_ids": gid, "num_groups": len(names)} if opts["group_by"] else {}
        g_ref, met_ref = isr.step_gamma(flat, opts["rho_min"], mask=umask, **kw)
        g_rows = g_ref.reshape(m.shape)[:, 0] if level == "token" else g_ref
        by_row = dict(zip(rows.tolist(), g_rows.numpy(), strict=True))
        assert g_rows.min() < 1.0  # the constraint binds: not the trivial gamma = 1
        assert len(set(np.round(g_rows.numpy(), 9))) > (1 if opts["group_by"] else 0)
        for rr in per_rank:
            np.testing.assert_allclose(
                rr[0]["metrics"].get(
                    "actor/is_reshape/gamma", rr[0]["metrics"].get("rollout_corr/rollout_is_gamma")
                ),
                float(met_ref["gamma"]),
                rtol=0,
                atol=1e-12,
            )
            for rec in rr:
                want = np.array([by_row[i] for i in rec["rows"]])
                if case["rc"]:
                    lw_rows = isr.log_weights(
                        torch.tensor(old[rec["rows"]]),
                        torch.tensor(rollout[rec["rows"]]),
                        torch.tensor(mask[rec["rows"]]),
                        level=level,
                    ).numpy()
                    w = np.exp(want * lw_rows)[:, None] * mask[rec["rows"]]
                    got = rec["weights"]
                    np.testing.assert_allclose(got, w[:, : got.shape[1]], rtol=1e-6, atol=1e-7)
                else:
                    np.testing.assert_allclose(rec["gamma"], want, rtol=0, atol=1e-12)
                    # and the loss used exactly those gammas
                    o, lp_ = torch.tensor(old[rec["rows"]]), torch.tensor(logp[rec["rows"]])
                    mk = torch.tensor(mask[rec["rows"]])
                    mat = torch.stack(
                        [
                            reference_loss_mat(
                                o[i : i + 1],
                                lp_[i : i + 1],
                                torch.tensor(adv[rec["rows"]][i : i + 1]),
                                mk[i : i + 1],
                                float(want[i]),
                                level,
                            )[0]
                            for i in range(len(want))
                        ]
                    )
                    ref = core_algos.agg_loss(mat, mk, "seq-mean-token-sum")
                    np.testing.assert_allclose(rec["loss"], ref.item(), rtol=1e-10, atol=1e-12)


def test_trainer_registration_and_config_errors():
    """The trainer ``is_reshape`` through verl's registry, built by verl's own ``__init__`` on
    verl's YAML: its start-up checks (errors naming the key) and its worker mapping."""
    trainer_mod = pytest.importorskip("isreshape_torch.verl_trainer")
    import verl
    from omegaconf import OmegaConf, open_dict
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import get_trainer_cls

    trainer_cls = get_trainer_cls("is_reshape")
    assert trainer_cls is trainer_mod.ISReshapeTrainer
    worker = trainer_mod.ISReshapeActorRolloutRefWorker
    assert worker.actor_worker_cls is trainer_mod.ISReshapeTrainingWorker
    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml")
    cfg.trainer.v1.trainer_mode = "is_reshape"
    pl = cfg.actor_rollout_ref.actor.policy_loss
    with open_dict(cfg):
        pl.is_reshape_rollout_correction = True
    cfg.algorithm.rollout_correction.bypass_mode = False
    with open_dict(cfg):
        cfg.algorithm.rollout_correction.rollout_is = "sequence"  # verl's TIS
    with pytest.raises(ValueError, match=r"rollout_correction\.rollout_is=null"):
        trainer_cls(config=cfg)
    cfg.algorithm.rollout_correction.rollout_is = None
    cfg.actor_rollout_ref.rollout.calculate_log_probs = False
    with pytest.raises(ValueError, match="calculate_log_probs=true"):
        trainer_cls(config=cfg)
    cfg.actor_rollout_ref.rollout.calculate_log_probs = True
    trainer = trainer_cls(config=cfg)
    assert trainer.trainer_mode == "sync" and trainer.parameter_sync_step == 1
    trainer._init_resource_pool_mgr()
    assert trainer.role_worker_mapping[Role.ActorRollout].__ray_actor_class__ is worker
    cfg.algorithm.rollout_correction.bypass_mode = True
    with pytest.raises(ValueError, match="bypass_mode=false"):
        trainer_cls(config=cfg)


# ----------------------------------------------------------------------------------------------
# the trainer ``is_reshape`` on verl's own FSDP2 engine: a tiny Qwen2 built from a config, CPU
# processes, gloo (verl 0.9's trainer modules and their dependencies installed)

import copy  # noqa: E402

TRAINER_ROWS, TRAINER_G, VOCAB = 32, 4, 13  # 8 GRPO groups of 4 (rollout.n = 4)
TRAINER_CASES = {
    # bypass mode: IS Reshape is the loss, gamma from the hook's forward pass at the step
    "loss": {
        "bypass": True,
        "policy_loss": {
            "loss_mode": "is_reshape",
            "is_reshape_gamma": "ess",
            "is_reshape_group_by": "uid",
            "is_reshape_rho_min": 0.9,
        },
    },
    # decoupled mode: verl's PPO-clip loss with the tempered pi_old / mu as behaviour correction
    "rollout_correction": {
        "bypass": False,
        "policy_loss": {
            "loss_mode": "vanilla",
            "is_reshape_rollout_correction": True,
            "is_reshape_group_by": "uid",
            "is_reshape_rho_min": 0.9,
        },
    },
}


def trainer_rows():
    """32 trajectories: prompt and response ids, mu (rollout), pi_old, advantages, uid."""
    rng = np.random.default_rng(21)
    n = TRAINER_ROWS
    plen = rng.integers(2, 5, n)
    rlen = rng.integers(1, T_RESP + 1, n)
    rows = {
        "prompts": [rng.integers(3, VOCAB, k) for k in plen],
        "responses": [rng.integers(3, VOCAB, k) for k in rlen],
        "rollout": [np.log(rng.uniform(0.05, 1.0, k)) for k in rlen],
        "adv": [np.full(k, a) for k, a in zip(rlen, rng.normal(0, 1, n), strict=True)],
        "uid": [f"prompt-{i // TRAINER_G}" for i in range(n)],
    }
    rows["old"] = [r + rng.normal(0, 0.8, len(r)) for r in rows["rollout"]]
    return rows


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Qwen2 with random weights (from a config) and a character tokenizer, saved."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny_qwen2")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *"abcdefghij"])}
    assert len(vocab) == VOCAB
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(path)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def trainer_config(model_dir, case):
    """verl's own trainer YAML with the IS Reshape trainer, FSDP2 in fp32, dynamic batch size,
    shuffled mini-batches (2 per epoch on each of 2 ranks), 2 epochs."""
    import verl
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml")
    cfg.trainer.v1.trainer_mode = "is_reshape"
    cfg.trainer.n_gpus_per_node = 2
    cfg.algorithm.adv_estimator = "grpo"
    cfg.algorithm.rollout_correction.bypass_mode = case["bypass"]
    cfg.algorithm.rollout_correction.rollout_is = None
    ar = cfg.actor_rollout_ref
    ar.rollout.name = "vllm"  # never started: the actor role builds no rollout
    ar.rollout.n = TRAINER_G
    ar.rollout.calculate_log_probs = True
    ar.model.path = model_dir
    ar.model.use_remove_padding = False  # packed sequences need flash-attn (CUDA)
    ar.model.enable_gradient_checkpointing = False
    actor = ar.actor
    actor.strategy = actor.fsdp_config.strategy = "fsdp2"
    actor.use_torch_compile = actor.fsdp_config.use_torch_compile = False
    actor.ppo_mini_batch_size = 4  # prompts: 16 rows a step, 8 per rank
    actor.ppo_epochs = 2
    actor.shuffle = True
    actor.use_dynamic_bsz = True
    actor.ppo_max_token_len_per_gpu = 24  # several micro-batches a step
    actor.optim.lr = 1e-2  # the parameters move between steps
    actor.policy_loss._target_ = "isreshape_torch.verl.ISReshapePolicyLossConfig"
    with open_dict(cfg):
        ar.model.override_config.attn_implementation = "sdpa"
        actor.fsdp_config.mixed_precision = dict.fromkeys(
            ["param_dtype", "reduce_dtype", "buffer_dtype"], "fp32"
        )
        for key, val in case["policy_loss"].items():
            actor.policy_loss[key] = val
    return cfg


def _trainer_td(idx, rows, bypass):
    """The rows ``idx`` as verl's actor receives them from TransferQueue (jagged)."""
    from verl.utils import tensordict_utils as tu

    def nested(key, dtype):
        return torch.nested.as_nested_tensor(
            [torch.as_tensor(np.asarray(x), dtype=dtype) for x in key], layout=torch.jagged
        )

    def pick(key):
        return [rows[key][i] for i in idx]

    ids = [np.concatenate([rows["prompts"][i], rows["responses"][i]]) for i in idx]
    ones = [np.ones(len(r)) for r in pick("responses")]
    fields = {
        "row": torch.as_tensor(idx),
        "prompts": nested(pick("prompts"), torch.int64),
        "responses": nested(pick("responses"), torch.int64),
        "input_ids": nested(ids, torch.int64),
        "attention_mask": nested([np.ones(len(x)) for x in ids], torch.int64),
        "position_ids": nested([np.arange(len(x)) for x in ids], torch.int64),
        "response_mask": nested(ones, torch.int64),
        "loss_mask": nested(ones, torch.int64),
        # bypass mode: verl's trainer copies rollout_log_probs into old_log_probs
        "old_log_probs": nested(pick("rollout" if bypass else "old"), torch.float32),
        "rollout_log_probs": nested(pick("rollout"), torch.float32),
        "advantages": nested(pick("adv"), torch.float32),
    }
    return tu.get_tensordict(tensor_dict={**fields, "uid": pick("uid")})


class _LocalActorGroup:
    """The actor worker group as verl's trainer drives it, within one process: verl's dispatch
    (the balanced batch cut into equal consecutive shards by data-parallel rank: the split of
    TransferQueue's ``BatchMeta.chunk``) and TransferQueue's read of a shard (its rows by key,
    ``extra_info`` as non-tensor entries), without the TransferQueue service."""

    def __init__(self, worker, rank, world, rows, bypass):
        self.worker, self.rank, self.world, self.rows, self.bypass = (
            worker,
            rank,
            world,
            rows,
            bypass,
        )
        self._dispatch_info = {"actor": list(range(world))}

    def update_actor(self, batch):
        from verl.utils import tensordict_utils as tu

        shard = batch.chunk(self.world)[self.rank]
        td = _trainer_td([int(k) for k in shard.keys], self.rows, self.bypass)
        for key, val in copy.deepcopy(shard.extra_info).items():
            tu.assign_non_tensor_data(tensor_dict=td, key=key, val=val)
        return self.worker.update_actor(td)


def _run_trainer_case(rank, world, model_dir, case):
    """One update of the IS Reshape trainer's actor on this rank, recording every step hook call
    and every micro-batch's policy-loss call (spies that call through)."""
    import torch.distributed as tdist
    import transformers
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1 import get_trainer_cls

    import isreshape_torch.verl_trainer as vt
    from isreshape_torch.verl import _STEP_GAMMA, is_reshape_ppo_loss

    cfg = trainer_config(model_dir, case)
    trainer = get_trainer_cls("is_reshape")(config=cfg)  # verl's __init__ and the start-up checks
    trainer._init_resource_pool_mgr()
    worker_cls = trainer.role_worker_mapping[Role.ActorRollout].__ray_actor_class__
    worker = worker_cls(config=cfg.actor_rollout_ref, role="actor")
    worker.init_model()  # verl's FSDP2 engine, then set_loss_fn(is_reshape_ppo_loss)
    assert worker.actor.loss_fn.func is is_reshape_ppo_loss

    events, current = [], {}
    real_hook, real_loss_fn = vt.prepare_step_gamma, worker.actor.loss_fn
    loss_mode = case["policy_loss"]["loss_mode"]
    real_policy_loss = core_algos.POLICY_LOSS_REGISTRY[loss_mode]

    def hook(data, policy_loss_config, *, dp_group=None, log_prob=None):
        metrics = real_hook(data, policy_loss_config, dp_group=dp_group, log_prob=log_prob)
        lp = None if log_prob is None else log_prob.detach().clone()
        world_dp = tdist.get_world_size(dp_group)
        events.append(
            {"step": data["row"].clone(), "log_prob": lp, "metrics": metrics, "dp": world_dp}
        )
        return metrics

    def loss_fn(model_output, data, dp_group=None):
        current["rows"] = data["row"].clone()
        return real_loss_fn(model_output=model_output, data=data, dp_group=dp_group)

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, **kw):
        gamma, weights = _STEP_GAMMA.get(), kw.get("rollout_is_weights")
        events.append(
            {
                "micro": current["rows"],
                "gamma": None if gamma is None else gamma.clone(),
                "log_prob": log_prob.detach().clone(),
                "weights": None if weights is None else weights.detach().clone(),
            }
        )
        return real_policy_loss(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, **kw
        )

    rows = trainer_rows()
    trainer.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer.global_steps = 1
    trainer.actor_rollout_wg = _LocalActorGroup(worker, rank, world, rows, case["bypass"])
    lengths = [len(p) + len(r) for p, r in zip(rows["prompts"], rows["responses"], strict=True)]
    batch = KVBatchMeta(
        keys=[str(i) for i in range(TRAINER_ROWS)],
        tags=[{"seq_len": n} for n in lengths],
        partition_id="train",
    )
    metrics = {}
    vt.prepare_step_gamma, worker.actor.loss_fn = hook, loss_fn
    core_algos.POLICY_LOSS_REGISTRY[loss_mode] = policy_loss
    try:
        batch = trainer._balance_batch(batch, metrics)  # verl's balance_batch
        trainer._update_actor(batch, metrics)  # verl's, then the trainer's metric names
    finally:
        vt.prepare_step_gamma, worker.actor.loss_fn = real_hook, real_loss_fn
        core_algos.POLICY_LOSS_REGISTRY[loss_mode] = real_policy_loss
    return {"events": events, "metrics": metrics}


def _trainer_worker(rank, world, port, out_dir, model_dir):
    os.environ.update(
        VERL_PLATFORM="cpu",
        VERL_ENGINE_DEVICE="cuda",
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import _verl_cpu_platform  # noqa: F401  (registers verl's platform "cpu")
    import torch.distributed as tdist

    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out = {name: _run_trainer_case(rank, world, model_dir, c) for name, c in TRAINER_CASES.items()}
    tdist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def trainer_run(tiny_model_dir, tmp_path_factory):
    """Both cases on 2 gloo ranks; per rank and case: the events in order, and the metrics."""
    pytest.importorskip("isreshape_torch.verl_trainer")
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("trainer_run")
    mp.spawn(_trainer_worker, args=(2, _free_port(), str(out), tiny_model_dir), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _trainer_steps(events):
    """One rank's events as steps: the hook's call, then that step's micro-batch losses."""
    steps = []
    for ev in events:
        if "step" in ev:
            steps.append({**ev, "micro": []})
        else:
            steps[-1]["micro"].append(ev)
    return steps


def _padded_rows(seqs, idx, width):
    out = np.zeros((len(idx), width))
    for j, i in enumerate(idx):
        out[j, : len(seqs[i])] = seqs[i]
    return out


def _reference_step(rows, step_rows, num, den, rho_min):
    """The core's step gamma per uid group of the whole step, in one process, and its metrics:
    unit log weights of sequences ``num - den`` (padded (B, T) float64 arrays)."""
    mask = _padded_rows([np.ones(len(r)) for r in rows["responses"]], step_rows, num.shape[1]) > 0
    lw = isr.log_weights(torch.tensor(num), torch.tensor(den), torch.tensor(mask))
    names = sorted({rows["uid"][i] for i in step_rows})
    gid = torch.tensor([names.index(rows["uid"][i]) for i in step_rows])
    gamma, metrics = isr.step_gamma(lw, rho_min, group_ids=gid, num_groups=len(names))
    return gamma.numpy(), lw.numpy(), mask, metrics


def _check_steps(run, case_name, reference):
    """Common checks; ``reference(step_rows, hooks)`` gives each step row's expected value."""
    rows = trainer_rows()
    per_rank = [_trainer_steps(run[r][case_name]["events"]) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 2 mini-batches x 2 epochs on each rank
    split_groups = 0
    for step in range(4):
        hooks = [per_rank[r][step] for r in range(2)]
        step_rows = np.concatenate([h["step"].numpy() for h in hooks])
        assert sorted(step_rows) == sorted(set(step_rows)) and len(step_rows) == 16
        on_rank = [{rows["uid"][i] for i in h["step"].numpy()} for h in hooks]
        split_groups += len(on_rank[0] & on_rank[1])
        assert all(h["dp"] == 2 for h in hooks)
        expected = reference(step_rows, hooks)
        for h in hooks:
            # every row of the rank's mini-batch reaches exactly one micro-batch loss
            seen = np.concatenate([m["micro"].numpy() for m in h["micro"]])
            assert sorted(seen) == sorted(h["step"].numpy())
            for m in h["micro"]:
                yield step, h, m, [expected[i] for i in m["micro"].numpy()]
    assert split_groups > 0  # verl's balance_batch put rows of one uid group on both ranks
    assert max(len(per_rank[r][s]["micro"]) for r in range(2) for s in range(4)) > 1


def test_trainer_step_gamma_reaches_every_micro_batch_loss(trainer_run):
    """Bypass mode, loss_mode=is_reshape, groups by uid, through the trainer ``is_reshape`` on
    verl's FSDP2 engine (2 gloo ranks, verl's balance_batch, shuffled mini-batches, 2 epochs,
    dynamic micro-batches): every micro-batch's policy loss uses, for each row, the gamma that the
    core's ``step_gamma`` chooses over the whole mini-batch in one process (1e-12), from
    ``log_prob - old_log_probs`` with ``log_prob`` from the hook's forward pass, which equals the
    log-probabilities that verl's training forward pass hands the loss (1e-5: the parameters of
    the step); the step's metrics reach verl's metrics (mean over steps, max of maxima)."""
    rows = trainer_rows()
    ref_metrics, hook_lp = [], {}

    def reference(step_rows, hooks):
        width = max(h["log_prob"].shape[1] for h in hooks)
        lp = np.concatenate(
            [
                np.pad(
                    h["log_prob"].double().numpy(), ((0, 0), (0, width - h["log_prob"].shape[1]))
                )
                for h in hooks
            ]
        )
        old = _padded_rows(rows["rollout"], step_rows, width).astype(np.float32).astype(np.float64)
        gamma, _, mask, metrics = _reference_step(rows, step_rows, lp, old, 0.9)
        lp = np.where(mask, lp, 0.0)
        ref_metrics.append(metrics)
        assert gamma.min() < 1.0 and len(set(np.round(gamma, 9))) > 1
        for h in hooks:
            np.testing.assert_allclose(
                h["metrics"]["actor/is_reshape/gamma"], float(metrics["gamma"]), rtol=0, atol=1e-12
            )
        for j, i in enumerate(step_rows):
            hook_lp.setdefault(int(i), []).append(lp[j, : len(rows["responses"][i])])
        return dict(zip(step_rows.tolist(), gamma, strict=True))

    for _, _, micro, want in _check_steps(trainer_run, "loss", reference):
        np.testing.assert_allclose(micro["gamma"].numpy(), want, rtol=0, atol=1e-12)
        for j, i in enumerate(micro["micro"].numpy()):
            n = len(rows["responses"][i])
            np.testing.assert_allclose(
                micro["log_prob"][j, :n].numpy(), hook_lp[int(i)][-1], atol=1e-5
            )
    # the hook recomputes at every step: epoch 2 sees other parameters than epoch 1
    assert max(np.abs(a - b).max() for a, b in hook_lp.values()) > 1e-3
    for r in range(2):
        m = trainer_run[r]["loss"]["metrics"]
        np.testing.assert_allclose(
            m["actor/is_reshape/gamma"],
            np.mean([float(x["gamma"]) for x in ref_metrics]),
            rtol=1e-12,
        )
        np.testing.assert_allclose(
            m["actor/is_reshape/max_weight"],
            max(float(x["max_weight"]) for x in ref_metrics),
            rtol=1e-12,
        )


def test_trainer_rollout_correction_weights_reach_every_micro_batch(trainer_run):
    """Decoupled mode, verl's vanilla PPO-clip loss with ``is_reshape_rollout_correction``,
    groups by uid, through the same trainer run: every micro-batch's loss receives
    ``rollout_is_weights = (pi_old / mu)^gamma`` with gamma the core's step gamma of the whole
    mini-batch in one process; the metrics carry verl's ``rollout_corr/`` names."""
    rows = trainer_rows()

    def reference(step_rows, hooks):
        assert all(h["log_prob"] is None for h in hooks)  # no extra forward pass

        def f32(key):  # the float32 values that verl's batch holds
            return _padded_rows(rows[key], step_rows, T_RESP).astype(np.float32).astype(np.float64)

        gamma, lw, mask, metrics = _reference_step(rows, step_rows, f32("old"), f32("rollout"), 0.9)
        assert gamma.min() < 1.0
        for h in hooks:
            np.testing.assert_allclose(
                h["metrics"]["rollout_corr/rollout_is_gamma"],
                float(metrics["gamma"]),
                rtol=0,
                atol=1e-12,
            )
        weights = np.exp(gamma * lw)[:, None] * mask
        return dict(zip(step_rows.tolist(), weights, strict=True))

    for _, _, micro, want in _check_steps(trainer_run, "rollout_correction", reference):
        assert micro["gamma"] is None
        got = micro["weights"].numpy()
        np.testing.assert_allclose(got, np.stack(want)[:, : got.shape[1]], rtol=1e-6, atol=1e-7)
    for r in range(2):
        m = trainer_run[r]["rollout_correction"]["metrics"]
        assert "rollout_corr/rollout_is_gamma" in m and not any(
            k.startswith("actor/rollout_corr") for k in m
        )


def test_logged_names_reduce_as_the_core_merges():
    # verl's reduce_metrics takes the max of a key with "max" in it and the mean of the others:
    # every name logged for a step metric must say "max" exactly where METRIC_MERGE says max.
    from isreshape_torch import verl as isreshape_verl

    names = ["gamma", "sigma2", "ess_ratio", "ess_ratio_at_1", "ess_ratio_pooled", "max_weight"]
    names += ["k_hat", "log_scale"]
    for name in names:
        merged_by_max = isr.metric_reduction(name) == "max"
        logged = isreshape_verl._verl_metric_name(name)
        assert ("max" in logged) == merged_by_max, (name, logged)
        rollout = isreshape_verl._ROLLOUT_CORR_METRICS.get(name)
        if rollout is not None:
            assert ("max" in rollout) == merged_by_max, (name, rollout)
    assert isreshape_verl._verl_metric_name("k_hat") == "k_hat_max"
    assert isreshape_verl._verl_metric_name("max_weight") == "max_weight"
