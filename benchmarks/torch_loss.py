"""One-thread CPU time of the torch IS Reshape loss (forward + backward) against PPO-clip.

Same tensors for every loss (B = 64 responses of T = 2048 tokens, float32, ragged lengths), one
thread (``torch.set_num_threads(1)``), all in one run with the harness of ``_harness.py``: the
cases interleaved round by round, the caches flushed (a 64 MiB write) before every timed call,
this thread's CPU time, and the median and spread of the per-round ratios to PPO-clip. The
``torch.compile`` rows are timed against a compiled PPO-clip (compile time excluded). Each
IS Reshape call returns its metrics too, as a training step that logs them would use them.

Targets (issue 16, ratios of one-thread CPU time): the default (sequence level, exact-ESS gamma)
<= 1.1x PPO-clip; fixed gamma, sequence and token level, <= 1.2x; token-level exact-ESS
<= 2.5x; under ``torch.compile`` the default within 1.2x of the compiled PPO-clip.

    python benchmarks/torch_loss.py          # print the table
    python benchmarks/torch_loss.py --out    # and write benchmarks/results/torch_loss.md
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

import _harness  # noqa: E402

from isreshape_torch import is_reshape_loss  # noqa: E402

BASELINE = "PPO-clip, token-mean (baseline)"
COMPILED_BASELINE = "PPO-clip, torch.compile"
COMPILED_DEFAULT = "IS Reshape, exact-ESS gamma (default), torch.compile(fullgraph=True)"
# On the benchmark's tensors the token-level gamma is gamma_max = 1 (ESS(1)/n = 0.997), which an
# eager search settles after its first pass; this case makes the search run to the end.
STALE = "IS Reshape, exact-ESS gamma, token, stale behaviour (gamma 0.91)"
# case -> (the baseline its ratio is taken to, the target ratio or None)
TARGETS: dict[str, tuple[str, float | None]] = {
    BASELINE: (BASELINE, None),
    "IS Reshape, fixed gamma 0.5, sequence": (BASELINE, 1.2),
    "IS Reshape, fixed gamma 0.5, token": (BASELINE, 1.2),
    "IS Reshape, exact-ESS gamma (default), sequence": (BASELINE, 1.1),
    "IS Reshape, exact-ESS gamma, token": (BASELINE, 2.5),
    STALE: (BASELINE, 2.5),
    "IS Reshape, closed-form gamma, sequence": (BASELINE, None),
    "IS Reshape, PSIS gamma, sequence": (BASELINE, None),
    COMPILED_BASELINE: (BASELINE, None),
    COMPILED_DEFAULT: (COMPILED_BASELINE, 1.2),
}
OPTIONS = {
    "IS Reshape, fixed gamma 0.5, sequence": {"gamma": 0.5},
    "IS Reshape, fixed gamma 0.5, token": {"gamma": 0.5, "level": "token"},
    "IS Reshape, exact-ESS gamma (default), sequence": {},
    "IS Reshape, exact-ESS gamma, token": {"level": "token"},
    "IS Reshape, closed-form gamma, sequence": {"gamma": "closed_form"},
    "IS Reshape, PSIS gamma, sequence": {"gamma": "psis"},
}


def ppo_clip_loss(logp, old_logp, advantages, mask, clip=0.2):
    """verl-style PPO-clip policy loss, token-mean (the baseline; written here on purpose).

    ``ratio = exp(clamp(logp - old, -20, 20))``, ``loss = max(-A ratio, -A clip(ratio, 1 - eps,
    1 + eps))`` averaged over the valid tokens.
    """
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    adv = advantages[:, None]
    losses = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip))
    m = mask.to(losses.dtype)
    return (losses * m).sum() / m.sum()


def make_inputs(B, T, device, seed=0):
    """``[logp, logq, advantages, mask]``: log-probabilities in (-3, 0], a slightly stale
    behaviour policy, one advantage per response, and lengths uniform in [T/4, T]."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3.0
    logq = logp + 0.05 * torch.randn(B, T, generator=g)  # a slightly stale behaviour policy
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    advantages = torch.randn(B, generator=g)
    return [x.to(device) for x in (logp, logq, advantages, mask)]


