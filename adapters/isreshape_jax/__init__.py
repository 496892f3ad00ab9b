"""isreshape_jax: the IS Reshape loss for JAX (custom_jvp, jit, vmap, collectives on a mesh axis).

A thin layer over :mod:`isreshape_core`: :func:`is_reshape_loss` calls the core's
value-plus-derivative and registers the exact gradient with :func:`jax.custom_jvp`;
:class:`AxisReducer` merges the statistics of data-parallel shards with ``lax.psum`` /
``lax.pmax`` over a named axis (``shard_map``, ``pmap``).
"""

from isreshape_core.extend import require

require("jax", ">=0.4.35", tested="0.10.2", integration=__name__, extra="jax")

from .loss import AxisReducer, is_reshape_loss
from .trust_region import decoupled_ppo_loss

__all__ = ["AxisReducer", "decoupled_ppo_loss", "is_reshape_loss"]
