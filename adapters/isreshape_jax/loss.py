"""The IS Reshape loss for JAX: the core's value and derivative wired in through ``custom_jvp``.

The math lives in :func:`isreshape_core.is_reshape_loss_and_grad`; this module calls it on the
inputs and registers its exact gradient with respect to ``logp`` as a :func:`jax.custom_jvp`
rule: the tangent of the loss is ``sum(grad_logp * logp_dot)``, linear in
``logp_dot``, so reverse mode (``jax.grad``, ``jax.value_and_grad``, ``jax.vjp``) follows by
transposition. Nothing is pulled to the host, so the loss runs under ``jax.jit``, ``jax.vmap``,
inside ``optax`` training steps and, with ``axis_name``, inside ``shard_map`` or ``pmap`` over a
data-parallel mesh axis, where :class:`AxisReducer` merges the partial statistics with
``lax.psum`` / ``lax.pmax``.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isreshape_core import is_reshape_loss_and_grad

__all__ = ["AxisReducer", "is_reshape_loss"]

AxisName = Hashable | tuple[Hashable, ...]


class AxisReducer:
    """A :class:`isreshape_core.Reducer` over a named JAX mesh axis (``psum`` / ``pmax``).

    Inside ``jax.shard_map``, ``jax.pmap`` or ``jax.vmap(..., axis_name=...)``, ``sum(x)`` and
    ``max(x)`` return the element-wise sum and maximum of the shards' partial results ``x``
    over ``axis_name`` (``lax.psum``, ``lax.pmax``), so that the core's mergeable statistics
    (counts, sums of shifted exponentials, maxima: :ref:`theory-groups`) are those of the global
    batch. ``x`` passes through ``lax.stop_gradient`` first: statistics carry no gradient.

    Parameters
    ----------
    axis_name : hashable or tuple of hashables
        The data-parallel mesh axis (or axes), as named in the mesh / ``pmap`` / ``vmap``.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> reducer = AxisReducer("i")
    >>> out = jax.vmap(lambda x: (reducer.sum(x), reducer.max(x)), axis_name="i")(
    ...     jnp.array([1.0, 4.0, 2.0]))
    >>> print(np.asarray(out[0]), np.asarray(out[1]))
    [7. 7. 7.] [4. 4. 4.]
    """

    def __init__(self, axis_name: AxisName) -> None:
        _check_axis_name(axis_name)
        self.axis_name = axis_name

    def sum(self, x: jax.Array) -> jax.Array:
        """Element-wise sum of ``x`` over the shards of ``axis_name``."""
        return lax.psum(lax.stop_gradient(x), self.axis_name)

    def max(self, x: jax.Array) -> jax.Array:
        """Element-wise maximum of ``x`` over the shards of ``axis_name``."""
        return lax.pmax(lax.stop_gradient(x), self.axis_name)

    def __repr__(self) -> str:
        return f"AxisReducer(axis_name={self.axis_name!r})"


def _check_axis_name(axis_name: Any) -> None:
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or any(n is None or not isinstance(n, Hashable) for n in names):
        raise TypeError(
            "axis_name must be a mesh axis name (e.g. 'data') or a non-empty tuple of names, "
            f"got {axis_name!r}"
        )


def _as_jax_array(value: Any, name: str, shape_hint: str) -> jax.Array:
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return jnp.asarray(value)
    extra = " (rewards are required: there is no r = 1 default)" if name == "rewards" else ""
    raise TypeError(
        f"{name} must be a jax.Array (or NumPy array) of shape {shape_hint}, got "
        f"{type(value).__name__}{extra}"
    )


def _varying_axes(x: jax.Array) -> frozenset:
    """The mesh axes over which ``x`` is typed as varying inside ``shard_map`` (empty elsewhere:
    outside a mesh, under ``pmap``, or with ``check_vma=False``)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
    vma = getattr(aval, "vma", None)  # jax < 0.10
    if vma is None:  # jax >= 0.10: ShapedArray.manual_axis_type.varying
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(dynamic, static)``: array-valued options travel as arguments of the ``custom_jvp``
    function (they may be tracers of an enclosing ``jit``/``grad``); the rest are closed over."""
    dynamic = {k: v for k, v in options.items() if isinstance(v, (jax.Array, np.ndarray))}
    return dynamic, {k: v for k, v in options.items() if k not in dynamic}


def with_exact_gradient(core: Any, axis_name: AxisName | None) -> Any:
    """``(loss, metrics)`` of ``core(logp, *rest)`` as a :func:`jax.custom_jvp` function whose
    tangent is ``sum(grad_logp * logp_dot)``, ``grad_logp`` the core's exact derivative.

    ``core`` returns ``(loss, grad_logp, metrics)``; the metrics get zero tangents. Inside
    ``shard_map`` the loss is the psum of the shards' values, invariant over ``axis_name``: its
    tangent is the sum of the shards' contributions (the varying axes must agree too).
    """

    @jax.custom_jvp
    def loss_and_metrics(*args):
        loss, _, metrics = core(*args)
        return loss, metrics

    @loss_and_metrics.defjvp
    def _jvp(primals, tangents):
        loss, grad_logp, metrics = core(*primals)
        tangent = jnp.sum(grad_logp * tangents[0])
        if axis_name is not None:
            names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
            extra = _varying_axes(tangent) - _varying_axes(loss)
            summed = tuple(n for n in names if n in extra)
            if summed:
                tangent = lax.psum(tangent, summed)
        tangent = tangent.astype(loss.dtype)
        return (loss, metrics), (tangent, jax.tree.map(jnp.zeros_like, metrics))

    return loss_and_metrics


def is_reshape_loss(
    logp: jax.Array,
    logq: jax.Array,
    rewards: jax.Array,
    mask: jax.Array | None = None,
    *,
    gamma: str | float = "ess",
    rho_min: float | jax.Array = 0.3,
    level: Literal["sequence", "geometric", "token"] = "sequence",
    loss_agg_mode: str = "token-mean",
    form: Literal["objective", "reinforce"] = "objective",
    group_size: int | None = None,
    loss_scale_factor: float | None = None,
    axis_name: AxisName | None = None,
    **gamma_options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The IS Reshape loss ``-L_gamma`` with its exact gradient, and 0-d metrics (pure).

    With unit log weights ``l_u = log pi/mu`` (per sequence, geometric mean per token, or per
    token: ``level``), rewards ``r`` and verl's aggregation coefficients ``c`` (``loss_agg_mode``),

    .. math::

        \text{loss} = -\sum_{b,t} c_{bt}\, r_{bt}\, \frac{\operatorname{expm1}(\gamma\, l_u)}
        {\gamma}, \qquad
        \frac{\partial\,\text{loss}}{\partial \log\pi_{bt}} =
        -\sum_{t'} c_{bt'}\, r_{bt'}\, w_u^{\gamma}\, \frac{\partial l_u}{\partial \log\pi_{bt}}

    (``form="objective"``, the Box-Cox form of :ref:`theory-objective`; ``gamma = 0`` is the limit
    ``-sum c r l_u``, reward-weighted SFT). ``form="reinforce"`` is
    ``-sum c r stop_grad(w_u^gamma) log pi_u``, with the same gradient. ``gamma`` is chosen per
    batch (or per GRPO group) from the log weights (default: the largest gamma whose ESS ratio
    is at least ``rho_min``) and carries no gradient. The derivative is the core's exact rule
    ``r w^gamma`` (the paper's Theorem 2.1), registered with :func:`jax.custom_jvp`: the tangent is
    ``sum(grad_logp * logp_dot)`` (no ``1/gamma``, exact at ``gamma = 0``), and reverse mode
    is its transpose. The metrics have zero tangents.

    **Only** ``logp`` **carries gradient**: ``logq``, ``rewards``, ``mask`` and array-valued
    options (``rho_min``, ``gamma_max``, ...) are constants of the rule, so ``jax.grad`` with
    respect to them is zero (the behaviour policy and the advantages are data), and so is
    gamma. First order only: a second derivative would differentiate the constant rule and
    return zero, not the true Hessian.

    The function is pure: it works under ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``,
    ``jax.vmap`` and inside ``optax`` update steps. Eagerly (not traced), inputs with NaN or
    ``+inf`` log-ratios or non-finite rewards raise ``ValueError``; under a transformation the
    values are not inspected.

    Parameters
    ----------
    logp : jax.Array (B, T) or (B,), floating
        Token (or sequence) log-probabilities of the trained policy. float16/bfloat16 are
        computed in float32 (the loss is float32; the cotangent reaching ``logp`` has its dtype).
    logq : jax.Array, the shape of ``logp``
        Behaviour (rollout / inference engine / old policy) log-probabilities.
    rewards : jax.Array (B,) or (B, T)
        Rewards or advantages (signed allowed), per sequence or per token. Required.
    mask : bool jax.Array (B, T), optional
        Valid (response) tokens; convert a 0/1 float mask with ``mask > 0``.
    gamma : {"ess", "closed_form", ...}, float in [0, 1] or array
        How to choose gamma (:func:`isreshape_core.select_gamma`), a fixed value, or a
        precomputed gamma array (0-d, ``(B,)``, or ``(B, T)`` at the token level; e.g. the
        optimizer step's gamma from :func:`isreshape_core.step_gamma`), which may be traced and
        carries no gradient (see :func:`isreshape_core.is_reshape_loss_and_grad`).
    rho_min : float or 0-d array in (0, 1]
        Least acceptable ESS ratio.
    level : {"sequence", "geometric", "token"}
    loss_agg_mode : str
        One of ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``,
        ``"seq-mean-token-sum-norm"`` (verl's aggregation modes; the last divides by
        ``loss_scale_factor``, default ``T``).
    form : {"objective", "reinforce"}
    group_size : int, optional
        One gamma per group of ``G`` consecutive responses (GRPO); ``B % G == 0``.
    loss_scale_factor : float, optional
        The constant divisor of ``seq-mean-token-sum-norm``.
    axis_name : hashable or tuple, optional
        Inside ``jax.shard_map`` (or ``pmap``, or ``vmap`` with an axis name) over a
        data-parallel axis whose shards each hold a slice of the batch: gamma, the statistics
        and the normalisers are those of the *global* batch (partials merged with ``lax.psum``
        / ``lax.pmax``, :class:`AxisReducer`), so every shard uses the same gamma and returns
        the global loss, equal to the single-device loss of the whole batch. ``jax.grad`` with
        respect to a shard's ``logp`` gives that shard's slice of the whole-batch gradient;
        with parameters replicated over the axis, ``shard_map`` sums the contributions, which
        is the whole-batch gradient (do not ``pmean`` the gradients: that divides it by the
        number of shards). In ``shard_map`` (with ``check_vma``, the default) the loss is
        invariant over the axis and its forward-mode tangent is summed over the shards; under
        ``pmap`` or ``check_vma=False`` the tangent is the shard's own contribution. With
        ``group_size``, a group must lie on one shard; the metrics are then averaged (maxima:
        maximised) over the shards.
    **gamma_options
        Passed to :func:`isreshape_core.select_gamma` (``gamma_min``, ``gamma_max``,
        ``max_iter``, ...). Array values (e.g. a warm-up schedule's ``gamma_max`` computed from
        the step) are allowed and traced.

    Returns
    -------
    loss : 0-d jax.Array
        Float32 for half-precision inputs, else ``logp``'s dtype.
    metrics : dict of 0-d jax.Arrays (never Python floats)
        ``gamma`` (mean over groups), ``sigma2`` (variance of the unit log weights),
        ``ess_ratio`` (at gamma), ``ess_ratio_at_1``, ``max_weight`` (largest normalised unit
        weight), ``k_hat`` where the gamma method computes it.

    References
    ----------
    :ref:`theory-objective`, :ref:`theory-gamma-ess`, :ref:`theory-groups`;
    verl ``core_algos.agg_loss`` for the aggregation modes; JAX's "Custom derivative rules"
    guide for ``custom_jvp``.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> logp = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.5]]))
    >>> logq = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.5]]))
    >>> rewards = jnp.array([1.0, 2.0])
    >>> def f(logp):
    ...     return is_reshape_loss(logp, logq, rewards, gamma=0.0,
    ...                            loss_agg_mode="seq-mean-token-sum")
    >>> (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    >>> # Each of the T_b = 2 tokens carries its sequence's loss: -(1/B) sum_b T_b r_b l_b,
    >>> # l = (log 2, -log 2), so -(2 log 2 - 4 log 2) / 2 = log 2.
    >>> print(np.round(np.asarray(loss), 4))
    0.6931
    >>> print(np.asarray(grad))  # -T_b r_b / B on every token at gamma = 0
    [[-1. -1.]
     [-2. -2.]]
    >>> print(sorted(metrics))  # doctest: +NORMALIZE_WHITESPACE
    ['ess_ratio', 'ess_ratio_at_1', 'gamma', 'log_scale', 'max_weight', 'n_capped',
     'n_nonfinite', 'sigma2']
    """
    logp = _as_jax_array(logp, "logp", "(B, T) or (B,)")
    logq = _as_jax_array(logq, "logq", "(B, T) or (B,), like logp")
    rewards = _as_jax_array(rewards, "rewards", "(B,) or (B, T)")
    if mask is not None:
        mask = _as_jax_array(mask, "mask", "(B, T), boolean")
    if not jnp.issubdtype(logp.dtype, jnp.floating):
        raise TypeError(
            f"logp must have a floating dtype to carry gradient, got {logp.dtype}; pass "
            "log-probabilities as float32/float64 (or bfloat16/float16)"
        )
    if group_size is not None and (
        not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool)
    ):
        raise TypeError(f"group_size must be a positive int or None, got {group_size!r}")
    reducer = None
    if axis_name is not None:
        reducer = AxisReducer(axis_name)

    if isinstance(gamma, np.ndarray):
        gamma = jnp.asarray(gamma)
    dynamic, static = split_options({"gamma": gamma, "rho_min": rho_min, **gamma_options})

    def core(logp_, logq_, rewards_, mask_, dynamic_):
        return is_reshape_loss_and_grad(
            lax.stop_gradient(logp_),
            lax.stop_gradient(logq_),
            lax.stop_gradient(rewards_),
            mask_,
            level=level,
            loss_agg_mode=loss_agg_mode,
            form=form,
            group_size=group_size,
            loss_scale_factor=loss_scale_factor,
            reducer=reducer,
            **static,
            **{k: lax.stop_gradient(v) for k, v in dynamic_.items()},
        )

    loss_and_metrics = with_exact_gradient(core, axis_name)
    try:
        loss, metrics = loss_and_metrics(logp, logq, rewards, mask, dynamic)
    except NameError as exc:
        if axis_name is None or "unbound axis name" not in str(exc):
            raise
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call is_reshape_loss inside "
            "jax.shard_map, jax.pmap or jax.vmap(..., axis_name=...) over that axis, or pass "
            "axis_name=None for a single device"
        ) from exc
    return loss, metrics
