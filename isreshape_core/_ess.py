"""Effective sample size of tempered importance weights ``w**gamma`` (:ref:`theory-ess`)."""

from __future__ import annotations

from typing import Any

from ._lib.checks import check_gamma
from ._lib.inputs import broadcast_rewards, prepare_log_weights
from ._lib.namespace import Array, Namespace
from ._lib.numerics import log_abs, shift_by_max, tempered_log_weights
from ._lib.reduce import Reducer, reduce_sum, sample_count
from ._lib.rows import row_param
from ._lib.tracing import poison, traced_bad_rows

__all__ = ["ess", "ess_ratio", "gradient_ess", "kish_ess_from_log", "kish_from_sums"]


def kish_from_sums(xp: Namespace, s1: Array, s2: Array, n_pos: Array) -> Array:
    """Kish's ESS ``s1^2 / s2`` from the sums of weights shifted by their max (so ``s2 >= 1``,
    the max's own ``e^0``, wherever ``n_pos > 0``, and ``s1 = s2 = 0`` where ``n_pos = 0``),
    clipped to ``[1, n_pos]`` (rounding can exceed the number of positive weights); 0 where
    ``n_pos = 0``."""
    value = s1 * s1 / xp.maximum(s2, 1.0)  # a dummy 1 only where s2 = 0: no 0 / 0
    return xp.minimum(xp.maximum(value, 1.0), n_pos)


def kish_ess_from_log(xp: Namespace, z: Array, axis: int, reducer: Reducer | None = None) -> Array:
    """Kish's ESS ``(sum e^z)^2 / sum e^(2z)`` along ``axis`` of log weights ``z`` (``-inf`` = 0).

    Shifted by the row maximum, so no term overflows; see :func:`kish_from_sums` for the clip.
    With a ``reducer`` the sums run over every shard of the samples.
    """
    e = xp.exp(shift_by_max(xp, z, axis, reducer)[0])
    s1 = reduce_sum(xp, e, axis, reducer)
    s2 = reduce_sum(xp, e * e, axis, reducer)
    n_pos = reduce_sum(xp, xp.astype(z > -xp.inf, z.dtype), axis, reducer)
    return kish_from_sums(xp, s1, s2, n_pos)


def _tempered_kish(
    log_w: Array, gamma: Any, axis: int, mask: Array | None, reducer: Reducer | None
) -> tuple[Namespace, Array, Array | None, int, Array]:
    """Validated ``(xp, l, mask, axis)`` and Kish's ESS of ``w**gamma``, NaN on invalid traced
    rows. The log weights are taken relative to their max, as :func:`gamma_ess` takes them (the
    same exponents, bit for bit)."""
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_gamma(gamma)
    g = row_param(xp, gamma, axis, l, "gamma")
    bad = traced_bad_rows(xp, l, axis, gamma, reducer=reducer)
    shifted = shift_by_max(xp, l, axis, reducer)[0]
    value = kish_ess_from_log(xp, tempered_log_weights(xp, shifted, g), axis, reducer)
    return xp, l, mask, axis, poison(xp, value, bad)


