"""Tests for ``isreshape_core.renyi`` (DESIGN.md section 3 item 7).

References are computed independently: plain NumPy sums over ``p = softmax(l)``, SciPy's
``rel_entr`` / ``entropy`` for the KL limit, and mpmath at 50 digits near ``alpha = 1``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from _helpers import to_numpy
from hypothesis import given
from hypothesis import strategies as st
from scipy import special, stats

from isreshape_core._renyi import log_mean_tempered_weight, renyi_divergence

ORDERS = (0.0, 0.25, 0.5, 0.9, 1.0, 1.2, 1.5, 2.0, 5.0)


def sn_ref(l: np.ndarray, alpha: float) -> float:
    """``D_alpha(softmax(l) || uniform)`` by its definition, with NumPy sums (1-D ``l``)."""
    n = l.size
    p = np.exp(l - l.max())
    p = p / p.sum()
    u = np.full(n, 1.0 / n)
    pos = p > 0
    if alpha == 1:
        return float(np.sum(special.rel_entr(p, u)))
    if alpha == 0:
        return float(-np.log(u[pos].sum()))
    if alpha == np.inf:
        return float(np.log(np.max(p / u)))
    return float(np.log(np.sum(p[pos] ** alpha * u[pos] ** (1 - alpha))) / (alpha - 1))


def plain_ref(l: np.ndarray, alpha: float) -> float:
    """``log mean(w**alpha) / (alpha - 1)``; ``mean(w l)`` at ``alpha = 1`` (1-D ``l``)."""
    w = np.exp(l)
    pos = w > 0
    if alpha == 1:
        return float(np.sum(w[pos] * l[pos]) / l.size)
    if alpha == 0:
        return float(-np.log(pos.sum() / l.size))
    return float(np.log(np.sum(w[pos] ** alpha) / l.size) / (alpha - 1))


def rvs(seed: int, shape: tuple, scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape)


def D(xp, l, alpha, **kw):
    a = xp.asarray(alpha) if isinstance(alpha, np.ndarray) else alpha
    return to_numpy(renyi_divergence(xp.asarray(l), a, **kw))


# --- against the definitions ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [*ORDERS, np.inf])
def test_self_normalized_is_divergence_to_uniform(xp, alpha):
    l = rvs(0, (12,), 1.5)
    np.testing.assert_allclose(D(xp, l, alpha), sn_ref(l, alpha), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("alpha", ORDERS)
def test_plain_estimate(xp, alpha):
    l = rvs(1, (10,), 0.8) - 0.2
    np.testing.assert_allclose(
        D(xp, l, alpha, self_normalized=False), plain_ref(l, alpha), rtol=1e-11, atol=1e-14
    )


def test_plain_max_divergence(xp):
    l = rvs(2, (9,))
    np.testing.assert_allclose(D(xp, l, np.inf, self_normalized=False), l.max(), rtol=1e-14)


def test_kl_limit_against_scipy(xp):
    l = rvs(3, (2, 15), 2.0)
    p = special.softmax(l, axis=-1)
    want = stats.entropy(p, np.full_like(p, 1 / 15), axis=-1)
    np.testing.assert_allclose(D(xp, l, 1.0), want, rtol=1e-12)
    # plain: the usual estimate mean(w log w) of KL(pi || mu) = E_mu[w log w]
    w = np.exp(l)
    np.testing.assert_allclose(
        D(xp, l, 1.0, self_normalized=False), np.mean(w * l, axis=-1), rtol=1e-12
    )


def test_order_zero_counts_positive_weights(xp):
    l = np.array([0.3, -np.inf, -1.0, -np.inf, 2.0])
    for sn in (True, False):
        np.testing.assert_allclose(D(xp, l, 0.0, self_normalized=sn), -math.log(3 / 5))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_continuity_at_one(xp, sign):
    mpmath = pytest.importorskip("mpmath")
    l = rvs(4, (8,), 1.3)
    alpha = 1.0 + sign * 1e-7
    with mpmath.workdps(50):
        a = mpmath.mpf(alpha)  # the float64 alpha, exactly
        ws = [mpmath.exp(mpmath.mpf(v)) for v in l]
        total = mpmath.fsum(ws)
        n = len(ws)
        ps = [w / total for w in ws]
        want = float(mpmath.log(mpmath.fsum(p**a for p in ps) * mpmath.mpf(n) ** (a - 1)) / (a - 1))
        kl = float(mpmath.fsum(p * mpmath.log(n * p) for p in ps))
    got = float(D(xp, l, alpha))
    # The naive (LSE(al) - a LSE(l))/(a - 1) loses ~1e-9 here; the stable form keeps ~1e-15.
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(kl, rel=1e-6)
    assert float(D(xp, l, 1.0)) == pytest.approx(kl, rel=1e-13)


def test_branch_boundaries_are_continuous(xp):
    # The stable form is used for |alpha - 1| <= 0.5: no jump at 0.5 and 1.5.
    l = rvs(5, (10,), 1.7)
    for edge in (0.5, 1.5):
        below, above = D(xp, l, edge - 1e-12), D(xp, l, edge + 1e-12)
        assert below == pytest.approx(above, rel=1e-10)
        assert below == pytest.approx(sn_ref(l, edge), rel=1e-10)


# --- properties ----------------------------------------------------------------------------------


@given(
    l=st.lists(st.one_of(st.floats(-20, 20), st.just(-np.inf)), min_size=1, max_size=8).filter(
        lambda v: max(v) > -np.inf
    ),
    a1=st.floats(0, 6),
    a2=st.floats(0, 6),
    shift=st.floats(-50, 50),
)
def test_self_normalized_nonnegative_monotone_shift_invariant(xp, l, a1, a2, shift):
    l = np.array(l)
    lo, hi = min(a1, a2), max(a1, a2)
    d_lo, d_hi = float(D(xp, l, lo)), float(D(xp, l, hi))
    assert d_lo >= 0.0
    assert d_hi >= d_lo - 1e-12 * max(1.0, d_lo)
    assert d_hi <= math.log(l.size) + 1e-12  # D(p || u) <= log n for every order
    assert float(D(xp, l + shift, hi)) == pytest.approx(d_hi, rel=1e-9, abs=1e-11)
    assert d_hi == pytest.approx(sn_ref(l, hi), rel=1e-9, abs=1e-11)


def test_plain_can_be_negative(xp):
    # w = (1, 1, 2, 4): mean(sqrt(w)) = 1.3536 > 1, so log mean(w^0.5) / (0.5 - 1) < 0.
    l = np.log(np.array([1.0, 1.0, 2.0, 4.0]))
    got = float(D(xp, l, 0.5, self_normalized=False))
    want = math.log((1 + 1 + math.sqrt(2) + 2) / 4) / (0.5 - 1)
    assert got == pytest.approx(want, rel=1e-13)
    assert got < 0
    assert float(D(xp, l, 0.5)) > 0


def test_plain_is_not_shift_invariant_but_sn_plus_correction(xp):
    # log mean(w^a) = log mean((w/mean w)^a) + a log mean(w): the plain estimate moves.
    l = rvs(6, (7,))
    c = 0.75
    for alpha in (0.3, 2.0):
        moved = D(xp, l + c, alpha, self_normalized=False)
        assert moved == pytest.approx(plain_ref(l + c, alpha), rel=1e-12)
        assert moved != pytest.approx(D(xp, l, alpha, self_normalized=False), rel=1e-3)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 0.999, 1.0, 1.6, 2.0])
def test_theorem_5_2_identity(xp, gamma):
    # mean(w^g) = exp((g - 1) D_g) with the plain estimate (seed Theorem 5.2).
    l = rvs(7, (11,), 0.9)
    l[3] = -np.inf
    w = np.exp(l)
    lm = to_numpy(log_mean_tempered_weight(xp.asarray(l), gamma))
    pos = w > 0
    np.testing.assert_allclose(np.exp(lm), np.sum(w[pos] ** gamma) / w.size, rtol=1e-13)
    if gamma != 1.0:
        d = D(xp, l, gamma, self_normalized=False)
        np.testing.assert_allclose(np.exp((gamma - 1) * d), np.exp(lm), rtol=1e-12)


def test_variance_driver_is_second_moment(xp):
    l = rvs(8, (9,))
    for gamma in (0.25, 0.5, 1.0):
        got = to_numpy(log_mean_tempered_weight(xp.asarray(l), 2 * gamma))
        np.testing.assert_allclose(got, np.log(np.mean(np.exp(l) ** (2 * gamma))), rtol=1e-13)


# --- masks, batches, per-row orders --------------------------------------------------------------


@pytest.mark.parametrize("sn", [True, False])
def test_mask_equals_unpadded(xp, sn):
    rng = np.random.default_rng(9)
    l = rng.normal(size=(2, 5))
    pad = np.concatenate([l, 30 + rng.normal(size=(2, 2))], axis=1)[:, [0, 5, 1, 2, 6, 3, 4]]
    mask = np.array([True, False, True, True, False, True, True])
    mask = np.broadcast_to(mask, (2, 7))
    for alpha in (0.0, 0.5, 1.0, 3.0, np.inf):
        got = to_numpy(
            renyi_divergence(xp.asarray(pad), alpha, mask=xp.asarray(mask), self_normalized=sn)
        )
        want = D(xp, l, alpha, self_normalized=sn)
        np.testing.assert_allclose(got, want, rtol=1e-12)
    got = to_numpy(log_mean_tempered_weight(xp.asarray(pad), 0.7, mask=xp.asarray(mask)))
    np.testing.assert_allclose(got, np.log(np.mean(np.exp(0.7 * l), axis=-1)), rtol=1e-12)


def test_per_row_alpha_and_batched_axis(xp):
    rng = np.random.default_rng(10)
    l = rng.normal(size=(3, 6, 2))  # samples along axis 1, batch (3, 2)
    alpha = np.array([[0.0, 0.5], [1.0, 2.0], [4.0, np.inf]])
    for sn in (True, False):
        got = to_numpy(
            renyi_divergence(xp.asarray(l), xp.asarray(alpha), axis=1, self_normalized=sn)
        )
        assert got.shape == (3, 2)
        ref = sn_ref if sn else plain_ref
        for i in range(3):
            for k in range(2):
                if not sn and alpha[i, k] == np.inf:
                    want = l[i, :, k].max()
                else:
                    want = ref(l[i, :, k], alpha[i, k])
                assert got[i, k] == pytest.approx(want, rel=1e-11, abs=1e-14)
    g = np.array([0.2, 1.5])  # broadcast over the leading batch axis
    got = to_numpy(log_mean_tempered_weight(xp.asarray(l), xp.asarray(g), axis=1))
    want = np.log(np.mean(np.exp(l * g[None, None, :]), axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --- degenerate and extreme inputs ---------------------------------------------------------------


def test_minus_inf_entries(xp):
    l = np.array([-np.inf, 0.4, -np.inf, -1.2, 0.9])
    for alpha in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(D(xp, l, alpha), sn_ref(l, alpha), rtol=1e-12)
        np.testing.assert_allclose(
            D(xp, l, alpha, self_normalized=False), plain_ref(l, alpha), rtol=1e-12
        )


def test_single_positive_weight_is_log_n(xp):
    l = np.array([-np.inf, 3.0, -np.inf, -np.inf])
    for alpha in (0.0, 0.5, 1.0, 2.0, np.inf):
        np.testing.assert_allclose(D(xp, l, alpha), math.log(4), rtol=1e-13)


def test_degenerate_rows(xp):
    l = np.array([[-np.inf, -np.inf, -np.inf], [0.1, 0.2, 0.3]])
    mask = np.array([[True, True, True], [False, False, False]])
    for alpha in (0.0, 0.5, 1.0, 2.0, np.inf):
        for sn in (True, False):
            got = to_numpy(
                renyi_divergence(xp.asarray(l), alpha, mask=xp.asarray(mask), self_normalized=sn)
            )
            np.testing.assert_array_equal(got, [np.inf, np.inf])
    got = to_numpy(log_mean_tempered_weight(xp.asarray(l), 0.5, mask=xp.asarray(mask)))
    np.testing.assert_array_equal(got, [-np.inf, -np.inf])


def test_uniform_weights_give_zero(xp):
    l = np.full((4,), 2.5)
    for alpha in (0.0, 0.5, 1.0, 2.0, np.inf):
        assert float(D(xp, l, alpha)) == pytest.approx(0.0, abs=1e-15)


def test_extreme_log_weights(xp):
    l = np.array([1e4, 0.0, -1e4])
    for alpha in (0.5, 1.0, 2.0, 40.0, np.inf):
        assert float(D(xp, l, alpha)) == pytest.approx(math.log(3), rel=1e-13)
    # plain: log mean(w^2) = 2e4 - log 3, exactly representable in log space
    assert float(D(xp, l, 2.0, self_normalized=False)) == pytest.approx(
        2e4 - math.log(3), rel=1e-14
    )
    assert float(D(xp, l, 1.0, self_normalized=False)) == np.inf  # mean(w l) = e^1e4 * 1e4 / 3
    lm = to_numpy(log_mean_tempered_weight(xp.asarray(l), 0.5))
    assert float(lm) == pytest.approx(5e3 - math.log(3), rel=1e-14)


def test_no_warnings_numpy():
    l = np.array([[-np.inf, 800.0, -1e4, 0.0], [-np.inf] * 4])
    mask = np.array([[True] * 4, [True, True, False, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for alpha in (0.0, 0.5, 1.0, 1.0 + 1e-9, 3.0, np.inf):
            for sn in (True, False):
                renyi_divergence(l, alpha, mask=mask, self_normalized=sn)
            renyi_divergence(l.astype(np.float32), alpha)
        for gamma in (0.0, 0.5, 2.0):
            log_mean_tempered_weight(l, gamma, mask=mask)


def test_float32(xp):
    l = rvs(11, (6,))
    got = renyi_divergence(xp.asarray(np.asarray(l, dtype=np.float32)), 2.0)
    assert got.dtype == xp.float32
    np.testing.assert_allclose(to_numpy(got), sn_ref(l, 2.0), rtol=1e-5)


def test_jax_jit_and_torch_compile():
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    jax.config.update("jax_enable_x64", True)
    l = rvs(12, (3, 7))
    alpha = np.array([0.5, 1.0, 3.0])
    want = [sn_ref(l[i], a) for i, a in enumerate(alpha)]
    want_lm = [np.log(np.mean(np.exp(a * l[i]))) for i, a in enumerate(alpha)]

    def fn(x, a):
        return renyi_divergence(x, a), log_mean_tempered_weight(x, a)

    jd, jl = jax.jit(fn)(jax.numpy.asarray(l), jax.numpy.asarray(alpha))
    tfn = torch.compile(fn, fullgraph=True)
    as_t = lambda x: torch.asarray(x, dtype=torch.float64)  # noqa: E731
    td, tl = tfn(as_t(l), as_t(alpha))
    for d, lm in ((jd, jl), (td, tl)):
        np.testing.assert_allclose(to_numpy(d), want, rtol=1e-11)
        np.testing.assert_allclose(to_numpy(lm), want_lm, rtol=1e-12)


# --- validation ---------------------------------------------------------------------------------


def test_validation(xp):
    l = xp.asarray(np.zeros((2, 3)))
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            renyi_divergence(l, bad)
        with pytest.raises(ValueError, match="gamma"):
            log_mean_tempered_weight(l, bad)
    with pytest.raises(ValueError, match="gamma"):
        log_mean_tempered_weight(l, float("inf"))
    with pytest.raises(ValueError, match="alpha"):
        renyi_divergence(l, xp.asarray(np.array([1.0, -1.0])))
    with pytest.raises(ValueError, match="alpha"):
        renyi_divergence(l, xp.asarray(np.array([1.0, 2.0, 3.0])))  # batch shape is (2,)
    with pytest.raises(TypeError, match="alpha"):
        renyi_divergence(l, "2")
    with pytest.raises(TypeError, match="self_normalized"):
        renyi_divergence(l, 2.0, self_normalized="yes")
    with pytest.raises(ValueError, match="mask"):
        renyi_divergence(l, 2.0, mask=xp.asarray(np.ones(4, bool)))
    bad_l = np.zeros((2, 3))
    bad_l[0, 1] = np.inf
    with pytest.raises(ValueError, match="log_w"):
        renyi_divergence(xp.asarray(bad_l), 2.0)
