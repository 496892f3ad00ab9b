"""Internal helpers shared by the core modules: namespaces, dtypes, masks and validation.

Nothing here is public API. Every helper works on arrays of any array-API namespace and never
pulls a Python scalar out of an array, except the value checks, which run only on concrete
(eager) inputs so that the same code traces under ``jax.jit`` and ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Protocol

from array_api_compat import array_namespace, is_jax_array, is_torch_array
from array_api_compat import device as array_device

Array = Any  # an array of any array-API namespace
Namespace = Any


class Reducer(Protocol):
    """Combines per-shard partial reductions into global ones (data-parallel statistics).

    When the samples along the reduction axis are split over several processes or devices, the
    core reduces its shard locally and hands the partial result to ``sum`` or ``max``, which
    must return the reduction over all shards (an all-reduce), with the same shape. Adapters
    provide one for ``torch.distributed`` and for a JAX named axis; ``None`` means one shard.

    Examples
    --------
    Any object with ``sum`` and ``max`` will do. With one shard the all-reduce is the identity,
    and the result is the unsharded one; ``isreshape_torch.TorchDistributedReducer`` and
    ``isreshape_jax.AxisReducer`` all-reduce over processes or a mesh axis instead.

    >>> import numpy as np
    >>> import isreshape_core as isr
    >>> class OneShard:
    ...     def sum(self, x):
    ...         return x
    ...     def max(self, x):
    ...         return x
    >>> l = np.array([0.0, -1.0, 0.5, 2.0])
    >>> print(isr.ess(l, reducer=OneShard()) == isr.ess(l))
    True
    """

    def sum(self, x: Array) -> Array: ...

    def max(self, x: Array) -> Array: ...


__all__ = [
    "Array",
    "Namespace",
    "Reducer",
    "array_device",
    "as_compute_array",
    "broadcast_rewards",
    "check_gamma",
    "check_log_weights",
    "check_mask_type",
    "check_real_floating",
    "check_rho_min",
    "expand_at_axis",
    "is_concrete",
    "logsumexp",
    "namespace",
    "nonfinite_rows",
    "normalize_axis",
    "poison",
    "prepare_log_weights",
    "reduce_max",
    "reduce_sum",
    "tempered_log_weights",
    "traced_bad_rows",
]


def namespace(*arrays: Any) -> Namespace:
    """The array-API namespace of the given arrays, ignoring ``None`` and Python numbers."""
    present = [a for a in arrays if a is not None and not isinstance(a, numbers.Number)]
    if not present:
        raise TypeError("expected at least one array argument; got only Python scalars or None")
    xp = array_namespace(*present)
    if is_torch_array(present[0]):
        return _torch_namespace(xp)
    return xp


# array-api-compat's torch wrappers promote a Python scalar operand with `torch.result_type`,
# which returns a dtype and so breaks a `torch.compile(fullgraph=True)` graph. The core passes
# Python scalars to `where`, `maximum`, ...: while compiling, they become 0-d tensors of the other
# operand's dtype and device first, which is what the array API's promotion rules ask anyway
# (eagerly, array-api-compat's own promotion is cheaper and gives the same result).
_SCALAR_PROMOTING = (
    "where",
    "maximum",
    "minimum",
    "add",
    "subtract",
    "multiply",
    "divide",
    "pow",
    "logaddexp",
    "equal",
    "not_equal",
    "less",
    "less_equal",
    "greater",
    "greater_equal",
)
_TORCH_NAMESPACES: dict[int, Any] = {}


def _torch_namespace(compat: Namespace) -> Namespace:
    cached = _TORCH_NAMESPACES.get(id(compat))
    if cached is None:
        cached = _TorchNamespace(compat)
        _TORCH_NAMESPACES[id(compat)] = cached
    return cached


class _TorchNamespace:
    """array-api-compat's torch namespace with Python-scalar operands made 0-d tensors."""

    def __init__(self, compat: Namespace) -> None:
        self._compat = compat
        self.__name__ = compat.__name__
        for name in _SCALAR_PROMOTING:
            setattr(self, name, self._wrap(getattr(compat, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compat, name)

    @staticmethod
    def _wrap(fn: Any) -> Any:
        torch = sys.modules["torch"]

        def wrapped(*args: Any) -> Any:
            if not torch.compiler.is_compiling():
                # Eager: array-api-compat's own scalar promotion is fine, and cheaper.
                return fn(*args)
            like = next(
                (a for a in args if hasattr(a, "dtype") and a.dtype.is_floating_point), None
            )
            if like is None:
                like = next((a for a in args if hasattr(a, "dtype") and a.dtype != _bool(a)), None)
            if like is not None:
                args = tuple(
                    _to_tensor_like(a, like) if isinstance(a, numbers.Number) else a for a in args
                )
            return fn(*args)

        wrapped.__name__ = getattr(fn, "__name__", "wrapped")
        return wrapped


def _bool(a: Any) -> Any:
    return sys.modules["torch"].bool


def _to_tensor_like(value: Any, like: Any) -> Any:
    torch = sys.modules["torch"]
    return torch.asarray(value, dtype=like.dtype, device=like.device)


def compute_dtype(xp: Namespace, x: Array) -> Any:
    """float64 for float64 inputs, float32 for every other input (half, bfloat16, ints, bool)."""
    if x.dtype == xp.float64:
        return xp.float64
    return xp.float32


def as_compute_array(xp: Namespace, x: Any, dtype: Any = None, *, like: Array = None) -> Array:
    """``x`` as an array of ``xp`` in at least float32 (or exactly ``dtype`` when given)."""
    if not hasattr(x, "shape"):
        dev = None if like is None else array_device(like)
        target = dtype if dtype is not None else (xp.float32 if like is None else like.dtype)
        return xp.asarray(x, dtype=target, device=dev)
    target = dtype if dtype is not None else compute_dtype(xp, x)
    if x.dtype != target:
        x = xp.astype(x, target)
    return x


def is_concrete(x: Array) -> bool:
    """True where the values of ``x`` may be read cheaply: not traced by JAX or torch.compile."""
    if is_jax_array(x):
        return not any(cls.__name__.endswith("Tracer") for cls in type(x).__mro__)
    if is_torch_array(x):
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return False
        functorch = getattr(torch._C, "_functorch", None)
        if functorch is not None and functorch.is_functorch_wrapped_tensor(x):
            return False
        return x.device.type != "meta"
    return True


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """``axis`` as a non-negative index; a clear error when it is out of range."""
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if ndim == 0:
        raise ValueError(
            f"{name}={axis} cannot reduce a 0-d array; pass at least one sample along {name}"
        )
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimension(s)")
    return int(axis) % ndim


def check_real_floating(xp: Namespace, x: Array, name: str = "log_w") -> None:
    """Refuse bool, integer and complex arrays where log weights or log-probabilities go.

    A bool array is almost always a mask passed in the wrong place, and an integer one would be
    rounded to float32 (``1e8 + 1`` is not representable there): convert explicitly instead.
    """
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got "
            f"{x.dtype}; convert it explicitly, e.g. `{name}.astype(float64)` (integers are not "
            "rounded silently; a bool array is a mask: pass it as `mask`)"
        )


def nonfinite_rows(
    xp: Namespace, x: Array, axis: int | None, reducer: Reducer | None = None
) -> Array | None:
    """Where a traced input holds NaN or ``+inf``: a boolean array of the batch shape (all
    axes reduced for ``axis=None``), or ``None`` on eager inputs (which raise instead).

    Traced code cannot raise; the functions use this to return NaN for such rows
    (:func:`poison`) instead of a plausible finite value.
    """
    if is_concrete(x) and not is_jax_array(x):
        return None
    bad = xp.isnan(x) | (x == xp.inf)
    if axis is None:
        out = xp.any(bad)
    else:
        out = xp.any(bad, axis=axis)
    if is_concrete(out):  # eager (also a JAX constant outside a trace): raised already
        return None
    if reducer is not None:
        out = reducer.max(xp.astype(out, x.dtype)) > 0
    return out


def traced_bad_rows(
    xp: Namespace, l: Array, axis: int, *params: Any, reducer: Reducer | None = None
) -> Array | None:
    """:func:`nonfinite_rows` of the log weights, or'ed with NaN in any traced array parameter
    (``rho_min``, ``gamma_min``, ... broadcast to the batch shape); ``None`` when all are eager."""
    bad = nonfinite_rows(xp, l, axis, reducer)
    for value in params:
        if hasattr(value, "shape"):
            nan = xp.isnan(value)
            if not is_concrete(nan):  # eager: checked (and raised) already
                bad = nan if bad is None else bad | nan
    return bad


def poison(xp: Namespace, value: Array, bad: Array | None) -> Array:
    """``value`` with NaN where ``bad`` (see :func:`nonfinite_rows`); unchanged for ``None``."""
    if bad is None:
        return value
    return xp.where(bad, xp.nan, value)


def check_log_weights(xp: Namespace, log_w: Array, name: str = "log_w") -> None:
    """Reject NaN and ``+inf`` (``-inf`` is weight 0 and allowed); eager inputs only."""
    if not is_concrete(log_w):
        return
    # The result, not only the input, must be concrete: inside jax.jit a constant closed over is
    # concrete, but what is computed from it is traced (and then NaN rows are made NaN instead).
    bad = xp.any(xp.isnan(log_w) | (log_w == xp.inf))
    if is_concrete(bad) and bool(bad):
        raise ValueError(
            f"{name} contains NaN or +inf; log weights must be finite or -inf (weight 0). "
            "Check logp/logq for NaN or use `mask` to drop those samples."
        )


def check_mask_type(mask: Any, name: str = "mask") -> None:
    """``mask`` must be ``None`` or an array (checked before the namespace is looked up, whose
    error would not name the argument)."""
    if mask is not None and not hasattr(mask, "shape"):
        raise TypeError(
            f"{name} must be a boolean array (of the log weights' namespace) or None, got "
            f"{type(mask).__name__}; convert it first, e.g. `xp.asarray({name}, dtype=bool)`"
        )


def broadcast_mask(xp: Namespace, mask: Array | None, shape: tuple, name: str = "mask") -> Array:
    """``mask`` as a boolean array of ``shape`` (``None`` keeps every sample)."""
    if mask is None:
        return None
    check_mask_type(mask, name)
    if mask.dtype != xp.bool:
        raise TypeError(
            f"{name} must have a boolean dtype, got {mask.dtype}; pass e.g. `{name} > 0`"
        )
    try:
        return xp.broadcast_to(mask, shape)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the log weights' "
            f"shape {tuple(shape)}"
        ) from exc


