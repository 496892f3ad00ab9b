"""Rényi divergence estimates from log importance weights (:ref:`theory-renyi`).

``D_alpha(pi || mu) = log E_mu[w**alpha] / (alpha - 1)`` (the paper's Definition 5.1), estimated
from samples of ``mu`` with ``l = log w``. The identity of the paper's Theorem 5.2,
``E_mu[w**gamma] = exp((gamma - 1) D_gamma(pi || mu))``, links it to the tempered weights of the
IS Reshape loss; ``E_mu[w**(2 gamma)]`` drives the variance (its Corollary 5.4).
"""

from __future__ import annotations

from typing import Any

from ._lib.checks import check_in_interval
from ._lib.inputs import prepare_log_weights
from ._lib.namespace import Array, Namespace
from ._lib.numerics import exp_capped, logsumexp, shift_by_max, tempered_log_weights
from ._lib.reduce import sample_count
from ._lib.rows import row_param, squeeze_row
from ._lib.tracing import poison, traced_bad_rows

__all__ = ["log_mean_tempered_weight", "renyi_divergence"]

# Below this |alpha - 1| the self-normalised divergence uses log1p/expm1 (no 0/0 cancellation
# near alpha = 1); above it, the log-sum-exp form. On [-0.5, 0.5] the argument of log1p stays in
# [min(1, n**-0.5) - 1, inf), far from -1, and no expm1 overflows (see ``_self_normalized``).
_SMALL_ORDER_GAP = 0.5


def _self_normalized(
    xp: Namespace, x: Array, alpha: Array, log_n: Array, axis: int
) -> tuple[Array, Array]:
    """``D_alpha(softmax(x) || uniform)`` and ``KL(softmax(x) || uniform)`` along ``axis``.

    ``x`` are log weights normalised so that ``mean(exp(x)) = 1`` over the ``n`` samples
    (``-inf`` = weight 0), ``alpha`` is expanded at ``axis``, ``log_n`` has the batch shape.
    With ``p = exp(x) / n`` and ``s = alpha - 1``:

    - ``|s| <= 0.5``: ``D = log1p(sum p expm1(s x)) / s``, and ``sum p x`` (the KL) at ``s = 0``;
      both are free of the 0/0 cancellation of ``log(sum p e^(s x)) / s`` near ``alpha = 1``;
    - otherwise ``D = (alpha M + LSE(alpha (x - M)) - log n) / (alpha - 1)``, ``M = max x``;
    - ``alpha = inf``: ``M = log(n max p)`` (the max-divergence).

    Rows without a positive weight are the caller's business (the value there is finite junk).
    """
    p = xp.exp(x - xp.expand_dims(log_n, axis=axis))  # <= 1: no overflow; -inf -> 0
    live = p > 0
    xs = xp.where(live, x, 0.0)  # p = 0 terms are dropped (0 * expm1(...) is never formed)
    kl = xp.sum(p * xs, axis=axis)

    s = alpha - 1.0
    finite = xp.isfinite(alpha)
    small = (s <= _SMALL_ORDER_GAP) & (s >= -_SMALL_ORDER_GAP)
    # Branch A. |s| <= 0.5 and x >= log(n * tiny) keep s * xs below ~372 (float64) / ~52 (float32).
    s_a = xp.where(small, s, _SMALL_ORDER_GAP)
    total = xp.sum(p * xp.expm1(s_a * xs), axis=axis)
    s_a = squeeze_row(xp, s_a, axis)
    at_one = s_a == 0
    d_small = xp.where(at_one, kl, xp.log1p(total) / xp.where(at_one, 1.0, s_a))

    # Branch B, shifted by the row maximum so that alpha * (x - M) <= 0 never overflows.
    a_b = xp.where(small | ~finite, 2.0, alpha)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    shifted = tempered_log_weights(xp, x - m, a_b)
    a_b = squeeze_row(xp, a_b, axis)
    m = xp.squeeze(m, axis=axis)
    d_large = (a_b * m + logsumexp(xp, shifted, axis) - log_n) / (a_b - 1.0)

    small = squeeze_row(xp, small, axis)
    finite = squeeze_row(xp, finite, axis)
    d = xp.where(small, d_small, d_large)
    d = xp.where(finite, d, m)
    # Rounding can leave -1e-17 where the divergence is 0; the exact value is never negative.
    d = xp.where(d > 0, d, 0.0)
    return d, xp.where(kl > 0, kl, 0.0)


