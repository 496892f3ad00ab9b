"""For adapters and framework integrations: the loss pipeline's stages and the checks they reuse.

Not needed for ordinary use: :func:`isreshape_core.is_reshape_loss_and_grad` and the framework
adapters (``isreshape_torch``, ``isreshape_jax``, ``isreshape_cupy``) run the whole pipeline. A
new adapter (another framework, a fused kernel, a trainer integration) builds on the names
below, so that it rejects the same inputs with the same messages as the core and holds no loss
math of its own. As ``jax.extend`` does for JAX, this module names what such code may rely on;
the modules it imports from are private and may change.

Array types

- :data:`Array`: the type alias of an array of any array-API namespace (for annotations).
- :func:`array_device`: the device of an array, for ``xp.asarray(..., device=...)``.
- :func:`is_array`: whether an option is an array rather than a number (without asking a
  number, which ``torch.compile`` may trace as a symbolic float, for a shape).

Checks

- :func:`require`: the installed version of a framework, checked against the supported range
  (an ``ImportError`` naming the range and the pip extra otherwise).
- :func:`check_loss_options`: the choices among names of the loss (``level``,
  ``loss_agg_mode``, ``form``, a gamma method), without any array (a module's constructor).
- :func:`check_loss_arguments`: every boundary check of the loss on its arguments.
- :func:`check_logq`: refuses ``logq = +inf`` (a probability above 1) on eager inputs.
- :func:`check_choice`: a value among string choices, the error naming the argument (an
  integration's config field, e.g. ``is_reshape_level``).
- :func:`check_rho_min`: a target ESS ratio in ``(0, 1]``, the error naming the argument.

Stages of the loss (:func:`isreshape_core.is_reshape_loss_and_grad`)

- :func:`split_loss_options`: the loss's named options, with defaults, apart from the options of
  the gamma selection.
- :func:`prepare_loss_inputs`: the checked inputs in the compute dtype, shapes ``(B, T)``.
- :func:`units_from_row_sums`: the units (sequences) of a fused token pass, from its per-sequence
  sums.
- :func:`row_coefficients`: each sequence's aggregation coefficient times its reward,
  ``sum_t c_bt r_bt``, from the same sums.
- :func:`unit_loss`: stage 2, gamma of every unit, the loss, the unit gradients and the metrics.
- :class:`UnitGradient` and :func:`token_gradient`: stage 3, the gradient per unit (what
  ``is_reshape_loss_and_grad(..., gradient="units")`` returns) and its scatter to the tokens,
  times a cotangent: an autograd wrapper's backward pass.

Examples
--------
>>> import numpy as np
>>> from isreshape_core.extend import check_loss_options, prepare_loss_inputs
>>> check_loss_options(level="sequence", loss_agg_mode="token-mean", gamma="ess")
>>> xp, logp, logq, r, mask, one_d = prepare_loss_inputs(
...     np.zeros(3), np.zeros(3), np.ones(3), None)
>>> print(logp.shape, r.shape, mask.shape, one_d)
(3, 1) (3, 1) (3, 1) True
"""

from __future__ import annotations

from ._lib.checks import check_choice, check_rho_min
from ._lib.namespace import Array, array_device, is_array
from ._loss import (
    UnitGradient,
    check_loss_arguments,
    check_loss_options,
    prepare_loss_inputs,
    row_coefficients,
    split_loss_options,
    token_gradient,
    unit_loss,
    units_from_row_sums,
)
from ._versions import require
from ._weights import check_logq

__all__ = [
    "Array",
    "UnitGradient",
    "array_device",
    "check_choice",
    "check_logq",
    "check_loss_arguments",
    "check_loss_options",
    "check_rho_min",
    "is_array",
    "prepare_loss_inputs",
    "require",
    "row_coefficients",
    "split_loss_options",
    "token_gradient",
    "unit_loss",
    "units_from_row_sums",
]