def prepare_log_weights(
    log_w: Any, *, axis: int, mask: Array | None, name: str = "log_w"
) -> tuple[Namespace, Array, Array | None, int]:
    """Validate and promote log weights at a public boundary.

    Returns ``(xp, log_w, mask, axis)`` with ``log_w`` in the compute dtype, masked entries set to
    ``-inf`` (weight 0, never counted), ``mask`` broadcast to ``log_w.shape`` (or ``None``) and
    ``axis`` non-negative.
    """
    if not hasattr(log_w, "shape"):
        raise TypeError(f"{name} must be an array, got {type(log_w).__name__}")
    check_mask_type(mask)
    xp = namespace(log_w, mask)
    check_real_floating(xp, log_w, name)
    log_w = as_compute_array(xp, log_w)
    axis = normalize_axis(axis, log_w.ndim)
    if log_w.shape[axis] == 0:
        raise ValueError(
            f"{name} has no samples along axis {axis} (shape {tuple(log_w.shape)}); "
            "the reduction axis must not be empty"
        )
    mask = broadcast_mask(xp, mask, log_w.shape)
    check_log_weights(xp, log_w if mask is None else xp.where(mask, log_w, 0.0), name)
    if mask is not None:
        log_w = xp.where(mask, log_w, -xp.inf)
    return xp, log_w, mask, axis


