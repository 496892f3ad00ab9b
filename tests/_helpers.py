"""Helpers for the test suite: backend discovery, conversion to NumPy, reference computations."""

from __future__ import annotations

import importlib.util
import math
import os
import threading

import numpy as np

ALL_BACKENDS = ("numpy", "strict", "torch", "jax", "cupy")


def _usable(name: str, module: str) -> bool:
    """Whether the backend's module is installed (and, for CuPy, sees a CUDA device: its wheel
    imports without one and fails at the first array)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:  # a folder named like the module is no install
        return False
    if name == "cupy":
        import cupy

        return bool(cupy.is_available())
    return True


def available_backends() -> list[str]:
    """Backends to run the ``xp`` fixture on: ``ISRESHAPE_XP`` (comma-separated) or every one
    that is installed (CuPy: with a GPU)."""
    requested = os.environ.get("ISRESHAPE_XP")
    names = [b.strip() for b in requested.split(",")] if requested else list(ALL_BACKENDS)
    modules = {
        "numpy": "numpy",
        "strict": "array_api_strict",
        "torch": "torch",
        "jax": "jax",
        "cupy": "cupy",
    }
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"ISRESHAPE_XP names unknown backends {unknown}; known: {ALL_BACKENDS}")
    out = []
    for name in names:
        if _usable(name, modules[name]):
            out.append(name)
        elif requested:
            raise RuntimeError(
                f"ISRESHAPE_XP asks for {name!r}, which is not installed"
                + (" or sees no CUDA device" if name == "cupy" else "")
            )
    return out


def get_namespace(name: str):
    """The array-API namespace for a backend name, configured for float64."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "strict":
        import array_api_strict as xp

        return xp
    if name == "torch":
        import array_api_compat.torch as xp
        import torch

        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        return xp
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        return xp
    if name == "cupy":
        import array_api_compat.cupy as xp

        return xp
    raise ValueError(name)


def to_numpy(x) -> np.ndarray:
    """Any backend's array (or a Python number) as a float64-or-bool NumPy array."""
    if isinstance(x, (int, float, bool, np.ndarray, np.generic)):
        return np.asarray(x)
    mod = type(x).__module__
    if mod.startswith("array_api_strict"):
        import array_api_strict as s

        if x.dtype == s.bool:
            return np.asarray(x._array)
        return np.asarray(x._array)
    if mod.startswith("torch"):
        return x.detach().cpu().numpy()
    if mod.startswith("cupy"):  # no implicit conversion from device memory
        return x.get()
    return np.asarray(x)


def brute_force_ess(w: np.ndarray) -> float:
    """Kish's ESS by the textbook formula, with plain Python sums over ``w`` (1-D, weights >= 0)."""
    s1 = sum(float(v) for v in w)
    s2 = sum(float(v) ** 2 for v in w)
    return 0.0 if s2 == 0 else s1 * s1 / s2


# --------------------------------------------------------------------------------------------
# Reference computations shared by the core, CuPy and CLI tests. None calls isreshape: plain
# NumPy and Python sums, brute-force bisections, and arviz-stats for PSIS.


def brute_ratio(l, gamma: float, r=None, mask=None) -> float:
    """Kish's ESS of ``w**gamma`` (times ``|r|`` where given) over the ``n`` unmasked samples, / n.

    1-D ``l``; ``-inf`` is weight 0 at every gamma (``0**0`` is 0 here), Python sums.
    """
    l = np.asarray(l, dtype=np.float64)
    keep = np.ones(l.shape, bool) if mask is None else np.asarray(mask, bool)
    finite = np.isfinite(l) & keep
    w = np.zeros_like(l)
    if finite.any():
        w[finite] = np.exp(gamma * (l[finite] - l[finite].max()))
    if r is not None:
        w = w * np.abs(np.asarray(r, dtype=np.float64))
    return brute_force_ess(w[keep]) / int(keep.sum())


def brute_gamma(l, rho: float, lo: float = 0.0, hi: float = 1.0, iters: int = 200, **kw) -> float:
    """The largest gamma in ``[lo, hi]`` with ``brute_ratio(l, gamma, **kw) >= rho``, by plain
    bisection (``lo`` where even ``lo`` misses it). Assumes the ratio is monotone in gamma."""
    if brute_ratio(l, hi, **kw) >= rho:
        return hi
    if brute_ratio(l, lo, **kw) < rho:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if brute_ratio(l, mid, **kw) >= rho:
            lo = mid
        else:
            hi = mid
    return lo


