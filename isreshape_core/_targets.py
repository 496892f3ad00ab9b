"""Finite-support analysis: target distributions, bias and MSE (:ref:`theory-finite-support`).

On a finite support of ``K`` outcomes (bandits, tests, teaching) the behaviour policy ``mu`` is
given by its log-probabilities ``logq`` and the reward ``r >= 0`` of each outcome is read as an
unnormalised distribution. Two families of distributions are exposed:

- the paper's geometric target (Definition 4.1, Theorem 4.2; :ref:`theory-finite-support`)
  ``p_gamma ∝ (mu r)**(1 - gamma) * exp(gamma r / tau)``, the e-geodesic between
  ``p_0 = mu r / Z_0`` and ``p_1 = exp(r / tau) / Z_1``;
- the correction (:ref:`theory-correction-target`): the policy that maximises the loss
  ``L_gamma(pi) = sum_y mu r ((pi/mu)**gamma - 1)/gamma`` is ``pi ∝ mu r**(1/(1 - gamma))``:
  ``tau`` does not enter the loss and the exponent of ``mu`` stays 1, so the paper's picture of
  gamma moving the learned policy away from ``mu`` along ``mu**(1 - gamma)`` holds for
  ``p_gamma``, not for what the loss trains.

Outcomes are laid out along ``axis`` (default -1); every other axis is a batch axis. ``logq`` need
not be normalised (only ratios matter); ``-inf`` is probability 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._lib.checks import check_gamma, check_in_interval, check_real_floating, normalize_axis
from ._lib.dtypes import as_compute_array
from ._lib.namespace import Array, Namespace, array_device, namespace
from ._lib.numerics import log_abs, logsumexp
from ._lib.rows import row_param, squeeze_row
from ._lib.tracing import is_concrete, nan_or_plus_inf
from ._lognormal import lognormal_second_moment

__all__ = [
    "bias",
    "mse",
    "mse_optimal_gamma",
    "stationary_log_probs",
    "target_log_probs",
]


# --------------------------------------------------------------------------------------------
# validation helpers (private)
# --------------------------------------------------------------------------------------------


def _support(logq: Any, rewards: Any, axis: int) -> tuple[Namespace, Array, Array, int]:
    """Validate ``logq`` and ``rewards``; return them in a common compute dtype."""
    for name, x in (("logq", logq), ("rewards", rewards)):
        if not hasattr(x, "shape"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    xp = namespace(logq, rewards)
    check_real_floating(xp, logq, "logq")
    if tuple(logq.shape) != tuple(rewards.shape):
        raise ValueError(
            f"logq of shape {tuple(logq.shape)} and rewards of shape {tuple(rewards.shape)} must "
            "have the same shape: one log-probability and one reward per outcome"
        )
    dtype = xp.float64 if xp.float64 in (logq.dtype, rewards.dtype) else xp.float32
    logq = as_compute_array(xp, logq, dtype)
    rewards = as_compute_array(xp, rewards, dtype)
    axis = normalize_axis(axis, logq.ndim)
    if logq.shape[axis] == 0:
        raise ValueError(
            f"logq has no outcomes along axis {axis} (shape {tuple(logq.shape)}); "
            "the support must not be empty"
        )
    if is_concrete(logq) and bool(xp.any(nan_or_plus_inf(xp, logq))):
        raise ValueError(
            "logq contains NaN or +inf; log-probabilities must be finite or -inf (probability 0)"
        )
    if is_concrete(rewards) and not bool(xp.all(xp.isfinite(rewards) & (rewards >= 0))):
        raise ValueError(
            "rewards must be finite and >= 0 here (they are read as an unnormalised distribution "
            "over the outcomes; 0 is an outcome of zero mass); shift or exponentiate signed "
            "rewards first"
        )
    return xp, logq, rewards, axis


def _check_tau(tau: Any) -> None:
    check_in_interval(tau, "tau", 0.0, low_open=True, meaning="the temperature")


def _row(xp: Namespace, value: Any, name: str, axis: int, logq: Array) -> Array:
    """A per-row parameter of ``logq``'s batch, with a size-1 dimension at ``axis``."""
    return row_param(xp, value, axis, logq, name, of="logq")


