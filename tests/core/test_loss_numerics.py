"""Numerical safety of the loss (issue 14): for every finite input, in every dtype, the loss and
every gradient are finite, masked tokens get exactly zero gradient, and where the true values
are out of range both are divided by one reported factor ``exp(log_scale)``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _helpers import to_numpy

import isreshape_core as isr
from isreshape_core import _loss as loss_module
from isreshape_core._lib import sizes
from isreshape_core._lib.dtypes import log_max


def _loss(xp, lp, lq, r, mask, dtype, **kw):
    cast = (lambda a: xp.asarray(np.asarray(a, dtype=dtype))) if dtype else xp.asarray
    loss, grad, metrics = isr.is_reshape_loss_and_grad(
        cast(lp), cast(lq), cast(r), None if mask is None else xp.asarray(mask), **kw
    )
    return to_numpy(loss), to_numpy(grad), {k: to_numpy(v) for k, v in metrics.items()}


ISSUE_LP = np.array([[100.0, 0.0], [0.1, 0.0]])
ISSUE_MASK = np.array([[True, False], [True, True]])


@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_issue_reproduction_float32_is_finite_and_consistent(xp, form):
    """The issue's example: sequence 0 has weight e^100, beyond float32."""
    lq = np.zeros((2, 2))
    for rewards in ([1.0, 1.0], [0.0, 1.0]):
        kw = {"gamma": 1.0, "form": form}
        loss, grad, m = _loss(xp, ISSUE_LP, lq, rewards, ISSUE_MASK, np.float32, **kw)
        exact, exact_grad, m64 = _loss(xp, ISSUE_LP, lq, rewards, ISSUE_MASK, np.float64, **kw)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        assert grad[0, 1] == 0.0  # the padding token: exactly 0, not inf * 0
        assert m64["n_capped"] == 0 and m64["log_scale"] == 0  # float64 holds e^100
        factor = np.exp(np.float64(m["log_scale"]))
        # Value and gradient are divided by the same factor: the direction is exact.
        np.testing.assert_allclose(loss * factor, exact, rtol=2e-5)
        np.testing.assert_allclose(grad * factor, exact_grad, rtol=2e-5, atol=1e-30)
        if rewards[0] == 0.0:  # nothing overflows: exact, no rescaling
            assert m["n_capped"] == 0 and m["log_scale"] == 0
            np.testing.assert_allclose(loss, exact, rtol=1e-6)
        else:
            assert m["n_capped"] == 1 and m["log_scale"] > 0


def test_drift_of_0_2_nats_per_token_over_512_tokens(xp):
    """The issue's default-settings failure: all weights ~e^102, alike, so gamma = 1."""
    rng = np.random.default_rng(0)
    lq = rng.normal(-2.0, 0.5, (8, 512))
    lp = lq + 0.2 + rng.normal(0.0, 1e-3, (8, 512))
    r = rng.normal(size=8)
    loss, grad, m = _loss(xp, lp, lq, r, None, np.float32, gamma="ess")
    exact, exact_grad, _ = _loss(xp, lp, lq, r, None, np.float64, gamma="ess")
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert m["n_capped"] == 8
    factor = np.exp(np.float64(m["log_scale"]))
    np.testing.assert_allclose(grad * factor, exact_grad, rtol=1e-3)  # float32 log weights
    np.testing.assert_allclose(loss * factor, exact, rtol=1e-3)


