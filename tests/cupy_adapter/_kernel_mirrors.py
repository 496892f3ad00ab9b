"""NumPy mirrors of the CUDA kernels of ``isreshape_cupy.kernels``: the same formulas, token by
token, so that the adapter's fused path runs on CPU with them in place of the kernels (and the GPU
tests compare the kernels against them). Keep each in step with its kernel."""

from __future__ import annotations

from typing import Any

import numpy as np

from isreshape_cupy.kernels import ROW_STATS_OUT_NAMES

__all__ = ["ROW_STATS_OUT_NAMES", "reference_row_stats", "reference_token_grad"]


def reference_row_stats(
    logp: np.ndarray,
    logq: np.ndarray,
    rewards: np.ndarray,
    mask: np.ndarray,
    geometric: bool,
    out_dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """NumPy mirror of the row-statistics kernel: the same formulas, token by token.

    ``logp``, ``logq`` (B, T); ``rewards`` and ``mask`` broadcastable to (B, T). Returns a dict of
    (B,) arrays keyed like the kernel's outputs (:data:`ROW_STATS_OUT_NAMES`).
    """
    shape = np.broadcast_shapes(np.shape(logp), np.shape(logq), np.shape(rewards), np.shape(mask))
    m = np.broadcast_to(np.asarray(mask, dtype=bool), shape)
    lp = np.broadcast_to(np.asarray(logp, dtype=np.float64), shape)
    lq = np.broadcast_to(np.asarray(logq, dtype=np.float64), shape)
    r = np.broadcast_to(np.asarray(rewards, dtype=np.float64), shape)
    # isr_row_stats_map: masked tokens contribute zeros and their values are never read.
    lp_m = np.where(m, lp, 0.0)
    lq_m = np.where(m, lq, 0.0)
    r_m = np.where(m, r, 0.0)
    with np.errstate(invalid="ignore"):  # -inf - (-inf) is NaN here as in CUDA: counted as bad
        d = lp_m - lq_m
    bad_l = np.where(m & (np.isnan(d) | (d == np.inf)), 1.0, 0.0)
    bad_r = np.where(m & ~np.isfinite(r_m), 1.0, 0.0)
    n = np.sum(np.where(m, 1.0, 0.0), axis=-1)
    with np.errstate(invalid="ignore"):  # inf + -inf sums: NaN, as in CUDA (rejected as bad)
        sum_l = np.sum(d, axis=-1)
        sum_lp = np.sum(lp_m, axis=-1)
        sum_r = np.sum(r_m, axis=-1)

    def unit_value(total: np.ndarray) -> np.ndarray:  # isr_unit_value
        if not geometric:
            return total
        return np.where(n > 0.0, total / np.where(n > 0.0, n, 1.0), total)

    out = {
        "unit_l": unit_value(sum_l),
        "unit_logp": unit_value(sum_lp),
        "sum_r": sum_r,
        "n_tok": n,
        "bad_l": np.sum(bad_l, axis=-1),
        "bad_r": np.sum(bad_r, axis=-1),
    }
    return {k: v.astype(out_dtype) for k, v in out.items()}


def reference_token_grad(mask: np.ndarray, scale: np.ndarray, shape: tuple) -> np.ndarray:
    """NumPy mirror of the token-gradient kernel: ``grad = m ? s : 0`` broadcast to ``shape``.

    ``scale`` is the per-sequence scale with a trailing axis of length 1, (B, 1).
    """
    m = np.broadcast_to(np.asarray(mask, dtype=bool), shape)
    s = np.broadcast_to(scale, shape)
    return np.where(m, s, np.zeros((), dtype=s.dtype))
