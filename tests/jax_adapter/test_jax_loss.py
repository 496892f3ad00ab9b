"""Tests of isreshape_jax.loss: value and gradient against a plain-JAX reimplementation of the
formula (differentiated by JAX's own autodiff), ``check_grads`` and finite differences at
gamma 0, 0.5 and 1 for every level, adaptive gamma against a brute-force ESS, jit, vmap,
collectives over a vmapped axis against the whole batch, dtypes and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import make_batch

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from isreshape_jax import AxisReducer, is_reshape_loss  # noqa: E402

LEVELS = ("sequence", "geometric", "token")
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def reference_loss(logp, logq, rewards, mask, gamma, level, mode):
    """The loss written directly from DESIGN.md 3.1 and verl's ``agg_loss`` in plain jnp, for a
    fixed gamma; its gradient is whatever JAX's autodiff makes of it."""
    m = mask.astype(logp.dtype)
    B, T = logp.shape
    r = rewards if rewards.ndim == 2 else jnp.broadcast_to(rewards[:, None], (B, T))
    tok = (logp - logq) * m
    if level == "token":
        unit = tok
    else:
        seq = jnp.sum(tok, axis=-1)
        if level == "geometric":
            seq = seq / jnp.sum(m, axis=-1)
        unit = jnp.broadcast_to(seq[:, None], (B, T))
    h = unit if gamma == 0 else jnp.expm1(gamma * unit) / gamma
    loss_mat = -r * h * m
    if mode == "token-mean":
        return jnp.sum(loss_mat) / jnp.sum(m)
    if mode == "seq-mean-token-sum":
        return jnp.mean(jnp.sum(loss_mat, axis=-1))
    if mode == "seq-mean-token-mean":
        return jnp.mean(jnp.sum(loss_mat, axis=-1) / jnp.sum(m, axis=-1))
    return jnp.sum(loss_mat) / T


def unit_log_weights(logp, logq, mask, level):
    """Unit log weights by explicit Python loops (valid units only)."""
    out = []
    for b in range(logp.shape[0]):
        valid = [t for t in range(logp.shape[1]) if mask[b, t]]
        ratios = [logp[b, t] - logq[b, t] for t in valid]
        if level == "token":
            out.extend(ratios)
        elif level == "sequence":
            out.append(sum(ratios))
        else:
            out.append(sum(ratios) / len(ratios))
    return np.array(out)


def brute_ess_ratio(l, gamma):
    w = [math.exp(gamma * (v - max(l))) for v in l]
    return sum(w) ** 2 / sum(v * v for v in w) / len(w)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", MODES)