def _geometric_inputs(
    logq: Any, rewards: Any, gamma: Any, tau: Any, axis: int
) -> tuple[Namespace, Array, Array, int, Array, Array]:
    """Validated ``(xp, logq, rewards, axis, gamma, tau)``, ``gamma`` and ``tau`` per row."""
    xp, logq, rewards, axis = _support(logq, rewards, axis)
    check_gamma(gamma)
    _check_tau(tau)
    return (
        xp,
        logq,
        rewards,
        axis,
        _row(xp, gamma, "gamma", axis, logq),
        _row(xp, tau, "tau", axis, logq),
    )


def _mse_params(xp: Namespace, logq: Array, axis: int, sigma2: Any, n: Any) -> tuple[Array, Array]:
    """``sigma2`` and ``n`` checked, one value per row of the batch (``axis`` dropped)."""
    check_in_interval(sigma2, "sigma2", 0.0, meaning="the variance of the log weights")
    check_in_interval(n, "n", 0.0, low_open=True, meaning="the sample size")
    return (
        squeeze_row(xp, _row(xp, sigma2, "sigma2", axis, logq), axis),
        squeeze_row(xp, _row(xp, n, "n", axis, logq), axis),
    )


def _normalize(xp: Namespace, u: Array, axis: int) -> tuple[Array, Array]:
    """``u - LSE(u)`` along ``axis``; rows that are all ``-inf`` stay all ``-inf``.

    Returns the normalised log-probabilities and the per-row flag "row has mass" (keepdims)."""
    lse = logsumexp(xp, u, axis, keepdims=True)
    ok = lse > -xp.inf
    return xp.where(ok, u - xp.where(ok, lse, 0.0), -xp.inf), ok


# --------------------------------------------------------------------------------------------
# private kernels (validated inputs; gamma and tau broadcastable with a size-1 `axis`)
# --------------------------------------------------------------------------------------------


def _geometric(
    xp: Namespace, logq: Array, log_r: Array, rewards: Array, gamma: Array, tau: Array, axis: int
) -> tuple[Array, Array]:
    """The geometric target p_gamma in log space and the per-row "defined" flag."""
    a = logq + log_r  # log(mu r): finite or -inf, never NaN (no +inf in either term)
    zero_mass = a == -xp.inf
    # (1 - gamma) log(mu r), with the gamma = 1 limit 0 (not 0 * -inf) where mu r = 0.
    term = xp.where(zero_mass & (gamma < 1.0), -xp.inf, (1.0 - gamma) * xp.where(zero_mass, 0.0, a))
    # gamma r / tau, shifted by the row maximum so that large r / tau keeps logq's precision.
    r_max = xp.max(rewards, axis=axis, keepdims=True)
    return _normalize(xp, term + gamma * (rewards - r_max) / tau, axis)


def _stationary(
    xp: Namespace, logq: Array, log_r: Array, rewards: Array, gamma: Array, axis: int
) -> tuple[Array, Array]:
    """Maximiser of L_gamma in log space and the per-row "defined" flag."""
    support = logq > -xp.inf
    # gamma < 1: logq + (log r - max log r) / (1 - gamma), the shift keeping gamma -> 1 stable.
    log_r_s = xp.where(support, log_r, -xp.inf)
    m = xp.max(log_r_s, axis=axis, keepdims=True)
    d = log_r_s - xp.where(m > -xp.inf, m, 0.0)  # <= 0, or -inf (off support or r = 0)
    below = gamma < 1.0
    scaled = d / xp.where(below, 1.0 - gamma, 1.0)
    u_below = logq + scaled  # -inf off the support: logq = -inf and scaled = -inf
    # gamma = 1: mu restricted to the argmax set of r on the support (the gamma -> 1 limit).
    r_s = xp.where(support, rewards, -xp.inf)
    r_max = xp.max(r_s, axis=axis, keepdims=True)
    u_one = xp.where(support & (rewards == r_max), logq, -xp.inf)
    return _normalize(xp, xp.where(below, u_below, u_one), axis)


