"""The timing harness shared by ``torch_loss.py`` and ``jax_loss.py`` (standard library + NumPy).

How a loss is timed, and why:

- **Ratios in one run.** Every loss is compared with a baseline (PPO-clip on the same tensors)
  timed in the same run, round by round: the ratio of each round is the case's time over the
  baseline's time in that round, and the table reports the median of those per-round ratios
  with their spread (quartiles, min and max). Absolute times on a shared machine drift between
  runs; ratios taken round by round mostly do not.
- **Interleaved.** Every round times each case once, in an order rotated by one each round, so
  that a burst of load from other processes, or a case that warms the caches for the next one,
  hits all cases alike.
- **Cold caches.** Before every timed call a 64 MiB buffer is written, as a model's backward
  pass would between two loss calls: a loss timed with its inputs still in cache is timed in a
  state it is never in during training. 64 MiB is far more than a core's L1 and L2; a large
  server L3 (hundreds of MiB on some, shared by the cores) is only partly evicted.
- **This thread's CPU time** (``time.thread_time_ns``): on one thread it is the work done,
  insensitive to other processes competing for the cores. The process's CPU time is recorded
  too, and the table states the fraction of it the thread accounts for: near 1 means no work
  ran on other threads (a framework's worker pool) and escaped the measure.
- **A settled allocator.** Before the rounds a 16 MiB block is allocated and freed, as a
  model's activations are in every training step. glibc's ``malloc`` serves blocks above a
  threshold (128 KiB at start) by ``mmap`` and raises the threshold to the size of a mapped
  block that is freed: in a training process the loss's arrays (512 KiB each here) come from
  the heap, while in a fresh process every one of them would be mapped, faulted in page by
  page and unmapped again, a cost (and a noise: per-round ratios spread 6 times wider) that
  training does not pay. Elsewhere than glibc the block changes nothing.
- Python's garbage collector is paused during the timed rounds.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLUSH_BYTES = 64 * 2**20
SETTLE_BYTES = 16 * 2**20  # at most glibc's largest dynamic mmap threshold (32 MiB)
HISTORY_HEADING = "## History"
_FLUSH_BUFFER = np.zeros(FLUSH_BYTES, dtype=np.uint8)


def flush_caches() -> None:
    """Write every byte of a 64 MiB buffer (a new value each call), evicting the caches."""
    _FLUSH_BUFFER.fill((int(_FLUSH_BUFFER[0]) + 1) % 256)


def settle_allocator() -> None:
    """Allocate, write and free a block of :data:`SETTLE_BYTES`, as a training step frees its
    activations: glibc's ``malloc`` then takes smaller arrays from the heap rather than mapping
    each one (see the module's notes)."""
    np.ones(SETTLE_BYTES, dtype=np.uint8)


@dataclass(frozen=True)
class Timings:
    """Per-round seconds of each case (``thread``: this thread's CPU time; ``process``: the
    process's CPU time), in case order; ``flushed``: whether the caches were flushed."""

    thread: dict[str, list[float]]
    process: dict[str, list[float]]
    flushed: bool = True

    @property
    def thread_share(self) -> float:
        """Total thread CPU time over total process CPU time, all timed calls together."""
        total = sum(sum(v) for v in self.process.values())
        return sum(sum(v) for v in self.thread.values()) / total if total > 0 else math.nan


def time_interleaved(
    cases: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 2, flush: bool = True
) -> Timings:
    """Time each ``cases[name]()`` once per round, the cases interleaved, caches flushed first.

    ``warmup`` untimed rounds run first (compilation, allocator warm-up). Each callable must do
    all the work it is timed for (forward and backward, and wait for the result). ``flush=False``
    (warm caches) is for seeing what the flush changes, not for the tables.
    """
    names = list(cases)
    thread = {name: [] for name in names}
    process = {name: [] for name in names}
    settle_allocator()
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if flush:
                    flush_caches()
                # The process's interval encloses the thread's.
                p0 = time.process_time_ns()
                t0 = time.thread_time_ns()
                cases[name]()
                t1 = time.thread_time_ns()
                p1 = time.process_time_ns()
                if r >= warmup:
                    thread[name].append((t1 - t0) * 1e-9)
                    process[name].append((p1 - p0) * 1e-9)
    finally:
        gc.enable()
    return Timings(thread, process, flush)


@dataclass(frozen=True)
class Summary:
    """One case against its baseline: the median time, and the median, quartiles, minimum and
    maximum of the per-round ratios to the baseline."""

    median_s: float
    ratio: float
    q1: float
    q3: float
    lo: float
    hi: float


def summarise(times: Mapping[str, list[float]], baseline: str, name: str) -> Summary:
    """``name`` against ``baseline``, round by round (see :class:`Summary`)."""
    ratios = sorted(t / b for t, b in zip(times[name], times[baseline], strict=True))
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return Summary(
        statistics.median(times[name]), statistics.median(ratios), q1, q3, ratios[0], ratios[-1]
    )


def verdict(ratio: float, target: float | None) -> str:
    """``"<= 1.1x: met"`` / ``"<= 1.1x: MISSED"``, or empty without a target."""
    if target is None:
        return ""
    return f"<= {target:g}x: {'met' if ratio <= target else 'MISSED'}"


def time_columns(s: Summary) -> str:
    """The time cells of a row: median ms, median ratio, quartiles, min-max."""
    return f"{s.median_s * 1e3:.3f} | {s.ratio:.2f} | {s.q1:.2f}-{s.q3:.2f} | {s.lo:.2f}-{s.hi:.2f}"


def method_text(rounds: int, warmup: int, timings: Timings) -> str:
    """The sentences that say how the table's times were taken."""
    caches = (
        "caches flushed (64 MiB written) before every timed call"
        if timings.flushed
        else "caches NOT flushed (warm: a diagnostic run, not the harness's figures)"
    )
    return (
        f"{rounds} interleaved rounds after {warmup} warm-up rounds (compile time excluded); "
        f"{caches}; the allocator settled by a freed 16 MiB block; this thread's CPU time "
        f"(it was {timings.thread_share:.1%} of the process's "
        "CPU time over the timed calls). Ratios are per round, to the baseline timed in the same "
        "round: median, quartiles (IQR) and min-max over the rounds; median ms: the case's "
        "median over the rounds."
    )


TIME_HEADER = "median ms | ratio (median) | ratio IQR | ratio min-max"


def platform_line(frameworks: str) -> str:
    """Versions, processor, the CPUs this process may use, and the date (UTC)."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{frameworks}, NumPy {np.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()} {cpu_model()}".rstrip()
        + f", {os.cpu_count()} CPUs on the machine, {today}."
    )


def cpu_model() -> str:
    """The processor's model name (Linux's ``/proc/cpuinfo``, else ``platform.processor()``):
    ratios between losses differ between processors by more than their spread in one run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def git_commit(root: Path) -> str:
    """``"<HEAD> (loss code last changed in <commit>)"``: the checked-out commit of ``root``
    (``+dirty`` if tracked files have changes) and the last commit that touched
    ``isreshape_core/`` or ``adapters/``; ``"unknown"`` outside a git work tree."""
    try:
        head = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        code = _git(root, "log", "-1", "--format=%h", "--", "isreshape_core", "adapters")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''} (loss code last changed in {code})"


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def arguments(description: str, results: Path) -> argparse.ArgumentParser:
    """The options both benchmarks take: shapes, rounds, warm-up rounds and the output file
    (``--out`` alone: ``results``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--B", type=int, default=64, help="responses (default 64)")
    parser.add_argument("--T", type=int, default=2048, help="tokens per response (2048)")
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds (100)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (3)")
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(results),
        default=None,
        help=f"write the table to this markdown file (no value: {results.name} in results/)",
    )
    parser.add_argument(
        "--no-flush", action="store_true", help="warm caches (to see what the flush changes)"
    )
    return parser


def write_results(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, keeping the file's ``## History`` section (if any) after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    at = old.find(HISTORY_HEADING)
    history = "\n" + old[at:] if at >= 0 else ""
    path.write_text(text + history)
