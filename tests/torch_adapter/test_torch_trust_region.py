"""isreshape_torch.decoupled_ppo_loss against the same loss written in plain torch ops and
differentiated by autograd (gamma and the cap, detached, computed by the core's selectors)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch.set_num_threads(1)

import isreshape_core as isr  # noqa: E402
from isreshape_torch import decoupled_ppo_loss  # noqa: E402


def batch(seed=0, B=6, T=7):
    rng = np.random.default_rng(seed)
    lq = np.log(rng.dirichlet(np.ones(5), (B, T))[..., 0])
    lprox = lq + rng.normal(0, 2.0, (B, T))
    lp = lprox + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, (B,))
    mask = rng.random((B, T)) < 0.8
    mask[:, 0] = True
    return lp, lprox, lq, adv, mask


def plain_torch(lp, lprox, lq, adv, mask, level, behaviour, eps=(0.2, 0.28)):
    """Decoupled PPO in torch ops, differentiable in ``lp``; token-mean aggregation."""
    m = mask.double()
    if level == "token":
        u, v = lp - lprox, (lprox - lq).detach()
        valid_units = mask
    else:
        n = m.sum(-1)
        u = ((lp - lprox) * m).sum(-1) / n
        v = (((lprox - lq) * m).sum(-1) / n).detach()
        valid_units = n > 0
    flat = v[valid_units].numpy()
    if behaviour == "tempered":
        gamma = float(isr.step_gamma(flat, 0.3)[0][0])
        b = torch.exp(gamma * v)
    else:
        b = torch.minimum(torch.exp(v), torch.exp(torch.tensor(isr.ess_truncation_cap(flat, 0.3))))
    ratio = torch.exp(torch.clamp(u, -20, 20))
    if level != "token":
        ratio, b = ratio[:, None], b[:, None]
    a = adv[:, None]
    loss_mat = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps[0], 1 + eps[1]))
    return (b * loss_mat * m).sum() / m.sum()


@pytest.mark.parametrize("level", ["token", "geometric"])
@pytest.mark.parametrize("behaviour", ["tempered", "truncated"])
def test_decoupled_ppo_loss_matches_plain_autograd(level, behaviour):
    lp, lprox, lq, adv, mask = (torch.tensor(x) for x in batch(1))
    x = lp.clone().requires_grad_()
    loss, metrics = decoupled_ppo_loss(
        x, lprox, lq, adv, mask, behaviour=behaviour, level=level,
        clip_ratio_low=0.2, clip_ratio_high=0.28,
    )  # fmt: skip
    loss.backward()
    y = lp.clone().requires_grad_()
    want = plain_torch(y, lprox, lq, adv, mask, level, behaviour)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    ess = float(metrics["ess_ratio"])
    assert ess >= 0.3 - 1e-9  # the correction meets rho_min
    if level == "token":  # 42 heavy token weights: the rule binds
        assert abs(ess - 0.3) < 1e-6
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())


def test_decoupled_ppo_loss_only_logp_carries_gradient_and_float32():
    lp, lprox, lq, adv, mask = (torch.tensor(x) for x in batch(2))
    x = lp.float().requires_grad_()
    prox = lprox.float().requires_grad_()
    loss, _ = decoupled_ppo_loss(x, prox, lq.float(), adv.float(), mask)
    loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert prox.grad is None
    with pytest.raises(TypeError, match="logp_prox"):
        decoupled_ppo_loss(x, lprox.numpy(), lq, adv)