def _kl_p1_pgamma(
    xp: Namespace, logq: Array, log_r: Array, rewards: Array, gamma: Array, tau: Array, axis: int
) -> Array:
    """KL(p_1 || p_gamma) along ``axis`` (reduced): +inf where p_gamma misses an outcome."""
    one = xp.ones_like(gamma) if hasattr(gamma, "shape") else 1.0
    lp1, _ = _geometric(xp, logq, log_r, rewards, one, tau, axis)
    lpg, _ = _geometric(xp, logq, log_r, rewards, gamma, tau, axis)
    # p_1 = softmax(r / tau) > 0 on every outcome, so KL is +inf as soon as p_gamma is 0 anywhere.
    lpg, lp1 = xp.broadcast_arrays(lpg, lp1)
    present = lpg > -xp.inf
    terms = xp.where(present, xp.exp(lp1) * (lp1 - xp.where(present, lpg, 0.0)), 0.0)
    kl = xp.sum(terms, axis=axis)
    kl = xp.where(kl > 0.0, kl, 0.0)  # KL >= 0; rounding may dip below 0
    kl = xp.where(xp.all(present, axis=axis), kl, xp.inf)
    return xp.where(squeeze_row(xp, gamma, axis) == 1.0, 0.0, kl)


def _raise_if_undefined(ok: Array, what: str) -> None:
    if is_concrete(ok) and not bool(namespace(ok).all(ok)):
        raise ValueError(what)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def target_log_probs(
    logq: Array,
    rewards: Array,
    gamma: float | Array,
    tau: float | Array,
    *,
    axis: int = -1,
) -> Array:
    r"""The paper's geometric target distribution ``p_gamma`` on a finite support, in log space.

    .. math::
        \log p_\gamma = (1-\gamma)\log\mu + f_\gamma(r) - \mathrm{LSE}(\ldots), \qquad
        f_\gamma(r) = (1-\gamma)\log r + \gamma\, r/\tau,

    i.e. ``p_gamma ∝ p_0**(1 - gamma) * p_1**gamma`` with ``p_0 = mu r / Z_0`` (reward-weighted
    SFT) and ``p_1 = exp(r / tau) / Z_1`` (entropy-regularised RL). It is the unique minimiser of
    ``(1 - gamma) KL(p || p_0) + gamma KL(p || p_1)`` (the paper's Theorem 4.2), the e-geodesic
    (exponential connection) between ``p_0`` and ``p_1`` -- not the Fisher-Rao geodesic that the
    paper's Proposition 4.3 calls it (:ref:`theory-correction-geodesic`). It is *not* what the
    loss ``L_gamma`` trains towards; that is :func:`stationary_log_probs`.

    Limits: at ``gamma = 1`` the terms ``(1 - gamma) log mu`` and ``(1 - gamma) log r`` are 0 even
    where ``logq = -inf`` or ``r = 0`` (the result is ``log softmax(r / tau)``); for
    ``gamma < 1`` an outcome with ``mu r = 0`` has probability 0 (``-inf``).

    Parameters
    ----------
    logq : array, shape (..., K, ...)
        Log-probabilities of the behaviour policy ``mu`` over ``K`` outcomes along ``axis``
        (finite or ``-inf``; need not be normalised).
    rewards : array, same shape as ``logq``
        Rewards ``r >= 0``, read as an unnormalised distribution (0 is an outcome of zero mass).
    gamma : float or array
        In ``[0, 1]``; a number or an array broadcastable to the batch shape (``logq.shape``
        without ``axis``).
    tau : float or array
        Temperature ``> 0``; a number or an array broadcastable to the batch shape.
    axis : int, default -1
        The outcome axis.

    Returns
    -------
    array, shape of ``logq``
        ``log p_gamma``, normalised along ``axis``; float64 when an input is float64, else
        float32.

    Raises
    ------
    ValueError
        Shapes of ``logq`` and ``rewards`` differ; ``logq`` has NaN or ``+inf``; ``rewards``
        negative or not finite; ``gamma`` outside ``[0, 1]``; ``tau <= 0``; or, for
        ``gamma < 1``, a row in which no outcome has both ``logq > -inf`` and ``rewards > 0``
        (``p_0`` does not exist). Data checks run on eager inputs only; under ``jax.jit`` or
        ``torch.compile`` such an undefined row comes back as all ``-inf``.
    TypeError
        ``logq`` or ``rewards`` is not an array.

    References
    ----------
    :ref:`theory-finite-support`; the paper's Definition 4.1, Theorem 4.2, Proposition 4.4.

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import target_log_probs
    >>> logq = np.log(np.array([0.5, 0.3, 0.2]))
    >>> r = np.array([1.0, 2.0, 0.5])
    >>> print(np.round(np.exp(target_log_probs(logq, r, 0.0, 1.0)), 4))  # mu r / Z0
    [0.4167 0.5    0.0833]
    >>> print(np.round(np.exp(target_log_probs(logq, r, 1.0, 1.0)), 4))  # softmax(r / tau)
    [0.2312 0.6285 0.1402]
    """
    xp, logq, rewards, axis, g, t = _geometric_inputs(logq, rewards, gamma, tau, axis)
    out, ok = _geometric(xp, logq, log_abs(xp, rewards), rewards, g, t, axis)
    _raise_if_undefined(
        ok,
        "target_log_probs: for gamma < 1 every row needs an outcome with logq > -inf and "
        "rewards > 0 (p_0 = mu r / Z_0 does not exist otherwise); found a row without one",
    )
    return out