def test_value_and_grad_match_plain_jax(level, mode):
    logp, logq, rewards, mask = make_batch(1, per_token_rewards=(mode == "token-mean"))
    lq, r, m = jnp.asarray(logq), jnp.asarray(rewards), jnp.asarray(mask)
    for gamma in (0.0, 0.5, 1.0):

        def f(lp, gamma=gamma):
            return is_reshape_loss(lp, lq, r, m, gamma=gamma, level=level, loss_agg_mode=mode)

        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
        want, want_grad = jax.value_and_grad(reference_loss)(
            jnp.asarray(logp), lq, r, m, gamma, level, mode
        )
        np.testing.assert_allclose(np.asarray(loss), np.asarray(want), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(metrics["gamma"]), gamma)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_check_grads_forward_and_reverse(level, gamma):
    logp, logq, rewards, mask = make_batch(2, spread=0.5)
    lq, r, m = jnp.asarray(logq), jnp.asarray(rewards), jnp.asarray(mask)

    def f(lp):
        return is_reshape_loss(lp, lq, r, m, gamma=gamma, level=level)[0]

    check_grads(f, (jnp.asarray(logp),), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_gradient_against_central_differences(level, form):
    logp, logq, rewards, mask = make_batch(3, B=4, T=3, spread=0.5)
    lq, r, m = jnp.asarray(logq), jnp.asarray(rewards), jnp.asarray(mask)
    gamma = 0.5

    def f(lp):
        return is_reshape_loss(lp, lq, r, m, gamma=gamma, level=level, form=form)[0]

    grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))

    # Finite differences of the objective form (the reinforce surrogate's value holds the
    # weights fixed, so its own differences are not the gradient; both have this gradient).
    objective_jit = jax.jit(lambda lp: is_reshape_loss(lp, lq, r, m, gamma=gamma, level=level)[0])

    def objective(lp):
        return float(objective_jit(jnp.asarray(lp)))

    eps = 1e-6
    fd = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (objective(up) - objective(down)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
    assert np.all(grad[~mask] == 0.0)


@pytest.mark.parametrize("level", LEVELS)
def test_adaptive_gamma_meets_the_ess_target_and_gradient_treats_it_as_constant(level):
    spread = {"sequence": 1.0, "geometric": 3.0, "token": 1.5}[level]
    logp, logq, rewards, mask = make_batch(4, B=16, T=4, spread=spread)
    lq, r, m = jnp.asarray(logq), jnp.asarray(rewards), jnp.asarray(mask)
    rho = 0.5

    def f(lp):
        return is_reshape_loss(lp, lq, r, m, rho_min=rho, level=level)

    (_, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(logp))
    gamma = float(metrics["gamma"])
    l = unit_log_weights(logp, logq, mask, level)
    assert 0.0 < gamma < 1.0  # the target binds on this batch
    assert brute_ess_ratio(l, gamma) >= rho - 1e-9
    assert brute_ess_ratio(l, gamma + 1e-3) < rho  # the largest such gamma
    np.testing.assert_allclose(float(metrics["ess_ratio"]), brute_ess_ratio(l, gamma), rtol=1e-10)
    np.testing.assert_allclose(float(metrics["ess_ratio_at_1"]), brute_ess_ratio(l, 1.0))
    np.testing.assert_allclose(float(metrics["sigma2"]), np.var(l, ddof=1), rtol=1e-10)
    # gamma carries no gradient: the gradient is the fixed-gamma gradient at the chosen gamma.
    want = jax.grad(reference_loss)(jnp.asarray(logp), lq, r, m, gamma, level, "token-mean")
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-10, atol=1e-14)


@jax.jit
def _seq_sum_step(lp, lq, r, m, rho):
    def f(x):
        return is_reshape_loss(x, lq, r, m, rho_min=rho, loss_agg_mode="seq-mean-token-sum")

    return jax.value_and_grad(f, has_aux=True)(lp)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), rho=st.floats(0.1, 0.9), spread=st.floats(0.1, 2.0))
def test_property_gradient_is_r_w_gamma(seed, rho, spread):
    logp, logq, rewards, mask = make_batch(seed, B=5, T=3, spread=spread)
    args = [jnp.asarray(a) for a in (logp, logq, rewards, mask)]
    (_, metrics), grad = _seq_sum_step(*args, jnp.asarray(rho))
    gamma = float(metrics["gamma"])
    l = unit_log_weights(logp, logq, mask, "sequence")
    # d loss / d logp_bt = -(T_b / B) r_b w_b^gamma on valid tokens (Python arithmetic).
    want = np.zeros_like(logp)
    for b in range(logp.shape[0]):
        n_b = int(mask[b].sum())
        want[b, mask[b]] = -n_b / logp.shape[0] * rewards[b] * math.exp(gamma * l[b])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-10, atol=1e-13)
    assert brute_ess_ratio(l, gamma) >= rho - 1e-9 or gamma == 0.0


def test_only_logp_carries_gradient():
    logp, logq, rewards, mask = make_batch(5, spread=0.8)
    m = jnp.asarray(mask)

    def f(lp, lq, r):
        return is_reshape_loss(lp, lq, r, m, gamma=0.5)[0]

    g_logp, g_logq, g_r = jax.grad(f, argnums=(0, 1, 2))(
        jnp.asarray(logp), jnp.asarray(logq), jnp.asarray(rewards)
    )
    assert np.any(np.asarray(g_logp) != 0)
    np.testing.assert_array_equal(np.asarray(g_logq), 0.0)
    np.testing.assert_array_equal(np.asarray(g_r), 0.0)
    # Forward mode agrees: a tangent on logq changes nothing, one on logp is sum(grad * dot).
    dot = np.random.default_rng(0).normal(size=logp.shape)
    args = (jnp.asarray(logp), jnp.asarray(logq), jnp.asarray(rewards))
    _, t_q = jax.jvp(f, args, (jnp.zeros_like(args[0]), jnp.asarray(dot), jnp.zeros(6)))
    _, t_p = jax.jvp(f, args, (jnp.asarray(dot), jnp.zeros_like(args[1]), jnp.zeros(6)))
    assert float(t_q) == 0.0
    np.testing.assert_allclose(float(t_p), float(np.sum(np.asarray(g_logp) * dot)), rtol=1e-12)


