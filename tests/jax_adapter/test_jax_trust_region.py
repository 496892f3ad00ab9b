"""isreshape_jax.decoupled_ppo_loss against the same loss in plain jax.numpy differentiated by
jax.grad (the detached gamma and cap computed by the core's selectors), under jit too."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import isreshape_core as isr  # noqa: E402
from isreshape_jax import decoupled_ppo_loss  # noqa: E402


def batch(seed=0, B=6, T=7):
    rng = np.random.default_rng(seed)
    lq = np.log(rng.dirichlet(np.ones(5), (B, T))[..., 0])
    lprox = lq + rng.normal(0, 2.0, (B, T))
    lp = lprox + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, (B, T))
    mask = rng.random((B, T)) < 0.8
    mask[:, 0] = True
    return lp, lprox, lq, adv, mask


@pytest.mark.parametrize("behaviour", ["tempered", "truncated"])
def test_decoupled_ppo_loss_matches_plain_jax_grad(behaviour):
    lp, lprox, lq, adv, mask = batch(3)
    v = (lprox - lq)[mask]
    if behaviour == "tempered":
        b = np.exp(float(isr.step_gamma(v, 0.3)[0][0]) * (lprox - lq))
    else:
        b = np.minimum(np.exp(lprox - lq), np.exp(isr.ess_truncation_cap(v, 0.3)))

    def plain(x):
        ratio = jnp.exp(jnp.clip(x - lprox, -20, 20))
        mat = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 0.8, 1.2))
        return jnp.sum(jnp.where(mask, b * mat, 0.0)) / mask.sum()

    def ours(x):
        return decoupled_ppo_loss(x, lprox, lq, adv, mask, behaviour=behaviour)[0]

    x = jnp.asarray(lp)
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-10)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(x), jax.grad(plain)(x), rtol=1e-9,
                               atol=1e-13)  # fmt: skip


def test_decoupled_ppo_loss_over_a_named_axis_equals_the_whole_batch():
    lp, lprox, lq, adv, mask = batch(4, B=6)
    whole = lambda x: decoupled_ppo_loss(x, lprox, lq, adv, mask, behaviour="truncated")[0]  # noqa: E731

    def sharded(x):
        def one(x_, p_, q_, a_, m_):
            return decoupled_ppo_loss(x_, p_, q_, a_, m_, behaviour="truncated", axis_name="i")[0]

        shards = [v.reshape(3, 2, -1) for v in (x, lprox, lq, adv, mask)]
        return jax.vmap(one, axis_name="i")(*shards)  # every shard returns the global loss

    x = jnp.asarray(lp)
    losses = sharded(x)
    np.testing.assert_allclose(losses, np.full(3, whole(x)), rtol=1e-10)
    # Each shard's loss carries the gradient of the global loss with respect to its own slice
    # (as under torch.distributed), so the sum over shards gives the whole batch's gradient.
    g = jax.grad(lambda y: sharded(y).sum())(x)
    np.testing.assert_allclose(g, jax.grad(whole)(x), rtol=1e-9, atol=1e-13)