def broadcast_rewards(xp: Namespace, rewards: Any, like: Array, name: str = "rewards") -> Array:
    """``rewards`` broadcast to ``like``'s shape and dtype; NaN or inf rejected (eager inputs)."""
    if not hasattr(rewards, "shape"):
        raise TypeError(f"{name} must be an array, got {type(rewards).__name__}")
    r = as_compute_array(xp, rewards, like.dtype)
    try:
        r = xp.broadcast_to(r, like.shape)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(
            f"{name} of shape {tuple(rewards.shape)} does not broadcast to the log weights' "
            f"shape {tuple(like.shape)}"
        ) from exc
    ok = xp.all(xp.isfinite(r)) if is_concrete(r) else None
    if ok is not None and is_concrete(ok) and not bool(ok):
        raise ValueError(f"{name} contains NaN or inf; rewards must be finite")
    return r


def _check_unit_interval(value: Any, name: str, *, low_open: bool) -> None:
    lo_ok = (lambda v: v > 0) if low_open else (lambda v: v >= 0)
    interval = "(0, 1]" if low_open else "[0, 1]"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not (math.isfinite(value) and lo_ok(value) and value <= 1):
            raise ValueError(f"{name} must lie in {interval}, got {value!r}")
        return
    if hasattr(value, "shape") and is_concrete(value):
        xp = array_namespace(value)
        ok = xp.all((value > 0 if low_open else value >= 0) & (value <= 1))
        if is_concrete(ok) and not bool(ok):
            raise ValueError(f"{name} must lie in {interval} everywhere; got values outside it")
        return
    if not hasattr(value, "shape"):
        raise TypeError(f"{name} must be a real number or an array, got {type(value).__name__}")


