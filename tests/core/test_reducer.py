"""Sharded statistics: every shard, combining partials through a ``Reducer``, gets what one
process computes on the whole batch. Shards run in threads; the reducer is an all-reduce built on
a barrier, like ``torch.distributed.all_reduce`` or ``jax.lax.psum`` across ranks."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import run_sharded, to_numpy

import isreshape_core as isr
from isreshape_core._lib.reduce import count_true


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("spread", [2.0, 0.05])  # gamma inside (0, 1); gamma_max (no search)
def test_sharded_gamma_and_ess_equal_the_whole_batch(world, spread):
    rng = np.random.default_rng(world)
    l = rng.standard_t(3, size=(2, 301)) * spread  # 2 rows, samples split unevenly along axis 1
    l[0, 7] = -np.inf
    mask = rng.random((2, 301)) < 0.9
    cuts = np.sort(rng.choice(np.arange(1, 301), size=world - 1, replace=False))
    shards = list(zip(np.split(l, cuts, axis=1), np.split(mask, cuts, axis=1), strict=True))

    def stats(shard, reducer):
        part, m = shard
        return (
            isr.gamma_ess(part, 0.3, mask=m, reducer=reducer),
            isr.gamma_closed_form(part, 0.3, mask=m, reducer=reducer),
            isr.ess(part, 0.6, mask=m, reducer=reducer),
            isr.ess_ratio(part, 0.6, mask=m, reducer=reducer),
        )

    whole = (
        isr.gamma_ess(l, 0.3, mask=mask),
        isr.gamma_closed_form(l, 0.3, mask=mask),
        isr.ess(l, 0.6, mask=mask),
        isr.ess_ratio(l, 0.6, mask=mask),
    )
    for result in run_sharded(stats, shards):
        for got, want in zip(result, whole, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_count_true_counts_exactly(xp, axis):
    rng = np.random.default_rng(0)
    x = rng.random((37, 1001)) < 0.3
    want = np.count_nonzero(x, axis=axis)
    for dtype in (xp.float32, xp.float64):
        got = count_true(xp, xp.asarray(x), axis, dtype)
        assert got.dtype == dtype and tuple(got.shape) == np.shape(want)
        np.testing.assert_array_equal(to_numpy(got), want)


@pytest.mark.parametrize("shape", [(7, 5), (64, 2048)])  # below and above the integer count
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_count_true_is_exact_in_the_float_dtype(xp, shape, axis):
    """Counts of booleans in float32, along an axis or over all, equal NumPy's integer counts:
    torch counts many booleans into an integer first (a faster pass), the others into the
    float, and both are exact."""
    rng = np.random.default_rng(3)
    mask = rng.random(shape) < 0.37
    got = count_true(xp, xp.asarray(mask), axis, xp.float32)
    want = np.count_nonzero(mask, axis=axis)
    assert got.dtype == xp.float32 and tuple(got.shape) == np.shape(want)
    np.testing.assert_array_equal(to_numpy(got), want)
