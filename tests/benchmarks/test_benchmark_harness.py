"""The shared timing harness of benchmarks/ (``_harness.py``): ratios, spread and results file."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def harness(load_benchmark):
    return load_benchmark("_harness")


def test_summarise_takes_ratios_round_by_round(harness):
    # Rounds where the whole machine slowed down by 10x: the per-round ratio stays 2.
    times = {"base": [1.0, 10.0, 1.0, 10.0, 1.0], "case": [2.0, 20.0, 2.0, 20.0, 3.0]}
    s = harness.summarise(times, "base", "case")
    assert s.ratio == 2.0
    assert (s.lo, s.hi) == (2.0, 3.0)
    assert (s.q1, s.q3) == (2.0, 2.0)
    assert s.median_s == 3.0
    assert harness.summarise(times, "base", "base").ratio == 1.0


def test_verdict(harness):
    assert harness.verdict(1.1, 1.1) == "<= 1.1x: met"
    assert harness.verdict(1.2, 1.1) == "<= 1.1x: MISSED"
    assert harness.verdict(9.0, None) == ""


def test_time_interleaved_times_every_case_every_round(harness):
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = harness.time_interleaved(cases, rounds=3, warmup=1)
    assert calls == list("abcbcacababc")  # one warm-up round, then rotated orders
    for name in "abc":
        assert len(timings.thread[name]) == len(timings.process[name]) == 3
        assert all(t >= 0 for t in timings.thread[name])
    # Microsecond calls: the two clocks' granularity makes the share only roughly 1 here.
    assert math.isnan(timings.thread_share) or timings.thread_share > 0


def test_flush_writes_the_whole_buffer(harness):
    harness.flush_caches()
    first = int(harness._FLUSH_BUFFER[0])
    harness.flush_caches()
    buffer = harness._FLUSH_BUFFER
    assert buffer.nbytes == 64 * 2**20
    assert int(buffer[0]) == int(buffer[-1]) == (first + 1) % 256


def test_write_results_keeps_the_history_section(harness, tmp_path):
    path = tmp_path / "r.md"
    path.write_text("# old table\n\n| a |\n\n## History\n\nbefore: 1.5x\n")
    harness.write_results(path, "# new table\n")
    assert path.read_text() == "# new table\n\n## History\n\nbefore: 1.5x\n"
    fresh = tmp_path / "fresh.md"
    harness.write_results(fresh, "# t\n")
    assert fresh.read_text() == "# t\n"


def test_git_commit_outside_a_repository(harness, tmp_path):
    assert harness.git_commit(tmp_path) == "unknown"
    commit = harness.git_commit(Path(__file__).resolve().parents[2])
    pattern = r"[0-9a-f]{7,}(\+dirty)? \(loss code last changed in [0-9a-f]{7,}\)"
    assert re.fullmatch(pattern, commit), commit


def test_flush_before_every_timed_call_unless_told_not_to(harness):
    seen = []
    cases = {"a": lambda: seen.append(int(harness._FLUSH_BUFFER[-1]))}
    timings = harness.time_interleaved(cases, rounds=3, warmup=0)
    assert timings.flushed and len(set(seen)) == 3  # a new value written before each call
    seen.clear()
    timings = harness.time_interleaved(cases, rounds=3, warmup=0, flush=False)
    assert not timings.flushed and len(set(seen)) == 1
    assert "NOT flushed" in harness.method_text(3, 0, timings)


def test_out_without_a_value_is_the_results_file(harness, tmp_path):
    parser = harness.arguments("d", tmp_path / "x.md")
    assert parser.parse_args(["--out"]).out == str(tmp_path / "x.md")
    assert parser.parse_args(["--out", "y.md"]).out == "y.md"
    assert parser.parse_args([]).out is None


_MAPPED_PROBE = """
import ctypes, ctypes.util, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import _harness
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in names]
try:
    mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
except (OSError, AttributeError, TypeError):
    sys.exit(3)
mallinfo2.restype = MallInfo2
if sys.argv[2] == "settled":
    _harness.settle_allocator()
before = mallinfo2().hblks
block = np.ones(2**20, dtype=np.uint8)
print(mallinfo2().hblks - before)
"""


@pytest.mark.parametrize("state", ["fresh", "settled"])
def test_settled_allocator_serves_the_loss_arrays_from_the_heap(state):
    """In a fresh process glibc maps an array of 1 MiB (twice a benchmark tensor) on its own;
    once the harness has freed its 16 MiB block, it comes from the heap (``mallinfo2().hblks``,
    the mapped blocks, does not grow)."""
    import subprocess
    import sys

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    run = subprocess.run(
        [sys.executable, "-c", _MAPPED_PROBE, bench, state], capture_output=True, text=True
    )
    if run.returncode == 3:
        pytest.skip("needs glibc's mallinfo2")
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == (1 if state == "fresh" else 0)
