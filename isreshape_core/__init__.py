"""isreshape_core: backend-neutral importance-sampling reshaping (array API only)."""

from .diagnostics import VERDICTS, Diagnostics, diagnose
from .ess import ess, ess_ratio, gradient_ess
from .gamma import GAMMA_METHODS, gamma_closed_form, gamma_ess, select_gamma
from .schedules import cosine_warmup, linear_warmup, sensitivity_guard
from .weights import LEVELS, log_weights

__version__ = "0.1.0.dev0"

__all__ = [
    "GAMMA_METHODS",
    "LEVELS",
    "VERDICTS",
    "Diagnostics",
    "cosine_warmup",
    "diagnose",
    "ess",
    "ess_ratio",
    "gamma_closed_form",
    "gamma_ess",
    "gradient_ess",
    "linear_warmup",
    "log_weights",
    "select_gamma",
    "sensitivity_guard",
]
