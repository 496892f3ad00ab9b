"""Operation counts and one-thread CPU time of the jitted JAX IS Reshape loss against PPO-clip.

Every case is ``jax.jit(jax.value_and_grad(loss))`` on the same arrays (B = 64 responses of
T = 2048 tokens, float32, ragged lengths), on the CPU; the baseline is a verl-style PPO-clip in
``jax.numpy`` (token-mean), jitted the same way. Two counts per case, both deterministic:

- **jaxpr equations** of the jitted value-and-grad: every equation at every nesting level; an
  equation that holds sub-jaxprs (``jit``, ``custom_jvp_call``, ``while``, ``cond``, ...) counts 1
  and its bodies are counted in full, once per call site; a loop body counts once, not once per
  iteration; every branch of a ``cond`` counts.
- **HLO instructions** of the module after XLA's optimisation
  (``jax.jit(f).lower(*args).compile().as_text()``): the instruction lines of every computation
  (fused computations and reduction bodies included), the number of ``fusion`` instructions
  (each one loop nest XLA emits), and the *executed* instructions: those outside fused
  computations and reduction bodies, less ``parameter``, ``constant``, ``tuple``,
  ``get-tuple-element`` and ``bitcast`` (the kernels a call runs; a loop body's once).

Time: this thread's CPU time of the compiled call with ``block_until_ready``, with the harness of
``_harness.py`` (interleaved rounds, caches flushed before every call, per-round ratios); compile
time excluded. XLA's CPU client runs a computation on a worker pool sized by the CPUs the
process may use, and dispatches asynchronously, so ``main`` first pins the process to one CPU and
turns asynchronous dispatch off: the computation then runs on the calling thread (the table
states the share of the process's CPU time the thread accounts for).

Target (issue 16): under ``jax.jit`` the loss (the default: sequence level, exact-ESS gamma)
within 1.2x of the jitted PPO-clip.

    python benchmarks/jax_loss.py            # print the table
    python benchmarks/jax_loss.py --out      # and write benchmarks/results/jax_loss.md
"""

from __future__ import annotations

import collections
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters"), str(ROOT / "benchmarks")]

import _harness  # noqa: E402

from isreshape_jax import is_reshape_loss  # noqa: E402

BASELINE = "PPO-clip, token-mean (baseline)"
DEFAULT = "IS Reshape, exact-ESS gamma (default), sequence"
TARGETS = {DEFAULT: 1.2}
OPTIONS = {
    "IS Reshape, fixed gamma 0.5, sequence": {"gamma": 0.5},
    "IS Reshape, fixed gamma 0.5, token": {"gamma": 0.5, "level": "token"},
    DEFAULT: {},
    "IS Reshape, exact-ESS gamma, token": {"level": "token"},
    "IS Reshape, closed-form gamma, sequence": {"gamma": "closed_form"},
    "IS Reshape, PSIS gamma, sequence": {"gamma": "psis"},
}
# Bookkeeping instructions that run no kernel.
_NOT_EXECUTED = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = ")
_OPCODE = re.compile(r"\s([a-z][a-z0-9_-]*)\(")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.-]+)")


def ppo_clip_loss(logp, old_logp, advantages, mask, clip=0.2):
    """verl-style PPO-clip policy loss, token-mean, in ``jax.numpy`` (as in ``torch_loss``).

    ``ratio = exp(clip(logp - old, -20, 20))``, ``loss = max(-A ratio, -A clip(ratio, 1 - eps,
    1 + eps))`` averaged over the valid tokens.
    """
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    adv = advantages[:, None]
    losses = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    m = mask.astype(losses.dtype)
    return (losses * m).sum() / m.sum()


