"""``isreshape diagnose FILE``: diagnostics of saved log importance weights.

Reads log weights (``log_w``), or token/sequence log-probabilities ``logp`` and ``logq`` with an
optional ``mask``, from ``.npy``, ``.npz``, ``.pt`` (needs torch), ``.csv`` or ``.parquet`` (needs
pyarrow); prints :func:`isreshape_core.diagnose`'s report (n, sigma^2, skewness, excess kurtosis,
largest normalised weight, PSIS ``k_hat`` and its reading, the verdict) and, for every method of
:data:`isreshape_core.GAMMA_METHODS`, the gamma it picks and the ESS ratio ``ESS(gamma)/n`` of the
raw weights at that gamma. ``--json`` prints the same as JSON (non-finite numbers as ``null``);
``--plot out.png`` draws the log-weight histogram with the PSIS tail and its generalised Pareto fit,
and the ESS ratio as a function of gamma with each method's choice marked (needs matplotlib).

A 1-D ``log_w`` is one batch; a 2-D one is rows x samples, diagnosed row by row. ``logp``/``logq``
of shape ``(B,)`` give ``l = logp - logq``; of shape ``(B, T)`` they go through
:func:`isreshape_core.log_weights` at ``--level``: ``sequence`` and ``geometric`` give one batch of
``B`` sequences (sequences without a valid token are masked out), ``token`` one batch of all valid
tokens. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DiagnoseError",
    "add_parser",
    "compute",
    "diagnose_rows",
    "format_report",
    "load_arrays",
]

FORMATS = (".npy", ".npz", ".pt", ".csv", ".parquet")
DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")


class DiagnoseError(Exception):
    """A problem with the input that is reported as one line and exit status 2."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``diagnose`` sub-command."""
    parser = subparsers.add_parser(
        "diagnose",
        help="diagnose saved log importance weights: moments, PSIS k_hat, gamma per method",
        description=DESCRIPTION,
    )
    parser.add_argument("file", type=Path, help=f"input file ({', '.join(FORMATS)})")
    parser.add_argument(
        "--rho-min", type=float, default=0.3, help="least acceptable ESS ratio (default 0.3)"
    )
    parser.add_argument(
        "--level",
        choices=("sequence", "geometric", "token"),
        default="sequence",
        help="how 2-D logp/logq become log weights (default sequence)",
    )
    parser.add_argument("--key", default="log_w", help="array/column of log weights (log_w)")
    parser.add_argument("--logp", default="logp", help="array/column of log pi (default logp)")
    parser.add_argument("--logq", default="logq", help="array/column of log mu (default logq)")
    parser.add_argument("--mask", default="mask", help="optional validity mask (default mask)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the diagnostics")
    parser.add_argument(
        "--plot-row", type=int, default=0, help="row drawn by --plot for 2-D input (default 0)"
    )
    parser.set_defaults(func=_run_from_args)
    return parser


# ----------------------------------------------------------------------------- loading


def _read_npy(path: Path) -> Any:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype.names:  # a structured array: its fields are the columns
        return {name: np.asarray(arr[name]) for name in arr.dtype.names}
    return arr


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: np.asarray(data[key]) for key in data.files}