def test_metrics_are_0d_arrays_with_zero_tangents():
    logp, logq, rewards, mask = make_batch(6, spread=1.0)
    lq, r, m = jnp.asarray(logq), jnp.asarray(rewards), jnp.asarray(mask)

    def metrics(lp):
        return is_reshape_loss(lp, lq, r, m)[1]

    out, tangents = jax.jvp(metrics, (jnp.asarray(logp),), (jnp.ones(logp.shape),))
    assert set(out) == {
        "gamma",
        "sigma2",
        "ess_ratio",
        "ess_ratio_at_1",
        "max_weight",
        "n_capped",
        "log_scale",
        "n_nonfinite",
    }
    for key, value in out.items():
        assert isinstance(value, jax.Array) and value.shape == (), key
        assert float(tangents[key]) == 0.0, key
    # Reverse mode through a metric is zero too (gamma is a constant of the loss).
    g = jax.grad(lambda lp: metrics(lp)["gamma"])(jnp.asarray(logp))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_jit_equals_eager_and_traced_options():
    logp, logq, rewards, mask = make_batch(7, B=12, T=4, spread=1.0)
    args = [jnp.asarray(a) for a in (logp, logq, rewards, mask)]

    def step(lp, lq, r, mm, gamma_max):
        def f(x):
            return is_reshape_loss(x, lq, r, mm, rho_min=0.3, gamma_max=gamma_max)

        return jax.value_and_grad(f, has_aux=True)(lp)

    eager = step(*args, 1.0)
    jitted = jax.jit(step)(*args, jnp.asarray(1.0))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)
    # A traced gamma_max (a warm-up schedule) caps gamma: min(schedule, gamma*).
    gamma_star = float(eager[0][1]["gamma"])
    assert gamma_star > 0.2
    (_, capped), grad = jax.jit(step)(*args, jnp.asarray(0.2))
    assert float(capped["gamma"]) == pytest.approx(0.2)
    want = jax.grad(reference_loss)(
        args[0], args[1], args[2], args[3], 0.2, "sequence", "token-mean"
    )
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-12, atol=1e-15)