def stationary_log_probs(
    logq: Array,
    rewards: Array,
    gamma: float | Array,
    *,
    axis: int = -1,
) -> Array:
    r"""The policy that maximises the loss ``L_gamma`` on a finite support, in log space.

    .. math::
        \pi_\gamma = \arg\max_\pi \sum_y \mu(y)\, r(y)\,
                     \frac{(\pi(y)/\mu(y))^\gamma - 1}{\gamma}
                   \;\propto\; \mu\, r^{1/(1-\gamma)} \quad (\gamma < 1),

    and, at ``gamma = 1`` (the ``gamma -> 1`` limit), ``mu`` restricted to the argmax set of ``r``
    among the outcomes with ``mu > 0``, renormalised. At ``gamma = 0`` the loss is
    ``sum mu r log(pi / mu)`` and the maximiser is ``mu r / Z_0``, the paper's ``p_0``.

    This corrects the paper (:ref:`theory-correction-target`): ``tau`` does not enter the loss, and
    the exponent of ``mu`` stays 1, so for ``0 < gamma < 1`` the maximiser differs from the
    geometric target :func:`target_log_probs` (it sharpens ``r`` instead of moving away from
    ``mu``). Computed as ``logq + (log r - max log r) / (1 - gamma) - LSE(...)``, stable as
    ``gamma -> 1``.

    Parameters
    ----------
    logq, rewards, gamma, axis
        As in :func:`target_log_probs`.

    Returns
    -------
    array, shape of ``logq``
        ``log pi_gamma`` normalised along ``axis``; outcomes with ``mu r = 0`` (or, at
        ``gamma = 1``, outside the argmax set) are ``-inf``.

    Raises
    ------
    ValueError
        As :func:`target_log_probs` (without ``tau``); a row in which no outcome has both
        ``logq > -inf`` and ``rewards > 0`` (``gamma < 1``) or no outcome has ``logq > -inf``
        (``gamma = 1``) has no unique maximiser (the loss is constant) and raises in eager mode;
        under tracing it comes back as all ``-inf``.
    TypeError
        ``logq`` or ``rewards`` is not an array.

    References
    ----------
    :ref:`theory-finite-support`, :ref:`theory-correction-target`; the first-order condition
    ``r (pi / mu)**(gamma - 1) = lambda`` of the concave program on the simplex.

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import stationary_log_probs
    >>> logq = np.log(np.array([0.5, 0.3, 0.2]))
    >>> r = np.array([1.0, 2.0, 0.5])
    >>> print(np.round(np.exp(stationary_log_probs(logq, r, 0.5)), 4))  # ∝ mu r**2
    [0.2857 0.6857 0.0286]
    >>> print(np.round(np.exp(stationary_log_probs(logq, r, 1.0)), 4))  # argmax of r
    [0. 1. 0.]
    """
    xp, logq, rewards, axis = _support(logq, rewards, axis)
    check_gamma(gamma)
    g = _row(xp, gamma, "gamma", axis, logq)
    out, ok = _stationary(xp, logq, log_abs(xp, rewards), rewards, g, axis)
    _raise_if_undefined(
        ok,
        "stationary_log_probs: found a row in which no outcome has logq > -inf and rewards > 0 "
        "(or, at gamma = 1, no outcome has logq > -inf); the loss is constant there and has no "
        "unique maximiser",
    )
    return out


