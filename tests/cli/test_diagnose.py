"""End-to-end tests of ``isreshape diagnose`` (isreshape_cli.diagnose), run in a subprocess.

Every test writes a file to ``tmp_path``, runs ``python -m isreshape_cli diagnose`` on it and checks
the output against independent computations: NumPy/SciPy moments, a brute-force Kish ESS of
``w**gamma`` and brute-force bisections for the gammas, arviz-stats for ``k_hat`` and the Pareto
rules, and hand-made rows whose verdicts are known by construction.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import (
    arviz_gpd_fit,
    arviz_psis,
    brute_gamma,
    reference_gamma_psis,
    reference_gamma_tail,
)
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "isreshape_cli", "diagnose", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _json(*args: str | Path) -> dict:
    proc = _run(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _brute_ess_ratio(l: np.ndarray, gamma: float) -> float:
    """Kish ESS(w**gamma) / n by a plain sum over the samples."""
    w = np.exp(gamma * (l - l.max()))
    return float(w.sum() ** 2 / (w * w).sum() / l.size)


def _reading(k: float, threshold: float) -> str:
    if not math.isfinite(k):
        return "not estimable"
    if k <= threshold:
        return "good"
    return "usable with smoothing" if k <= 0.7 else "unreliable"


def _check_against_references(
    out: dict,
    rows: np.ndarray,
    rho_min: float = 0.3,
    mask: np.ndarray | None = None,
    verdicts: list[str] | None = None,
) -> None:
    """``rows`` (n_rows, S): the log weights built independently of the CLI; ``mask`` (S,)."""
    assert out["n_rows"] == rows.shape[0]
    # PSIS counts masked samples as zero weights (its k_hat depends on S).
    zeroed = rows if mask is None else np.where(mask, rows, -np.inf)
    _, k_ref = arviz_psis(zeroed)
    np.testing.assert_allclose(out["k_hat"], np.atleast_1d(k_ref), rtol=1e-9)
    threshold = min(1 - 1 / math.log10(rows.shape[1]), 0.7)
    assert out["k_threshold"] == pytest.approx(threshold, abs=1e-15)
    assert out["k_hat_verdict"] == [_reading(k, threshold) for k in np.atleast_1d(k_ref)]
    if verdicts is not None:
        assert out["verdict"] == verdicts
    for i, l in enumerate(rows):
        full = l
        l = l if mask is None else l[mask]
        assert out["n"][i] == l.size
        np.testing.assert_allclose(out["sigma2"][i], np.var(l, ddof=1), rtol=1e-9)
        dev = l - l.mean()
        m2 = np.mean(dev**2)
        np.testing.assert_allclose(out["skewness"][i], np.mean(dev**3) / m2**1.5, rtol=1e-7)
        kurt = np.mean(dev**4) / m2**2 - 3.0
        np.testing.assert_allclose(out["excess_kurtosis"][i], kurt, rtol=1e-7, atol=1e-9)
        w = np.exp(l - l.max())
        np.testing.assert_allclose(out["max_weight"][i], w.max() / w.sum(), rtol=1e-9)
        np.testing.assert_allclose(out["ess_ratio_at_1"][i], _brute_ess_ratio(l, 1.0), rtol=1e-9)
        tail = reference_gamma_tail(zeroed[i])[0]
        want = {
            "ess": brute_gamma(l, rho_min),
            "closed_form": min(math.sqrt(-math.log(rho_min) / np.var(l, ddof=1)), 1.0),
            "psis": reference_gamma_psis(full, rho_min, mask=mask)[0],
            "tail": tail,
            "combined": min(brute_gamma(l, rho_min), tail),
        }
        for method, values in out["methods"].items():
            g = values["gamma"][i]
            assert abs(g - want[method]) < 1e-9, (method, g, want[method])
            np.testing.assert_allclose(values["ess_ratio"][i], _brute_ess_ratio(l, g), rtol=1e-7)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(8)
    return np.stack([rng.normal(0.0, 1.5, 400), rng.standard_t(3, 400)])


def test_npy_one_batch(tmp_path, rows):
    path = tmp_path / "w.npy"
    np.save(path, rows[0])
    out = _json(path, "--rho-min", "0.3")
    _check_against_references(out, rows[:1])
    assert out["source"] == "array"


def test_npy_rows_and_rho_min(tmp_path, rows):
    path = tmp_path / "w.npy"
    np.save(path, rows)
    out = _json(path, "--rho-min", "0.5")
    assert out["rho_min"] == 0.5
    _check_against_references(out, rows, rho_min=0.5)


def test_npz_logp_logq_mask_sequence_level(tmp_path):
    rng = np.random.default_rng(3)
    logp, logq = rng.normal(-1.0, 0.4, (2, 60, 12))
    mask = rng.random((60, 12)) < 0.8
    mask[5] = False  # a sequence without a valid token is left out
    logp[~mask] = np.nan  # padding is never read
    path = tmp_path / "lp.npz"
    np.savez(path, logp=logp, logq=logq, mask=mask)
    out = _json(path, "--level", "geometric")
    assert out["source"] == "logp - logq (geometric)"
    keep = mask.any(axis=1)
    diff = np.where(mask, logp - logq, 0.0)
    l = diff.sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    _check_against_references(out, l[None, :], mask=keep)


def test_csv_columns(tmp_path, rows):
    logq = np.random.default_rng(0).normal(-2.0, 0.5, 200)
    logp = logq + rows[1][:200]
    path = tmp_path / "w.csv"
    lines = ["logp,logq,mask"]
    lines += [
        f"{float(p)!r},{float(q)!r},{int(i != 7)}"
        for i, (p, q) in enumerate(zip(logp, logq, strict=True))
    ]
    path.write_text("\n".join(lines) + "\n")
    out = _json(path)
    l = logp - logq
    _check_against_references(out, l[None, :], mask=np.arange(l.size) != 7)


def test_parquet_list_column(tmp_path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"weights": [list(r) for r in rows]}), path)
    out = _json(path, "--key", "weights")
    _check_against_references(out, rows)


def test_pt_dict_and_tensor(tmp_path, rows):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pt"
    torch.save({"log_w": torch.tensor(rows, dtype=torch.float32)}, path)
    out = _json(path)
    _check_against_references(out, rows.astype(np.float32).astype(np.float64))


def test_table_and_plot(tmp_path, rows):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "w.npy", tmp_path / "sub" / "plot.png"
    np.save(path, rows)
    proc = _run(path, "--plot", png, "--plot-row", "1")
    assert proc.returncode == 0, proc.stderr
    _, k_hat = arviz_psis(rows)
    for needle in ("Pareto k_hat", "gamma closed_form", "row 1", f"{k_hat[1]:.3f}", "verdict"):
        assert needle in proc.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_verdicts_of_hand_made_rows(tmp_path):
    # Verdicts known by construction (checked here with NumPy/SciPy): Normal(0, 0.5^2) is ok;
    # the same with 1% of the draws at +-8 sigma has an excess kurtosis far above 3 (heavy
    # tail); at sigma = 4 it also has sigma^2 > 10, and refresh takes precedence.
    rng = np.random.default_rng(21)
    n = 1000

    def heavy(scale):
        x = rng.normal(0.0, scale, n)
        x[::100] = 8.0 * scale * np.where(np.arange(x[::100].size) % 2, 1.0, -1.0)
        return x

    rows = np.stack([rng.normal(0.0, 0.5, n), heavy(0.5), heavy(4.0)])
    kurt = stats.kurtosis(rows, axis=1)
    var = np.var(rows, axis=1, ddof=1)
    assert kurt[0] < 1 and var[0] < 0.5 and _brute_ess_ratio(rows[0], 1.0) > 0.5
    assert kurt[1] > 10 and var[1] < 10 and kurt[2] > 10 and var[2] > 12
    path = tmp_path / "w.npy"
    np.save(path, rows)
    out = _json(path)
    _check_against_references(out, rows, verdicts=["ok", "heavy_tail", "refresh"])


def test_plot_draws_the_fitted_pareto_tail(tmp_path, rows, monkeypatch):
    # The drawn curve is the GPD density fitted to the PSIS tail (by arviz-stats here), mapped
    # to log space and scaled to the histogram: counts M * bin width * f(e^y - e^c) e^y.
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from isreshape_cli import diagnose as cli

    figures = []
    savefig = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    result = cli.compute(rows, None, 0.3)
    cli.plot_diagnostics(rows, None, result, 1, tmp_path / "plot.png")
    (ax1, ax2) = figures[0].axes
    l = rows[1]
    s = np.sort(l - l.max())
    m = 60  # floor(3 sqrt(400)): 400 > 225 draws
    cutoff = s[-m - 1]
    k, sigma = arviz_gpd_fit(np.exp(s[-m:]) - math.exp(cutoff))
    width = np.diff(np.histogram_bin_edges(l, bins="auto"))[0]
    grid = np.linspace(cutoff, 0.0, 200)
    z = 1.0 + k * (np.exp(grid) - math.exp(cutoff)) / sigma
    density = np.exp(grid) / sigma * z ** (-1.0 / k - 1.0)
    (fit,) = [line for line in ax1.lines if line.get_label() == "GPD fit"]
    np.testing.assert_allclose(fit.get_xdata(), grid + l.max(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fit.get_ydata(), m * width * density, rtol=1e-8)
    # The right panel: the ESS ratio on a grid of gammas, and each method's choice on it.
    (curve,) = [line for line in ax2.lines if line.get_label() == "ESS(gamma)/n"]
    gammas = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(curve.get_xdata(), gammas)
    want = [_brute_ess_ratio(l, g) for g in gammas]
    np.testing.assert_allclose(curve.get_ydata(), want, rtol=1e-9)
    (ess,) = [line for line in ax2.lines if str(line.get_label()).startswith("ess:")]
    assert abs(ess.get_xdata()[0] - brute_gamma(l, 0.3)) < 1e-9


def _write(tmp_path: Path, case: str) -> tuple[Path, list[str], str]:
    """A bad input: ``(path, extra args, a word the error line must contain)``."""
    good = np.zeros(50)
    if case == "missing":
        return tmp_path / "nope.npy", [], "no such file"
    path = tmp_path / {"extension": "w.txt", "csv_text": "w.csv"}.get(case, "w.npz")
    if case == "extension":
        path.write_text("1\n")
        return path, [], "extension"
    if case == "csv_text":
        path.write_text("log_w\n0.5\nabc\n")
        return path, [], "not a number"
    arrays = {
        "missing_key": {"weights": good},
        "shape": {"log_w": np.zeros((2, 3, 4))},
        "nan": {"log_w": np.array([0.0, np.nan, 1.0])},
        "inf": {"log_w": np.array([0.0, np.inf, 1.0])},
        "empty": {"log_w": np.zeros(0)},
        "corrupt": None,
        "rho": {"log_w": good},
    }[case]
    if arrays is None:
        path.write_bytes(b"not a zip file")
        return path, [], "cannot read"
    np.savez(path, **arrays)
    extra = ["--rho-min", "1.5"] if case == "rho" else []
    word = {
        "missing_key": "--key",
        "shape": "shape",
        "nan": "NaN",
        "inf": "inf",
        "empty": "no samples",
        "rho": "--rho-min",
    }[case]
    return path, extra, word


BAD_CASES = ("missing", "extension", "csv_text", "missing_key", "shape", "nan", "inf", "empty")
BAD_CASES += ("corrupt", "rho")


@pytest.mark.parametrize(
    "case",
    BAD_CASES,
)
def test_bad_input_one_line(tmp_path, case):
    path, extra, word = _write(tmp_path, case)
    proc = _run(path, *extra)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("isreshape diagnose: error:") and word in lines[0]
