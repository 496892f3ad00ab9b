"""Tests of adapters/isreshape_torch/verl.py against verl itself (0.9.x, installed for real).

The loss registered as ``is_reshape`` is checked, value and gradient, against verl's own
``agg_loss`` applied to the IS Reshape loss matrix written out here in plain torch (autograd
through ``expm1(gamma l)/gamma``), for every verl aggregation mode, with and without verl's global
normalisers; gamma against a NumPy ESS computation; the registration through
``VERL_USE_EXTERNAL_MODULES``; and the options through verl's own config conversion.
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
    return {
        "policy_loss": {
            "loss_mode": "is_reshape",
            "is_reshape_gamma": gamma,
            "is_reshape_level": level,
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
    actor_config = omega_conf_to_dataclass(actor)
    assert isinstance(actor_config.policy_loss, ISReshapePolicyLossConfig)
    assert is_reshape_options(actor_config.policy_loss) == {
        "gamma": "closed_form",
        "rho_min": 0.5,
        "level": "token",
        "form": "objective",
        "group_size": None,
        "gamma_min": 0.1,
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