def bias(
    logq: Array,
    rewards: Array,
    gamma: float | Array,
    tau: float | Array,
    *,
    axis: int = -1,
) -> Array:
    r"""The paper's bias of tempering: ``KL(p_1 || p_gamma)`` on a finite support.

    .. math::
        \mathrm{Bias}(\gamma) = D_{KL}(p_1 \,\|\, p_\gamma)
        = \sum_y p_1(y) \log\frac{p_1(y)}{p_\gamma(y)}, \qquad p_1 = \mathrm{softmax}(r/\tau),

    with ``p_gamma`` the geometric target of :func:`target_log_probs`. It is non-increasing in
    gamma, with derivative ``E_{p_gamma}[h] - E_{p_1}[h] <= 0``, ``h = log(p_1 / p_0)`` (this
    completes the proof of the paper's Theorem 6.2, :ref:`theory-correction-bias`), strictly
    decreasing where ``p_0 != p_1``, 0 at ``gamma = 1``. When some ``r = 0`` or some ``mu = 0``
    (``logq = -inf``), ``p_gamma`` misses an outcome that ``p_1`` charges and the bias is ``+inf``
    for every ``gamma < 1`` (also for rows where ``mu r = 0`` everywhere); it is still 0 at
    ``gamma = 1``.

    Parameters
    ----------
    logq, rewards, gamma, tau, axis
        As in :func:`target_log_probs`.

    Returns
    -------
    array, the batch shape (``logq.shape`` without ``axis``)
        ``KL(p_1 || p_gamma)`` in ``[0, +inf]``, never NaN.

    Raises
    ------
    ValueError, TypeError
        As :func:`target_log_probs` (rows without mass do not raise here: their bias is
        ``+inf`` for ``gamma < 1``).

    References
    ----------
    :ref:`theory-finite-support`; the paper's Definition 6.1 and Theorem 6.2.

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import bias
    >>> logq = np.log(np.array([0.5, 0.3, 0.2]))
    >>> r = np.array([1.0, 2.0, 0.5])
    >>> gammas = np.array([0.0, 0.5, 1.0])  # one gamma per row of a batch of three
    >>> print(np.round(np.asarray(bias(np.tile(logq, (3, 1)), np.tile(r, (3, 1)), gammas, 1.0)), 4))
    [0.0806 0.0192 0.    ]
    >>> print(np.asarray(bias(logq, np.array([1.0, 2.0, 0.0]), 0.5, 1.0)))
    inf
    """
    xp, logq, rewards, axis, g, t = _geometric_inputs(logq, rewards, gamma, tau, axis)
    return _kl_p1_pgamma(xp, logq, log_abs(xp, rewards), rewards, g, t, axis)


def mse(
    logq: Array,
    rewards: Array,
    gamma: float | Array,
    tau: float | Array,
    sigma2: float | Array,
    n: float | Array,
    *,
    axis: int = -1,
) -> Array:
    r"""The paper's bias-variance trade-off ``Bias(gamma)**2 + V(gamma) / n`` (a heuristic).

    .. math::
        \mathrm{MSE}(\gamma) = D_{KL}(p_1 \,\|\, p_\gamma)^2
                             + \frac{1}{n}\, e^{\sigma^2\gamma(2\gamma-1)}

    with the bias of :func:`bias` and the log-normal second moment
    ``V(gamma) = E[w**(2 gamma)]`` of
    :func:`~isreshape_core.lognormal_second_moment`. This is a heuristic, not a mean
    squared error: a KL divergence is squared and added to a second moment (not a variance; the
    variance of ``w**gamma`` is smallest at ``gamma = 0``). Use it for teaching and for rough
    comparisons; the per-batch gamma of the library comes from the ESS (:ref:`theory-gamma-ess`).

    Parameters
    ----------
    logq, rewards, gamma, tau, axis
        As in :func:`bias`.
    sigma2 : float or array
        Variance of the log importance weights, ``>= 0``; a number or broadcastable to the batch
        shape.
    n : float or array
        Sample size, ``> 0``; a number or broadcastable to the batch shape.

    Returns
    -------
    array, the batch shape (``logq.shape`` without ``axis``)
        ``MSE(gamma)`` in ``[0, +inf]`` (``+inf`` wherever the bias is), never NaN.

    Raises
    ------
    ValueError, TypeError
        As :func:`bias`; ``sigma2`` negative or not finite; ``n <= 0`` or not finite.

    References
    ----------
    :ref:`theory-finite-support`; :ref:`theory-lognormal`; the paper's section 6.4.

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import mse
    >>> logq = np.log(np.array([0.5, 0.3, 0.2]))
    >>> r = np.array([1.0, 2.0, 0.5])
    >>> lq, rr = np.tile(logq, (3, 1)), np.tile(r, (3, 1))
    >>> print(np.round(np.asarray(mse(lq, rr, np.array([0.0, 0.5, 1.0]), 1.0, 1.0, 100)), 4))
    [0.0165 0.0104 0.0272]
    """
    xp, logq, rewards, axis, g, t = _geometric_inputs(logq, rewards, gamma, tau, axis)
    s, nn = _mse_params(xp, logq, axis, sigma2, n)
    b = _kl_p1_pgamma(xp, logq, log_abs(xp, rewards), rewards, g, t, axis)
    v = lognormal_second_moment(s, squeeze_row(xp, g, axis))
    return b * b + v / nn


