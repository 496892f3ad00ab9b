"""benchmarks/torch_loss.py end to end on tiny shapes, one round: every case in the table, with
finite positive times and ratios (no timing assertions: the figures of a tiny run mean nothing)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")


def test_ppo_clip_baseline_matches_a_direct_computation(load_benchmark):
    bench = load_benchmark("torch_loss")
    logp = torch.tensor([[0.0, -1.0], [-0.5, -2.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, -1.0], [-0.5, -1.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    # ratios e^-0.5, 1, 1 (valid tokens); A = 1, 1, -2: max(-A r, -A clip(r, 0.8, 1.2)).
    expected = (max(-math.exp(-0.5), -0.8) + -1.0 + 2.0) / 3
    got = bench.ppo_clip_loss(logp, old, adv, mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
def test_table_has_every_case(load_benchmark, compiled):
    bench = load_benchmark("torch_loss")
    text, summaries = bench.run(B=4, T=16, rounds=1, warmup=0, compiled=compiled)
    names = [n for n in bench.TARGETS if compiled or "compile" not in n]
    assert list(summaries) == names
    for name in names:
        assert f"| {name} |" in text
        s = summaries[name]
        for value in (s.median_s, s.ratio, s.q1, s.q3, s.lo, s.hi):
            assert math.isfinite(value) and value > 0
    assert summaries[bench.BASELINE].ratio == 1.0
    assert text.count("\n| ") == len(names) + 1  # the header row and one row per case


def test_main_writes_the_table(load_benchmark, tmp_path, capsys):
    bench = load_benchmark("torch_loss")
    out = tmp_path / "torch_loss.md"
    argv = ["--B", "4", "--T", "16", "--rounds", "1", "--warmup", "0", "--no-compile"]
    summaries = bench.main([*argv, "--out", str(out)])
    assert capsys.readouterr().out.startswith("# torch loss benchmark")
    text = out.read_text()
    assert text.startswith("# torch loss benchmark")
    assert all(f"| {name} |" in text for name in summaries)
