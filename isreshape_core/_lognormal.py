"""The log-normal model of importance weights (:ref:`theory-lognormal`).

Under the paper's Assumption 6.3 the log weight ``l = log w`` is ``Normal(-sigma2/2, sigma2)``, so
that ``E_mu[w] = 1``. Then ``w**gamma`` is log-normal with log-mean ``-gamma*sigma2/2`` and
log-variance ``gamma**2 * sigma2``, and every moment has a closed form:

- ``E[w**gamma]      = exp(sigma2 * gamma * (gamma - 1) / 2)``
- ``E[w**(2*gamma)]  = exp(sigma2 * gamma * (2*gamma - 1))``   (the second moment, paper's ``V``)
- ``ESS_gamma / n   -> E[w**gamma]**2 / E[w**(2*gamma)] = exp(-sigma2 * gamma**2)``
- ``Var(w**gamma)    = exp(sigma2 * gamma * (gamma - 1)) * expm1(sigma2 * gamma**2)``

Every function accepts Python numbers or arrays for ``sigma2`` and ``gamma`` (broadcast against each
other). With two Python numbers the result is a Python ``float``; otherwise it is an array of the
arguments' namespace, on their device, in at least float32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from ._lib.checks import check_gamma, check_in_interval
from ._lib.namespace import Array, Namespace, array_device, namespace

__all__ = ["lognormal_ess_ratio", "lognormal_second_moment", "lognormal_variance"]


def _common_arrays(sigma2: Any, gamma: Any) -> tuple[Namespace | None, Any, Any]:
    """Validate; return ``(None, float, float)`` for two numbers, else ``(xp, array, array)``."""
    check_in_interval(sigma2, "sigma2", 0.0, meaning="the variance of the log weights")
    check_gamma(gamma)
    # NumPy scalars are numbers here (they have a ``shape`` but no array namespace).
    sigma2, gamma = (float(a) if isinstance(a, numbers.Real) else a for a in (sigma2, gamma))
    arrays = [a for a in (sigma2, gamma) if not isinstance(a, float)]
    if not arrays:
        return None, sigma2, gamma
    xp = namespace(*arrays)
    dtype = xp.float64 if any(a.dtype == xp.float64 for a in arrays) else xp.float32
    dev = array_device(arrays[0])
    out = []
    for a in (sigma2, gamma):
        if not isinstance(a, float):
            out.append(a if a.dtype == dtype else xp.astype(a, dtype))
        else:
            out.append(xp.asarray(a, dtype=dtype, device=dev))
    return xp, out[0], out[1]


def _exp(xp: Namespace | None, e: Any) -> Any:
    """``exp(e)``, ``+inf`` past the largest finite value (no overflow warning)."""
    if xp is None:
        try:
            return math.exp(e)
        except OverflowError:
            return math.inf
    log_max = math.log(float(xp.finfo(e.dtype).max))
    over = e > log_max
    return xp.where(over, xp.inf, xp.exp(xp.where(over, 0.0, e)))


def _apply(sigma2: Any, gamma: Any, exponent: Callable[[Any, Any], Any]) -> Any:
    xp, s, g = _common_arrays(sigma2, gamma)
    return _exp(xp, exponent(s, g))


def lognormal_ess_ratio(sigma2: float | Array, gamma: float | Array) -> float | Array:
    r"""ESS ratio of tempered weights under the log-normal model: ``exp(-sigma2 * gamma**2)``.

    .. math:: \frac{\mathrm{ESS}_\gamma}{n} \to \frac{E[w^\gamma]^2}{E[w^{2\gamma}]}
              = e^{-\sigma^2 \gamma^2}, \qquad \log w \sim N(-\sigma^2/2, \sigma^2).

    The ratio does not depend on the mean of ``log w``; it is the population limit of Kish's ESS
    divided by ``n``, and the model behind the closed-form gamma (:ref:`theory-closed-form`).

    Parameters
    ----------
    sigma2 : float or array
        Variance of the log importance weights, ``>= 0``.
    gamma : float or array
        Tempering exponent in ``[0, 1]``; broadcast against ``sigma2``.

    Returns
    -------
    float or array
        ``exp(-sigma2 * gamma**2)`` in ``(0, 1]``, of the broadcast shape of the arguments (a
        Python float when both are Python numbers).

    Raises
    ------
    ValueError
        ``sigma2`` negative or not finite, or ``gamma`` outside ``[0, 1]`` (eager inputs).

    References
    ----------
    :ref:`theory-lognormal`; the paper's Theorem 7.2.

    Examples
    --------
    A Python float for two numbers, an array of their namespace otherwise:

    >>> import numpy as np
    >>> from isreshape_core import lognormal_ess_ratio
    >>> print(round(lognormal_ess_ratio(2.0, 0.5), 4))
    0.6065
    >>> print(np.round(np.asarray(lognormal_ess_ratio(np.array([0.0, 1.0, 4.0]), 1.0)), 4))
    [1.     0.3679 0.0183]
    """
    return _apply(sigma2, gamma, lambda s, g: -(s * g * g))


def lognormal_second_moment(sigma2: float | Array, gamma: float | Array) -> float | Array:
    r"""Second moment of tempered weights under the log-normal model, the paper's ``V(gamma)``.

    .. math:: V(\gamma) = E_\mu[w^{2\gamma}] = e^{\sigma^2 \gamma (2\gamma - 1)},
              \qquad \log w \sim N(-\sigma^2/2, \sigma^2) \ (\text{so } E_\mu[w] = 1).

    It is smallest at ``gamma = 1/4`` (value ``exp(-sigma2/8)``) and increases on ``[1/4, 1]``.

    This is a second moment, not a variance: ``Var(w**gamma) = E[w**(2 gamma)] - E[w**gamma]**2``
    (see :func:`lognormal_variance`) is 0 at ``gamma = 0``, its smallest value, and the relative
    variance ``Var(w**gamma) / E[w**gamma]**2 = exp(sigma2 gamma**2) - 1`` grows on all of
    ``[0, 1]``. (For weights with ``log w ~ N(0, sigma2)`` instead, the variance is
    ``exp(sigma2 gamma**2) (exp(sigma2 gamma**2) - 1)``, smallest at ``gamma = 0`` too.) The paper's
    trade-off ``MSE(gamma) = Bias(gamma)**2 + V(gamma)/n`` therefore uses ``V`` as a proxy for the
    variance of the weights: it is a heuristic, not an exact mean squared error.

    Parameters
    ----------
    sigma2, gamma : float or array
        As in :func:`lognormal_ess_ratio`, which also says what raises and when the result is a
        Python float.

    Returns
    -------
    float or array
        ``exp(sigma2 * gamma * (2 gamma - 1))``, ``+inf`` where it overflows the dtype.

    References
    ----------
    :ref:`theory-lognormal`; the paper's Theorem 6.4 and Corollary 6.5; its Theorem 5.3's second
    moment ``E[w**(2 gamma)] = exp((2 gamma - 1) D_{2 gamma})`` (:ref:`theory-renyi`).

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core import lognormal_second_moment
    >>> g = np.array([0.0, 0.25, 0.5, 1.0])
    >>> print(np.round(np.asarray(lognormal_second_moment(1.0, g)), 4))
    [1.     0.8825 1.     2.7183]
    """
    return _apply(sigma2, gamma, lambda s, g: s * g * (2.0 * g - 1.0))


def lognormal_variance(sigma2: float | Array, gamma: float | Array) -> float | Array:
    r"""Variance of tempered weights under the log-normal model.

    .. math:: \mathrm{Var}_\mu(w^\gamma) = E[w^{2\gamma}] - E[w^\gamma]^2
              = e^{\sigma^2\gamma(\gamma-1)}\,\bigl(e^{\sigma^2\gamma^2} - 1\bigr),
              \qquad \log w \sim N(-\sigma^2/2, \sigma^2).

    It is 0 at ``gamma = 0`` (the smallest possible value: ``w**0 = 1``). For ``sigma2`` up to
    about 24.8 it is increasing on ``[0, 1]``; for larger ``sigma2`` it first rises and dips again
    below ``gamma = 1/4`` (the factor ``exp(sigma2 gamma (gamma - 1))`` shrinks the weights)
    before it grows. Computed as ``exp(sigma2 gamma (2 gamma - 1) + log(-expm1(-sigma2 gamma**2)))``
    so that no ``0 * inf`` arises for large ``sigma2``.

    Parameters
    ----------
    sigma2, gamma : float or array
        As in :func:`lognormal_second_moment`.

    Returns
    -------
    float or array
        ``Var(w**gamma) >= 0``, ``+inf`` where it overflows the dtype.

    References
    ----------
    :ref:`theory-lognormal` (the variance is smallest at ``gamma = 0``, so ``MSE = Bias**2 +
    V/n`` is a heuristic); moments of the log-normal distribution.

    Examples
    --------
    The second moment less the squared mean ``E[w**gamma] = exp(sigma2 gamma (gamma - 1) / 2)``:

    >>> import numpy as np
    >>> from isreshape_core import lognormal_second_moment, lognormal_variance
    >>> g = np.array([0.0, 0.5, 1.0])
    >>> v = lognormal_variance(1.0, g)
    >>> print(np.round(v, 4), np.allclose(v, lognormal_second_moment(1.0, g) - np.exp(g * (g - 1))))
    [0.     0.2212 1.7183] True
    """
    xp, s, g = _common_arrays(sigma2, gamma)
    b = s * g * g
    if xp is None:
        if b == 0.0:
            return 0.0
        return _exp(None, s * g * (2.0 * g - 1.0) + math.log(-math.expm1(-b)))
    positive = b > 0
    log_gap = xp.log(xp.where(positive, -xp.expm1(-b), 1.0))  # log(1 - exp(-b)), b > 0 only
    return xp.where(positive, _exp(xp, s * g * (2.0 * g - 1.0) + log_gap), 0.0)