def test_vmap_over_batches_equals_a_loop():
    batches = [make_batch(10 + k, spread=0.8) for k in range(3)]
    stacked = [jnp.asarray(np.stack(parts)) for parts in zip(*batches, strict=True)]

    def one(lp, lq, r, m):
        (loss, metrics), grad = jax.value_and_grad(
            lambda x: is_reshape_loss(x, lq, r, m, level="geometric"), has_aux=True
        )(lp)
        return loss, metrics["gamma"], grad

    losses, gammas, grads = jax.jit(jax.vmap(one))(*stacked)
    for k, parts in enumerate(batches):
        loss, gamma, grad = jax.jit(one)(*[jnp.asarray(p) for p in parts])
        np.testing.assert_allclose(np.asarray(losses[k]), np.asarray(loss), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(gammas[k]), np.asarray(gamma), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(grad), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("level", "group_size", "mode", "method"),
    [
        ("sequence", None, "token-mean", "ess"),
        ("geometric", None, "seq-mean-token-mean", "closed_form"),
        ("token", None, "seq-mean-token-sum", "ess"),
        ("sequence", 2, "seq-mean-token-mean", "closed_form"),
        ("token", 2, "token-mean", "ess"),
    ],
)
def test_named_axis_collectives_equal_the_whole_batch(level, group_size, mode, method):
    """Shards as a vmapped named axis (the same collectives as shard_map, in one process)."""
    shards, B, T = 4, 8, 5
    spread = {"sequence": 1.2, "geometric": 3.0, "token": 1.5}[level]
    logp, logq, rewards, mask = make_batch(11, B=B, T=T, spread=spread)
    kw = {"level": level, "group_size": group_size, "loss_agg_mode": mode, "gamma": method}
    kw["rho_min"] = 0.5

    def whole(lp):
        return is_reshape_loss(lp, jnp.asarray(logq), jnp.asarray(rewards), jnp.asarray(mask), **kw)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(whole, has_aux=True))(jnp.asarray(logp))
    if group_size is None:
        assert float(metrics["gamma"]) < 1.0  # the statistics matter

    def shard(lp, lq, r, m):
        def f(x):
            return is_reshape_loss(x, lq, r, m, axis_name="data", **kw)

        return jax.value_and_grad(f, has_aux=True)(lp)

    split = [
        jnp.asarray(a.reshape(shards, B // shards, *a.shape[1:]))
        for a in (logp, logq, rewards, mask)
    ]
    (s_loss, s_metrics), s_grad = jax.jit(jax.vmap(shard, axis_name="data"))(*split)
    np.testing.assert_allclose(np.asarray(s_loss), np.full(shards, float(loss)), rtol=1e-12)
    for key, value in metrics.items():
        np.testing.assert_allclose(np.asarray(s_metrics[key]), float(value), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        np.asarray(s_grad).reshape(B, T), np.asarray(grad), rtol=1e-12, atol=1e-15
    )


def test_half_precision_inputs_compute_in_float32():
    logp, logq, rewards, mask = make_batch(12, spread=0.5)
    lp16 = jnp.asarray(logp, dtype=jnp.bfloat16)
    lq16 = jnp.asarray(logq, dtype=jnp.bfloat16)
    r, m = jnp.asarray(rewards, dtype=jnp.float32), jnp.asarray(mask)

    def f(lp):
        return is_reshape_loss(lp, lq16, r, m, gamma=0.5)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp16)
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    assert metrics["gamma"].dtype == jnp.float32
    up = [jnp.asarray(np.asarray(a, dtype=np.float64)) for a in (lp16, lq16)]
    want_loss, want_grad = jax.value_and_grad(reference_loss)(
        up[0], up[1], jnp.asarray(rewards), m, 0.5, "sequence", "token-mean"
    )
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grad, dtype=np.float64), np.asarray(want_grad), rtol=1e-2, atol=1e-3
    )


def test_reducer_sums_and_maximises_over_the_axis():
    x = np.array([[1.0, -2.0], [4.0, 0.5], [2.0, 3.0]])
    reducer = AxisReducer("i")
    s, mx = jax.vmap(lambda v: (reducer.sum(v), reducer.max(v)), axis_name="i")(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(s), np.tile(x.sum(axis=0), (3, 1)))
    np.testing.assert_array_equal(np.asarray(mx), np.tile(x.max(axis=0), (3, 1)))


def test_errors_name_the_argument():
    logp, logq, rewards, mask = make_batch(13)
    lp, lq, r, m = (jnp.asarray(a) for a in (logp, logq, rewards, mask))
    with pytest.raises(TypeError, match="rewards are required"):
        is_reshape_loss(lp, lq, None, m)
    with pytest.raises(TypeError, match=r"logq must be a jax\.Array"):
        is_reshape_loss(lp, logq.tolist(), r, m)
    with pytest.raises(TypeError, match="floating dtype"):
        is_reshape_loss(jnp.zeros((2, 3), dtype=jnp.int32), jnp.zeros((2, 3)), r[:2])
    with pytest.raises(TypeError, match="mask must have a boolean dtype"):
        is_reshape_loss(lp, lq, r, m.astype(jnp.float64))
    with pytest.raises(ValueError, match="level must be one of"):
        is_reshape_loss(lp, lq, r, m, level="sentence")
    with pytest.raises(ValueError, match="gamma must be one of"):
        is_reshape_loss(lp, lq, r, m, gamma="bisection")
    with pytest.raises(TypeError, match="axis_name"):
        is_reshape_loss(lp, lq, r, m, axis_name=())
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        is_reshape_loss(lp, lq, r, m, axis_name="data")
    with pytest.raises(TypeError, match="group_size"):
        is_reshape_loss(lp, lq, r, m, group_size=2.0)
    bad = logp.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        is_reshape_loss(jnp.asarray(bad), lq, r, m)
    # Under a transformation the values are not inspected (no host sync).
    jax.jit(lambda x: is_reshape_loss(x, lq, r, m)[0])(lp)


