"""Bad paths, files and output streams on the command line (issue 14): one line on stderr and
exit status 2, never a traceback; the report is printed before the plot is drawn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isreshape_cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "lw.npy"
    np.save(path, np.random.default_rng(0).normal(size=300))
    return path


def _one_line_error(capsys, fragment):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and fragment in err, err
    return err


@pytest.mark.parametrize(
    ("plot", "fragment"),
    [
        ("afile/x.png", "is a file, not a folder"),
        ("afile/sub/x.png", "cannot be created"),
        ("out.npy", "must end in one of .png"),
        ("noext", "must end in one of .png"),
    ],
)
def test_diagnose_refuses_a_bad_plot_path_before_any_work(
    tmp_path, weights, capsys, plot, fragment
):
    (tmp_path / "afile").write_text("")
    status = main(["diagnose", str(weights), "--plot", str(tmp_path / plot)])
    assert status == 2
    _one_line_error(capsys, fragment)
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_diagnose_refuses_an_unwritable_folder(tmp_path, weights, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["diagnose", str(weights), "--plot", str(folder / "x.png")]) == 2
        _one_line_error(capsys, "not writable")
    finally:
        folder.chmod(0o755)


def test_diagnose_prints_the_report_before_a_failing_plot(tmp_path, weights, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from isreshape_cli import diagnose

    def broken(*args, **kwargs):
        raise diagnose.DiagnoseError("cannot write the plot: disk full")

    monkeypatch.setattr(diagnose, "plot_diagnostics", broken)
    assert main(["diagnose", str(weights), "--plot", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "verdict:" in captured.out  # the report survived
    assert "disk full" in captured.err and "Traceback" not in captured.err


def test_diagnose_plot_into_a_directory(tmp_path, weights, capsys):
    pytest.importorskip("matplotlib")
    assert main(["diagnose", str(weights), "--plot", str(tmp_path)]) == 0
    assert (tmp_path / "isreshape_diagnose.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_out_directory_writes_inside_and_bad_out_is_refused_first(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "afile").write_text("")
    # Refused in one line before the run (the run would take a minute): no "[1/9]" progress.
    assert main(["demo", "--steps", "1", "--out", str(tmp_path / "afile" / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "[1/" not in captured.out and "is a file, not a folder" in captured.err
    assert main(["demo", "--steps", "1", "--staleness", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "isreshape_demo.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnose_bad_files(tmp_path, capsys):
    complex_path = tmp_path / "c.npy"
    np.save(complex_path, np.ones(40) + 1j)
    assert main(["diagnose", str(complex_path)]) == 2
    _one_line_error(capsys, "complex")

    one = tmp_path / "one.npy"
    np.save(one, np.ones(1))
    assert main(["diagnose", str(one)]) == 2
    _one_line_error(capsys, "at least 2")

    folder = tmp_path / "dir.npy"
    folder.mkdir()
    for path in (folder, tmp_path):
        assert main(["diagnose", str(path)]) == 2
        _one_line_error(capsys, "is a directory")


def test_diagnose_csv_with_a_byte_order_mark(tmp_path, capsys):
    values = np.random.default_rng(1).normal(size=50)
    path = tmp_path / "bom.csv"
    text = "log_w\n" + "\n".join(repr(float(v)) for v in values) + "\n"
    path.write_text(text, encoding="utf-8-sig")
    assert main(["diagnose", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"source": "log_w"' in out


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_output_to_a_full_device(weights, extra):
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "isreshape_cli", "diagnose", str(weights), *extra],
            cwd=ROOT,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "isreshape diagnose: error: cannot write the output: No space left on device"
    )