def check_rho_min(rho_min: Any, name: str = "rho_min") -> None:
    """``rho_min`` must lie in (0, 1]."""
    _check_unit_interval(rho_min, name, low_open=True)


def check_gamma(gamma: Any, name: str = "gamma") -> None:
    """``gamma`` must lie in [0, 1]."""
    _check_unit_interval(gamma, name, low_open=False)


def expand_at_axis(xp: Namespace, value: Any, axis: int, ndim: int, *, like: Array) -> Array:
    """A per-row value (Python number or array shaped like the reduced batch) made broadcastable
    against an array of ``ndim`` dimensions reduced along ``axis``."""
    value = as_compute_array(xp, value, like=like) if not hasattr(value, "shape") else value
    if hasattr(value, "dtype") and value.dtype != like.dtype:
        value = xp.astype(value, like.dtype)
    if value.ndim == 0:
        return value
    if value.ndim > ndim - 1:
        raise ValueError(
            f"a per-row value of shape {tuple(value.shape)} has more dimensions than the batch "
            f"shape of an array with {ndim} dimension(s) reduced along axis {axis}"
        )
    # Right-align against the batch shape (the shape with `axis` removed), then re-insert `axis`.
    value = xp.reshape(value, (1,) * (ndim - 1 - value.ndim) + tuple(value.shape))
    return xp.expand_dims(value, axis=axis)


def tempered_log_weights(xp: Namespace, log_w: Array, gamma: Array) -> Array:
    """``gamma * log_w`` with ``-inf`` kept at ``-inf`` for every gamma, ``gamma = 0`` included.

    A sample of weight 0 (or a masked one) never counts: ``0**0`` is not 1 here.
    """
    zero_weight = log_w == -xp.inf
    # Multiply a finite stand-in: 0 * -inf would be NaN (and a warning in numpy).
    return xp.where(zero_weight, -xp.inf, gamma * xp.where(zero_weight, 0.0, log_w))