def mse_optimal_gamma(
    logq: Array,
    rewards: Array,
    tau: float | Array,
    sigma2: float | Array,
    n: float | Array,
    *,
    gammas: Sequence[float] | Array | None = None,
    axis: int = -1,
) -> Array:
    r"""The gamma that minimises the heuristic :func:`mse` on a grid, for every row at once.

    .. math::
        \gamma^\star = \arg\min_{\gamma \in G}\;
        D_{KL}(p_1 \,\|\, p_\gamma)^2 + e^{\sigma^2\gamma(2\gamma-1)} / n

    The grid is a new trailing axis of the computation (``len(G) * K`` entries per row) and the
    minimum is taken with ``argmin``: no Python loop over rows or grid points. Ties go to the first
    grid point in the order given. Where the MSE is ``+inf`` at every grid point (some ``r = 0`` or
    ``mu = 0`` and ``1`` not in the grid) the largest grid gamma is returned.

    Parameters
    ----------
    logq, rewards, tau, sigma2, n, axis
        As in :func:`mse`.
    gammas : sequence of float or 1-D array, optional
        The grid, values in ``[0, 1]``; default 101 points ``0, 0.01, ..., 1``.

    Returns
    -------
    array, the batch shape (``logq.shape`` without ``axis``)
        The minimising gamma of each row, in the compute dtype.

    Raises
    ------
    ValueError, TypeError
        As :func:`mse`; ``gammas`` empty, not 1-D or outside ``[0, 1]``.

    References
    ----------
    :ref:`theory-finite-support`; the paper's section 6.4 ("an optimal gamma balances the two").

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import mse_optimal_gamma
    >>> logq = np.log(np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    >>> r = np.array([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])
    >>> print(np.round(np.asarray(mse_optimal_gamma(logq, r, 1.0, 1.0, 100)), 4))
    [0.4  0.29]
    """
    xp, logq, rewards, axis = _support(logq, rewards, axis)
    _check_tau(tau)
    t = squeeze_row(xp, _row(xp, tau, "tau", axis, logq), axis)
    s, nn = _mse_params(xp, logq, axis, sigma2, n)
    dev = array_device(logq)
    if gammas is None:
        grid = xp.linspace(0.0, 1.0, 101, dtype=logq.dtype, device=dev)
    else:
        if not hasattr(gammas, "shape"):
            gammas = xp.asarray(list(gammas), dtype=logq.dtype, device=dev)
        else:
            namespace(logq, gammas)  # one namespace for all arrays
        if gammas.ndim != 1 or gammas.shape[0] == 0:
            raise ValueError(
                f"gammas must be a non-empty 1-D grid of values in [0, 1], got shape "
                f"{tuple(gammas.shape)}"
            )
        check_gamma(gammas, "gammas")
        grid = as_compute_array(xp, gammas, logq.dtype)

    # Layout (..., G, K): outcomes last, the grid just before them.
    lq = xp.expand_dims(xp.moveaxis(logq, axis, -1), axis=-2)
    rw = xp.expand_dims(xp.moveaxis(rewards, axis, -1), axis=-2)
    g = xp.reshape(grid, (1,) * (lq.ndim - 2) + (grid.shape[0], 1))
    tt = xp.expand_dims(xp.expand_dims(t, axis=-1), axis=-1) if t.ndim else t
    b = _kl_p1_pgamma(xp, lq, log_abs(xp, rw), rw, g, tt, lq.ndim - 1)  # (..., G)
    s = xp.expand_dims(s, axis=-1) if s.ndim else s
    nn = xp.expand_dims(nn, axis=-1) if nn.ndim else nn
    total = b * b + lognormal_second_moment(s, grid) / nn  # (..., G)

    idx = xp.argmin(total, axis=-1)
    best = xp.reshape(xp.take(grid, xp.reshape(idx, (-1,)), axis=0), idx.shape)
    all_inf = xp.min(total, axis=-1) == xp.inf
    return xp.where(all_inf, xp.max(grid), best)