def stale_behaviour(logq: torch.Tensor, seed: int = 1, spread: float = 1.2) -> torch.Tensor:
    """``logq`` moved by Normal(0, spread^2) noise per token: a behaviour policy whose token
    weights have ESS(1)/n near ``exp(-spread^2) = 0.24``, below ``rho_min = 0.3``, so that the
    token-level gamma (about 0.91) needs the whole search."""
    g = torch.Generator().manual_seed(seed)
    return logq + spread * torch.randn(logq.shape, generator=g).to(logq.device)


def loss_cases(logq, adv, mask, compiled: bool = True) -> dict[str, Callable]:
    """Each case as ``logp -> loss`` or ``logp -> (loss, metrics)``, in table order."""

    def isr(options, q=logq):
        return lambda lp: is_reshape_loss(lp, q, adv, mask, **options)

    cases = {BASELINE: lambda lp: ppo_clip_loss(lp, logq, adv, mask)}
    cases.update({name: isr(options) for name, options in OPTIONS.items()})
    cases[STALE] = isr({"level": "token"}, stale_behaviour(logq))
    if compiled:
        ppo_c = torch.compile(ppo_clip_loss, fullgraph=True)
        # (loss, metrics) out, so that the compiled graph computes the metrics it would log.
        isr_c = torch.compile(is_reshape_loss, fullgraph=True)
        cases[COMPILED_BASELINE] = lambda lp: ppo_c(lp, logq, adv, mask)
        cases[COMPILED_DEFAULT] = lambda lp: isr_c(lp, logq, adv, mask)
    return {name: cases[name] for name in TARGETS if name in cases}  # in table order


def forward_backward(loss: Callable, logp: torch.Tensor) -> Callable[[], None]:
    """One timed step: the loss at ``logp`` and its backward pass."""

    def step() -> None:
        logp.grad = None
        out = loss(logp)
        (out[0] if isinstance(out, tuple) else out).backward()

    return step


def run(
    B: int = 64,
    T: int = 2048,
    rounds: int = 100,
    warmup: int = 3,
    compiled: bool = True,
    flush: bool = True,
) -> tuple[str, dict[str, _harness.Summary]]:
    """Time every case; return the markdown table and each case's :class:`_harness.Summary`."""
    torch.set_num_threads(1)
    logp0, logq, adv, mask = make_inputs(B, T, torch.device("cpu"))
    logp = logp0.clone().requires_grad_()
    steps = {
        name: forward_backward(loss, logp)
        for name, loss in loss_cases(logq, adv, mask, compiled).items()
    }
    for step in steps.values():  # compile (and first-call set-up) before any round
        step()
    timings = _harness.time_interleaved(steps, rounds, warmup, flush)
    summaries = {name: _harness.summarise(timings.thread, TARGETS[name][0], name) for name in steps}
    lines = [
        "| loss | ratio to | " + _harness.TIME_HEADER + " | target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, s in summaries.items():
        base, target = TARGETS[name]
        to = "compiled PPO-clip" if base == COMPILED_BASELINE else "PPO-clip"
        lines.append(
            f"| {name} | {to} | {_harness.time_columns(s)} | {_harness.verdict(s.ratio, target)} |"
        )
    header = [
        "# torch loss benchmark: one-thread CPU time, forward + backward",
        "",
        f"B={B}, T={T}, float32, ragged mask (lengths uniform in [T/4, T]), CPU, 1 thread; "
        "forward + backward, each IS Reshape call returning its metrics. "
        + _harness.method_text(rounds, warmup, timings),
        "",
        _harness.platform_line(f"torch {torch.__version__}")
        + f" Commit measured: {_harness.git_commit(ROOT)}.",
        "",
    ]
    return "\n".join(header + lines) + "\n", summaries


def main(argv=None) -> dict[str, _harness.Summary]:
    parser = _harness.arguments(
        __doc__.splitlines()[0], ROOT / "benchmarks" / "results" / "torch_loss.md"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args(argv)
    text, summaries = run(
        args.B, args.T, args.rounds, args.warmup, not args.no_compile, not args.no_flush
    )
    print(text)
    if args.out:
        _harness.write_results(Path(args.out), text)
    return summaries


if __name__ == "__main__":
    main()