EXTREMES = (0.0, 0.5, -3.0, 88.0, -88.0, 1e3, -1e3, 1e30, -1e30, 3e38, -3e38)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_finite_input_gives_a_finite_loss_and_gradient(xp, dtype):
    if dtype == np.float16 and "strict" in xp.__name__:
        pytest.skip("array-api-strict has no float16")
    rng = np.random.default_rng(5)
    big = float(np.finfo(dtype).max) / 2
    values = np.array([v for v in EXTREMES if abs(v) <= big] + [big, -big], dtype=dtype)
    rewards = np.array([0.0, 1.0, -2.0, big, -big], dtype=dtype)
    for level, form, agg, gamma in itertools.product(
        ("sequence", "geometric", "token"),
        ("objective", "reinforce"),
        ("token-mean", "seq-mean-token-sum"),
        (0.0, 1e-6, 0.5, 1.0, "ess"),
    ):
        lp = rng.choice(values, size=(4, 3))
        lq = rng.choice(values, size=(4, 3))
        r = rng.choice(rewards, size=(4,))
        mask = rng.random((4, 3)) < 0.7
        loss, grad, m = _loss(
            xp, lp, lq, r, mask, dtype, gamma=gamma, level=level, form=form, loss_agg_mode=agg
        )
        where = (level, form, agg, gamma)
        assert np.isfinite(loss), where
        assert np.all(np.isfinite(grad)), where
        assert np.all(np.isfinite(grad.astype(dtype))), where  # as the adapters return it
        assert np.all(grad[~mask] == 0.0), where
        assert all(np.all(np.isfinite(v)) for k, v in m.items() if k != "sigma2"), (where, m)


def test_exact_where_nothing_overflows(xp):
    rng = np.random.default_rng(1)
    lq = rng.normal(-1.0, 0.3, (6, 5))
    lp = lq + rng.normal(0.0, 0.3, (6, 5))
    r = rng.normal(size=6)
    loss, grad, m = _loss(xp, lp, lq, r, None, None, gamma=0.7)
    assert m["n_capped"] == 0 and m["log_scale"] == 0 and m["n_nonfinite"] == 0
    l = (lp - lq).sum(axis=-1)
    want = -np.sum(r * 5 / 30 * np.expm1(0.7 * l) / 0.7)
    np.testing.assert_allclose(loss, want, rtol=1e-13)
    np.testing.assert_allclose(grad, np.broadcast_to(-(r / 6 * np.exp(0.7 * l))[:, None], (6, 5)))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf, -math.inf])
def test_loss_scale_factor_must_be_positive_and_finite(xp, bad):
    x = xp.asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="loss_scale_factor must be a positive finite number"):
        isr.is_reshape_loss_and_grad(
            x,
            x,
            xp.asarray(np.ones(2)),
            loss_agg_mode="seq-mean-token-sum-norm",
            loss_scale_factor=bad,
        )


