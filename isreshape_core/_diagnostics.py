"""Diagnostics of a batch of importance weights and a verdict on them (:ref:`theory-diagnostics`).

The paper's section 8.3 asks whether the log-normal model behind the closed-form gamma holds and
what to do when it does not. :func:`diagnose` answers with a :class:`Diagnostics` report whose
fields are arrays of the input's namespace (batched like the input) and whose ``str`` is a table.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from ._ess import kish_ess_from_log
from ._gamma import closed_form_gamma, gamma_ess
from ._lib.checks import check_rho_min
from ._lib.inputs import prepare_log_weights
from ._lib.namespace import Array, Namespace, array_device
from ._lib.numerics import (
    log_variance_stats,
    logsumexp,
    scaled_deviations,
    shift_by_max,
    tempered_log_weights,
)
from ._lib.reduce import sample_count
from ._lib.tracing import is_concrete, poison, traced_bad_rows
from ._psis import pareto_k_threshold, psis

__all__ = ["VERDICTS", "Diagnostics", "diagnose"]

#: Verdict codes (the ``verdict_code`` field) and their advice, in order of precedence.
VERDICTS = {
    0: ("ok", "log-normal model fits: the closed-form gamma is usable"),
    1: ("heavy_tail", "heavy tail: use the exact ESS gamma (method='ess') or PSIS"),
    2: ("refresh", "sigma^2 > 10: refresh the behaviour policy (resample from pi)"),
    3: ("severe", "no gamma meets rho_min: use a conservative fixed gamma and refresh mu"),
    4: ("empty", "no sample with positive weight: nothing to diagnose"),
    5: ("invalid", "NaN or +inf in the log weights (a traced input, which cannot raise)"),
}

#: Excess kurtosis of log w above which the tail is called heavy: normal log weights have 0, a
#: Laplace distribution 3 (the paper's threshold, :ref:`theory-diagnostics`).
HEAVY_KURTOSIS = 3.0
#: Var(log w) above which the behaviour policy is called stale: the log-normal ESS ratio
#: ``exp(-sigma2 gamma**2)`` is then below 0.3 for every gamma above 0.35 (the paper's threshold,
#: :ref:`theory-diagnostics`).
REFRESH_SIGMA2 = 10.0


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What :func:`diagnose` reports; every array field has the batch shape.

    Attributes
    ----------
    n : array
        Number of unmasked samples.
    sigma2, skewness, excess_kurtosis : array
        Moments of the finite log weights (``sigma2`` with ddof=1; skewness and excess kurtosis
        are the population moments, as ``scipy.stats.skew`` / ``kurtosis`` with ``bias=True``).
        NaN-free for finite input (also at ``+-1e300``: the moments are taken of scaled
        deviations): 0 where fewer than 2 finite values or zero variance.
    max_weight : array
        Largest self-normalised weight ``max_i w_i / sum_j w_j``.
    ess_ratio_at_1 : array
        ``ESS(1) / n``, the plain importance-sampling ESS ratio.
    gamma : array
        The exact ESS gamma (:func:`gamma_ess`) for ``rho_min``.
    ess_ratio_at_gamma : array
        ``ESS(gamma) / n`` at that gamma.
    gamma_closed_form, ess_ratio_at_closed_form : array
        The closed-form gamma (:func:`isreshape_core.gamma_closed_form`) and the ESS ratio it
        actually delivers.
    rho_min : float
    verdict_code : int array
        A key of :data:`VERDICTS`: 5 invalid (NaN or ``+inf`` in a traced row, which cannot
        raise; the row's float fields are then NaN), else 4 empty, else 3 severe (even
        ``gamma = 0`` misses ``rho_min``), else 2 refresh (``sigma2 > 10``), else 1 heavy tail
        (excess kurtosis > 3 or the closed form misses ``rho_min``, or ``k_hat > 0.7``), else
        0 ok.
    shapiro_p : array or None
        Shapiro–Wilk p-value of the finite log weights (first 5000 per row; NaN for fewer than 3),
        a NumPy array; None where SciPy is missing or the input cannot be read on the host (traced,
        or on a GPU).
    k_hat : array
        Pareto ``k_hat`` of the weights (:func:`isreshape_core.psis`); ``inf`` where no tail can
        be fitted (fewer than 25 samples, a constant tail). With a ``mask``, masked samples are
        zero weights for PSIS and still count in its sample size.
    k_threshold : float
        The good-``k`` threshold ``min(1 - 1/log10 S, 0.7)`` for the sample size ``S``.

    Examples
    --------
    >>> import numpy as np
    >>> report = diagnose(np.random.default_rng(0).normal(0.0, 0.5, size=(2, 1000)))
    >>> print(report.n, report.verdicts)
    [1000. 1000.] ['ok', 'ok']
    """

    n: Array
    sigma2: Array
    skewness: Array
    excess_kurtosis: Array
    max_weight: Array
    ess_ratio_at_1: Array
    gamma: Array
    ess_ratio_at_gamma: Array
    gamma_closed_form: Array
    ess_ratio_at_closed_form: Array
    rho_min: float
    verdict_code: Array
    k_hat: Array
    k_threshold: float
    shapiro_p: Any = None

    @property
    def k_hat_verdicts(self) -> list[str]:
        """PSIS's reading of ``k_hat`` per row (reads the values on the host): ``good`` (at most
        the threshold), ``usable with smoothing`` (up to 0.7), ``unreliable`` (above 0.7),
        ``not estimable`` (``inf``)."""
        out = []
        for k in _flat_values(self.k_hat):
            if not math.isfinite(k):
                out.append("not estimable")
            elif k <= self.k_threshold:
                out.append("good")
            elif k <= 0.7:
                out.append("usable with smoothing")
            else:
                out.append("unreliable")
        return out

    @property
    def verdicts(self) -> list[str]:
        """The verdict names, one per row in C order (reads the codes on the host)."""
        return [VERDICTS[int(c)][0] for c in _flat_values(self.verdict_code)]

    def __str__(self) -> str:
        return self.format()

    def format(self, max_rows: int | None = 8, extra_rows: tuple = ()) -> str:
        """The report as a plain-text table, one aligned column per row of the batch (the
        first ``max_rows`` of them; all for None), then a verdict line per row;
        ``str(report)`` is ``report.format()``. ``extra_rows``: more ``(name, cells)`` lines
        for the table, ``cells`` a string per row of the batch.

        Examples
        --------
        >>> import numpy as np
        >>> report = diagnose(np.random.default_rng(0).normal(0.0, 0.5, size=(20, 100)))
        >>> len(report.format().splitlines()), len(report.format(max_rows=None).splitlines())
        (21, 33)
        >>> report.format(max_rows=2, extra_rows=[("note", ["a"] * 20)]).splitlines()[-3].split()
        ['note', 'a', 'a', '...']
        """
        specs = [
            ("n", self.n, "{:.0f}"),
            ("sigma^2 = Var(log w)", self.sigma2, "{:.4g}"),
            ("skewness", self.skewness, "{:.3f}"),
            ("excess kurtosis", self.excess_kurtosis, "{:.3f}"),
            ("max normalised weight", self.max_weight, "{:.4f}"),
            ("ESS/n at gamma=1", self.ess_ratio_at_1, "{:.4f}"),
            ("gamma (exact ESS)", self.gamma, "{:.4f}"),
            ("ESS/n at gamma", self.ess_ratio_at_gamma, "{:.4f}"),
            ("gamma (closed form)", self.gamma_closed_form, "{:.4f}"),
            ("ESS/n at closed form", self.ess_ratio_at_closed_form, "{:.4f}"),
            (f"Pareto k_hat (good <= {self.k_threshold:.2f})", self.k_hat, "{:.3f}"),
        ]
        if self.shapiro_p is not None:
            specs.append(("Shapiro-Wilk p", self.shapiro_p, "{:.3g}"))
        codes = _flat_values(self.verdict_code)
        n_rows = len(codes)
        shown = n_rows if max_rows is None else min(n_rows, max_rows)
        table = [(name, [_fmt(f, v) for v in _flat_values(x)[:shown]]) for name, x, f in specs]
        table += [(name, list(cells)[:shown]) for name, cells in extra_rows]
        width = max(len(name) for name, _ in table)
        widths = [max(len(cells[i]) for _, cells in table) for i in range(shown)]
        head = f"IS Reshape diagnostics (rho_min = {self.rho_min:g}"
        lines = [head + (f", {n_rows} rows)" if n_rows > 1 else ")")]
        for name, cells in table:
            body = "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
            lines.append(f"  {name:<{width}}  {body}{'  ...' if n_rows > shown else ''}")
        k_readings = self.k_hat_verdicts
        for i, c in enumerate(codes[:shown]):
            label, advice = VERDICTS[int(c)]
            prefix = f"row {i}: " if n_rows > 1 else ""
            lines.append(f"  verdict: {prefix}{label} — {advice} (k_hat: {k_readings[i]})")
        return "\n".join(lines)