def loop_log_weights(logp, logq, mask=None, level: str = "sequence") -> np.ndarray:
    """Sequence (summed), geometric (mean) or token log weights by explicit loops over tokens.

    ``(B, T)`` inputs; sequence/geometric give ``(B,)`` (0 for a sequence without a valid
    token), token gives ``(B, T)`` with 0 at padded positions.
    """
    logp, logq = np.asarray(logp, np.float64), np.asarray(logq, np.float64)
    B, T = logp.shape
    mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    if level == "token":
        out = np.zeros((B, T))
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    out[b, t] = logp[b, t] - logq[b, t]
        return out
    out = np.zeros(B)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        total = sum(logp[b, t] - logq[b, t] for t in valid)
        out[b] = total / len(valid) if (level == "geometric" and valid) else total
    return out


def arviz_psis(log_w, r_eff: float = 1.0, axis: int = -1):
    """arviz-stats' PSIS of log *weights* along ``axis``: ``(smoothed, k_hat)``.

    arviz-stats takes log-likelihoods and smooths their negation (``psislw(-log_w)``), and moves
    the sample axis to the end: it is put back here.
    """
    import pytest

    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    log_lik = -np.asarray(to_numpy(log_w), np.float64)
    smoothed, k_hat = array_stats.psislw(log_lik, r_eff=r_eff, axis=axis)
    return np.moveaxis(np.asarray(smoothed), -1, axis), np.asarray(k_hat)


def assert_log_close(actual, expected, atol: float) -> None:
    """Equal ``-inf`` patterns and finite entries within ``atol`` (arrays of any backend)."""
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=atol)


def arviz_gpd_fit(exceedances):
    """arviz-stats' Zhang-Stephens fit ``(k_hat with the PSIS prior, sigma)`` of sorted
    exceedances over the cutoff (``_gpdfit``)."""
    import pytest

    array_stats = pytest.importorskip("arviz_stats.base").array_stats
    k, sigma = array_stats._gpdfit(np.asarray(exceedances, np.float64))
    return float(k), float(sigma)


def _arviz_k(row) -> float:
    """arviz-stats' k_hat of one row of log weights; ``inf`` where all weights are equal."""
    row = np.asarray(row, np.float64)
    finite = row[np.isfinite(row)]
    if finite.size == 0 or np.all(finite == finite[0]):
        return float("inf")
    return float(arviz_psis(row)[1])


def reference_gamma_psis(
    l, rho: float, mask=None, fallback: float = 0.3, k_threshold: float = 0.7
) -> tuple[float, float]:
    """``(gamma, k_hat)`` of the PSIS rule for one row, from arviz-stats' smoothing and
    brute-force bisections: the ESS gamma of the smoothed weights where ``k_hat <=
    k_threshold``, ``min(fallback, ESS gamma of the raw weights)`` above it, the raw weights'
    ESS gamma where no tail can be fitted (fewer than 25 draws). Masked samples are zero
    weights for PSIS and left out of every ESS."""
    l = np.asarray(l, np.float64)
    zeroed = l if mask is None else np.where(mask, l, -np.inf)
    raw = brute_gamma(l, rho, mask=mask)
    if l.size < 25:
        return raw, float("inf")
    smoothed, k = arviz_psis(zeroed)
    k = float(k)
    if k > k_threshold:
        return min(fallback, raw), k
    return brute_gamma(smoothed, rho, mask=mask), k


def reference_gamma_tail(
    l, k_target: float = 0.5, gamma_min: float = 0.0, gamma_max: float = 1.0, iters: int = 12
) -> tuple[float, float]:
    """``(gamma, k_hat)`` of the tail rule for one row with arviz-stats' k_hat of ``w**gamma``.

    As documented for ``gamma_tail``: start at 1 where ``k_hat <= k_target``, else at
    ``k_target / k_hat``, clipped to the bounds; keep it where ``k_hat(w**start) <= k_target``,
    else bisect ``iters`` times on ``[gamma_min, start]`` keeping the feasible end;
    ``gamma_max`` where no tail can be fitted to ``w``.
    """
    l = np.asarray(l, np.float64)

    def k_at(g):
        return float("inf") if g == 0 else _arviz_k(np.where(np.isfinite(l), g * l, -np.inf))

    k = _arviz_k(l)
    if not np.isfinite(k):
        return gamma_max, k
    start = 1.0 if k <= k_target else k_target / k
    start = min(max(start, gamma_min), gamma_max)
    if k_at(start) <= k_target:
        return start, k
    a, b = gamma_min, start
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if k_at(mid) <= k_target:
            a = mid
        else:
            b = mid
    return a, k


# --------------------------------------------------------------------------------------------
# Batches and the loss by loops, shared by the core's and the adapters' loss tests.