@pytest.mark.parametrize("level", LEVELS)
def test_precomputed_gamma_array_traced_under_jit(level):
    logp, logq, rewards, mask = make_batch(31, B=6, T=4, spread=1.0)
    args = [jnp.asarray(a) for a in (logp, logq, rewards, mask)]
    gammas = jnp.asarray([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])

    def f(lp, g):
        return is_reshape_loss(lp, *args[1:], gamma=g, level=level)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(args[0], gammas)

    def want(lp):  # row b's terms at gamma_b, with the whole batch's normaliser
        total = 0.0
        for b in range(6):
            r_b = jnp.zeros_like(args[2]).at[b].set(args[2][b])
            total = total + reference_loss(
                lp, args[1], r_b, args[3], float(gammas[b]), level, "token-mean"
            )
        return total

    np.testing.assert_allclose(float(loss), float(want(args[0])), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(want)(args[0])), rtol=1e-11)
    # The gradient with respect to gamma is zero: gamma is data.
    g_grad = jax.grad(lambda g: f(args[0], g)[0])(gammas)
    np.testing.assert_array_equal(np.asarray(g_grad), 0.0)
    # NumPy gammas are accepted and equal the number.
    by_number = is_reshape_loss(*args, gamma=0.5, level=level)[0]
    by_array = is_reshape_loss(*args, gamma=np.asarray(0.5), level=level)[0]
    assert float(by_array) == float(by_number)
    assert metrics["gamma"].shape == ()


def test_step_gamma_over_a_named_axis_feeds_every_shards_loss():
    """The step's gamma computed over a vmapped data axis (AxisReducer) equals the one-process
    gamma of the whole step (groups by index, split over the shards), and the shards' losses with
    it sum to the whole step's loss."""
    import isreshape_core as isr

    shards, B, T, G = 4, 16, 5, 3
    logp, logq, rewards, mask = make_batch(41, B=B, T=T, spread=1.5)
    ids = np.random.default_rng(41).integers(0, G, B)
    l = isr.log_weights(logp, logq, mask)
    whole_g, whole_m = isr.step_gamma(l, 0.7, group_ids=ids, num_groups=G)
    assert len(np.unique(whole_g)) > 1
    whole_loss = is_reshape_loss(
        *(jnp.asarray(a) for a in (logp, logq, rewards, mask)), gamma=jnp.asarray(whole_g)
    )[0]

    def shard(lp, lq, r, m, gid):
        reducer = AxisReducer("data")
        g, metrics = isr.step_gamma(
            isr.log_weights(lp, lq, m), 0.7, group_ids=gid, num_groups=G, reducer=reducer
        )
        loss, _ = is_reshape_loss(lp, lq, r, m, gamma=g, axis_name="data")
        return g, metrics, loss

    split = [
        jnp.asarray(a.reshape(shards, B // shards, *a.shape[1:]))
        for a in (logp, logq, rewards, mask, ids)
    ]
    g, metrics, loss = jax.jit(jax.vmap(shard, axis_name="data"))(*split)
    np.testing.assert_allclose(np.asarray(g).reshape(B), whole_g, rtol=1e-12)
    for key, value in whole_m.items():
        np.testing.assert_allclose(np.asarray(metrics[key]), float(value), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(loss), float(whole_loss), rtol=1e-12)


@pytest.mark.parametrize(
    "second",
    [
        lambda f: jax.hessian(f),
        lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x))),
        lambda f: lambda x: jax.jvp(jax.grad(f), (x,), (jnp.ones_like(x),))[1],
    ],
    ids=["hessian", "grad_of_grad", "jvp_of_grad"],
)
def test_second_derivative_is_an_error_not_zero(second):
    logp, logq, rewards, mask = (jnp.asarray(a) for a in make_batch(3))

    def f(x):
        return is_reshape_loss(x, logq, rewards, mask, gamma=0.5)[0]

    assert np.all(np.isfinite(np.asarray(jax.grad(f)(logp))))  # first order still works
    with pytest.raises(RuntimeError, match="first order"):
        second(f)(logp)