def _fmt(fmt: str, value: float) -> str:
    return fmt.format(value) if math.isfinite(value) else str(value)


def _flat_values(x: Any) -> list[float]:
    """Host-side values of an array field in C order (only for printing)."""
    import numpy as np

    if hasattr(x, "__dlpack__"):
        try:
            return [float(v) for v in np.from_dlpack(x).reshape(-1)]
        except (TypeError, RuntimeError, BufferError):
            pass
    return [float(v) for v in np.asarray(x).reshape(-1)]


def _moments(xp: Namespace, l: Array, axis: int) -> tuple[Array, Array, Array]:
    """Variance (ddof=1), skewness and excess kurtosis (population) of the finite entries.

    The skewness and kurtosis are scale-free: they are taken of the scaled deviations
    (``scaled_deviations``), so that no power overflows.
    """
    _, var = log_variance_stats(xp, l, axis)
    count, dev, _ = scaled_deviations(xp, l, axis)
    count = xp.squeeze(count, axis=axis)
    c = xp.where(count > 0, count, 1.0)
    d2 = dev * dev
    m2 = xp.sum(d2, axis=axis) / c
    m3 = xp.sum(d2 * dev, axis=axis) / c
    m4 = xp.sum(d2 * d2, axis=axis) / c
    ok = (count >= 2) & (m2 > 0)
    m2s = xp.where(ok, m2, 1.0)
    skew = xp.where(ok, m3 / m2s**1.5, 0.0)
    kurt = xp.where(ok, m4 / (m2s * m2s) - 3.0, 0.0)
    return var, skew, kurt