def renyi_divergence(
    log_w: Array,
    alpha: Any,
    *,
    axis: int = -1,
    mask: Array | None = None,
    self_normalized: bool = True,
) -> Array:
    r"""Estimate of the Rényi divergence ``D_alpha(pi || mu)`` from log importance weights.

    Plain estimate, with ``n`` samples from ``mu`` and ``l = log(pi/mu)``:

    .. math::

        \hat D_\alpha = \frac{\log \frac{1}{n}\sum_i w_i^\alpha}{\alpha - 1}
        = \frac{\mathrm{LSE}(\alpha l) - \log n}{\alpha - 1}.

    Self-normalised (default): ``l`` is first shifted so that ``mean(w) = 1``; the estimate is
    then exactly ``D_alpha(p || u)`` with ``p = softmax(l)`` and ``u`` uniform on the samples,

    .. math::

        \hat D^{\mathrm{SN}}_\alpha = \log n + \frac{\mathrm{LSE}(\alpha l)
        - \alpha\,\mathrm{LSE}(l)}{\alpha - 1},

    never negative and non-decreasing in ``alpha``, invariant to adding a constant to ``l``.
    The plain estimate is not: it is negative where ``mean(w) > 1`` and ``alpha < 1``, for one.

    Special orders:

    - ``alpha = 1``: the KL limit. Self-normalised: ``sum p log(n p)`` (``0 log 0 = 0``),
      continuous in ``alpha`` (a stable ``log1p``/``expm1`` form is used for
      ``|alpha - 1| <= 0.5``). Plain: ``mean(w l)``, the usual estimate of
      ``KL(pi || mu) = E_mu[w log w]``; it is the limit of the plain formula only where
      ``mean(w) = 1``, which the sample need not satisfy (the plain formula has a pole at
      ``alpha = 1`` otherwise).
    - ``alpha = 0``: ``-log(n_pos / n)``, ``n_pos`` the number of positive weights (``0**0`` is
      not 1 here: a ``-inf`` or masked sample never counts); both variants agree.
    - ``alpha = inf``: the max-divergence, ``log(n max p)`` self-normalised, ``max l`` plain.

    A row without a positive weight (all ``-inf`` or all masked) gives ``+inf``.

    Parameters
    ----------
    log_w : array ``(..., n, ...)``
        Log importance weights, as in :func:`isreshape_core.ess`.
    alpha : float or array broadcastable to the batch shape (``log_w.shape`` without ``axis``)
        Order, ``>= 0`` (``inf`` allowed).
    axis : int
        The sample axis; the other axes are batch axes.
    mask : bool array broadcastable to ``log_w.shape``, optional
        False removes a sample from the estimate (it does not count in ``n``).
    self_normalized : bool
        Self-normalised estimate (default) or the plain one.

    Returns
    -------
    array, the batch shape
        The estimate in the compute dtype (float32 or float64), in nats.

    References
    ----------
    :ref:`theory-renyi`; the paper's Definition 5.1 and Theorem 5.2; Rényi (1961); van Erven &
    Harremoës, "Rényi divergence and Kullback-Leibler divergence", IEEE Trans. Inf. Theory 60
    (2014), Theorems 3 and 5 (monotone in the order; ``alpha = 0, 1, inf`` limits).

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([1.0, 1.0, 2.0, 4.0]))
    >>> print(np.round(renyi_divergence(l, 2.0), 4))  # log(n * sum p^2)
    0.3185
    >>> print(np.round([renyi_divergence(l, a) for a in (0.0, 0.5, 1.0, np.inf)], 4))
    [0.     0.0877 0.1733 0.6931]
    >>> print(np.round(renyi_divergence(l, 0.5, self_normalized=False), 4))  # mean(w) = 2
    -0.6055
    """
    check_in_interval(alpha, "alpha", 0.0, allow_inf=True)
    if not isinstance(self_normalized, bool):
        raise TypeError(f"self_normalized must be True or False, got {self_normalized!r}")
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    a = row_param(xp, alpha, axis, l, "alpha")

    n = sample_count(xp, l, mask, axis)
    log_n = xp.log(xp.where(n > 0, n, 1.0))
    has_pos = xp.any(l > -xp.inf, axis=axis)
    bad = traced_bad_rows(xp, l, axis, alpha)
    # Relative to the max (no digits lost to a constant offset, nor to a span of 1e300).
    l, top = shift_by_max(xp, l, axis)
    lse = logsumexp(xp, l, axis)
    lse = xp.where(has_pos, lse, 0.0)
    c_rel = lse - log_n  # log mean(w) - max l
    x = l - xp.expand_dims(c_rel, axis=axis)  # mean(exp(x)) = 1; -inf stays -inf
    c = xp.squeeze(top, axis=axis) + c_rel  # log mean(w)

    d_sn, kl = _self_normalized(xp, x, a, log_n, axis)
    if self_normalized:
        d = d_sn
    else:
        # log mean(w**alpha) = log mean(exp(alpha x)) + alpha c, so the plain estimate is
        # D_sn + alpha c / (alpha - 1); at alpha = 1 it is mean(w l) = e^c (KL + c).
        a_row = squeeze_row(xp, a, axis)
        at_one = a_row == 1.0
        infinite = a_row == xp.inf
        a_safe = xp.where(at_one | infinite, 2.0, a_row)
        shift = xp.where(infinite, c, a_safe * c / (a_safe - 1.0))
        mean_wl = exp_capped(xp, c) * (kl + c)  # kl + c >= c: no inf * 0
        d = xp.where(at_one, mean_wl, d_sn + shift)
    return poison(xp, xp.where(has_pos, d, xp.inf), bad)


