"""Run by ``test_shard_map.py`` in its own process: 4 host CPU devices, ``shard_map``/``pmap``
over a data-parallel axis against the single-device result on the whole batch (float64).

``XLA_FLAGS`` must be set before JAX is imported, hence a separate process. Prints one JSON
object: ``{"devices": n, "results": [{"case", "quantity", "max_abs_diff", "ok"}, ...]}``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from isreshape_jax import is_reshape_loss  # noqa: E402

RTOL, ATOL = 1e-12, 1e-14
SHARDS, B, T = 4, 16, 6
RESULTS: list[dict] = []


def record(case: str, quantity: str, got, want) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    ok = got.shape == want.shape and bool(np.allclose(got, want, rtol=RTOL, atol=ATOL))
    RESULTS.append({"case": case, "quantity": quantity, "max_abs_diff": diff, "ok": ok})


def make_batch(seed: int, spread: float):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    logq = logp + rng.normal(0, spread, (B, T))
    lengths = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    rewards = rng.normal(0, 1, B)
    return logp, logq, rewards, mask


def main() -> None:
    devices = jax.devices("cpu")
    mesh = Mesh(np.array(devices[:SHARDS]), ("data",))
    spec = P("data")

    cases = [
        ("sequence", None, "ess", "token-mean", 1.0),
        ("geometric", None, "closed_form", "seq-mean-token-mean", 3.0),
        ("token", None, "ess", "seq-mean-token-sum", 1.5),
        ("sequence", 2, "ess", "token-mean", 1.0),
        ("token", None, 0.5, "seq-mean-token-sum-norm", 1.0),
    ]
    for k, (level, group_size, method, mode, spread) in enumerate(cases):
        name = f"{level}/group={group_size}/{method}/{mode}"
        logp, logq, rewards, mask = make_batch(k, spread)
        kw = {"level": level, "group_size": group_size, "gamma": method, "loss_agg_mode": mode}
        kw["rho_min"] = 0.5

        def whole(lp, lq, r, m, kw=kw):
            return jax.value_and_grad(lambda x: is_reshape_loss(x, lq, r, m, **kw), has_aux=True)(
                lp
            )

        (loss, metrics), grad = jax.jit(whole)(logp, logq, rewards, mask)
        if group_size is None and not isinstance(method, float):
            record(name, "gamma below 1 (the statistics matter)", float(metrics["gamma"] < 1), 1.0)

        # Gradient taken inside each shard with respect to the shard's logp.
        def inner(lp, lq, r, m, kw=kw):
            (l, met), g = jax.value_and_grad(
                lambda x: is_reshape_loss(x, lq, r, m, axis_name="data", **kw), has_aux=True
            )(lp)
            return l, met, g

        sharded = jax.jit(
            jax.shard_map(inner, mesh=mesh, in_specs=(spec,) * 4, out_specs=(P(), P(), spec))
        )
        s_loss, s_metrics, s_grad = sharded(logp, logq, rewards, mask)
        record(name, "loss", s_loss, loss)
        for key in metrics:
            record(name, f"metric {key}", s_metrics[key], metrics[key])
        record(name, "grad (inside shard_map)", s_grad, grad)

        # Gradient of the shard_map-ed loss with respect to the global logp (outside), and the
        # forward-mode tangent along a random direction.
        def outer(lp, lq, r, m, kw=kw):
            return jax.shard_map(
                lambda x, q, rr, mm: is_reshape_loss(x, q, rr, mm, axis_name="data", **kw)[0],
                mesh=mesh,
                in_specs=(spec,) * 4,
                out_specs=P(),
            )(lp, lq, r, m)

        o_grad = jax.jit(jax.grad(outer))(logp, logq, rewards, mask)
        record(name, "grad (outside shard_map)", o_grad, grad)
        if k == 0:
            direction = np.random.default_rng(99).normal(size=(B, T))

            def jvp(lp, lq, r, m, d):
                return jax.jvp(lambda x: outer(x, lq, r, m), (lp,), (d,))[1]

            tangent = jax.jit(jvp)(logp, logq, rewards, mask, direction)
            record(name, "jvp (outside shard_map)", tangent, np.sum(np.asarray(grad) * direction))

            # pmap over the same axis name: same gamma, loss and per-shard gradient.
            def split(a):
                return a.reshape(SHARDS, B // SHARDS, *a.shape[1:])

            p_loss, p_metrics, p_grad = jax.pmap(inner, axis_name="data", devices=devices[:SHARDS])(
                *(split(a) for a in (logp, logq, rewards, mask))
            )
            record(name, "pmap loss", p_loss, np.full(SHARDS, float(loss)))
            record(name, "pmap gamma", p_metrics["gamma"], np.full(SHARDS, float(metrics["gamma"])))
            record(name, "pmap grad", np.asarray(p_grad).reshape(B, T), grad)

    train_loop_case(mesh, spec)


def train_loop_case(mesh: Mesh, spec: P) -> None:
    """A data-parallel SGD loop: replicated softmax-policy parameters, the batch sharded, three
    steps in ``lax.scan`` inside ``shard_map`` against the same loop on one device."""
    name = "scan training loop"
    K, D, N = 5, 3, 32
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    actions = rng.integers(0, K, N)
    logq = np.log(np.full(N, 1.0 / K))
    rewards = rng.normal(size=N)
    theta0 = rng.normal(0, 1.0, (D, K))

    def loss_fn(theta, xx, a, lq, r, axis_name=None):
        logits = xx @ theta
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), a[:, None], axis=1)[:, 0]
        return is_reshape_loss(logp, lq, r, rho_min=0.6, axis_name=axis_name)

    def train(theta, xx, a, lq, r, axis_name=None):
        def step(th, _):
            (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(
                th, xx, a, lq, r, axis_name
            )
            return th - 0.5 * g, (loss, metrics["gamma"])

        return jax.lax.scan(step, theta, None, length=3)

    theta1, (losses1, gammas1) = jax.jit(train)(theta0, x, actions, logq, rewards)
    sharded = jax.jit(
        jax.shard_map(
            lambda th, xx, a, lq, r: train(th, xx, a, lq, r, "data"),
            mesh=mesh,
            in_specs=(P(), spec, spec, spec, spec),
            out_specs=(P(), (P(), P())),
        )
    )
    theta4, (losses4, gammas4) = sharded(theta0, x, actions, logq, rewards)
    record(name, "gamma below 1 (the statistics matter)", float(np.min(gammas1) < 1), 1.0)
    record(name, "losses", losses4, losses1)
    record(name, "gammas", gammas4, gammas1)
    record(name, "parameters after 3 steps", theta4, theta1)


if __name__ == "__main__":
    main()
    json.dump({"devices": len(jax.devices("cpu")), "results": RESULTS}, sys.stdout)