def test_loss_argument_messages(xp):
    x = xp.asarray(np.zeros((2, 3)))
    r = xp.asarray(np.ones(2))
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\], got 1.5"):
        isr.is_reshape_loss_and_grad(x, x, r, gamma=1.5)
    with pytest.raises(TypeError, match="loss_scale_factor must be a positive finite number"):
        isr.is_reshape_loss_and_grad(x, x, r, loss_scale_factor="2")
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        isr.is_reshape_loss_and_grad(x, x, r, [[True] * 3] * 2)
    with pytest.raises(TypeError, match="logp must have a real floating dtype"):
        isr.is_reshape_loss_and_grad(xp.asarray(np.zeros((2, 3), dtype=np.int64)), x, r)
    lq = xp.asarray(np.array([[0.0, math.inf, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="logq contains \\+inf"):
        isr.is_reshape_loss_and_grad(x, lq, r, gamma=0.5)


@pytest.mark.parametrize("gamma", ["ess", 0.5])
def test_jax_jit_loss_nan_in_nan_out(gamma):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    lq = rng.normal(-1.0, 0.3, (4, 5))
    lp = lq + rng.normal(0.0, 0.5, (4, 5))
    r = rng.normal(size=4)
    mask = np.ones((4, 5), dtype=bool)
    mask[0, 4] = False
    bad = lp.copy()
    bad[2, 1] = np.inf  # one +inf token: eagerly an error, traced NaN where it belongs

    def fn(lp_, lq_, r_, m_):
        return isr.is_reshape_loss_and_grad(lp_, lq_, r_, m_, gamma=gamma)

    loss, grad, m = jax.jit(fn)(*(jnp.asarray(a) for a in (bad, lq, r, mask)))
    loss, grad = np.asarray(loss), np.asarray(grad)
    assert np.isnan(loss) and float(m["n_nonfinite"]) == 1
    assert grad[0, 4] == 0.0  # masked: exactly 0 even so
    assert np.all(np.isnan(grad[2]))
    if gamma == "ess":  # the batch gamma is NaN: every gradient is NaN, none plausible
        assert np.isnan(float(m["gamma"]))
        assert np.all(np.isnan(np.delete(grad, [(0 * 5 + 4)]).reshape(-1)))
    else:  # a fixed gamma: the other rows are untouched
        keep = [0, 1, 3]
        clean = fn(*(jnp.asarray(a[keep]) for a in (lp, lq, r, mask)))[1]
        # token-mean: the clean call has 14 tokens, the batch 19.
        np.testing.assert_allclose(grad[keep] * 19 / 14, np.asarray(clean), rtol=1e-12)


def _random_units(xp, rng, dtype, form, shape):
    """Units whose terms range from tiny to beyond the dtype: normal log weights, weight 0,
    and exponents near the largest float's log, with coefficients from 0 to huge."""
    top = float(np.log(np.finfo(dtype).max))
    choices = np.array([0.0, -0.5, 1.5, -40.0, top - 3.0, top - 0.5, top + 2.0, 3 * top, -np.inf])
    l = np.where(rng.random(shape) < 0.3, rng.choice(choices, shape), rng.normal(0, 3, shape))
    valid = rng.random(shape) < 0.8
    coef = rng.normal(0, 1, shape) * 10.0 ** rng.choice([-30, -3, 0, 3, 30], shape)
    coef = np.where(rng.random(shape) < 0.2, 0.0, coef)
    gamma = rng.choice([0.0, 1e-30, 0.3, 1.0], shape) if rng.random() < 0.5 else rng.random()
    log_p = -np.abs(rng.normal(0, 1, shape)) * 10.0 ** rng.choice([0, 3, 36], shape)

    def cast(a):
        return xp.asarray(np.array(np.broadcast_to(a, shape), dtype=dtype))

    units = loss_module.Units(
        cast(l),
        xp.asarray(valid),
        xp.asarray(np.ones(shape[0], dtype=dtype)),
        cast(log_p) if form == "reinforce" else None,
        xp.asarray(np.zeros(shape, dtype=bool)),
        None,
        finite=bool(np.all(np.isfinite(l))),  # what the loss's plain units claim
    )
    # Invalid units have coef = 0, as unit_loss takes them (from masked rewards).
    return units, cast(gamma), cast(np.where(valid, coef, 0.0).astype(dtype))


def _bits(a):
    """The array as NumPy with the sign of every zero kept (``-0.0 == 0.0`` would hide it)."""
    a = np.asarray(to_numpy(a))
    return a, np.signbit(a)


@pytest.mark.parametrize("stacked_below", [2**12, 0])  # both forms of the check
@pytest.mark.parametrize("form", ["objective", "reinforce"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_path_is_the_scaled_path_bit_for_bit(xp, form, dtype, stacked_below, monkeypatch):
    """The eager fast path returns exactly what the log-space path returns, or declines."""
    monkeypatch.setattr(sizes, "LARGE_SIZE", stacked_below)

    rng, claims = np.random.default_rng(11), np.random.default_rng(12)
    taken = 0
    for case in range(300):
        shape = (5,) if case % 2 else (3, 4)
        units, unit_g, coef = _random_units(xp, rng, dtype, form, shape)
        grad_dtype = np.float16 if case % 7 == 0 else dtype
        cap = min(log_max(np, dtype), log_max(np, grad_dtype))  # as the loss sets it
        # The options' claim that every gamma is positive: true or not (a false one must
        # make the fast path decline, never answer).
        positive = bool(claims.random() < 0.5)
        factors = loss_module._plain_factors(xp, units, unit_g, positive)
        plain = loss_module._plain_loss_and_grad(xp, units, factors, coef, None, cap)
        scaled = loss_module._scaled_loss_and_grad(xp, units, unit_g, coef, None, cap)
        if plain is None:
            continue
        taken += 1
        for got, want in zip(plain[:2], scaled[:2], strict=True):
            np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=str(case))
        invalid = ~np.asarray(to_numpy(units.valid))
        assert not np.any(np.asarray(to_numpy(plain[1]))[invalid]), case  # exactly 0 there
        for key in ("n_capped", "log_scale"):
            assert to_numpy(plain[2][key]) == to_numpy(scaled[2][key]) == 0, (case, key)
    assert 30 < taken < 270  # both paths are exercised


def test_infinite_value_stays_infinite_under_a_scale(xp):
    """At gamma = 0 a zero-weight sequence (a -inf token) has the value ``l = -inf``: its term
    is infinite, and stays so when another sequence's overflow sets a scale (inf times the
    vanishing factor ``e^-s`` would be NaN). The gradient stays finite."""
    lp = np.array([[-np.inf, 0.0], [2000.0, 0.0]])
    gamma = xp.asarray(np.array([0.0, 1.0]))  # one gamma per sequence
    loss, grad, metrics = _loss(xp, lp, np.zeros((2, 2)), [1.0, 1.0], None, np.float64, gamma=gamma)
    assert metrics["log_scale"] > 1000.0  # e^2000 is beyond float64
    assert loss == np.inf  # -r l = +inf for r > 0, not NaN
    assert np.all(np.isfinite(grad))


def _fast_path_cases(rng, dtype):
    """Losses on which the eager fast paths apply, or just fail to: ragged and empty sequences,
    per-sequence and per-token rewards, every level, agg mode and form, gammas from the
    search (default and with ``gamma_min``), fixed (0 included) and precomputed, log weights
    from small to beyond the dtype, zero weights, rewards up to 1e30, padding that holds NaN
    and inf."""
    modes = loss_module.LOSS_AGG_MODES
    for case in range(96):
        B, T = int(rng.choice([3, 8])), int(rng.choice([1, 5, 40]))
        lp = rng.normal(-1.0, 0.5, (B, T)) * (300.0 if case % 11 == 4 else 1.0)
        lq = lp + rng.normal(0.0, rng.uniform(0.05, 2.0), (B, T))
        mask = rng.random((B, T)) < 0.8
        if case % 5 == 2:
            mask[0] = False  # a sequence without a valid token
        lp[~mask] = np.where(rng.random(int((~mask).sum())) < 0.5, np.nan, np.inf)
        if case % 4 == 3:  # a valid token of probability 0: weight 0, the guarded path
            lp[-1, 0], mask[-1, 0] = -np.inf, True
        r = rng.normal(0.0, 1.0, (B, T) if case % 4 == 1 else B)
        if case % 13 == 6:
            r = r * 1e30
        gamma = ["ess", 0.5, 0.0, "ess", "closed_form", 1.0][case % 6]
        kw = {"level": ["sequence", "token", "geometric"][case % 3], "gamma": gamma}
        kw["loss_agg_mode"] = modes[(case // 3) % len(modes)]
        if case % 7 == 3:
            kw["form"] = "reinforce"
        if case % 6 == 3:
            kw["gamma_min"] = 0.2
        if case % 10 == 9:
            kw["gamma"] = np.asarray(rng.uniform(0.0, 1.0), dtype=dtype)
        yield case, lp.astype(dtype), lq.astype(dtype), r.astype(dtype), mask, kw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_units_change_nothing(xp, dtype, monkeypatch):
    """Eagerly, the plain sums of the loss's units (one host read, no checks or clipping) and
    what they let the later stages skip (the metrics' variance scaling, the search's offset)
    give the loss, the gradient and every metric of the guarded path, bit for bit."""
    rng = np.random.default_rng(21)
    cases = list(_fast_path_cases(rng, dtype))

    def run():
        out = []
        for case, lp, lq, r, mask, kw in cases:
            if hasattr(kw["gamma"], "shape"):
                kw = {**kw, "gamma": xp.asarray(kw["gamma"])}
            loss, grad, metrics = _loss(xp, lp, lq, r, mask, None, **kw)
            out.append((case, loss, grad, metrics))
        return out

    fast = run()
    taken = []
    plain_units = loss_module._ordinary_units

    def counted(*args):
        units = plain_units(*args)
        taken.append(units is not None)
        return units

    monkeypatch.setattr(loss_module, "_ordinary_units", counted)
    run()
    assert 60 < sum(taken) < len(taken)  # both paths are exercised
    monkeypatch.setattr(loss_module, "_ordinary_units", lambda *args: None)
    for (case, *got), (_, *want) in zip(fast, run(), strict=True):
        for a, b in zip(got[:2], want[:2], strict=True):
            np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=str(case))
        assert got[2].keys() == want[2].keys()
        for key in got[2]:
            np.testing.assert_array_equal(
                _bits(got[2][key]), _bits(want[2][key]), err_msg=f"{case} {key}"
            )


def test_a_clipped_sum_is_counted_where_its_term_is_representable(xp):
    """Two finite tokens of -3e38 sum beyond float32: the sequence's log weight is clipped to
    -max_float and counted in ``n_capped``, also where its weight 0 and value -1/gamma need no
    scale (the plain products)."""
    lp = np.array([[-3e38, -3e38], [-0.5, -0.2]])
    loss, grad, metrics = _loss(xp, lp, np.zeros((2, 2)), [1.0, 1.0], None, np.float32, gamma=0.5)
    assert metrics["n_capped"] == 1.0 and metrics["log_scale"] == 0.0
    np.testing.assert_array_equal(grad[0], 0.0)  # weight 0
    # token-mean: each sequence's coefficient is r n_b / 4 = 1/2; values -1/gamma and h.
    want = -0.5 * (-1.0 / 0.5 + np.expm1(0.5 * -0.7) / 0.5)
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def _bad_inputs(per_token_rewards):
    """A batch with one NaN reward (row 1) and one ``+inf`` token (row 2, valid), masked
    padding, and the count of valid tokens each makes bad."""
    rng = np.random.default_rng(9)
    lq = rng.normal(-1.0, 0.3, (4, 6))
    lp = lq + rng.normal(0.0, 0.5, (4, 6))
    mask = np.arange(6)[None, :] < np.array([6, 4, 5, 3])[:, None]
    r = rng.normal(size=(4, 6) if per_token_rewards else 4)
    lp[2, 1] = np.inf
    if per_token_rewards:
        r[1, 2] = np.nan  # one token of row 1
        r[3, 5] = np.inf  # padding: not counted
        expected = 1 + 1
    else:
        r[1] = np.nan  # every valid token of row 1: 4
        expected = 4 + 1
    return (lp, lq, r, mask), expected


@pytest.mark.parametrize("level", ["sequence", "geometric", "token"])
@pytest.mark.parametrize("per_token_rewards", [False, True])
@pytest.mark.parametrize("tracer", ["jax.jit", "torch.compile"])
def test_traced_bad_tokens_are_counted_and_poison_their_units(level, per_token_rewards, tracer):
    """Traced inputs cannot raise: a valid token whose log ratio is +inf or whose reward is
    not finite counts in ``n_nonfinite`` (a NaN per-sequence reward: every valid token of its
    sequence), padding does not, and the loss is NaN."""
    (lp, lq, r, mask), expected = _bad_inputs(per_token_rewards)
    kw = {"gamma": 0.5, "level": level}
    if tracer == "jax.jit":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        args = [jax.numpy.asarray(a) for a in (lp, lq, r, mask)]
        loss, _, m = jax.jit(lambda *a: isr.is_reshape_loss_and_grad(*a, **kw))(*args)
    else:
        torch = pytest.importorskip("torch")
        args = [torch.asarray(a) for a in (lp, lq, r, mask)]
        fn = torch.compile(
            lambda *a: isr.is_reshape_loss_and_grad(*a, **kw), fullgraph=True, backend="eager"
        )
        loss, _, m = fn(*args)
    assert float(m["n_nonfinite"]) == expected
    assert np.isnan(float(loss))
