"""How each metric of the losses and of :func:`step_gamma` combines over groups and shards.

One table, :data:`METRIC_MERGE`, says for every metric name how partial values combine: the
per-group summaries of the loss (one gamma per GRPO group), the per-shard values of a
data-parallel batch, the per-process values an integration gathers for its logs. The core merges
with it (:func:`merge_rows`); the integrations read it (:func:`metric_reduction`) to reduce what
they gather.
"""

from __future__ import annotations

from typing import Literal

from ._lib.namespace import Array, Namespace, array_device
from ._lib.reduce import Reducer

__all__ = ["METRIC_MERGE", "metric_reduction"]

Reduction = Literal["mean", "max", "sum"]

#: How each metric combines over groups and shards: ``"mean"`` (the mean over all groups, each
#: group counted once), ``"max"`` (the largest: the worst group's), ``"sum"`` (counts).
METRIC_MERGE: dict[str, Reduction] = {
    "gamma": "mean",
    "sigma2": "mean",
    "ess_ratio": "mean",
    "ess_ratio_at_1": "mean",
    "ess_ratio_pooled": "mean",
    "max_weight": "max",
    "k_hat": "max",
    "log_scale": "max",
    "n_capped": "sum",
    "n_nonfinite": "sum",
    "clip_fraction": "mean",
    "behaviour_gamma": "mean",
    "behaviour_log_cap": "mean",
}


def metric_reduction(name: str) -> Reduction:
    """How the metric ``name`` combines over groups, shards or processes (:data:`METRIC_MERGE`).

    A name may carry a prefix (``"is_reshape/k_hat"``); unknown names are averaged.

    Parameters
    ----------
    name : str
        The metric's name, as the losses return it, optionally prefixed by ``".../"``.

    Returns
    -------
    {"mean", "max", "sum"}

    Examples
    --------
    >>> print(metric_reduction("is_reshape/k_hat"), metric_reduction("gamma"))
    max mean
    """
    return METRIC_MERGE.get(name.rsplit("/", 1)[-1], "mean")


def merge_rows(xp: Namespace, rows: dict[str, Array], reducer: Reducer | None) -> dict[str, Array]:
    """0-d metrics from per-row values ``rows[name]`` (shape ``(G,)``, one per group), merged over
    the groups of every shard by :data:`METRIC_MERGE` (two collectives at most).

    Every shard must hold the same metric names; ``"mean"`` weighs every group once.
    """
    if reducer is None and all(v.shape == (1,) for v in rows.values()):
        return {k: xp.reshape(v, ()) for k, v in rows.items()}  # one group: nothing to merge
    means = [k for k in rows if metric_reduction(k) == "mean"]
    sums = [k for k in rows if metric_reduction(k) == "sum"]
    maxima = [k for k in rows if metric_reduction(k) == "max"]
    out: dict[str, Array] = {}
    if means or sums:
        first = rows[(means + sums)[0]]
        n_rows = xp.asarray(first.shape[0] * 1.0, dtype=first.dtype, device=array_device(first))
        totals = xp.stack([xp.sum(rows[k]) for k in means + sums] + [n_rows])
        if reducer is not None:
            totals = reducer.sum(totals)
        for i, k in enumerate(means):
            out[k] = totals[i] / totals[-1]
        for i, k in enumerate(sums, start=len(means)):
            out[k] = totals[i]
    if maxima:
        worst = xp.stack([xp.max(rows[k]) for k in maxima])
        if reducer is not None:
            worst = reducer.max(worst)
        for i, k in enumerate(maxima):
            out[k] = worst[i]
    return {k: out[k] for k in rows}
