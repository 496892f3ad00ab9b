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
from typing import Any

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


def as_loss_inputs(
    named: dict[str, tuple[Any, str]], mask: Any
) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
    """The arrays of a loss, ``{name: (value, shape hint)}`` with ``logp`` first, as jax.Arrays,
    and the mask; a wrong type is refused with the expected shape, and ``logp``, which carries
    the gradient, must have a floating dtype."""
    arrays = tuple(_as_jax_array(value, name, hint) for name, (value, hint) in named.items())
    if mask is not None:
        mask = _as_jax_array(mask, "mask", "(B, T), boolean")
    if not jnp.issubdtype(arrays[0].dtype, jnp.floating):
        raise TypeError(
            f"logp must have a floating dtype to carry gradient, got {arrays[0].dtype}; pass "
            "log-probabilities as float32/float64 (or bfloat16/float16)"
        )
    return arrays, mask


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


_SECOND_ORDER_MESSAGE = (
    "the IS Reshape losses are first order in JAX: their derivative with respect to logp is the "
    "core's exact rule, a constant of the custom_jvp, so a second derivative (jax.hessian, "
    "jax.grad of jax.grad, jax.jvp of a gradient) would be silently zero; differentiate the "
    "loss once"
)


@jax.custom_jvp
def _first_order_only(grad: jax.Array, anchor: jax.Array) -> jax.Array:
    """The identity on ``grad``, whose own derivative (with respect to ``anchor``, ``logp``)
    raises :data:`_SECOND_ORDER_MESSAGE`: reached only by a second differentiation."""
    return grad


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise RuntimeError(_SECOND_ORDER_MESSAGE)


def exact_gradient_loss(
    core_fn: Any, arrays: tuple, mask: Any, axis_name: AxisName | None, options: dict[str, Any]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, metrics)`` of the core's ``core_fn(*arrays, mask, reducer=..., **options)`` with
    its exact gradient with respect to ``arrays[0]`` (``logp``) registered as a ``custom_jvp``.

    The arrays and array-valued options enter the core detached (they are data); with an
    ``axis_name`` the core merges its statistics over that mesh axis (:class:`AxisReducer`).
    """
    reducer = None if axis_name is None else AxisReducer(axis_name)
    if isinstance(options.get("gamma"), np.ndarray):
        options = {**options, "gamma": jnp.asarray(options["gamma"])}
    dynamic, static = split_options(options)

    def core(*args):
        *data, mask_, dynamic_ = args
        return core_fn(
            *(lax.stop_gradient(a) for a in data),
            mask_,
            reducer=reducer,
            **static,
            **{k: lax.stop_gradient(v) for k, v in dynamic_.items()},
        )

    return with_exact_gradient(core, axis_name)(*arrays, mask, dynamic)


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
        grad_logp = _first_order_only(grad_logp, primals[0])
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
    axis_name: AxisName | None = None,
    **options: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""The IS Reshape loss ``-L_gamma`` with its exact gradient as a ``custom_jvp``, and metrics.

    The loss of :func:`isreshape_core.is_reshape_loss_and_grad` (:ref:`theory-objective`), its
    options (``gamma``, ``rho_min``, ``level``, ``loss_agg_mode``, ``form``, ``group_size``,
    ``loss_scale_factor``, gamma options), shapes and metrics; see there. Its exact gradient
    with respect to ``logp`` is registered with :func:`jax.custom_jvp` (the tangent
    ``sum(grad_logp * logp_dot)``; reverse mode by transposition): **only** ``logp`` carries
    gradient (``logq``, ``rewards``, ``mask`` and array-valued options are constants of the
    rule), the metrics have zero tangents, and a second derivative raises ``RuntimeError``
    (the rule is first order: differentiating it again would silently give zeros). Pure: it
    runs under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and inside ``optax`` update steps;
    eager inputs are checked as in the core, traced ones are not inspected.

    Parameters
    ----------
    logp, logq, rewards, mask : jax.Array (or NumPy array)
        As in :func:`isreshape_core.is_reshape_loss_and_grad`; ``logp`` floating.
    axis_name : hashable or tuple, optional
        Inside ``jax.shard_map`` (or ``pmap``, or ``vmap`` with an axis name) over a
        data-parallel axis whose shards each hold a slice of the batch: gamma, the statistics,
        the normalisers and the metrics are those of the *global* batch (:class:`AxisReducer`),
        and every shard returns the single-device loss of the whole batch. ``jax.grad`` with
        respect to a shard's ``logp`` gives that shard's slice of the whole-batch gradient
        (do not ``pmean`` the gradients: that divides it by the number of shards). In
        ``shard_map`` (with ``check_vma``) the forward-mode tangent is summed over the shards;
        under ``pmap`` or ``check_vma=False`` it is the shard's own contribution. With
        ``group_size``, a group must lie on one shard.
    **options
        The options of :func:`isreshape_core.is_reshape_loss_and_grad`; array values (a traced
        ``rho_min``, a warm-up schedule's ``gamma_max``) are allowed.

    Returns
    -------
    loss : 0-d jax.Array
    metrics : dict of 0-d jax.Arrays
        As in :func:`isreshape_core.is_reshape_loss_and_grad`.

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
    >>> print(np.round(np.asarray(loss), 4), np.asarray(grad)[1])
    0.6931 [-2. -2.]
    >>> print(sorted(metrics))  # doctest: +NORMALIZE_WHITESPACE
    ['ess_ratio', 'ess_ratio_at_1', 'gamma', 'log_scale', 'max_weight', 'n_capped',
     'n_nonfinite', 'sigma2']
    """
    arrays, mask = as_loss_inputs(
        {
            "logp": (logp, "(B, T) or (B,)"),
            "logq": (logq, "(B, T) or (B,), like logp"),
            "rewards": (rewards, "(B,) or (B, T)"),
        },
        mask,
    )
    group_size = options.get("group_size")
    if group_size is not None and (
        not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool)
    ):
        raise TypeError(f"group_size must be a positive int or None, got {group_size!r}")
    try:
        loss, metrics = exact_gradient_loss(
            is_reshape_loss_and_grad, arrays, mask, axis_name, options
        )
    except NameError as exc:
        if axis_name is None or "unbound axis name" not in str(exc):
            raise
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call is_reshape_loss inside "
            "jax.shard_map, jax.pmap or jax.vmap(..., axis_name=...) over that axis, or pass "
            "axis_name=None for a single device"
        ) from exc
    return loss, metrics
