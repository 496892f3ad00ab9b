"""ATen operator counts of the torch loss, forward + backward (issue 16).

The counts are those of ``benchmarks/loss_ops.py`` (its ``count_ops`` and ``cases``, at its
shapes B = 64, T = 2048, float32): deterministic for given shapes and options, so a change that
adds operators to the loss fails here and has to update the numbers (and
``benchmarks/results/loss_ops.md``) on purpose.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

BASELINE = "PPO-clip, token-mean (baseline)"  # loss_ops.BASELINE
#: Operators of one forward + backward at the benchmark's shapes (benchmarks/results/loss_ops.md).
EXPECTED = {
    BASELINE: 46,
    "IS Reshape, fixed gamma 0.5, sequence": 85,
    "IS Reshape, fixed gamma 0.5, token": 90,
    "IS Reshape, exact-ESS gamma (default), sequence": 137,
    "IS Reshape, exact-ESS gamma, token": 101,
    "IS Reshape, exact-ESS gamma, token, stale behaviour (gamma 0.91)": 136,
    "IS Reshape, closed-form gamma, sequence": 166,
    "IS Reshape, precomputed gamma tensor (step gamma), sequence": 110,
}

#: Of those, the operators with an operand of B T elements (passes over the tokens).
EXPECTED_FULL_SIZE = {
    BASELINE: 37,
    "IS Reshape, fixed gamma 0.5, sequence": 9,
    "IS Reshape, fixed gamma 0.5, token": 44,
    "IS Reshape, exact-ESS gamma (default), sequence": 9,
    "IS Reshape, exact-ESS gamma, token": 53,
    "IS Reshape, exact-ESS gamma, token, stale behaviour (gamma 0.91)": 79,
    "IS Reshape, closed-form gamma, sequence": 9,
    "IS Reshape, precomputed gamma tensor (step gamma), sequence": 9,
}


@pytest.fixture(scope="module")
def counts(load_benchmark):
    loss_ops = load_benchmark("loss_ops")
    assert loss_ops.BASELINE == BASELINE
    torch.set_num_threads(1)
    # float32 by default, as in the benchmark's own process (another test may change it).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        logp0, logq, adv, mask = loss_ops.make_inputs(64, 2048, torch.device("cpu"))
        logp = logp0.clone().requires_grad_()
        steps = loss_ops.cases(logq, adv, mask)
        modes = {name: loss_ops.count_ops(steps[name], logp) for name in EXPECTED}
        return {name: (sum(m.counts.values()), m.full_size) for name, m in modes.items()}
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_operator_count(counts, name):
    assert counts[name] == (EXPECTED[name], EXPECTED_FULL_SIZE[name])
