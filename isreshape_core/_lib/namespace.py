"""The array-API namespace of the inputs, with a torch namespace that traces under torch.compile."""

from __future__ import annotations

import numbers
import sys
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as array_device

__all__ = ["Array", "Namespace", "array_device", "is_array", "masked_values", "namespace"]

Array = Any  # an array of any array-API namespace
Namespace = Any


def namespace(*arrays: Any) -> Namespace:
    """The array-API namespace of the given arrays, ignoring ``None`` and Python numbers."""
    present = [a for a in arrays if a is not None and not isinstance(a, numbers.Number)]
    if not present:
        raise TypeError("expected at least one array argument; got only Python scalars or None")
    torch = sys.modules.get("torch")  # imported wherever a torch tensor exists
    # torch tensors alone: no type dispatch of array-api-compat (which a compiled function would
    # otherwise guard, and check again on every call).
    if torch is not None and all(isinstance(a, torch.Tensor) for a in present):
        return _torch_namespace()
    return array_namespace(*present)


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array (it has a shape) rather than a number. A number is never asked
    for a shape: under ``torch.compile`` a Python float that changes between calls is traced as
    a symbolic float, on which ``hasattr`` does not trace.

    Examples
    --------
    >>> import numpy as np
    >>> from isreshape_core.extend import is_array
    >>> print(is_array(np.zeros(3)), is_array(0.5), is_array(np.float64(0.5)))
    True False False
    """
    return not isinstance(x, numbers.Number) and hasattr(x, "shape")


def masked_values(xp: Namespace, x: Array, mask: Array) -> Array:
    """The entries of ``x`` where the boolean ``mask`` (of ``x``'s shape) is true, in order, as
    one 1-D array: ``x[mask]``, which torch computes by ``masked_select`` in about half the
    time of its boolean indexing."""
    if isinstance(xp, _TorchNamespace):
        return sys.modules["torch"].masked_select(x, mask)
    return x[mask]


# array-api-compat's torch wrappers promote a Python scalar operand with `torch.result_type`,
# which returns a dtype and so breaks a `torch.compile(fullgraph=True)` graph; eagerly, torch
# turns every such scalar into a fresh 0-d tensor (one more operator per call, and the core's
# finite-for-every-input guards pass dozens of them to `where`, `maximum`, ...). So a Python
# number becomes a 0-d tensor of the floating operand's dtype and device first, which is what
# the array API's promotion rules ask anyway: while compiling a new one (it is a graph
# constant), eagerly one made once and kept (:func:`_constant`).
#: The wrapped functions, with the torch function each one is when every operand has one
#: floating dtype (where: and a boolean condition), so that no promotion is left to fix.
_SCALAR_PROMOTING = {
    "where": "where",
    "maximum": "maximum",
    "minimum": "minimum",
    "add": "add",
    "subtract": "sub",
    "multiply": "mul",
    "divide": "div",
    "pow": "pow",
    "logaddexp": "logaddexp",
    "equal": "eq",
    "not_equal": "ne",
    "less": "lt",
    "less_equal": "le",
    "greater": "gt",
    "greater_equal": "ge",
}
#: Eager 0-d constants by (value, dtype, device); a few dozen in practice, bounded anyway.
_CONSTANTS: dict[tuple[str, Any, Any], Any] = {}
_MAX_CONSTANTS = 1024


def _constant(torch: Any, value: numbers.Real, like: Any) -> Any:
    """A 0-d tensor holding ``value`` in ``like``'s dtype and on its device, made once.

    The core never writes to its operands, so one tensor can serve every call. It is made
    outside inference mode and without grad, so that autograd may save it for a backward.
    """
    key = (float(value).hex(), like.dtype, like.device)
    out = _CONSTANTS.get(key)
    if out is None:
        with torch.inference_mode(False), torch.no_grad():
            out = torch.asarray(value, dtype=like.dtype, device=like.device)
        if len(_CONSTANTS) < _MAX_CONSTANTS:
            _CONSTANTS[key] = out
    return out


#: The eager :class:`_TorchNamespace`, made at the first eager call.
_TORCH_NAMESPACE: list[Any] = []


def _torch_namespace() -> Namespace:
    """The :class:`_TorchNamespace`, made once (eagerly)."""
    import array_api_compat.torch as compat  # here: the core imports torch only where it is used

    if sys.modules["torch"].compiler.is_compiling():
        # A namespace of the trace's own: the graph's guards then do not read the cache, which
        # a trace or an eager call may fill (each would fail the next call's guards).
        return _TorchNamespace(compat)
    if not _TORCH_NAMESPACE:
        _TORCH_NAMESPACE.append(_TorchNamespace(compat))
    return _TORCH_NAMESPACE[0]


class _TorchNamespace:
    """array-api-compat's torch namespace with Python-scalar operands made 0-d tensors."""

    def __init__(self, compat: Namespace) -> None:
        self._compat = compat
        self.__name__ = compat.__name__
        torch = sys.modules["torch"]
        for name, direct in _SCALAR_PROMOTING.items():
            setattr(self, name, self._wrap(compat, name, getattr(torch, direct)))
        self.isfinite = _finite_by_abs(torch, compat.isfinite)
        self.sign = _real_sign(torch, compat.sign)
        self.vecdot = _real_vecdot(torch, compat.vecdot)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._compat, name)
        setattr(self, name, value)  # found here from now on, without this method
        return value

    @staticmethod
    def _wrap(compat: Namespace, name: str, direct: Any) -> Any:
        torch = sys.modules["torch"]

        def wrapped(*args: Any) -> Any:
            compiling = torch.compiler.is_compiling()
            operands = _same_dtype_operands(torch, args, direct is torch.where, compiling)
            if operands is not None:
                return direct(*operands)
            # Looked up here, not closed over: a trace that never gets here reads none of it.
            fn = getattr(compat, name)
            if not any(isinstance(a, numbers.Real) and not isinstance(a, bool) for a in args):
                return fn(*args)
            like = next((a for a in args if is_array(a) and a.dtype.is_floating_point), None)
            if like is None and compiling:
                like = next((a for a in args if is_array(a) and a.dtype != torch.bool), None)
            # Eagerly only plain tensors share constants (not fakes, functorch wrappers, ...).
            if like is None or not (compiling or type(like) is torch.Tensor):
                return fn(*args)
            return fn(*(_scalar_operand(torch, a, like, compiling) for a in args))

        wrapped.__name__ = name
        return wrapped


