"""Decoupled PPO with an ESS-controlled behaviour correction, for JAX.

The math lives in :func:`isreshape_core.decoupled_ppo_loss_and_grad`; this module registers its
exact gradient with respect to ``logp`` with :func:`jax.custom_jvp`, as
:func:`isreshape_jax.is_reshape_loss` does. See the docs page *When to use IS Reshape*.
"""

from __future__ import annotations

from typing import Any

import jax

from isreshape_core import decoupled_ppo_loss_and_grad

from .loss import as_loss_inputs, exact_gradient_loss

__all__ = ["decoupled_ppo_loss"]


def decoupled_ppo_loss(
    logp: jax.Array,
    logp_prox: jax.Array,
    logq: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    *,
    axis_name: Any = None,
    **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""Decoupled PPO-clip on ``pi/pi_prox`` times an ESS-controlled correction of ``pi_prox/mu``.

    See :func:`isreshape_core.decoupled_ppo_loss_and_grad` for the formula and the options
    (``behaviour``, ``gamma``, ``cap``, ``rho_min``, ``clip_ratio``, ``level``,
    ``loss_agg_mode``, ...). Only ``logp`` carries gradient (a ``custom_jvp``; works under
    ``jit``, ``grad`` and ``vmap``). ``axis_name``: a named data-parallel axis (``shard_map``,
    ``pmap``) over which the correction's gamma or cap and the normalisers become global.

    Returns
    -------
    loss : 0-d array
    metrics : dict of 0-d arrays

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> logp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> logq = jnp.log(jnp.array([[0.25, 0.5]]))
    >>> f = lambda lp: decoupled_ppo_loss(lp, logp, logq, jnp.array([1.0]), gamma=1.0)[0]
    >>> print(jax.grad(f)(logp))  # -c b A
    [[-1.  -0.5]]
    """
    like_logp = "(B, T) or (B,), like logp"
    arrays, mask = as_loss_inputs(
        {
            "logp": (logp, "(B, T) or (B,)"),
            "logp_prox": (logp_prox, like_logp),
            "logq": (logq, like_logp),
            "advantages": (advantages, "(B,) or (B, T)"),
        },
        mask,
    )
    return exact_gradient_loss(decoupled_ppo_loss_and_grad, arrays, mask, axis_name, options)
