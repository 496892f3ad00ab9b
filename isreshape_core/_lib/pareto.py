"""Constants and index rules of the generalised Pareto fit of PSIS (:ref:`theory-psis`).

Shared by the portable PSIS (``_psis.py``) and its NumPy kernel (``_psis_numpy.py``), which
must compute the same numbers: Zhang & Stephens (2009) for the grid, and the weakly informative
prior on ``k`` of Vehtari et al. (2024, appendix; arviz-stats ``_gpdfit``: ``prior_bs = 3``,
``prior_k = 10``).
"""

from __future__ import annotations

from .namespace import Array

__all__ = ["MIN_TAIL", "PRIOR_BS", "grid_size", "quartile_index", "with_prior"]

#: Zhang & Stephens' grid constant: ``theta_j = 1/x_M + (1 - sqrt(m/(j - 1/2)))/(PRIOR_BS x*)``.
PRIOR_BS = 3.0
#: Weight and mean of the prior on ``k`` (in prior draws).
_PRIOR_K = 10.0
_PRIOR_K_MEAN = 0.5
#: Fewest tail draws for a fit (R ``loo``: ``enough_tail_samples``; arviz-stats raises below it).
MIN_TAIL = 5


def grid_size(tail_len: int) -> int:
    """Number ``m = 30 + floor(sqrt(M))`` of grid points of the fit to a tail of ``M`` draws."""
    return 30 + int(tail_len**0.5)


def quartile_index(tail_len: int) -> int:
    """0-based index of the first quartile ``x*`` of the ``M`` sorted exceedances
    (``floor(M/4 + 1/2)``, 1-based, as in arviz-stats' ``_gpdfit``)."""
    return int(tail_len / 4 + 0.5) - 1


def with_prior(k_raw: Array, tail_len: int) -> Array:
    """The posterior ``k_hat = (M k + 10 * 0.5) / (M + 10)`` from the fitted ``k``."""
    return (tail_len * k_raw + _PRIOR_K * _PRIOR_K_MEAN) / (tail_len + _PRIOR_K)
