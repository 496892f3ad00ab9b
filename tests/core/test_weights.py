"""Tests of isreshape_core/weights.py against explicit per-sequence loops."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import to_numpy

import isreshape_core as isr


def make_batch(seed=0, B=4, T=7):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, size=(B, T)))
    logq = np.log(rng.uniform(0.05, 1.0, size=(B, T)))
    lengths = rng.integers(1, T + 1, size=B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    return logp, logq, mask


def test_levels_match_loops(xp):
    logp, logq, mask = make_batch()
    args = (xp.asarray(logp), xp.asarray(logq), xp.asarray(mask))
    seq = to_numpy(isr.log_weights(*args, level="sequence"))
    geo = to_numpy(isr.log_weights(*args, level="geometric"))
    tok = to_numpy(isr.log_weights(*args, level="token"))
    for b in range(logp.shape[0]):
        valid = [logp[b, t] - logq[b, t] for t in range(logp.shape[1]) if mask[b, t]]
        np.testing.assert_allclose(seq[b], sum(valid), rtol=1e-12)
        np.testing.assert_allclose(geo[b], sum(valid) / len(valid), rtol=1e-12)
        for t in range(logp.shape[1]):
            want = logp[b, t] - logq[b, t] if mask[b, t] else 0.0
            np.testing.assert_allclose(tok[b, t], want, rtol=1e-12)


def test_without_mask_and_sequence_level_inputs(xp):
    logp, logq, _ = make_batch(1)
    seq = to_numpy(isr.log_weights(xp.asarray(logp), xp.asarray(logq)))
    np.testing.assert_allclose(seq, (logp - logq).sum(axis=1), rtol=1e-12)
    geo = to_numpy(isr.log_weights(xp.asarray(logp), xp.asarray(logq), level="geometric"))
    np.testing.assert_allclose(geo, (logp - logq).mean(axis=1), rtol=1e-12)
    one_d = to_numpy(isr.log_weights(xp.asarray(logp[:, 0]), xp.asarray(logq[:, 0])))
    np.testing.assert_allclose(one_d, logp[:, 0] - logq[:, 0], rtol=1e-12)


def test_padding_garbage_is_ignored(xp):
    logp, logq, mask = make_batch(2)
    logp = np.where(mask, logp, -np.inf)  # -inf - -inf = NaN at padded positions
    logq = np.where(mask, logq, -np.inf)
    out = to_numpy(isr.log_weights(xp.asarray(logp), xp.asarray(logq), xp.asarray(mask)))
    assert np.isfinite(out).all()


def test_empty_sequence_gets_zero(xp):
    logp, logq, mask = make_batch(3)
    mask[1] = False
    for level in ("sequence", "geometric"):
        out = to_numpy(
            isr.log_weights(xp.asarray(logp), xp.asarray(logq), xp.asarray(mask), level=level)
        )
        assert out[1] == 0.0


def test_errors(xp):
    logp, logq, mask = make_batch(4)
    with pytest.raises(ValueError, match="same shape"):
        isr.log_weights(xp.asarray(logp), xp.asarray(logq[:, :3]))
    with pytest.raises(ValueError, match="level must be one of"):
        isr.log_weights(xp.asarray(logp), xp.asarray(logq), level="tokens")
    with pytest.raises(ValueError, match="mask of shape"):
        isr.log_weights(xp.asarray(logp), xp.asarray(logq), xp.asarray(mask[:, :2]))
    bad = logp.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="logp - logq contains NaN"):
        isr.log_weights(xp.asarray(bad), xp.asarray(logq), xp.asarray(mask))


def test_half_precision_is_promoted_before_subtracting():
    torch = pytest.importorskip("torch")
    logp = torch.tensor([[-80.0, -1.0]], dtype=torch.bfloat16)
    logq = torch.tensor([[-1.0, -80.0]], dtype=torch.bfloat16)
    out = isr.log_weights(logp, logq, level="token")
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), [[-79.0, 79.0]])
