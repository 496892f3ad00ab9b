"""Data-parallel statistics for the IS Reshape loss over ``torch.distributed``.

When every data-parallel rank holds a slice of the batch, gamma, the ESS statistics and the loss
normalisers must be those of the *global* batch (:ref:`theory-groups`: gamma is the same on every
data-parallel rank and equal to what one process would compute on the whole batch). The
core merges partial reductions through a :class:`isreshape_core.Reducer`; this module provides
one that all-reduces over a process group, and :func:`resolve_reducer`, which turns the loss's
``distributed=`` option into a reducer and a world size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TorchDistributedReducer", "resolve_reducer"]

try:  # Functional collectives: traced by torch.compile without a graph break.
    from torch.distributed import _functional_collectives as _funcol
except ImportError:  # pragma: no cover - torch builds without distributed support
    _funcol = None

_OPS = {"sum": "SUM", "max": "MAX"}


class TorchDistributedReducer:
    """A :class:`isreshape_core.Reducer` that all-reduces partial statistics over a process group.

    ``sum(x)`` and ``max(x)`` return the element-wise sum and maximum of ``x`` over every rank of
    ``group``; ``x`` is detached first (statistics carry no gradient: gamma is a constant of the
    loss), and the input is never modified in place. Eagerly the collective is
    ``torch.distributed.all_reduce`` on a clone; while ``torch.compile`` traces, it is the
    functional ``torch.distributed._functional_collectives.all_reduce``, which compiles without a
    graph break (its first eager call costs seconds of set-up, hence not used eagerly). Every
    rank must call the loss with the same options, as with any collective.

    Parameters
    ----------
    group : ProcessGroup, optional
        The data-parallel group; ``None`` is the default (world) group.
    device : torch.device, optional
        Where the collective runs. The core creates a few 0-d helper tensors (such as the local
        sequence count) on the default device; with NCCL they must travel on the GPU, so a tensor
        on another device is moved to ``device`` for the collective and moved back.

    Examples
    --------
    A one-rank group (in training, ``torchrun`` starts one process per rank):

    >>> import torch
    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> reducer = TorchDistributedReducer()
    >>> print(reducer.sum(torch.tensor([1.0, 2.0])), reducer.max(torch.tensor(3.0)))
    tensor([1., 2.]) tensor(3.)
    >>> dist.destroy_process_group()
    """

    def __init__(self, group: Any = None, device: torch.device | str | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributedReducer needs an initialised default process group; call "
                "torch.distributed.init_process_group(...) first, or pass distributed=False"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.device = None if device is None else torch.device(device)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``x`` over every rank of the group."""
        return self._all_reduce(x, "sum")

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``x`` over every rank of the group."""
        return self._all_reduce(x, "max")

    def _all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        y = x.detach()
        home = y.device
        if self.device is not None and home != self.device:
            y = y.to(self.device)
        if _funcol is not None and torch.compiler.is_compiling():
            out = _funcol.wait_tensor(_funcol.all_reduce(y.contiguous(), op, self.group))
        else:
            out = y.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS[op]), group=self.group)
        return out.to(home) if out.device != home else out

    def __repr__(self) -> str:
        return f"TorchDistributedReducer(group={self.group!r}, device={self.device!r})"


def _is_process_group(value: Any) -> bool:
    return dist.is_available() and isinstance(value, dist.ProcessGroup)


def resolve_reducer(distributed: Any, device: torch.device) -> tuple[Any, int | None]:
    """The reducer and world size for the loss's ``distributed=`` option.

    Parameters
    ----------
    distributed : "auto", bool, ProcessGroup or Reducer
        ``"auto"``: the default group when ``torch.distributed`` is available and initialised
        with more than one rank, else no reducer; ``True``: the default group (an error if none
        is initialised); ``False`` or ``None``: no reducer (rank-local statistics); a
        ``ProcessGroup``: that group; any object with ``sum`` and ``max`` methods: used as the
        reducer as is (its world size is unknown: ``None``).
    device : torch.device
        The device of the loss's inputs (where the collectives run).

    Returns
    -------
    (reducer or None, world size or None)
        World size 1 when no reducer is used.

    Examples
    --------
    >>> import torch
    >>> resolve_reducer(False, torch.device("cpu"))
    (None, 1)
    """
    if distributed is None or distributed is False:
        return None, 1
    if isinstance(distributed, str):
        if distributed != "auto":
            raise ValueError(
                f"distributed must be 'auto', True, False, a ProcessGroup or a Reducer, got "
                f"{distributed!r}"
            )
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        world = dist.get_world_size()
        if world == 1:
            return None, 1
        return TorchDistributedReducer(None, device), world
    if distributed is True:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs an initialised process group; call "
                "torch.distributed.init_process_group(...) first, or pass distributed='auto'"
            )
        return TorchDistributedReducer(None, device), dist.get_world_size()
    if _is_process_group(distributed):
        return TorchDistributedReducer(distributed, device), dist.get_world_size(distributed)
    if callable(getattr(distributed, "sum", None)) and callable(getattr(distributed, "max", None)):
        return distributed, None
    raise TypeError(
        "distributed must be 'auto', True, False, a torch.distributed.ProcessGroup or an object "
        "with sum() and max() methods (an isreshape_core.Reducer), got "
        f"{type(distributed).__name__}"
    )
