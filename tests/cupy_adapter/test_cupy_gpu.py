"""GPU tests of isreshape_cupy: the fused kernels launched for real, against the generic (core) path
on the same CuPy arrays, the kernels' NumPy mirrors, and the torch adapter on the same device.

Collected only where ``cupy.is_available()`` is true: a CuPy wheel imports without a GPU and fails
at the first array.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from _helpers import make_batch as numpy_batch

_spec = importlib.util.find_spec("cupy")
if _spec is None or _spec.origin is None:  # a folder named cupy on sys.path would import as "cupy"
    pytest.skip("CuPy is not installed: the GPU tests need cupy-cuda12x", allow_module_level=True)
import cupy  # noqa: E402

if not cupy.is_available():
    pytest.skip(
        "no CUDA GPU (cupy.is_available() is False): the fused-kernel GPU tests cannot run",
        allow_module_level=True,
    )

from _kernel_mirrors import reference_row_stats, reference_token_grad  # noqa: E402

from isreshape_cupy import is_reshape_loss_and_grad, kernels  # noqa: E402

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-6)}


def make_batch(seed=0, B=64, T=257, spread=0.05, per_token_rewards=False):
    """GPU-sized batches, some rows without a valid token."""
    return numpy_batch(seed, B, T, spread, per_token_rewards, min_length=0)


def to_gpu(dtype, *arrays):
    return [cupy.asarray(a.astype(dtype) if a.dtype != bool else a) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geometric", [False, True])
def test_row_stats_kernel_matches_reference(dtype, geometric):
    logp, logq, rewards, mask = make_batch(1, per_token_rewards=True)
    logp[0, 0] = np.nan
    mask[0, 0] = True
    args = to_gpu(dtype, logp, logq, rewards, mask)
    got = kernels.row_stats_cupy(*args, geometric, dtype)
    want = reference_row_stats(logp.astype(dtype), logq.astype(dtype),
                                        rewards.astype(dtype), mask, geometric, dtype)  # fmt: skip
    for key in kernels.ROW_STATS_OUT_NAMES:
        np.testing.assert_allclose(cupy.asnumpy(got[key]), want[key], equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_token_grad_kernel_matches_reference(dtype):
    rng = np.random.default_rng(2)
    mask = rng.uniform(size=(33, 130)) < 0.5
    scale = rng.normal(size=(33, 1)).astype(dtype)
    got = kernels.token_grad_cupy(cupy.asarray(mask), cupy.asarray(scale), mask.shape)
    np.testing.assert_array_equal(cupy.asnumpy(got), reference_token_grad(mask, scale, mask.shape))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("level", ["sequence", "geometric"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
@pytest.mark.parametrize("group_size", [None, 8])
def test_fused_matches_generic_on_gpu(dtype, level, mode, form, group_size):
    logp, logq, rewards, mask = make_batch(3, per_token_rewards=(mode == "token-mean"))
    args = to_gpu(dtype, logp, logq, rewards, mask)
    opts = dict(level=level, loss_agg_mode=mode, form=form, group_size=group_size)
    loss_f, grad_f, met_f = is_reshape_loss_and_grad(*args, fused=True, **opts)
    loss_g, grad_g, met_g = is_reshape_loss_and_grad(*args, fused=False, **opts)
    assert isinstance(grad_f, cupy.ndarray) and grad_f.dtype == dtype
    np.testing.assert_allclose(cupy.asnumpy(loss_f), cupy.asnumpy(loss_g), **TOL[dtype])
    np.testing.assert_allclose(cupy.asnumpy(grad_f), cupy.asnumpy(grad_g), **TOL[dtype])
    for key in met_g:
        np.testing.assert_allclose(cupy.asnumpy(met_f[key]), cupy.asnumpy(met_g[key]),
                                   **TOL[dtype])  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("level", ["sequence", "geometric"])
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_fused_matches_torch_adapter_on_same_device(dtype, level, form):
    torch = pytest.importorskip("torch")
    isreshape_torch = pytest.importorskip("isreshape_torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here: the torch adapter cannot run on the GPU")
    logp, logq, rewards, mask = make_batch(4, per_token_rewards=True)
    args = to_gpu(dtype, logp, logq, rewards, mask)
    loss, grad, metrics = is_reshape_loss_and_grad(*args, level=level, form=form)
    t_args = [torch.from_dlpack(a) for a in args]
    lp = t_args[0].clone().requires_grad_(True)
    t_loss, t_metrics = isreshape_torch.is_reshape_loss(lp, *t_args[1:], level=level, form=form)
    t_loss.backward()
    np.testing.assert_allclose(cupy.asnumpy(loss), t_loss.detach().cpu().numpy(), **TOL[dtype])
    np.testing.assert_allclose(cupy.asnumpy(grad), lp.grad.cpu().numpy(), **TOL[dtype])
    for key in metrics:
        np.testing.assert_allclose(cupy.asnumpy(metrics[key]),
                                   t_metrics[key].detach().cpu().numpy(), **TOL[dtype])  # fmt: skip


def test_fused_half_precision_and_errors_on_gpu():
    logp, logq, rewards, mask = make_batch(5)
    h = to_gpu(np.float16, logp, logq, rewards, mask)
    s = to_gpu(np.float32, logp.astype(np.float16), logq.astype(np.float16),
               rewards.astype(np.float16), mask)  # fmt: skip
    loss_h, grad_h, _ = is_reshape_loss_and_grad(*h, fused=True)
    loss_s, grad_s, _ = is_reshape_loss_and_grad(*s, fused=True)
    assert grad_h.dtype == cupy.float32
    np.testing.assert_allclose(cupy.asnumpy(loss_h), cupy.asnumpy(loss_s), rtol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(grad_h), cupy.asnumpy(grad_s), rtol=1e-5, atol=1e-7)
    bad = logp.copy()
    bad[0, 0] = np.nan
    args = to_gpu(np.float64, bad, logq, rewards, np.ones_like(mask))
    with pytest.raises(ValueError, match="logp - logq contains NaN"):
        is_reshape_loss_and_grad(*args, fused=True)
    with pytest.raises(ValueError, match="fused=True supports level"):
        is_reshape_loss_and_grad(*to_gpu(np.float64, logp, logq, rewards, mask), level="token",
                                 fused=True)  # fmt: skip
