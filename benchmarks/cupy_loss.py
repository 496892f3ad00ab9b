"""Benchmark: the CuPy adapter's fused path against the generic (core) path and the torch adapter.

On one GPU, for ``B=256, T=4096`` float32 (defaults; ``--B``, ``--T``, ``--dtype`` change them),
prints the time per call of

- ``fused``: ``isreshape_cupy.is_reshape_loss_and_grad`` (two fused token passes + the core on
  the B sequence weights),
- ``fused token passes``: the two kernels alone (row statistics + gradient),
- ``generic``: the same function with ``fused=False`` (the core on the (B, T) CuPy arrays),
- ``torch``: ``isreshape_torch.is_reshape_loss`` forward + backward on CUDA tensors,

and the achieved memory bandwidth of the fused token passes as a fraction of the device's peak,
``2 * memory clock * bus width / 8`` from the device attributes (the target is >= 50%). The bytes
counted are those the two passes must move: read ``logp``, ``logq``, the rewards and the mask,
then read the mask and write the gradient.

Without a GPU it prints why and exits with status 2.

Run: ``python benchmarks/cupy_loss.py`` (from the repository root).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), ".."),
    os.path.join(os.path.dirname(__file__), "..", "adapters"),
]


def _no_gpu(reason: str) -> None:
    print(f"cupy_loss benchmark: {reason}; nothing measured (exit status 2).")
    sys.exit(2)


def _time_gpu(cupy, fn, repeat: int) -> float:
    """Median seconds per call, timed with CUDA events around each call (after warm-up)."""
    for _ in range(3):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=256)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    spec = importlib.util.find_spec("cupy")
    if spec is None or spec.origin is None:
        _no_gpu("CuPy is not installed (pip install cupy-cuda12x)")
    import cupy

    if not cupy.is_available():
        _no_gpu("no CUDA GPU is available (cupy.is_available() is False)")

    from isreshape_cupy import is_reshape_loss_and_grad, kernels

    B, T, dtype = args.B, args.T, np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    logp_h = np.log(rng.uniform(0.05, 1.0, (B, T))).astype(dtype)
    logq_h = (logp_h + rng.normal(0, 0.02, (B, T))).astype(dtype)
    lengths = rng.integers(T // 2, T + 1, B)
    mask_h = np.arange(T)[None, :] < lengths[:, None]
    rewards_h = rng.normal(0, 1, B).astype(dtype)
    logp, logq, rewards, mask = (cupy.asarray(a) for a in (logp_h, logq_h, rewards_h, mask_h))

    dev = cupy.cuda.Device()
    attrs = dev.attributes
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    clock_khz = attrs.get("MemoryClockRate") or props.get("memoryClockRate")
    bus_bits = attrs.get("GlobalMemoryBusWidth") or props.get("memoryBusWidth")
    peak = 2.0 * clock_khz * 1e3 * bus_bits / 8.0  # bytes/s (double data rate)

    def fused():
        return is_reshape_loss_and_grad(logp, logq, rewards, mask, fused=True)

    def generic():
        return is_reshape_loss_and_grad(logp, logq, rewards, mask, fused=False)

    scale = cupy.asarray(rng.normal(size=(B, 1)).astype(dtype))

    def token_passes():
        kernels.row_stats_cupy(logp, logq, rewards[:, None], mask, False, dtype)
        kernels.token_grad_cupy(mask, scale, (B, T))

    # Bytes the two passes must move (the per-sequence reward is read B times only).
    item = dtype.itemsize
    n = B * T
    moved = n * (2 * item + 1) + B * item + n * (1 + item) + 6 * B * item

    results = {
        "fused (whole call)": _time_gpu(cupy, fused, args.repeat),
        "fused token passes": _time_gpu(cupy, token_passes, args.repeat),
        "generic (core on CuPy)": _time_gpu(cupy, generic, args.repeat),
    }
    try:
        import torch

        from isreshape_torch import is_reshape_loss

        if torch.cuda.is_available():
            t_lp = torch.from_dlpack(logp).clone()
            t_rest = [torch.from_dlpack(a) for a in (logq, rewards, mask)]

            def torch_call():
                x = t_lp.detach().requires_grad_(True)
                loss, _ = is_reshape_loss(x, *t_rest)
                loss.backward()

            results["torch adapter (fwd+bwd)"] = _time_gpu(cupy, torch_call, args.repeat)
        else:
            print("torch adapter: torch has no CUDA here, not measured")
    except ImportError as exc:
        print(f"torch adapter: not measured ({exc})")

    print(f"device: {name}; peak memory bandwidth {peak / 1e9:.0f} GB/s "
          f"({clock_khz} kHz x {bus_bits} bit x 2)")  # fmt: skip
    print(f"B={B} T={T} {dtype}; bytes moved by the fused token passes: {moved / 1e6:.1f} MB")
    base = results["fused (whole call)"]
    for label, sec in results.items():
        print(f"{label:28s} {sec * 1e6:10.1f} us   x{sec / base:6.2f} of fused")
    frac = moved / results["fused token passes"] / peak
    frac_whole = moved / base / peak
    rate = moved / results["fused token passes"] / 1e9
    print(f"fused token passes: {rate:.0f} GB/s = {100 * frac:.0f}% of peak (target >= 50%)")
    print(f"whole fused call: {100 * frac_whole:.0f}% of peak")


if __name__ == "__main__":
    main()