def make_batch(seed=0, B=6, T=5, spread=0.3, per_token_rewards=False, min_length=1):
    """``(logp, logq, rewards, mask)`` as NumPy arrays: token log-probs in ``log U(0.05, 1)``,
    ``logq = logp + Normal(0, spread)``, rows of random lengths ``min_length..T``
    (left-aligned), rewards ``Normal(0, 1)`` per sequence ``(B,)`` or per token ``(B, T)``."""
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    logq = logp + rng.normal(0, spread, (B, T))
    lengths = rng.integers(min_length, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    rewards = rng.normal(0, 1, (B, T) if per_token_rewards else B)
    return logp, logq, rewards, mask


def _aggregate_term(term, mode, n_tokens, n_valid, B, T):
    """One token's share of the loss under verl's ``agg_loss`` mode."""
    if mode == "token-mean":
        return term / n_tokens
    if mode == "seq-mean-token-sum":
        return term / B
    if mode == "seq-mean-token-mean":
        return term / (n_valid * B)
    return term / T


def reference_loss(logp, logq, rewards, mask, gamma, level, mode, form="objective"):
    """The loss by explicit Python loops over sequences and tokens (fixed gamma, NumPy inputs).

    ``form="objective"``: ``-r (w**gamma - 1) / gamma`` per token; ``"surrogate"``: the value whose
    gradient the loss has, ``-r w**gamma log pi``."""
    B, T = logp.shape
    r = rewards if rewards.ndim == 2 else np.repeat(rewards[:, None], T, axis=1)
    n_tokens = mask.sum()
    total = 0.0
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        seq_l = sum(logp[b, t] - logq[b, t] for t in valid)
        seq_logp = sum(logp[b, t] for t in valid)
        if level == "geometric":
            seq_l, seq_logp = seq_l / len(valid), seq_logp / len(valid)
        for t in valid:
            if level == "token":
                unit_l, unit_logp = logp[b, t] - logq[b, t], logp[b, t]
            else:
                unit_l, unit_logp = seq_l, seq_logp
            if form == "objective":
                h = unit_l if gamma == 0 else math.expm1(gamma * unit_l) / gamma
            else:
                h = math.exp(gamma * unit_l) * unit_logp
            total += _aggregate_term(-r[b, t] * h, mode, n_tokens, len(valid), B, T)
    return total


# --------------------------------------------------------------------------------------------
# Sharded runs: threads stand in for ranks, an all-reduce on a barrier for the collective.


class ThreadAllReduce:
    """An all-reduce among ``world`` threads (the two methods of a ``Reducer``): each deposits
    its partial, all read the total. Works on any array namespace; torch tensors are detached."""

    def __init__(self, world: int) -> None:
        self.world = world
        # A shard that makes a collective the others do not make fails, instead of hanging.
        self.barrier = threading.Barrier(world, timeout=120.0)
        self.slots: list = [None] * world
        self.local = threading.local()

    def _all(self, x, op):
        from array_api_compat import array_namespace

        if hasattr(x, "detach"):
            x = x.detach().clone()
        elif not hasattr(x, "__array_namespace__"):  # a Python or NumPy scalar
            x = np.asarray(x)
        self.slots[self.local.rank] = x
        self.barrier.wait()
        xp = array_namespace(*self.slots)
        out = op(xp, xp.stack(self.slots))
        self.barrier.wait()
        return out

    def sum(self, x):
        return self._all(x, lambda xp, s: xp.sum(s, axis=0))

    def max(self, x):
        return self._all(x, lambda xp, s: xp.max(s, axis=0))


def assert_shards_match_whole(results, loss, grad, metrics):
    """Every shard's ``(loss, grad, metrics)`` of a sharded loss (``results`` of
    :func:`run_sharded`) against one process's on the whole batch: the same loss and metrics on
    every shard, and the shards' gradients concatenated along the batch are the whole one."""
    for shard_loss, _, shard_metrics in results:
        np.testing.assert_allclose(shard_loss, loss, rtol=1e-12)
        for name, value in metrics.items():
            np.testing.assert_allclose(shard_metrics[name], value, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(np.concatenate([g for _, g, _ in results]), grad, rtol=1e-12)


def run_sharded(fn, shards):
    """``[fn(shard, reducer) for shard in shards]``, each call in its own thread, the threads
    sharing one :class:`ThreadAllReduce`; re-raises the first error."""
    reducer = ThreadAllReduce(len(shards))
    results = [None] * len(shards)
    errors = []

    def work(rank):
        reducer.local.rank = rank
        try:
            results[rank] = fn(shards[rank], reducer)
        except Exception as exc:  # surfaced below, after the other threads are released
            errors.append(exc)
            reducer.barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