def log_mean_tempered_weight(
    log_w: Array, gamma: Any, *, axis: int = -1, mask: Array | None = None
) -> Array:
    r"""``log mean(w**gamma)`` along ``axis``, in log space.

    .. math::

        \log \frac{1}{n}\sum_i w_i^\gamma = \mathrm{LSE}(\gamma\, l) - \log n
        = (\gamma - 1)\,\hat D_\gamma ,

    where ``hat D_gamma`` is the plain :func:`renyi_divergence` estimate (``gamma != 1``): the
    sample version of the paper's Theorem 5.2,
    ``E_mu[w**gamma] = exp((gamma - 1) D_gamma(pi || mu))``.
    ``gamma = 2 gamma'`` gives the second moment ``mean(w**(2 gamma'))`` of the tempered weights
    that drives the variance of the IS Reshape gradient (the paper's Corollary 5.4: a second
    moment, not the variance; :ref:`theory-correction-second-moment`).

    A ``-inf`` or masked sample is weight 0 for every ``gamma``, 0 included (``0**0`` is not 1
    here), so ``gamma = 0`` gives ``log(n_pos / n)``. A row without a positive weight, or
    without an unmasked sample, gives ``-inf``.

    Parameters
    ----------
    log_w : array ``(..., n, ...)``
        Log importance weights, as in :func:`isreshape_core.ess`.
    gamma : float or array broadcastable to the batch shape (``log_w.shape`` without ``axis``)
        Exponent, finite and ``>= 0`` (values above 1 are allowed, e.g. ``2 gamma``).
    axis, mask
        As in :func:`renyi_divergence`.

    Returns
    -------
    array, the batch shape
        ``log mean(w**gamma)`` in the compute dtype.

    References
    ----------
    :ref:`theory-renyi`; the paper's Theorem 5.2 and Corollary 5.4.

    Examples
    --------
    Four weights ``1, 1, 2, 4``: their mean, the mean of their squares, and Theorem 5.2.

    >>> import numpy as np
    >>> l = np.log(np.array([1.0, 1.0, 2.0, 4.0]))
    >>> print(np.round(np.exp(log_mean_tempered_weight(l, 1.0)), 4))  # mean(w)
    2.0
    >>> print(np.round(np.exp(log_mean_tempered_weight(l, 2.0)), 4))  # mean(w^2) = 22 / 4
    5.5
    >>> d = renyi_divergence(l, 0.5, self_normalized=False)
    >>> print(np.round(np.exp(-0.5 * d), 4))  # Theorem 5.2: mean(sqrt(w))
    1.3536
    """
    check_in_interval(gamma, "gamma", 0.0)
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    g = row_param(xp, gamma, axis, l, "gamma")
    n = sample_count(xp, l, mask, axis)
    bad = traced_bad_rows(xp, l, axis, gamma)
    l, top = shift_by_max(xp, l, axis)  # exact relative to the max; g * max added last
    lse = logsumexp(xp, tempered_log_weights(xp, l, g), axis, keepdims=True) + g * top
    lse = xp.squeeze(lse, axis=axis)
    has_n = n > 0
    return poison(xp, xp.where(has_n, lse - xp.log(xp.where(has_n, n, 1.0)), -xp.inf), bad)
