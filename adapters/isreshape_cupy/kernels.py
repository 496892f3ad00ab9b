"""Fused CUDA kernels of the IS Reshape loss (the two passes over the tokens), and their mirrors.

The loss touches every token twice:

1. **Row statistics** (one :class:`cupy.ReductionKernel` launch, one read of ``logp``, ``logq``,
   ``mask`` and the rewards): for every sequence ``b``, with ``m`` the mask and the sums
   accumulated in float64,

   - ``unit_l_b = sum_t m (logp - logq)`` (the sequence log weight; divided by
     ``n_b = sum_t m`` at the ``"geometric"`` level, ``n_b = 0`` rows left undivided),
   - ``unit_logp_b = sum_t m logp`` (likewise divided at the ``"geometric"`` level; the
     REINFORCE form needs it),
   - ``sum_r_b = sum_t m r``, ``n_b = sum_t m``,
   - ``bad_l_b`` = the number of valid tokens whose ``logp - logq`` is NaN or ``+inf``,
     ``bad_r_b`` = the number of valid tokens whose reward is not finite (the core's checks).

2. **Token gradient** (one :class:`cupy.ElementwiseKernel` launch, one read of ``mask`` and one
   write of the gradient): ``grad_bt = m_bt ? s_b : 0`` with the per-sequence scale
   ``s_b = d loss / d unit_l_b`` (divided by ``n_b`` at the ``"geometric"`` level), which the
   core computes on the ``B`` sequence log weights together with gamma.

The tests hold a NumPy mirror of each kernel (``tests/cupy_adapter/_kernel_mirrors.py``) and run
the adapter's fused path on CPU with the mirrors in place of the kernels, so that only the CUDA
compilation is left to the GPU tests. Keep each pair in step when editing one of them.

CuPy is imported lazily: importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__: list[str] = []

# --------------------------------------------------------------------------------------------
# Pass 1: per-sequence statistics (ReductionKernel over the token axis).
# --------------------------------------------------------------------------------------------

#: The reduction's accumulator: six float64 sums, combined by addition.
ROW_STATS_PREAMBLE = r"""
struct isr_row_stats {
    double l, lp, r, n, bad_l, bad_r;
    __device__ isr_row_stats() : l(0), lp(0), r(0), n(0), bad_l(0), bad_r(0) {}
    __device__ explicit isr_row_stats(int)
        : l(0), lp(0), r(0), n(0), bad_l(0), bad_r(0) {}
};

// One token: masked tokens contribute nothing (their values, even NaN, are never read).
__device__ isr_row_stats isr_row_stats_map(bool m, double lp, double lq, double r) {
    isr_row_stats s;
    if (m) {
        const double d = lp - lq;
        s.l = d;
        s.lp = lp;
        s.r = r;
        s.n = 1.0;
        s.bad_l = (isnan(d) || (isinf(d) && d > 0.0)) ? 1.0 : 0.0;
        s.bad_r = isfinite(r) ? 0.0 : 1.0;
    }
    return s;
}

__device__ isr_row_stats isr_row_stats_add(const isr_row_stats& a, const isr_row_stats& b) {
    isr_row_stats s;
    s.l = a.l + b.l;
    s.lp = a.lp + b.lp;
    s.r = a.r + b.r;
    s.n = a.n + b.n;
    s.bad_l = a.bad_l + b.bad_l;
    s.bad_r = a.bad_r + b.bad_r;
    return s;
}

// "geometric" level: the token mean; rows without a valid token keep their (zero) sum.
__device__ double isr_unit_value(double total, double n, int geometric) {
    return (geometric && n > 0.0) ? total / n : total;
}
"""

ROW_STATS_IN = "T lp, T lq, R r, bool m, int32 geometric"
ROW_STATS_OUT = "F unit_l, F unit_logp, F sum_r, F n_tok, F bad_l, F bad_r"
ROW_STATS_MAP = "isr_row_stats_map(m, (double)lp, (double)lq, (double)r)"
ROW_STATS_REDUCE = "isr_row_stats_add(a, b)"
ROW_STATS_POST = (
    "unit_l = (F)isr_unit_value(a.l, a.n, geometric), "
    "unit_logp = (F)isr_unit_value(a.lp, a.n, geometric), "
    "sum_r = (F)a.r, n_tok = (F)a.n, bad_l = (F)a.bad_l, bad_r = (F)a.bad_r"
)
ROW_STATS_OUT_NAMES = ("unit_l", "unit_logp", "sum_r", "n_tok", "bad_l", "bad_r")


# --------------------------------------------------------------------------------------------
# Pass 2: the token gradient (ElementwiseKernel).
# --------------------------------------------------------------------------------------------

TOKEN_GRAD_IN = "bool m, F s"
TOKEN_GRAD_OUT = "F grad"
TOKEN_GRAD_BODY = "grad = m ? s : (F)0"


# --------------------------------------------------------------------------------------------
# The CuPy kernel objects (built on first use; constructing them needs no GPU).
# --------------------------------------------------------------------------------------------


@functools.cache
def row_stats_kernel() -> Any:
    """The pass-1 :class:`cupy.ReductionKernel` (compiled by CuPy at its first launch)."""
    import cupy

    return cupy.ReductionKernel(
        ROW_STATS_IN,
        ROW_STATS_OUT,
        ROW_STATS_MAP,
        ROW_STATS_REDUCE,
        ROW_STATS_POST,
        "0",
        name="isreshape_row_stats",
        reduce_type="isr_row_stats",
        preamble=ROW_STATS_PREAMBLE,
    )


@functools.cache
def token_grad_kernel() -> Any:
    """The pass-2 :class:`cupy.ElementwiseKernel`."""
    import cupy

    return cupy.ElementwiseKernel(
        TOKEN_GRAD_IN, TOKEN_GRAD_OUT, TOKEN_GRAD_BODY, name="isreshape_token_grad"
    )


def row_stats_cupy(
    logp: Any, logq: Any, rewards: Any, mask: Any, geometric: bool, out_dtype: Any
) -> dict[str, Any]:
    """Launch pass 1 on CuPy arrays; ``rewards`` and ``mask`` broadcast to ``logp``'s (B, T).

    The outputs are preallocated (a ReductionKernel returns only its first output).
    """
    import cupy

    B = logp.shape[0]
    outs = [cupy.empty((B,), dtype=out_dtype) for _ in ROW_STATS_OUT_NAMES]
    row_stats_kernel()(logp, logq, rewards, mask, np.int32(bool(geometric)), *outs, axis=1)
    return dict(zip(ROW_STATS_OUT_NAMES, outs, strict=True))


def token_grad_cupy(mask: Any, scale: Any, shape: tuple) -> Any:
    """Launch pass 2 on CuPy arrays: the (B, T) gradient from the mask and the (B, 1) scale."""
    import cupy

    out = cupy.empty(shape, dtype=scale.dtype)
    return token_grad_kernel()(mask, scale, out)