def _same_dtype_operands(
    torch: Any, args: tuple[Any, ...], where: bool, compiling: bool
) -> list[Any] | None:
    """The operands with Python numbers as 0-d tensors (:func:`_scalar_tensor`) where every
    tensor operand is a plain tensor of one floating dtype (``where``: after a boolean
    condition), so that the torch function itself gives the array API's result: else ``None``.
    The common case of the core's guards, checked by type rather than through ``isinstance`` and
    ``result_type``; traced, it also spares the graph the guards on array-api-compat's wrapper
    (its code, closure and defaults), which every call of a compiled function evaluates."""
    tensor = torch.Tensor
    start = 1 if where else 0
    if where and not (type(args[0]) is tensor and args[0].dtype == torch.bool):
        return None
    like = next((a for a in args[start:] if type(a) is tensor), None)
    if like is None or not like.dtype.is_floating_point:
        return None
    out = list(args)
    for i in range(start, len(args)):
        a, kind = args[i], type(args[i])
        if kind is tensor:
            if a.dtype != like.dtype:
                return None
        elif kind is float or kind is int:
            out[i] = _scalar_tensor(torch, a, like, compiling)
        else:
            return None
    return out


def _scalar_operand(torch: Any, a: Any, like: Any, compiling: bool) -> Any:
    """``a`` as a 0-d tensor like ``like`` where it is a Python number (not a bool)."""
    if not isinstance(a, numbers.Real) or isinstance(a, bool):
        return a
    return _scalar_tensor(torch, a, like, compiling)


def _scalar_tensor(torch: Any, a: numbers.Real, like: Any, compiling: bool) -> Any:
    """The number ``a`` as a 0-d tensor of ``like``'s dtype and device: a graph constant while
    compiling, else the one :func:`_constant` keeps."""
    if compiling:
        return torch.asarray(a, dtype=like.dtype, device=like.device)
    return _constant(torch, a, like)


def _finite_by_abs(torch: Any, isfinite: Any) -> Any:
    """``isfinite`` as ``|x| < inf`` on real floating tensors: the same predicate (NaN fails
    the comparison) in 2 operators, where ``torch.isfinite`` dispatches 4."""

    def finite(x: Any) -> Any:
        if x.dtype.is_floating_point:
            return torch.abs(x) < torch.inf
        return isfinite(x)

    return finite


def _real_sign(torch: Any, sign: Any) -> Any:
    """``torch.sign`` on real tensors (0 at NaN): array-api-compat's ``sign`` mends NaN by
    boolean-mask indexing, which ``torch.func.vmap`` cannot batch."""

    def real_sign(x: Any) -> Any:
        return sign(x) if x.dtype.is_complex else torch.sign(x)

    return real_sign


def _real_vecdot(torch: Any, vecdot: Any) -> Any:
    """``vecdot`` as ``torch.linalg.vecdot`` on real tensors of one dtype: one fused kernel,
    where array-api-compat's broadcasts and moves the axis first (about 6 times the time of a
    plain ``sum(x * y)`` on 1e5 floats)."""

    def real_vecdot(x1: Any, x2: Any, /, *, axis: int = -1) -> Any:
        if x1.dtype == x2.dtype and x1.dtype.is_floating_point:
            return torch.linalg.vecdot(x1, x2, dim=axis)
        return vecdot(x1, x2, axis=axis)

    return real_vecdot
