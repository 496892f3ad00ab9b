"""The torch loss at the numerical edges (issue 14): finite in float32 and bfloat16 where the
weights overflow, a clear error for a second derivative, NaN (not a plausible value) for a bad
row under torch.compile."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from isreshape_torch import is_reshape_loss  # noqa: E402


def _issue_batch(dtype):
    logp = torch.tensor([[100.0, 0.0], [0.1, 0.0]], dtype=dtype, requires_grad=True)
    logq = torch.zeros((2, 2), dtype=dtype)
    mask = torch.tensor([[True, False], [True, True]])
    return logp, logq, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rewards", [[1.0, 1.0], [0.0, 1.0]])
def test_overflowing_weight_gives_finite_loss_and_gradient(dtype, rewards):
    logp, logq, mask = _issue_batch(dtype)
    loss, metrics = is_reshape_loss(
        logp, logq, torch.tensor(rewards, dtype=dtype), mask, gamma=1.0, distributed=False
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(logp.grad))
    assert logp.grad[0, 1] == 0  # padding: exactly 0
    assert float(metrics["n_capped"]) == (1.0 if rewards[0] else 0.0)


def test_second_derivative_raises_a_clear_error():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.25, 0.5]], dtype=torch.float64))
    logp.requires_grad_()
    logq = logp.detach() - 0.1
    loss, _ = is_reshape_loss(
        logp, logq, torch.tensor([1.0, -1.0], dtype=torch.float64), gamma=0.5, distributed=False
    )
    (grad,) = torch.autograd.grad(loss, logp, create_graph=True)
    np.testing.assert_allclose(
        grad.detach().numpy(), -np.array([[1, 1], [-1, -1]]) / 2 * np.exp(0.5 * 0.2), rtol=1e-12
    )
    with pytest.raises(RuntimeError, match="is_reshape_loss is first-order only"):
        grad.sum().backward()
    # First order as usual, without create_graph.
    loss, _ = is_reshape_loss(
        logp, logq, torch.tensor([1.0, -1.0], dtype=torch.float64), gamma=0.5, distributed=False
    )
    loss.backward()
    assert torch.all(torch.isfinite(logp.grad))


def test_compiled_loss_with_a_bad_row_is_nan_not_plausible():
    torch._dynamo.reset()
    rng = np.random.default_rng(0)
    lq = torch.tensor(rng.normal(-1.0, 0.3, (4, 5)))
    lp = lq + torch.tensor(rng.normal(0.0, 0.5, (4, 5)))
    lp[2, 1] = float("inf")
    r = torch.tensor(rng.normal(size=4))

    def fn(lp_, lq_, r_):
        loss, metrics = is_reshape_loss(lp_, lq_, r_, gamma="ess", distributed=False)
        return loss, metrics["gamma"], metrics["n_nonfinite"]

    loss, gamma, n_bad = torch.compile(fn, fullgraph=True, backend="eager")(lp, lq, r)
    assert torch.isnan(loss) and torch.isnan(gamma) and float(n_bad) == 1.0


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("gamma", (0.5, 0.6, 0.7, 0.8)),
        ("rho_min", (0.5, 0.6, 0.7, 0.8)),
        ("gamma_max", (0.5, 0.6, 0.7, 0.8)),  # a warm-up schedule's value
        ("gamma_min", (0.05, 0.1, 0.2, 0.3)),
    ],
)
def test_compiled_loss_takes_a_changing_number_option(name, values):
    """A number option that changes between calls (a gamma schedule): torch.compile traces it
    as a symbolic float after the first recompilation, and the loss still traces with it and
    equals the eager loss at every value."""
    torch._dynamo.reset()
    rng = np.random.default_rng(4)
    lq = torch.tensor(rng.normal(-1.0, 2.0, (4, 6)))  # stale: the gamma bounds matter
    lp = torch.tensor(rng.normal(-1.0, 0.6, (4, 6)), requires_grad=True)
    r = torch.tensor(rng.normal(size=4))

    def fn(lp_, value):
        return is_reshape_loss(lp_, lq, r, distributed=False, **{name: value})[0]

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    for value in values:
        np.testing.assert_allclose(float(compiled(lp, value)), float(fn(lp, value)), rtol=1e-12)
