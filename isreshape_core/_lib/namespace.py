"""The array-API namespace of the inputs, with a torch namespace that traces under torch.compile."""

from __future__ import annotations

import numbers
import sys
from typing import Any

from array_api_compat import array_namespace, is_torch_array
from array_api_compat import device as array_device

__all__ = ["Array", "Namespace", "array_device", "namespace"]

Array = Any  # an array of any array-API namespace
Namespace = Any


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
                like = next(
                    (a for a in args if hasattr(a, "dtype") and a.dtype != torch.bool), None
                )
            if like is not None:
                args = tuple(
                    torch.asarray(a, dtype=like.dtype, device=like.device)
                    if isinstance(a, numbers.Number)
                    else a
                    for a in args
                )
            return fn(*args)

        wrapped.__name__ = getattr(fn, "__name__", "wrapped")
        return wrapped
