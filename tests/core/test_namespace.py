"""Tests of isreshape_core/_lib/namespace.py: the torch namespace's eager scalar operands, its
``isfinite`` and ``sign``, against torch's own functions."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from isreshape_core._lib.namespace import namespace  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_scalar_operands_match_torch_without_a_new_tensor_per_call(dtype, load_benchmark):
    count_ops = load_benchmark("loss_ops").CountOps  # the op counter of benchmarks/loss_ops.py
    x = torch.tensor([-2.0, 0.5, float("inf"), float("nan")], dtype=dtype)
    xp = namespace(x)
    pos = x > 0
    cases = [
        (lambda: xp.where(pos, x, 0.0), torch.where(pos, x, 0.0)),
        (lambda: xp.where(pos, -xp.inf, x), torch.where(pos, -torch.inf, x)),
        (lambda: xp.maximum(x, 0.25), torch.maximum(x, torch.tensor(0.25, dtype=dtype))),
        (lambda: xp.minimum(1e30, x), torch.minimum(torch.tensor(1e30, dtype=dtype), x)),
    ]
    for fn, want in cases:
        fn()  # the first call may make the constant
        mode = count_ops()
        with mode:
            got = fn()
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        assert sum(mode.counts.values()) == 1, mode.counts  # the operator itself, nothing else


def test_constants_made_in_inference_mode_serve_autograd_later():
    x = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    xp = namespace(x)
    with torch.inference_mode():
        xp.maximum(x * 1.0, 0.125)  # makes the constant 0.125 inside inference mode
    y = x.clone().requires_grad_()
    xp.maximum(y, 0.125).sum().backward()  # maximum saves both operands for its backward
    torch.testing.assert_close(y.grad, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))


def test_isfinite_and_sign_match_torch_and_batch_under_vmap():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -3.0, 0.0, 2.0])
    xp = namespace(x)
    assert torch.equal(xp.isfinite(x), torch.isfinite(x))
    assert torch.equal(xp.isfinite(torch.arange(3)), torch.ones(3, dtype=torch.bool))
    assert torch.equal(xp.sign(x), torch.tensor([0.0, 1.0, -1.0, -1.0, 0.0, 1.0]))
    batched = torch.func.vmap(xp.sign)(torch.stack([x, -x]))
    assert torch.equal(batched[1], torch.tensor([0.0, -1.0, 1.0, 1.0, 0.0, -1.0]))