def _torch_to_numpy(value: Any, name: str) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise DiagnoseError(f"entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_complex():
        raise DiagnoseError(f"entry {name!r} holds complex numbers; log weights are real")
    if value.dtype == torch.bool:
        return value.numpy()
    return value.to(torch.float64).numpy()


def _read_pt(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise DiagnoseError(
            "reading .pt files needs torch: pip install isreshape[torch] (or save as .npz)"
        ) from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        return {str(k): _torch_to_numpy(v, str(k)) for k, v in obj.items()}
    return _torch_to_numpy(obj, "the file's content")


def _parse_cell(text: str, column: str, line: int) -> float:
    value = text.strip().lower()
    if value in ("true", "false"):
        return 1.0 if value == "true" else 0.0
    try:
        return float(value)
    except ValueError:
        raise DiagnoseError(f"column {column!r}, line {line}: {text!r} is not a number") from None


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # a byte-order mark is not a name
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DiagnoseError("the CSV file is empty (expected a header row, e.g. 'log_w')")
    header = [h.strip() for h in rows[0]]
    columns: dict[str, list[float]] = {h: [] for h in header}
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DiagnoseError(f"line {i} has {len(row)} fields, the header has {len(header)}")
        for name, cell in zip(header, row, strict=True):
            columns[name].append(_parse_cell(cell, name, i))
    return {name: np.asarray(values, dtype=np.float64) for name, values in columns.items()}


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DiagnoseError(
            "reading .parquet files needs pyarrow: pip install pyarrow (or save as .csv/.npz)"
        ) from None
    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        try:
            out[name] = np.asarray(values, dtype=np.float64)
        except (ValueError, TypeError):
            raise DiagnoseError(
                f"column {name!r} is neither numbers nor lists of equal length"
            ) from None
    return out


READERS = {
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".pt": _read_pt,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def load_arrays(path: Path) -> Any:
    """The file's content: one array, or a dict of named arrays/columns (host NumPy arrays)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DiagnoseError(f"{str(path)!r} is a directory, not a file")
    if suffix not in READERS:
        raise DiagnoseError(
            f"unknown file extension {path.suffix or '(none)'!r} of {str(path)!r}; expected one "
            f"of {', '.join(FORMATS)}"
        )
    if not path.is_file():
        raise DiagnoseError(f"no such file: {str(path)!r}")
    try:
        return READERS[suffix](path)
    except DiagnoseError:
        raise
    except Exception as exc:  # any reader failure is a bad file, reported on one line
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise DiagnoseError(f"cannot read {str(path)!r} as {suffix}: {message}") from None


def _numeric(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise DiagnoseError(f"{name!r} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise DiagnoseError(
            f"{name!r} holds complex numbers (dtype {arr.dtype}); log weights are real: save "
            "the real part explicitly if that is what you mean"
        )
    return arr.astype(np.float64)


def _as_mask(value: Any, shape: tuple, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isin(arr, (0, 1))):
            raise DiagnoseError(f"mask {name!r} must be boolean or 0/1, got other values")
        arr = arr.astype(bool)
    if arr.shape != shape:
        raise DiagnoseError(f"mask {name!r} has shape {arr.shape}, expected {shape}")
    return arr


def _check_finite(arr: np.ndarray, mask: np.ndarray | None, name: str) -> None:
    bad = ~np.isfinite(arr) if mask is None else (~np.isfinite(arr) & mask)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DiagnoseError(
            f"{name!r} holds NaN or inf at {where[0] if len(where) == 1 else where} "
            f"({int(bad.sum())} value(s)); drop those samples or mask them out"
        )


def select_log_weights(
    content: Any, *, key: str, logp: str, logq: str, mask: str, level: str
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(log_w, mask, source)``: log weights of shape ``(S,)`` or ``(rows, S)`` from the file."""
    if isinstance(content, dict):
        names = sorted(content)
        if key in content:
            log_w, source = _numeric(content[key], key), key
            m = _as_mask(content[mask], log_w.shape, mask) if mask in content else None
        elif logp in content and logq in content:
            lp, lq = _numeric(content[logp], logp), _numeric(content[logq], logq)
            if lp.shape != lq.shape:
                raise DiagnoseError(
                    f"{logp!r} and {logq!r} must have the same shape, got {lp.shape} and {lq.shape}"
                )
            if lp.ndim not in (1, 2):
                raise DiagnoseError(
                    f"{logp!r}/{logq!r} must be 1-D (sequences) or 2-D (sequences x tokens), "
                    f"got shape {lp.shape}"
                )
            m = _as_mask(content[mask], lp.shape, mask) if mask in content else None
            _check_finite(lp, m, logp)
            _check_finite(lq, m, logq)
            return (*_combine(lp, lq, m, level), f"{logp} - {logq} ({level})")
        else:
            raise DiagnoseError(
                f"no {key!r} and no {logp!r}+{logq!r} in the file (it holds {names}); name the "
                "log weights with --key, or the log-probabilities with --logp/--logq"
            )
    else:
        log_w, m, source = _numeric(content, "the array"), None, "array"
    if log_w.ndim not in (1, 2):
        raise DiagnoseError(
            f"log weights must be 1-D (one batch) or 2-D (rows x samples), got shape {log_w.shape}"
        )
    _check_finite(log_w, m, source)
    if m is not None:
        log_w = np.where(m, log_w, 0.0)
    return log_w, m, source


def _combine(
    lp: np.ndarray, lq: np.ndarray, m: np.ndarray | None, level: str
) -> tuple[np.ndarray, np.ndarray | None]:
    from isreshape_core import log_weights

    if m is not None:
        lp, lq = np.where(m, lp, 0.0), np.where(m, lq, 0.0)
    if lp.ndim == 1:
        return lp - lq, m
    log_w = np.asarray(log_weights(lp, lq, m, level=level))
    if level == "token":
        return log_w.reshape(-1), None if m is None else m.reshape(-1)
    return log_w, None if m is None else m.any(axis=-1)


# ----------------------------------------------------------------------------- computing


def _values(x: Any) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def diagnose_rows(
    log_w: np.ndarray, mask: np.ndarray | None, rho_min: float
) -> tuple[Any, dict[str, dict[str, list[float]]]]:
    """:func:`isreshape_core.diagnose`'s report of every row, and per gamma rule of
    :data:`isreshape_core.GAMMA_METHODS` the gammas it picks and the ESS ratios at them."""
    import isreshape_core as core

    if log_w.size == 0 or log_w.shape[-1] == 0:
        raise DiagnoseError(f"no samples: the log weights have shape {log_w.shape}")
    counts = np.full(log_w.shape[:-1], log_w.shape[-1]) if mask is None else mask.sum(axis=-1)
    few = np.atleast_1d(counts < 2)
    if np.any(few):
        row = int(np.argwhere(few)[0][0])
        raise DiagnoseError(
            f"a row has {int(np.atleast_1d(counts)[row])} unmasked sample(s) (row {row}); "
            "diagnostics need at least 2 (one sample has no spread, no ESS, no tail)"
        )
    report = core.diagnose(log_w, rho_min, mask=mask)
    methods = {}
    for method in core.GAMMA_METHODS:
        gamma = core.select_gamma(log_w, rho_min, method=method, mask=mask)
        ratio = core.ess_ratio(log_w, gamma, mask=mask)
        methods[method] = {"gamma": _values(gamma), "ess_ratio": _values(ratio)}
    return report, methods


def compute(log_w: np.ndarray, mask: np.ndarray | None, rho_min: float) -> dict[str, Any]:
    """The diagnostics of every row: a dict of per-row lists plus the methods' gammas."""
    return _as_dict(*diagnose_rows(log_w, mask, rho_min), log_w.shape)


def _as_dict(report: Any, methods: dict, shape: tuple) -> dict[str, Any]:
    import isreshape_core as core

    out: dict[str, Any] = {
        "rho_min": float(report.rho_min),
        "k_threshold": float(report.k_threshold),
        "n_rows": 1 if len(shape) == 1 else int(shape[0]),
        "n_samples": int(shape[-1]),
    }
    for field in (
        "n",
        "sigma2",
        "skewness",
        "excess_kurtosis",
        "max_weight",
        "ess_ratio_at_1",
        "k_hat",
    ):
        out[field] = _values(getattr(report, field))
    out["k_hat_verdict"] = report.k_hat_verdicts
    out["verdict"] = report.verdicts
    out["advice"] = [core.VERDICTS[int(c)][1] for c in _values(report.verdict_code)]
    out["methods"] = methods
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _cell(fmt: str, value: float) -> str:
    return fmt.format(value) if math.isfinite(value) else str(value)


def format_report(report: Any, methods: dict[str, dict[str, list[float]]], title: str) -> str:
    """``title``, then the report's table (:meth:`isreshape_core.Diagnostics.format`, every
    row) with a line per gamma rule: the gamma it picks and, in parentheses, ``ESS(gamma)/n``."""
    extra = [
        (
            f"gamma {method} (ESS/n)",
            [
                f"{_cell('{:.4f}', g)} ({_cell('{:.3f}', r)})"
                for g, r in zip(values["gamma"], values["ess_ratio"], strict=True)
            ],
        )
        for method, values in methods.items()
    ]
    return f"{title}\n{report.format(max_rows=None, extra_rows=extra)}"


# ----------------------------------------------------------------------------- plotting


def _gpd_tail(l: np.ndarray) -> tuple[float, float, float, int] | None:
    """``(cutoff, k_hat, sigma, M)`` of the PSIS fit of ``l`` (1-D, finite), shifted by its max,
    from :func:`isreshape_core.psis_tail_fit`; None where PSIS fitted no tail."""
    import isreshape_core as core

    k_hat, sigma, cutoff = (float(np.asarray(v)) for v in core.psis_tail_fit(l))
    if not math.isfinite(k_hat):
        return None
    return cutoff, k_hat, sigma, core.psis_tail_length(l.size)


def plot_diagnostics(
    log_w: np.ndarray, mask: np.ndarray | None, result: dict[str, Any], row: int, path: Path
) -> None:
    """Histogram with the Pareto tail and the ESS-versus-gamma curve of one row, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise DiagnoseError(
            "--plot needs matplotlib: pip install isreshape[plot] (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    l_all = log_w if log_w.ndim == 1 else log_w[row]
    m_row = None if mask is None else (mask if mask.ndim == 1 else mask[row])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_tail(ax1, l_all if m_row is None else l_all[m_row], result, row)
    _plot_ess_curve(ax2, l_all, m_row, result, row)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise DiagnoseError(f"cannot write the plot {str(path)!r}: {exc}") from None
    finally:
        plt.close(fig)


def _plot_tail(ax: Any, l: np.ndarray, result: dict[str, Any], row: int) -> None:
    """The histogram of the row's valid log weights ``l``, with the PSIS tail and its fitted
    generalised Pareto density (scaled to the histogram's counts)."""
    _, edges, _ = ax.hist(l, bins="auto", color="0.6", label="log weights")
    fit = _gpd_tail(l)
    top = l.max()
    if fit is not None:
        cutoff, k, sigma, m = fit
        ax.axvspan(cutoff + top, top, color="tab:orange", alpha=0.2, label=f"tail (top {m})")
        grid = np.linspace(cutoff, 0.0, 200)
        x = np.exp(grid) - math.exp(cutoff)
        z = 1.0 + k * x / sigma
        ok = z > 0
        log_dens = np.full_like(grid, -np.inf)
        log_dens[ok] = -math.log(sigma) - (1.0 / k + 1.0) * np.log(z[ok]) + grid[ok]
        width = edges[1] - edges[0]
        ax.plot(grid + top, m * width * np.exp(log_dens), color="tab:red", label="GPD fit")
    ax.set(
        xlabel="log weight l = log pi - log mu",
        ylabel="count",
        title=f"k_hat = {result['k_hat'][row]:.3f} ({result['k_hat_verdict'][row]})",
    )
    ax.legend(fontsize=8)


def _plot_ess_curve(
    ax: Any, l_all: np.ndarray, m_row: np.ndarray | None, result: dict[str, Any], row: int
) -> None:
    """``ESS(gamma)/n`` of the row on a grid of gamma, ``rho_min``, and each method's choice."""
    import isreshape_core as core

    gammas = np.linspace(0.0, 1.0, 101)
    ratios = [float(np.asarray(core.ess_ratio(l_all, float(g), mask=m_row))) for g in gammas]
    ax.plot(gammas, ratios, color="k", label="ESS(gamma)/n")
    ax.axhline(result["rho_min"], color="0.5", ls="--", label=f"rho_min = {result['rho_min']:g}")
    markers = "osD^v<>"
    for marker, (method, values) in zip(markers, result["methods"].items(), strict=False):
        ax.plot(
            values["gamma"][row],
            values["ess_ratio"][row],
            marker,
            ms=8,
            mfc="none",
            label=f"{method}: gamma {values['gamma'][row]:.3f}",
        )
    ax.set(xlabel="gamma", ylabel="ESS/n", ylim=(0, 1.05), title="ESS ratio versus gamma")
    ax.legend(fontsize=8)


# ----------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace, stream=None) -> int:
    """Load, diagnose, print (and plot); raises :class:`DiagnoseError` on bad input."""
    stream = sys.stdout if stream is None else stream
    if not 0.0 < args.rho_min <= 1.0:
        raise DiagnoseError(f"--rho-min must be in (0, 1], got {args.rho_min:g}")
    plot_path = None
    if args.plot is not None:  # checked first: a bad path is one line, before any work
        from ._output import OutputError, check_image_path

        try:
            plot_path = check_image_path(args.plot, "--plot", "isreshape_diagnose.png")
        except OutputError as exc:
            raise DiagnoseError(str(exc)) from None
    content = load_arrays(args.file)
    log_w, mask, source = select_log_weights(
        content, key=args.key, logp=args.logp, logq=args.logq, mask=args.mask, level=args.level
    )
    try:
        report, methods = diagnose_rows(log_w, mask, args.rho_min)
    except (ValueError, TypeError) as exc:
        raise DiagnoseError(" ".join(str(exc).split())) from None
    result = _as_dict(report, methods, log_w.shape)
    if plot_path is not None and not 0 <= args.plot_row < result["n_rows"]:
        raise DiagnoseError(f"--plot-row must be in [0, {result['n_rows']}), got {args.plot_row}")
    # The report first: a plot that fails to be written does not lose it.
    if args.json:
        payload = {"file": str(args.file), "source": source, **result}
        if plot_path is not None:
            payload["plot"] = str(plot_path)
        print(json.dumps(_json_safe(payload), allow_nan=False, indent=1), file=stream)
    else:
        title = f"isreshape diagnose {args.file} [{source}]: {result['n_rows']} row(s) x "
        title += f"{result['n_samples']} samples"
        print(format_report(report, methods, title), file=stream)
    if plot_path is not None:
        stream.flush()
        plot_diagnostics(log_w, mask, result, args.plot_row, plot_path)
        if not args.json:
            print(f"plot written to {plot_path}", file=stream)
    return 0


def _run_from_args(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except DiagnoseError as exc:
        print(f"isreshape diagnose: error: {exc}", file=sys.stderr)
        return 2
