"""isreshape_cupy: the IS Reshape loss on CuPy arrays, with fused CUDA kernels.

:func:`is_reshape_loss_and_grad` returns the loss, its exact gradient with respect to ``logp``
(CuPy has no autograd) and the metrics. On CuPy arrays the token-level work runs as two fused
kernels (:mod:`isreshape_cupy.kernels`); gamma and the metrics come from :mod:`isreshape_core`.
Importing this package needs neither CuPy nor a GPU.
"""

from .loss import is_reshape_loss_and_grad

__all__ = ["is_reshape_loss_and_grad"]
