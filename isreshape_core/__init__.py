"""isreshape_core: backend-neutral importance-sampling reshaping (array API only)."""

from ._diagnostics import VERDICTS, Diagnostics, diagnose
from ._ess import ess, ess_ratio, gradient_ess
from ._gamma import gamma_closed_form, gamma_ess
from ._lib.reduce import Reducer
from ._lognormal import lognormal_ess_ratio, lognormal_second_moment, lognormal_variance
from ._loss import LOSS_AGG_MODES, LOSS_FORMS, is_reshape_loss_and_grad
from ._metrics import METRIC_MERGE, metric_reduction
from ._objective import (
    objective,
    objective_grad,
    reinforce_objective,
    reinforce_objective_grad,
)
from ._psis import pareto_k_threshold, psis, psis_tail_fit, psis_tail_length
from ._psis_gamma import gamma_combined, gamma_psis, gamma_tail
from ._renyi import log_mean_tempered_weight, renyi_divergence
from ._schedules import cosine_warmup, linear_warmup, sensitivity_guard
from ._select import GAMMA_METHODS, select_gamma
from ._step import step_gamma
from ._targets import bias, mse, mse_optimal_gamma, stationary_log_probs, target_log_probs
from ._trust_region import (
    BEHAVIOUR_CORRECTIONS,
    decoupled_ppo_loss_and_grad,
    ess_truncation_cap,
)
from ._weights import LEVELS, log_weights, tempered_weights

__version__ = "0.1.0.dev0"

__all__ = [
    "BEHAVIOUR_CORRECTIONS",
    "GAMMA_METHODS",
    "LEVELS",
    "LOSS_AGG_MODES",
    "LOSS_FORMS",
    "METRIC_MERGE",
    "VERDICTS",
    "Diagnostics",
    "Reducer",
    "bias",
    "cosine_warmup",
    "decoupled_ppo_loss_and_grad",
    "diagnose",
    "ess",
    "ess_ratio",
    "ess_truncation_cap",
    "gamma_closed_form",
    "gamma_combined",
    "gamma_ess",
    "gamma_psis",
    "gamma_tail",
    "gradient_ess",
    "is_reshape_loss_and_grad",
    "linear_warmup",
    "log_mean_tempered_weight",
    "log_weights",
    "lognormal_ess_ratio",
    "lognormal_second_moment",
    "lognormal_variance",
    "metric_reduction",
    "mse",
    "mse_optimal_gamma",
    "objective",
    "objective_grad",
    "pareto_k_threshold",
    "psis",
    "psis_tail_fit",
    "psis_tail_length",
    "reinforce_objective",
    "reinforce_objective_grad",
    "renyi_divergence",
    "select_gamma",
    "sensitivity_guard",
    "stationary_log_probs",
    "step_gamma",
    "target_log_probs",
    "tempered_weights",
]
