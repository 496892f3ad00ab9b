"""Off-policy learning on a contextual bandit with IS Reshape, optax and adaptive gamma (JAX).

Run with ``python examples/jax_optax_bandit.py`` after ``pip install "isreshape[jax]" optax``
(from a source checkout: ``PYTHONPATH=.:adapters python examples/jax_optax_bandit.py``). CPU is
enough: about 20 seconds with the baselines, ``--epochs`` and ``--samples`` make it shorter.

A behaviour policy ``mu`` has logged ``(context, action, reward, log mu(action|context))`` on
a finite bandit with ``C`` contexts and ``K`` actions (Bernoulli rewards with unknown means).
A tabular softmax policy ``pi_theta(a|c) = softmax(theta[c])_a`` is trained on that fixed log
with Adam on the IS Reshape loss, ``-mean(r expm1(gamma l)/gamma)`` with
``l = log pi - log mu``, where every minibatch picks the largest ``gamma`` whose effective
sample size stays above ``rho_min`` of the batch (``gamma="ess"``; docs/theory.md, "The
exact-ESS gamma"). Early on ``pi = mu`` and ``gamma = 1`` (plain importance sampling); as ``pi``
moves away from ``mu`` the weights spread and gamma falls, which bounds the variance of the
gradient.

Each epoch is one jitted call (shuffle, ``lax.scan`` over the minibatches, Adam updates) and
prints the policy's true expected reward, the mean gamma and the ESS ratios (at gamma and at 1).
At the end the learned policy is compared with ``mu``, the best policy, the policies trained
with a fixed ``gamma`` of 0 (reward-weighted SFT) and 1 (importance-sampled policy gradient),
and the loss's exact maximiser ``pi ∝ mu r^(1/(1-gamma))`` (``stationary_log_probs``) at the
final gamma.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import isreshape_core as isr
from isreshape_jax import is_reshape_loss


def make_bandit(key: jax.Array, contexts: int, actions: int, samples: int):
    """True mean rewards, a behaviour policy and a log of ``samples`` draws from it."""
    k_mean, k_mu, k_ctx, k_act, k_rew = jax.random.split(key, 5)
    mean_reward = jax.random.uniform(k_mean, (contexts, actions), minval=0.05, maxval=0.95)
    # The behaviour policy prefers actions at random, not the good ones.
    log_mu = jax.nn.log_softmax(1.5 * jax.random.normal(k_mu, (contexts, actions)), axis=-1)
    ctx = jax.random.randint(k_ctx, (samples,), 0, contexts)
    act = jax.random.categorical(k_act, log_mu[ctx])
    rew = jax.random.bernoulli(k_rew, mean_reward[ctx, act]).astype(jnp.float32)
    logq = log_mu[ctx, act]
    return mean_reward, log_mu, (ctx, act, rew, logq)


def expected_reward(log_pi: jax.Array, mean_reward: jax.Array) -> jax.Array:
    """``E_c E_{a~pi(.|c)} [R(c, a)]`` with contexts uniform."""
    return jnp.mean(jnp.sum(jnp.exp(log_pi) * mean_reward, axis=-1))


def make_epoch(optimizer, batch: int, gamma, rho_min: float):
    """One jitted epoch: shuffle the log, scan Adam steps over its minibatches."""

    def loss_fn(theta, ctx, act, rew, logq):
        log_pi = jax.nn.log_softmax(theta, axis=-1)
        logp = log_pi[ctx, act]  # (B,): one "sequence" per logged decision
        return is_reshape_loss(logp, logq, rew, gamma=gamma, rho_min=rho_min)

    def step(carry, minibatch):
        theta, opt_state = carry
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta, *minibatch)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, opt_state), {"loss": loss, **metrics}

    @jax.jit
    def epoch(theta, opt_state, data, key):
        n = data[0].shape[0] // batch * batch
        order = jax.random.permutation(key, data[0].shape[0])[:n]
        minibatches = tuple(x[order].reshape(-1, batch) for x in data)
        (theta, opt_state), metrics = jax.lax.scan(step, (theta, opt_state), minibatches)
        return theta, opt_state, jax.tree.map(jnp.mean, metrics)

    return epoch


def train(data, contexts, actions, *, gamma, rho_min, epochs, batch, lr, key, verbose, bandit):
    optimizer = optax.adam(lr)
    # Start from the behaviour policy (pi = mu, gamma = 1 on the first batches).
    theta = jnp.broadcast_to(bandit["log_mu"], (contexts, actions))
    opt_state = optimizer.init(theta)
    epoch = make_epoch(optimizer, batch, gamma, rho_min)
    for e in range(epochs):
        key, sub = jax.random.split(key)
        theta, opt_state, m = epoch(theta, opt_state, data, sub)
        if verbose:
            reward = expected_reward(jax.nn.log_softmax(theta, -1), bandit["mean_reward"])
            print(
                f"epoch {e + 1:3d}  reward {float(reward):.4f}  gamma {float(m['gamma']):.3f}  "
                f"ESS/n {float(m['ess_ratio']):.3f}  ESS/n at 1 {float(m['ess_ratio_at_1']):.3f}"
                f"  loss {float(m['loss']):+.4f}"
            )
    return theta, m


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--actions", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8192, help="size of the logged data")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rho-min", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true", help="skip fixed gamma 0 and 1")
    args = parser.parse_args(argv)
    if args.batch > args.samples:
        parser.error("--batch must not exceed --samples")

    start = time.perf_counter()
    key, k_data = jax.random.split(jax.random.PRNGKey(args.seed))
    mean_reward, log_mu, data = make_bandit(k_data, args.contexts, args.actions, args.samples)
    bandit = {"mean_reward": mean_reward, "log_mu": log_mu}
    common = {
        "rho_min": args.rho_min,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "bandit": bandit,
    }
    print(
        f"{args.contexts} contexts x {args.actions} actions, {args.samples} logged samples, "
        f"batch {args.batch}, rho_min {args.rho_min}"
    )
    theta, last = train(
        data, args.contexts, args.actions, gamma="ess", key=key, verbose=True, **common
    )
    summary = {
        "behaviour mu": float(expected_reward(log_mu, mean_reward)),
        "best policy": float(jnp.mean(jnp.max(mean_reward, axis=-1))),
        "IS Reshape, adaptive gamma": float(
            expected_reward(jax.nn.log_softmax(theta, -1), mean_reward)
        ),
    }
    gamma_final = float(last["gamma"])
    # What the loss trains towards at that gamma with infinite data (docs/theory.md, "Finite
    # supports").
    stationary = isr.stationary_log_probs(log_mu, mean_reward, min(gamma_final, 1.0))
    summary[f"loss maximiser mu r^(1/(1-g)), g={gamma_final:.2f}"] = float(
        expected_reward(stationary, mean_reward)
    )
    if not args.no_baselines:
        for fixed in (0.0, 1.0):
            theta_fixed, _ = train(
                data, args.contexts, args.actions, gamma=fixed, key=key, verbose=False, **common
            )
            summary[f"fixed gamma = {fixed:g}"] = float(
                expected_reward(jax.nn.log_softmax(theta_fixed, -1), mean_reward)
            )
    print("expected reward:")
    for name, value in summary.items():
        print(f"  {name:<40s} {value:.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    main()
