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


def _promoting_cases(torch):
    """``(name, args)`` for every wrapped function: same-dtype tensors (the direct path), Python
    numbers, and operands whose promotion array-api-compat fixes (the general path)."""
    x32 = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float32)
    y32 = torch.tensor([1.5, 0.5, -1.0], dtype=torch.float32)
    x64 = torch.tensor(0.25, dtype=torch.float64)  # 0-d: torch alone would keep float32
    ints = torch.tensor([1, 2, 3])
    binary = [(x32, y32), (x32, 0.75), (2, x32), (x32, x64), (ints, 0.5), (ints, ints)]
    names = ["maximum", "minimum", "add", "subtract", "multiply", "divide", "pow", "logaddexp"]
    names += ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]
    # logaddexp is not defined on integer tensors in torch.
    cases = [(n, args) for n in names for args in binary if n != "logaddexp" or args[0] is not ints]
    cond = x32 > 0
    for args in [(x32, y32), (x32, 0.0), (-1.5, y32), (x32, x64), (ints, 1.5), (ints, ints)]:
        cases.append(("where", (cond, *args)))
    return cases


def test_promoting_functions_match_array_api_compat():
    """Every wrapped function gives array-api-compat's dtype and values: the direct call where
    the operands share one floating dtype, the promotion fixes otherwise."""
    from array_api_compat import torch as compat

    x = torch.zeros(1)
    xp = namespace(x)
    for name, args in _promoting_cases(torch):
        got, want = getattr(xp, name)(*args), getattr(compat, name)(*args)
        assert got.dtype == want.dtype, (name, args)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_same_dtype_operands_call_torch_alone(load_benchmark):
    """Tensors of one floating dtype (and a boolean condition for ``where``) reach the torch
    function with no promotion work: one operator, and no ``result_type`` call."""
    count_ops = load_benchmark("loss_ops").CountOps
    x = torch.tensor([[-2.0, 0.5], [3.0, 1.0]])
    y = torch.tensor([[1.5, 0.5], [-1.0, 2.0]])
    xp, cond = namespace(x), x > 0
    calls = []
    original = torch.result_type
    torch.result_type = lambda *a: calls.append(a) or original(*a)
    try:
        for fn in (lambda: xp.where(cond, x, y), lambda: xp.maximum(x, y), lambda: xp.add(x, y)):
            mode = count_ops()
            with mode:
                fn()
            assert sum(mode.counts.values()) == 1, mode.counts
    finally:
        torch.result_type = original
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vecdot_matches_a_float64_sum_of_products(dtype):
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5000, generator=rng, dtype=dtype)
    b = torch.randn(3, 5000, generator=rng, dtype=dtype)
    xp = namespace(a)
    want = (a.double() * b.double()).sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for axis, got in ((-1, xp.vecdot(a, b)), (0, xp.vecdot(a.T, b.T, axis=0))):
        assert got.dtype == dtype and got.shape == (3,), axis
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 100)
    torch.testing.assert_close(xp.vecdot(a[0], b[0]).double(), want[0], rtol=tol, atol=tol * 100)
    ints = torch.arange(6).reshape(2, 3)
    assert torch.equal(xp.vecdot(ints, ints), torch.tensor([5, 50]))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (0,)])
def test_masked_values_are_the_boolean_index(shape):
    """torch's masked_select gives what boolean indexing gives: the masked entries in order."""
    from isreshape_core._lib.namespace import masked_values

    rng = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=rng, dtype=torch.float64)
    for mask in (x > 0, torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)):
        got = masked_values(namespace(x), x, mask)
        assert got.shape == x[mask].shape and torch.equal(got, x[mask])