def shift_by_max(
    xp: Namespace, x: Array, axis: int, reducer: Reducer | None = None
) -> tuple[Array, Array]:
    """``(x - max, max)`` along ``axis`` (keepdims; over all shards), ``max`` 0 for a row
    without a finite entry. Statistics that are invariant to a constant shift of the log
    weights take their input relative to the max first, so that the shift costs no digits
    (``1e15 + l`` rounds ``l`` to 0.125, but every later step is exact relative to the max)."""
    top = reduce_max(xp, x, axis, reducer, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    # x - top can overflow only for a positive max. Entries further than 2^-20 of the largest
    # float below the max (a relative weight of exp(-3e32) in float32) are set to that floor:
    # finite (a weight 0 for every gamma that matters, still a positive weight at gamma = 0),
    # and sums of up to 2^20 of them cannot overflow.
    floor = -float(xp.finfo(x.dtype).max) * 2.0**-20
    limit = xp.where(top > 0, top + floor, -xp.inf)
    below = x < limit
    d = xp.where(below, floor, xp.where(below, top, x) - top)
    return xp.where(x == -xp.inf, -xp.inf, xp.maximum(d, floor)), top


def safe_sum(xp: Namespace, x: Array, axis: int = -1) -> Array:
    """``sum(x, axis)`` of finite entries without an intermediate overflow.

    Where ``max|x|`` times the number of terms could exceed the largest float, the row is
    divided by a power of 2 at least that number first (exact) and multiplied back at the end;
    the result is ``+-inf`` only where the sum itself is out of range, never ``inf - inf = NaN``
    from a partial sum. Rows that cannot overflow are summed as they are (bit for bit).
    """
    n = x.shape[axis]
    fmax = float(xp.finfo(x.dtype).max)
    if n <= 1:
        return xp.sum(x, axis=axis)
    factor = 2.0 ** math.ceil(math.log2(n))
    finite = xp.where(xp.isfinite(x), x, 0.0)
    risky = xp.max(xp.abs(finite), axis=axis, keepdims=True) > fmax / factor
    scaled = xp.where(risky, x / factor, x)
    total = xp.sum(scaled, axis=axis)
    risky = xp.squeeze(risky, axis=axis)
    fits = ~risky | (xp.abs(total) <= fmax / factor) | ~xp.isfinite(total)
    kept = xp.where(fits & risky, total, 0.0)
    back = xp.where(risky, kept * factor, total)
    inf = xp.full_like(total, xp.inf)
    return xp.where(fits, back, xp.where(total > 0, inf, -inf))  # out of range: +-inf


def logsumexp(
    xp: Namespace, x: Array, axis: int, keepdims: bool = False, reducer: Reducer | None = None
) -> Array:
    """``log(sum(exp(x)))`` along ``axis`` (over all shards); ``-inf`` for an all-``-inf`` row."""
    shifted, m = shift_by_max(xp, x, axis, reducer)
    total = reduce_sum(xp, xp.exp(shifted), axis, reducer, keepdims=True)
    positive = total > 0
    # log(0) is taken on a dummy 1 so that numpy raises no divide-by-zero warning.
    out = xp.where(positive, xp.log(xp.where(positive, total, 1.0)) + m, -xp.inf)
    if not keepdims:
        out = xp.squeeze(out, axis=axis)
    return out


def reduce_sum(
    xp: Namespace, x: Array, axis: int, reducer: Reducer | None = None, keepdims: bool = False
) -> Array:
    """``sum`` along ``axis``, then over all shards when a ``reducer`` is given."""
    out = xp.sum(x, axis=axis, keepdims=keepdims)
    return out if reducer is None else reducer.sum(out)


def reduce_max(
    xp: Namespace, x: Array, axis: int, reducer: Reducer | None = None, keepdims: bool = False
) -> Array:
    """``max`` along ``axis``, then over all shards when a ``reducer`` is given."""
    out = xp.max(x, axis=axis, keepdims=keepdims)
    return out if reducer is None else reducer.max(out)


def sample_count(
    xp: Namespace, log_w: Array, mask: Array | None, axis: int, reducer: Reducer | None = None
) -> Array:
    """Number of unmasked samples along ``axis`` (over all shards), in ``log_w``'s dtype."""
    if mask is None:
        shape = tuple(s for i, s in enumerate(log_w.shape) if i != axis)
        local = xp.full(shape, log_w.shape[axis], dtype=log_w.dtype, device=array_device(log_w))
        return local if reducer is None else reducer.sum(local)
    return reduce_sum(xp, xp.astype(mask, log_w.dtype), axis, reducer)