def _shapiro(xp: Namespace, l: Array, axis: int) -> Any:
    try:
        import numpy as np
        from scipy import stats
    except ImportError:
        return None
    if not is_concrete(l):
        return None
    try:
        host = np.from_dlpack(l)
    except (TypeError, RuntimeError, BufferError):
        return None
    host = np.moveaxis(np.where(np.isfinite(host), host, np.nan), axis, -1)[..., :5000]
    counts = np.sum(np.isfinite(host), axis=-1)
    if host.shape[-1] < 3:
        return np.full(counts.shape, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # Rows with fewer than 3 finite values get NaN below; scipy warns about them.
        warnings.simplefilter("ignore")
        result = stats.shapiro(host, axis=-1, nan_policy="omit")
    p = np.asarray(result.pvalue, dtype=float)
    return np.where(counts >= 3, p, np.nan)


def diagnose(
    log_w: Array,
    rho_min: float = 0.3,
    *,
    axis: int = -1,
    mask: Array | None = None,
) -> Diagnostics:
    """Diagnose a batch of log importance weights: moments, ESS, gamma and a verdict.

    Computes, per row along ``axis``: ``n``, ``sigma^2``, skewness, excess kurtosis, the largest
    normalised weight, ``ESS(1)/n``, the exact ESS gamma for ``rho_min`` and the ESS ratio it
    delivers, the closed-form gamma and the ESS ratio *it* delivers (the honest test of the
    log-normal model), the Shapiro–Wilk p-value where SciPy is present, and a verdict
    (see :class:`Diagnostics`, :data:`VERDICTS` and :ref:`theory-diagnostics`; the thresholds are
    the paper's, section 8.3).

    Parameters
    ----------
    log_w : array
        Log importance weights, samples along ``axis``.
    rho_min : float in (0, 1]
        Least acceptable ESS ratio.
    axis, mask
        As in :func:`ess`.

    Returns
    -------
    Diagnostics
        Printable; its array fields stay in the input's namespace.

    Examples
    --------
    >>> import numpy as np
    >>> l = np.random.default_rng(0).normal(0.0, 0.5, size=1000)
    >>> report = diagnose(l)
    >>> report.verdicts
    ['ok']
    >>> print(np.round(report.gamma_closed_form, 3))
    1.0
    """
    xp, l, mask, axis = prepare_log_weights(log_w, axis=axis, mask=mask)
    check_rho_min(rho_min)
    if not isinstance(rho_min, (int, float)):
        raise TypeError(f"rho_min must be a number for diagnose, got {type(rho_min).__name__}")
    n = sample_count(xp, l, mask, axis)
    stats, ratio_at_zero = _statistics(xp, l, mask, axis, n, rho_min)
    code = _verdict_codes(xp, stats, ratio_at_zero, rho_min)
    bad = traced_bad_rows(xp, l, axis)
    if bad is not None:
        code = xp.where(bad, 5, code)
        stats = {name: poison(xp, v, bad) for name, v in stats.items()}
    return Diagnostics(
        n=n,
        rho_min=float(rho_min),
        verdict_code=xp.astype(code, xp.int32),
        k_threshold=pareto_k_threshold(l.shape[axis]) if l.shape[axis] > 1 else 0.0,
        shapiro_p=_shapiro(xp, l, axis),
        **stats,
    )


def _statistics(
    xp: Namespace, l: Array, mask: Array | None, axis: int, n: Array, rho_min: float
) -> tuple[dict[str, Array], Array]:
    """The array fields of :class:`Diagnostics` but ``n`` and the verdict, by field name, and the
    ESS ratio at ``gamma = 0`` (the verdict's test of whether any gamma meets ``rho_min``)."""
    n_safe = xp.where(n > 0, n, 1.0)
    sigma2, skew, kurt = _moments(xp, l, axis)
    l_rel = shift_by_max(xp, l, axis)[0]  # relative to the max: exact, as gamma_ess works
    lse = logsumexp(xp, l_rel, axis)
    informative = lse > -xp.inf

    def ratio(g):
        z = tempered_log_weights(xp, l_rel, xp.expand_dims(g, axis=axis))
        return kish_ess_from_log(xp, z, axis) / n_safe

    gamma = gamma_ess(l, rho_min, axis=axis, mask=mask)
    closed = closed_form_gamma(xp, l, axis, rho_min, 0.0, 1.0)
    stats = {
        "sigma2": sigma2,
        "skewness": skew,
        "excess_kurtosis": kurt,
        "max_weight": xp.where(informative, xp.exp(-xp.where(informative, lse, 0.0)), 0.0),
        "ess_ratio_at_1": kish_ess_from_log(xp, l_rel, axis) / n_safe,
        "gamma": gamma,
        "ess_ratio_at_gamma": ratio(gamma),
        "gamma_closed_form": closed,
        "ess_ratio_at_closed_form": ratio(closed),
        "k_hat": psis(l, axis=axis)[1],
    }
    return stats, ratio(xp.zeros_like(gamma))


def _verdict_codes(
    xp: Namespace, stats: dict[str, Array], ratio_at_zero: Array, rho_min: float
) -> Array:
    """The verdict of every row (:data:`VERDICTS`), the later tests taking precedence."""
    k_hat, at_closed = stats["k_hat"], stats["ess_ratio_at_closed_form"]
    heavy = (stats["excess_kurtosis"] > HEAVY_KURTOSIS) | (at_closed < rho_min)
    heavy = heavy | (xp.isfinite(k_hat) & (k_hat > 0.7))
    code = xp.zeros(k_hat.shape, dtype=xp.int32, device=array_device(k_hat))
    code = xp.where(heavy, 1, code)
    code = xp.where(stats["sigma2"] > REFRESH_SIGMA2, 2, code)
    code = xp.where(ratio_at_zero < rho_min, 3, code)
    return xp.where(stats["max_weight"] > 0, code, 4)
