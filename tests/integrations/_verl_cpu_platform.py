"""A CPU platform for verl 0.9, registered through verl's own ``PlatformRegistry``.

verl 0.9.1 ships CUDA, NPU and ROCm platforms and, with no accelerator, falls back to CUDA. The
trainer tests run verl's real FSDP2 engine on CPU processes with gloo: importing this module
registers the platform ``cpu`` (device ``cpu``, backend ``gloo``), which ``VERL_PLATFORM=cpu``
selects, the extension point verl documents for a new device. ``VERL_ENGINE_DEVICE=cuda`` makes
verl's engine registry hand out its FSDP engine, registered for ``cuda`` and ``npu`` only.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _zero(*_args: Any, **_kwargs: Any) -> int:
    return 0


# What verl reads of ``get_torch_device()``: torch.cpu's functions plus the memory queries,
# which have no CPU counterpart (verl logs them as metrics).
CPU_DEVICE_MODULE = types.SimpleNamespace(
    current_device=torch.cpu.current_device,
    device_count=torch.cpu.device_count,
    is_available=torch.cpu.is_available,
    is_initialized=lambda: True,
    set_device=torch.cpu.set_device,
    synchronize=torch.cpu.synchronize,
    current_stream=torch.cpu.current_stream,
    stream=torch.cpu.stream,
    Stream=torch.cpu.Stream,
    Event=torch.cpu.Event,
    get_device_name=lambda *_args: "CPU",
    empty_cache=lambda: None,
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    max_memory_allocated=_zero,
    max_memory_reserved=_zero,
    memory_allocated=_zero,
    memory_reserved=_zero,
    mem_get_info=lambda *_args: (0, 0),
    reset_peak_memory_stats=lambda *_args: None,
)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """verl's platform interface on CPU processes (collectives over gloo)."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    def nvtx_range(self, msg: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None