def ess(
    log_w: Array,
    gamma: Any = 1.0,
    *,
    axis: int = -1,
    mask: Array | None = None,
    reducer: Reducer | None = None,
) -> Array:
    r"""Kish's effective sample size of the tempered weights ``w**gamma``.

    .. math::

        \mathrm{ESS}(\gamma) = \frac{(\sum_i w_i^\gamma)^2}{\sum_i w_i^{2\gamma}}
        = \exp\big(2\,\mathrm{LSE}(\gamma l) - \mathrm{LSE}(2\gamma l)\big)

    computed from ``l = log w`` without forming ``w``. Properties (:ref:`theory-ess`):
    ``1 <= ESS <= n``; invariant to adding a constant to ``l``; non-increasing in ``gamma``.
    A sample with ``l = -inf`` (weight 0) or masked out never counts, at ``gamma = 0`` included
    (``0**0`` is not 1 here), so ``ESS(0)`` is the number of positive weights.

    Parameters
    ----------
    log_w : array ``(..., n, ...)``
        Log importance weights, real floating (bool and integer arrays raise); ``-inf`` is
        weight 0. NaN and ``+inf`` raise on eager inputs; traced (``jax.jit``,
        ``torch.compile``), where nothing can raise, the row's result is NaN.
    gamma : float or array broadcastable to the batch shape (``log_w.shape`` without ``axis``)
        Tempering exponent in ``[0, 1]``.
    axis : int
        The sample axis; the other axes are batch axes.
    mask : bool array broadcastable to ``log_w.shape``, optional
        False removes a sample from every statistic.
    reducer : Reducer, optional
        Where the samples along ``axis`` are sharded over processes (data parallelism): combines
        the partial sums and maxima of every shard (:class:`isreshape_core.Reducer`).

    Returns
    -------
    array, the batch shape
        ESS in the compute dtype (float32 or float64). A row without a positive weight (fully
        masked or all ``-inf``) gives 0.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.log(np.array([1.0, 1.0, 2.0, 4.0]))
    >>> print(np.round(ess(l), 4))  # (1+1+2+4)^2 / (1+1+4+16)
    2.9091
    >>> print(ess(l, 0.0))
    4.0
    """
    return _tempered_kish(log_w, gamma, axis, mask, reducer)[-1]


def ess_ratio(
    log_w: Array,
    gamma: Any = 1.0,
    *,
    axis: int = -1,
    mask: Array | None = None,
    reducer: Reducer | None = None,
) -> Array:
    """``ESS(gamma) / n``, with ``n`` the number of unmasked samples along ``axis``.

    Lies in ``[1/n, 1]``; 0 for a row without a positive weight (a fully masked row included).
    See :func:`ess` for the parameters.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 50.0]])
    >>> print(np.round(ess_ratio(l), 4))
    [1.   0.25]
    """
    xp, l, mask, axis, value = _tempered_kish(log_w, gamma, axis, mask, reducer)
    n = sample_count(xp, l, mask, axis, reducer)
    return value / xp.where(n > 0, n, 1.0)


def gradient_ess(
    log_w: Array,
    rewards: Array,
    gamma: Any = 1.0,
    *,
    axis: int = -1,
    mask: Array | None = None,
) -> Array:
    r"""Kish's ESS of the weights that enter the gradient, ``w**gamma * |r|``.

    .. math::

        \mathrm{ESS}_\nabla(\gamma) = \frac{(\sum_i w_i^\gamma |r_i|)^2}{\sum_i w_i^{2\gamma} r_i^2}

    The loss's gradient is ``-mean(r w^gamma grad log pi)`` (:ref:`theory-objective`):
    samples with ``r = 0`` carry no gradient, and large ``|r|`` concentrates it even at
    ``gamma = 0``. ``ESS_grad(0)`` is the ESS of the rewards alone; ``ESS_grad`` need not be
    monotone in ``gamma`` (:ref:`theory-gradient-ess`).

    Parameters
    ----------
    log_w : array
        Log importance weights (see :func:`ess`).
    rewards : array broadcastable to ``log_w.shape``
        Rewards or advantages (signed allowed; only ``|r|`` enters).
    gamma, axis, mask
        As in :func:`ess`.

    Returns
    -------
    array, the batch shape
        In ``[1, n]``; 0 where no sample has ``w > 0`` and ``r != 0``.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.zeros(4)
    >>> print(gradient_ess(l, np.array([1.0, -1.0, 0.0, 0.0])))
    2.0
    """
    xp, l, _, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_gamma(gamma)
    r = broadcast_rewards(xp, rewards, l)
    g = row_param(xp, gamma, axis, l, "gamma")
    bad = traced_bad_rows(xp, l + xp.abs(r), axis, gamma)
    l = shift_by_max(xp, l, axis)[0]
    value = kish_ess_from_log(xp, tempered_log_weights(xp, l, g) + log_abs(xp, r), axis)
    return poison(xp, value, bad)