def make_inputs(B: int, T: int, seed: int = 0) -> list[jax.Array]:
    """``[logp, logq, advantages, mask]``, float32, distributed as ``torch_loss.make_inputs``'s
    (drawn with NumPy, so not the same numbers)."""
    rng = np.random.default_rng(seed)
    logp = -rng.random((B, T)) * 3.0
    logq = logp + 0.05 * rng.standard_normal((B, T))  # a slightly stale behaviour policy
    lengths = rng.integers(T // 4, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    advantages = rng.standard_normal(B)
    arrays = [a.astype(np.float32) for a in (logp, logq, advantages)] + [mask]
    return [jnp.asarray(a) for a in arrays]


def loss_cases() -> dict[str, Callable]:
    """Each case as a jitted ``(logp, logq, adv, mask) -> (value, grad)``, in table order."""
    cases = {BASELINE: jax.jit(jax.value_and_grad(ppo_clip_loss))}
    for name, options in OPTIONS.items():

        def loss(lp, lq, a, m, options=options):
            return is_reshape_loss(lp, lq, a, m, **options)

        cases[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return cases


def _sub_jaxprs(value) -> list:
    if isinstance(value, ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def count_equations(jaxpr) -> int:
    """Equations of ``jaxpr`` and, recursively, of the sub-jaxprs its equations hold."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            total += sum(count_equations(sub) for sub in _sub_jaxprs(value))
    return total


def count_hlo(text: str) -> dict[str, int]:
    """``{"instructions", "fusions", "executed"}`` of an optimised HLO module's text (see the
    module docstring)."""
    computations: dict[str, list[str]] = collections.defaultdict(list)
    name = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group(1)
        elif line.startswith("}"):
            name = None
        elif name is not None and _INSTRUCTION.match(line):
            computations[name].append(line)
    lines = [line for body in computations.values() for line in body]
    called = {c for line in lines for c in _CALLED.findall(line)}
    opcodes = [_OPCODE.search(line.split(" = ", 1)[1]) for line in lines]
    top = [
        op.group(1)
        for comp, body in computations.items()
        if comp not in called
        for line in body
        if (op := _OPCODE.search(line.split(" = ", 1)[1]))
    ]
    return {
        "instructions": len(lines),
        "fusions": sum(1 for op in opcodes if op and op.group(1) == "fusion"),
        "executed": sum(1 for op in top if op not in _NOT_EXECUTED),
    }


def op_counts(fn: Callable, args: list) -> tuple[dict[str, int], Callable]:
    """The counts of one jitted case, and its compiled executable."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    compiled = fn.lower(*args).compile()
    return {"jaxpr": count_equations(jaxpr.jaxpr), **count_hlo(compiled.as_text())}, compiled


def run(
    B: int = 64, T: int = 2048, rounds: int = 100, warmup: int = 3, flush: bool = True
) -> tuple[str, dict[str, _harness.Summary], dict[str, dict[str, int]]]:
    """Count and time every case; return the markdown table, the summaries and the counts."""
    args = make_inputs(B, T)
    counts, steps = {}, {}
    for name, fn in loss_cases().items():
        counts[name], compiled = op_counts(fn, args)
        steps[name] = lambda compiled=compiled: jax.block_until_ready(compiled(*args))
        steps[name]()
    timings = _harness.time_interleaved(steps, rounds, warmup, flush)
    summaries = {name: _harness.summarise(timings.thread, BASELINE, name) for name in steps}
    base = counts[BASELINE]
    lines = [
        "| loss | jaxpr eqns | ratio | HLO instr. | fusions | executed HLO | ratio | "
        + _harness.TIME_HEADER
        + " | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, s in summaries.items():
        c = counts[name]
        lines.append(
            f"| {name} | {c['jaxpr']} | {c['jaxpr'] / base['jaxpr']:.1f} | {c['instructions']} "
            f"| {c['fusions']} | {c['executed']} | {c['executed'] / base['executed']:.1f} | "
            f"{_harness.time_columns(s)} | {_harness.verdict(s.ratio, TARGETS.get(name))} |"
        )
    header = [
        "# JAX loss benchmark: operation counts and one-thread CPU time, jitted value_and_grad",
        "",
        f"B={B}, T={T}, float32, ragged mask (lengths uniform in [T/4, T]), CPU. Counts: jaxpr "
        "equations (recursively into sub-jaxprs, a loop body once), HLO instructions after "
        "XLA's optimisation (all computations), fusion instructions, and executed HLO "
        "instructions (outside fused computations and reduction bodies, less parameter, "
        "constant, tuple, get-tuple-element, bitcast). Time: the compiled call with "
        f"block_until_ready, the process pinned to {len(os.sched_getaffinity(0))} CPU(s), "
        "synchronous dispatch; " + _harness.method_text(rounds, warmup, timings),
        "",
        _harness.platform_line(f"JAX {jax.__version__}")
        + f" Commit measured: {_harness.git_commit(ROOT)}.",
        "",
    ]
    return "\n".join(header + lines) + "\n", summaries, counts


def pin_to_one_cpu() -> None:
    """Run this process (and the threads it starts from now on) on one CPU, so that XLA's CPU
    client sizes its pool to one thread and runs computations on the calling thread. Call it
    before JAX's CPU backend starts (before the first array)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main(argv=None) -> dict[str, _harness.Summary]:
    parser = _harness.arguments(
        __doc__.splitlines()[0], ROOT / "benchmarks" / "results" / "jax_loss.md"
    )
    args = parser.parse_args(argv)
    pin_to_one_cpu()
    jax.config.update("jax_platforms", "cpu")
    # Asynchronous dispatch would hand the computation to another thread.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    text, summaries, _ = run(args.B, args.T, args.rounds, args.warmup, not args.no_flush)
    print(text)
    if args.out:
        _harness.write_results(Path(args.out), text)
    return summaries


if __name__ == "__main__":
    main()
