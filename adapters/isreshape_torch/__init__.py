"""isreshape_torch: the IS Reshape loss for PyTorch (autograd, torch.compile, torch.distributed).

A thin layer over :mod:`isreshape_core`: :func:`is_reshape_loss` and :class:`ISReshapeLoss` call
the core's value-plus-derivative on detached tensors and register the exact gradient with
autograd; :class:`TorchDistributedReducer` merges the statistics of data-parallel ranks.
"""

from isreshape_core.extend import require

require("torch", ">=2.5", tested="2.13.0", integration=__name__, extra="torch")

from .distributed import TorchDistributedReducer, resolve_reducer
from .loss import ISReshapeLoss, is_reshape_loss
from .trust_region import decoupled_ppo_loss

__all__ = [
    "ISReshapeLoss",
    "TorchDistributedReducer",
    "decoupled_ppo_loss",
    "is_reshape_loss",
    "resolve_reducer",
]
