"""Reductions along the sample axis that also run over every shard of a data-parallel batch."""

from __future__ import annotations

from typing import Protocol

from array_api_compat import is_array_api_strict_namespace, is_torch_namespace

from .namespace import Array, Namespace, array_device
from .sizes import is_large
from .tracing import is_concrete

__all__ = ["Reducer", "count_true", "reduce_max", "reduce_sum", "sample_count"]


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


def count_true(
    xp: Namespace,
    x: Array,
    axis: int | tuple[int, ...] | None,
    dtype: object,
    reducer: Reducer | None = None,
) -> Array:
    """The number of ``True`` entries of the boolean ``x`` along ``axis`` (``None``: all), in
    the floating ``dtype``, over every shard with a ``reducer``: one sum that reads the
    booleans (no floating copy of ``x``; exact up to ``2**24`` in float32)."""
    # The standard's sum takes numeric arrays only (array-api-strict holds to it); the others
    # sum booleans directly. A float sum, unlike count_nonzero's integer one, fuses with the
    # float reductions next to it under XLA.
    if is_array_api_strict_namespace(xp):
        x = xp.astype(x, dtype)
    if is_torch_namespace(xp) and is_large(x) and is_concrete(x):
        # Eager torch sums many booleans into its default integer about twice as fast as into
        # a float; the count is exact either way. Traced, the float sum fuses with the float
        # reductions of the same rows (an integer one gets a loop of its own).
        local = xp.astype(xp.sum(x, axis=axis), dtype)
    else:
        local = xp.sum(x, axis=axis, dtype=dtype)
    return local if reducer is None else reducer.sum(local)


def sample_count(
    xp: Namespace, log_w: Array, mask: Array | None, axis: int, reducer: Reducer | None = None
) -> Array:
    """Number of unmasked samples along ``axis`` (over all shards), in ``log_w``'s dtype."""
    if mask is None:
        shape = tuple(s for i, s in enumerate(log_w.shape) if i != axis)
        local = xp.full(shape, log_w.shape[axis], dtype=log_w.dtype, device=array_device(log_w))
        return local if reducer is None else reducer.sum(local)
    return count_true(xp, mask, axis, log_w.dtype, reducer)
