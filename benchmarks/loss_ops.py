"""ATen operator counts of the torch losses, forward + backward, against PPO-clip.

On a GPU an eager loss costs about one kernel launch per ATen operator, and the sequence-level
statistics are tiny, so the count, not the arithmetic, is what a micro-batch pays. The count is
deterministic for given shapes and options (unlike a time), so it is a stable measure of the
pipeline's overhead. Every operator dispatched while the loss and its backward run is counted with
a ``TorchDispatchMode`` (views and metadata operators included, as the dispatcher sees them).

    python benchmarks/loss_ops.py                      # B = 64, T = 2048, float32
    python benchmarks/loss_ops.py --out benchmarks/results/loss_ops.md

Targets (issue 16, as ratios to PPO-clip): default (sequence, exact-ESS gamma) <= 3x; fixed
gamma <= 2x; token-level exact-ESS <= 4x.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

from torch_loss import STALE, make_inputs, ppo_clip_loss, stale_behaviour  # noqa: E402

from isreshape_torch import is_reshape_loss  # noqa: E402

BASELINE = "PPO-clip, token-mean (baseline)"
TARGETS = {
    "IS Reshape, exact-ESS gamma (default), sequence": 3.0,
    "IS Reshape, fixed gamma 0.5, sequence": 2.0,
    "IS Reshape, fixed gamma 0.5, token": 2.0,
    "IS Reshape, exact-ESS gamma, token": 4.0,
    STALE: 4.0,
}


class CountOps(TorchDispatchMode):
    """Counts every ATen operator dispatched inside the ``with`` block, by name, and in
    ``full_size`` those with a tensor operand of at least ``full_size`` elements (``B T``: the
    passes over the tokens, which dominate the time on long responses)."""

    def __init__(self, full_size: int | None = None) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.size = full_size
        self.full_size = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        if self.size is not None:
            operands = pytree.tree_leaves((args, kwargs))
            sizes = [a.numel() for a in operands if isinstance(a, torch.Tensor)]
            self.full_size += max(sizes, default=0) >= self.size
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[torch.Tensor], torch.Tensor], logp: torch.Tensor) -> CountOps:
    """The operators of one forward + backward of ``step`` at ``logp`` (after one warm-up call,
    so that one-time set-up is not counted)."""
    for counted in (False, True):
        logp.grad = None
        mode = CountOps(full_size=logp.numel())
        if counted:
            with mode:
                step(logp).backward()
            return mode
        step(logp).backward()
    raise AssertionError("unreachable")


def cases(logq, adv, mask) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def isr(q=logq, **kw):
        return lambda lp: is_reshape_loss(lp, q, adv, mask, distributed=False, **kw)[0]

    return {
        BASELINE: lambda lp: ppo_clip_loss(lp, logq, adv, mask),
        "IS Reshape, fixed gamma 0.5, sequence": isr(gamma=0.5),
        "IS Reshape, fixed gamma 0.5, token": isr(gamma=0.5, level="token"),
        "IS Reshape, exact-ESS gamma (default), sequence": isr(),
        "IS Reshape, exact-ESS gamma, token": isr(level="token"),
        STALE: isr(stale_behaviour(logq), level="token"),
        "IS Reshape, closed-form gamma, sequence": isr(gamma="closed_form"),
        "IS Reshape, precomputed gamma tensor (step gamma), sequence": isr(gamma=torch.tensor(0.5)),
        "IS Reshape, PSIS gamma, sequence": isr(gamma="psis"),
    }


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=64)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--out", default=None, help="write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logp0, logq, adv, mask = make_inputs(args.B, args.T, torch.device("cpu"))
    logp = logp0.clone().requires_grad_()
    totals, passes, top = {}, {}, {}
    for name, step in cases(logq, adv, mask).items():
        mode = count_ops(step, logp)
        totals[name] = sum(mode.counts.values())
        passes[name] = mode.full_size
        top[name] = ", ".join(f"{op} {k}" for op, k in mode.counts.most_common(4))
    base = totals[BASELINE]
    lines = [
        "# ATen operators of the torch losses, forward + backward",
        "",
        f"B={args.B}, T={args.T}, float32, ragged mask, CPU; counted with a TorchDispatchMode "
        f"(torch {torch.__version__}, Python {platform.python_version()}, "
        f'{datetime.date.today().isoformat()}). Ratios are to the PPO-clip loss; "ops on (B, T) '
        'tensors" counts those with an operand of B T elements or more (passes over the tokens).',
        "",
        "| loss | ATen ops | ratio | target | ops on (B, T) tensors | most frequent |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, total in totals.items():
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            verdict = f"<= {target:g}x: {'met' if total / base <= target else 'MISSED'}"
        lines.append(
            f"| {name} | {total} | {total / base:.1f} | {verdict} | {passes[name]} | {top[name]} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        # The history of the table (written by hand, one column per milestone) is kept.
        old = out.read_text() if out.exists() else ""
        history = old[old.index("## History") :] if "## History" in old else ""
        out.write_text(text + ("\n" + history if history else ""))
    return totals


if __name__ == "__main__":
    main()
