"""Tests of adapters/isreshape_torch/loss.py: value and gradient against a plain-torch loss written
here (autograd through ``expm1(gamma l)/gamma``), gradcheck, gamma against a NumPy bisection,
torch.compile (no graph break), torch.func, half precision, sharded statistics and errors.

(The file is named ``test_torch_loss.py``, not ``test_loss.py``: the tests have no packages, so
pytest imports them by basename and ``tests/core/test_loss.py`` already holds that name.)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _helpers import ThreadAllReduce
from _helpers import make_batch as numpy_batch

torch = pytest.importorskip("torch")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
torch.set_num_threads(1)

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from isreshape_torch import ISReshapeLoss, TorchDistributedReducer, is_reshape_loss  # noqa: E402

LEVELS = ("sequence", "geometric", "token")
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
F64 = torch.float64


def make_batch(seed=0, B=6, T=5, noise=0.3, per_token_rewards=False, dtype=F64):
    logp, logq, rewards, mask = numpy_batch(seed, B, T, noise, per_token_rewards)
    return (
        torch.tensor(logp, dtype=dtype, requires_grad=True),
        torch.tensor(logq, dtype=dtype),
        torch.tensor(rewards, dtype=dtype),
        torch.tensor(mask),
    )


def reference_loss(logp, logq, rewards, mask, gamma, level, mode, form="objective"):
    """The loss in plain torch (autograd through every operation); ``gamma`` a number or a tensor
    broadcastable to (B, T) (then positive). Follows verl's ``agg_loss`` for the modes."""
    B, T = logp.shape
    m = mask.to(logp.dtype)
    r = rewards if rewards.ndim == 2 else rewards[:, None].expand(B, T)
    tok_l = (logp - logq) * m
    if level == "token":
        l, unit_logp = tok_l, logp * m
    else:
        l, unit_logp = tok_l.sum(-1), (logp * m).sum(-1)
        if level == "geometric":
            n = m.sum(-1)
            l, unit_logp = l / n, unit_logp / n
        l, unit_logp = l[:, None].expand(B, T), unit_logp[:, None].expand(B, T)
    if form == "objective":
        h = l if isinstance(gamma, float) and gamma == 0 else torch.expm1(gamma * l) / gamma
    else:
        h = torch.exp(gamma * l).detach() * unit_logp
    loss_mat = -r * h * m
    if mode == "token-mean":
        return loss_mat.sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return loss_mat.sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return (loss_mat.sum(-1) / m.sum(-1)).mean()
    return loss_mat.sum() / T


def unit_log_weights(logp, logq, mask, level):
    """NumPy unit log weights, valid units only, in row-major order."""
    lp, lq = (x.detach().double().numpy() for x in (logp, logq))
    m = mask.numpy()
    tok = np.where(m, lp - lq, 0.0)
    if level == "token":
        return tok[m]
    seq = tok.sum(-1)
    return seq / m.sum(-1) if level == "geometric" else seq


def brute_ess_ratio(l, g):
    w = np.exp(g * (l - l.max()))
    return w.sum() ** 2 / (w**2).sum() / l.size


def bisect_gamma(l, rho_min=0.3, iters=200):
    """The largest gamma in [0, 1] with ESS(gamma)/n >= rho_min, by plain bisection."""
    if brute_ess_ratio(l, 1.0) >= rho_min:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if brute_ess_ratio(l, mid) >= rho_min else (lo, mid)
    return lo


def grad_of(fn, logp):
    logp.grad = None
    value = fn(logp)
    (g,) = torch.autograd.grad(value, logp)
    return value.detach(), g


# --------------------------------------------------------------------------------------------
# Value and gradient.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["objective", "reinforce"])
def test_value_and_gradient_match_plain_torch(level, mode, form):
    logp, logq, rewards, mask = make_batch(1, per_token_rewards=(mode == "token-mean"))
    for gamma in (0.0, 0.5, 1.0):
        kw = {"gamma": gamma, "level": level, "loss_agg_mode": mode, "form": form}
        loss, g = grad_of(lambda lp, kw=kw: is_reshape_loss(lp, logq, rewards, mask, **kw)[0], logp)
        want, g_want = grad_of(
            lambda lp, gamma=gamma: reference_loss(
                lp, logq, rewards, mask, gamma, level, mode, form
            ),
            logp,
        )
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", ["2d", "1d"])
def test_backward_scales_the_core_gradient_by_its_cotangent(level, shape):
    """The backward scatters the unit gradients after the product with the incoming cotangent:
    ``c * grad`` of the core's gradient on the valid tokens for any ``c``, and exactly 0 on the
    masked ones even where ``c`` is infinite."""
    from isreshape_core import is_reshape_loss_and_grad

    logp, logq, rewards, mask = make_batch(3, B=5, T=4, noise=0.6)
    if shape == "1d":
        logp, logq, mask = (x[:, 0] for x in (logp, logq, mask))
        logp = logp.detach().requires_grad_()
    kw = {"gamma": 0.4, "level": level}
    core_grad = is_reshape_loss_and_grad(logp.detach(), logq, rewards, mask, **kw)[1]
    for c in (1.0, -3.0, 0.25, math.inf):
        logp.grad = None
        (is_reshape_loss(logp, logq, rewards, mask, **kw)[0] * c).backward()
        want = torch.where(mask, c * core_grad, 0.0)
        assert torch.equal(logp.grad[~mask], torch.zeros_like(logp.grad[~mask])), c
        torch.testing.assert_close(logp.grad[mask], want[mask], rtol=0, atol=0)


@pytest.mark.parametrize("level", LEVELS)
def test_gradcheck(level):
    logp, logq, rewards, mask = make_batch(2, B=4, T=3, noise=0.8)
    for gamma in (0.0, 0.5, 1.0):

        def fn(lp, gamma=gamma):
            return is_reshape_loss(lp, logq, rewards, mask, gamma=gamma, level=level)[0]

        assert torch.autograd.gradcheck(fn, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_sequence_log_probs():
    logp, logq, rewards, _ = make_batch(3, B=5, T=1, noise=1.0)
    for gamma in (0.0, 0.5, 1.0):

        def fn(lp, gamma=gamma):
            return is_reshape_loss(lp, logq[:, 0], rewards, gamma=gamma)[0]

        assert torch.autograd.gradcheck(fn, (logp[:, 0].detach().requires_grad_(),))


def test_gradient_matches_finite_differences_at_gamma_zero():
    """gamma = 0 exactly: the core's rule has no 1/gamma; the central difference of the value."""
    logp, logq, rewards, mask = make_batch(4, B=3, T=4, noise=2.0)
    for level in LEVELS:
        (loss,) = is_reshape_loss(logp, logq, rewards, mask, gamma=0.0, level=level)[:1]
        (g,) = torch.autograd.grad(loss, logp)
        h = 1e-6
        fd = torch.zeros_like(g)
        base = logp.detach()
        for b in range(3):
            for t in range(4):
                up, down = base.clone(), base.clone()
                up[b, t] += h
                down[b, t] -= h
                f_up = reference_loss(up, logq, rewards, mask, 0.0, level, "token-mean")
                f_down = reference_loss(down, logq, rewards, mask, 0.0, level, "token-mean")
                fd[b, t] = (f_up - f_down) / (2 * h)
        torch.testing.assert_close(g, fd, rtol=1e-7, atol=1e-9)


@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 5),
    T=st.integers(1, 4),
    level=st.sampled_from(LEVELS),
    # Not subnormal: the reference's autograd through `/ gamma` overflows at 1/gamma.
    gamma=st.one_of(st.just(0.0), st.floats(1e-300, 1.0)),
    mode=st.sampled_from(MODES),
)
def test_gradient_property(seed, B, T, level, gamma, mode):
    logp, logq, rewards, mask = make_batch(seed, B=B, T=T, noise=1.0)
    loss, g = grad_of(
        lambda lp: is_reshape_loss(
            lp, logq, rewards, mask, gamma=gamma, level=level, loss_agg_mode=mode
        )[0],
        logp,
    )
    want, g_want = grad_of(
        lambda lp: reference_loss(lp, logq, rewards, mask, gamma, level, mode), logp
    )
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Gamma, groups and metrics.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_ess_gamma_is_the_largest_feasible_and_metrics(level):
    noise = {"sequence": 1.0, "token": 1.5, "geometric": 5.0}[level]  # the token mean shrinks it
    logp, logq, rewards, mask = make_batch(5, B=32, T=6, noise=noise)
    loss, metrics = is_reshape_loss(logp, logq, rewards, mask, level=level)
    l = unit_log_weights(logp, logq, mask, level)
    g_want = bisect_gamma(l)
    assert g_want < 1.0  # the batch is off-policy enough for the constraint to bind
    g = metrics["gamma"]
    np.testing.assert_allclose(g.item(), g_want, rtol=1e-9)
    assert brute_ess_ratio(l, g.item()) >= 0.3 * (1 - 1e-12)
    np.testing.assert_allclose(metrics["ess_ratio"].item(), brute_ess_ratio(l, g.item()), rtol=1e-9)
    np.testing.assert_allclose(metrics["ess_ratio_at_1"].item(), brute_ess_ratio(l, 1.0), rtol=1e-9)
    np.testing.assert_allclose(metrics["sigma2"].item(), np.var(l, ddof=1), rtol=1e-10)
    w = np.exp(l - l.max())
    np.testing.assert_allclose(metrics["max_weight"].item(), w.max() / w.sum(), rtol=1e-10)
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor), name
        assert value.ndim == 0 and not value.requires_grad, name
        assert value.dtype == F64 and value.device == logp.device, name
    # The gradient is that of the loss at the chosen (constant) gamma.
    (g_loss,) = torch.autograd.grad(loss, logp)
    want, g_ref = grad_of(
        lambda lp: reference_loss(lp, logq, rewards, mask, g.item(), level, "token-mean"), logp
    )
    torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_loss, g_ref, rtol=1e-10, atol=1e-13)


def test_closed_form_gamma():
    logp, logq, rewards, mask = make_batch(6, B=40, T=5, noise=1.0)
    _, metrics = is_reshape_loss(logp, logq, rewards, mask, gamma="closed_form", rho_min=0.5)
    l = unit_log_weights(logp, logq, mask, "sequence")
    want = min(1.0, math.sqrt(-math.log(0.5) / np.var(l, ddof=1)))
    assert want < 1.0
    np.testing.assert_allclose(metrics["gamma"].item(), want, rtol=1e-12)


def test_per_group_gamma():
    G = 8
    logp, logq, rewards, mask = make_batch(7, B=24, T=4, noise=2.0)
    loss, metrics = is_reshape_loss(logp, logq, rewards, mask, group_size=G)
    l = unit_log_weights(logp, logq, mask, "sequence").reshape(-1, G)
    gammas = np.array([bisect_gamma(row) for row in l])
    assert len(set(np.round(gammas, 6))) > 1  # the groups do get different gammas
    np.testing.assert_allclose(metrics["gamma"].item(), gammas.mean(), rtol=1e-9)
    (g_loss,) = torch.autograd.grad(loss, logp)
    per_row = torch.tensor(np.repeat(gammas, G), dtype=F64)[:, None]
    want, g_ref = grad_of(
        lambda lp: reference_loss(lp, logq, rewards, mask, per_row, "sequence", "token-mean"), logp
    )
    torch.testing.assert_close(loss.detach(), want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(g_loss, g_ref, rtol=1e-8, atol=1e-12)


def test_only_logp_carries_gradient():
    logp, logq, rewards, mask = make_batch(8)
    logq.requires_grad_(True)
    rewards.requires_grad_(True)
    loss, metrics = is_reshape_loss(logp, logq, rewards, mask, gamma=0.5)
    loss.backward()
    assert logq.grad is None and rewards.grad is None
    assert logp.grad is not None and bool(torch.all(logp.grad[~mask] == 0))
    assert all(not v.requires_grad for v in metrics.values())


def test_module_equals_function():
    logp, logq, rewards, mask = make_batch(9, B=8, noise=1.0)
    criterion = ISReshapeLoss(level="geometric", loss_agg_mode="seq-mean-token-mean", gamma="ess")
    assert list(criterion.parameters()) == [] and "geometric" in repr(criterion)
    loss, metrics = criterion(logp, logq, rewards, mask)
    l = unit_log_weights(logp, logq, mask, "geometric")
    g = bisect_gamma(l)
    want = reference_loss(logp, logq, rewards, mask, g, "geometric", "seq-mean-token-mean")
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics["gamma"].item(), g, rtol=1e-9)


def test_second_derivative_is_an_error_not_zero():
    logp, logq, rewards, mask = make_batch(10)
    loss, _ = is_reshape_loss(logp, logq, rewards, mask, gamma=0.5)
    (g,) = torch.autograd.grad(loss, logp, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), logp)


# --------------------------------------------------------------------------------------------
# Half precision.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("level", LEVELS)
def test_half_precision_large_log_ratios(dtype, level):
    rng = np.random.default_rng(11)
    B, T = 8, 4
    lp = rng.uniform(-3.0, -0.1, (B, T))
    lq = lp - rng.choice([-80.0, 80.0, 0.0, 1.0], size=(B, T))  # log ratios of +-80
    mask = torch.tensor(rng.random((B, T)) < 0.9)
    mask[:, 0] = True
    logp = torch.tensor(lp, dtype=dtype, requires_grad=True)
    logq = torch.tensor(lq, dtype=dtype)
    rewards = torch.tensor(rng.normal(0, 1, B), dtype=dtype)
    loss, metrics = is_reshape_loss(logp, logq, rewards, mask, level=level)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert logp.grad.dtype == dtype and bool(torch.all(torch.isfinite(logp.grad)))
    assert metrics["gamma"].dtype == torch.float32
    # The same (rounded) inputs in float64, at the gamma the half-precision call chose.
    g = metrics["gamma"].item()
    lp64 = logp.detach().double().requires_grad_()
    args = (logq.double(), rewards.double(), mask, g, level, "token-mean")
    want, g_want = grad_of(lambda x: reference_loss(x, *args), lp64)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        logp.grad.double(), g_want, rtol=1e-2, atol=1e-3 * g_want.abs().max()
    )


# --------------------------------------------------------------------------------------------
# torch.compile and torch.func.
# --------------------------------------------------------------------------------------------


def test_compile_has_no_graph_break():
    logp, logq, rewards, mask = make_batch(12, B=16, T=8, noise=1.0)

    def fn(lp, lq, r, m):
        return is_reshape_loss(lp, lq, r, m, gamma="ess", level="sequence", group_size=4)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(logp, logq, rewards, mask)
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1


_COMPILED_FIRST = """
import torch
from isreshape_torch import is_reshape_loss

torch.manual_seed(0)
logp = (-torch.rand(8, 6, dtype=torch.float64)).requires_grad_()
logq = logp.detach() + torch.randn(8, 6, dtype=torch.float64)
rewards, mask = torch.randn(8, dtype=torch.float64), torch.rand(8, 6) < 0.8
compiled = torch.compile(is_reshape_loss, fullgraph=True, backend="eager")
with torch._dynamo.config.patch(error_on_recompile=True):
    for _ in range(3):
        loss, _ = compiled(logp, logq, rewards, mask, distributed=False)
        loss.backward()
    is_reshape_loss(logp, logq, rewards, mask, distributed=False)  # an eager call after it ...
    compiled(logp, logq, rewards, mask, distributed=False)  # ... does not invalidate it
print("finite", bool(torch.isfinite(loss)))
"""


def test_compiled_loss_called_first_compiles_once():
    """In a new process whose first call of the loss is the compiled one, the loss is traced
    once: nothing the trace imports or caches makes a later call's guards fail."""
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(root), str(root / "adapters"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONPATH": path}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILED_FIRST], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["finite", "True"]


def test_compiled_equals_eager():
    logp, logq, rewards, mask = make_batch(13, B=16, T=8, noise=1.5)
    # max_iter=4 (default 16) keeps the compile short; the default is traced in the test above.
    kw = {"gamma": "ess", "level": "token", "loss_agg_mode": "seq-mean-token-mean", "max_iter": 4}
    criterion = ISReshapeLoss(**kw)
    torch._dynamo.reset()
    compiled = torch.compile(criterion, fullgraph=True)
    loss_c, metrics_c = compiled(logp, logq, rewards, mask)
    (g_c,) = torch.autograd.grad(loss_c, logp)
    loss_e, metrics_e = criterion(logp, logq, rewards, mask)
    (g_e,) = torch.autograd.grad(loss_e, logp)
    assert metrics_e["gamma"].item() < 1.0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_c, g_e, rtol=1e-12, atol=1e-14)
    for name in metrics_e:
        torch.testing.assert_close(metrics_c[name], metrics_e[name], rtol=1e-12, atol=1e-14)
    # And independently: the gradient at the chosen gamma.
    _, g_ref = grad_of(
        lambda lp: reference_loss(
            lp, logq, rewards, mask, metrics_e["gamma"].item(), "token", "seq-mean-token-mean"
        ),
        logp,
    )
    torch.testing.assert_close(g_c, g_ref, rtol=1e-10, atol=1e-13)


def test_torch_func_grad_and_vmap():
    K = 3
    batches = [make_batch(20 + k, B=6, T=4, noise=1.0) for k in range(K)]
    logp = torch.stack([b[0].detach() for b in batches])
    logq, rewards, mask = (torch.stack([b[i] for b in batches]) for i in (1, 2, 3))

    def loss_fn(lp, lq, r, m):
        return is_reshape_loss(lp, lq, r, m, gamma="ess", level="sequence")[0]

    per_problem = torch.func.vmap(torch.func.grad(loss_fn))(logp, logq, rewards, mask)
    for k in range(K):
        lp = logp[k].clone().requires_grad_()
        g_k = torch.func.grad(loss_fn)(lp, logq[k], rewards[k], mask[k])
        gamma = bisect_gamma(unit_log_weights(lp, logq[k], mask[k], "sequence"))
        _, g_ref = grad_of(
            lambda x, k=k, gamma=gamma: reference_loss(
                x, logq[k], rewards[k], mask[k], gamma, "sequence", "token-mean"
            ),
            lp,
        )
        torch.testing.assert_close(g_k, g_ref, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(per_problem[k], g_ref, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Sharded statistics through a reducer (threads stand in for ranks; processes: test_distributed).
# --------------------------------------------------------------------------------------------


def test_custom_reducer_gives_the_whole_batch_loss():
    logp, logq, rewards, mask = make_batch(30, B=9, T=5, noise=1.0)
    kw = {"level": "sequence", "loss_agg_mode": "token-mean"}
    l = unit_log_weights(logp, logq, mask, "sequence")
    gamma = bisect_gamma(l)
    want, g_want = grad_of(
        lambda lp: reference_loss(lp, logq, rewards, mask, gamma, "sequence", "token-mean"), logp
    )
    cuts = [(0, 2), (2, 7), (7, 9)]
    reducer = ThreadAllReduce(len(cuts))
    results = [None] * len(cuts)

    def work(rank):
        reducer.local.rank = rank
        a, b = cuts[rank]
        lp = logp.detach()[a:b].clone().requires_grad_()
        loss, metrics = is_reshape_loss(
            lp, logq[a:b], rewards[a:b], mask[a:b], distributed=reducer, **kw
        )
        loss.backward()
        results[rank] = (loss.detach(), lp.grad, metrics["gamma"])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(cuts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for loss, _, g in results:
        torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g.item(), gamma, rtol=1e-9)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), g_want, rtol=1e-8, atol=1e-12)


def test_distributed_options_without_a_process_group():
    logp, logq, rewards, mask = make_batch(31)
    auto, _ = is_reshape_loss(logp, logq, rewards, mask, gamma=0.5)
    off, _ = is_reshape_loss(logp, logq, rewards, mask, gamma=0.5, distributed=False)
    want = reference_loss(logp, logq, rewards, mask, 0.5, "sequence", "token-mean")
    torch.testing.assert_close(auto.detach(), want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(off.detach(), want.detach(), rtol=1e-12, atol=0)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            is_reshape_loss(logp, logq, rewards, mask, distributed=True)
        with pytest.raises(RuntimeError, match="init_process_group"):
            TorchDistributedReducer()


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"rewards": None}, TypeError, "rewards are required"),
        ({"logp": np.zeros((6, 5))}, TypeError, "logp must be a torch.Tensor"),
        ({"logq": [0.0] * 6}, TypeError, "logq must be a torch.Tensor"),
        ({"mask": np.ones((6, 5), dtype=bool)}, TypeError, "mask must be a torch.Tensor"),
        ({"mask": torch.ones(6, 5)}, TypeError, "mask must have a boolean dtype"),
        ({"logp": torch.zeros(6, 5, dtype=torch.int64)}, TypeError, "floating dtype"),
        ({"logq": torch.zeros(6, 5, device="meta")}, ValueError, "logq is on meta"),
        ({"rewards": torch.zeros(4)}, ValueError, "rewards must have shape"),
        ({"level": "seq"}, ValueError, "level must be one of"),
        ({"loss_agg_mode": "mean"}, ValueError, "loss_agg_mode must be one of"),
        ({"gamma": 1.5}, ValueError, "must lie in"),
        ({"gradient": "units"}, TypeError, "takes no 'gradient' option"),
        ({"distributed": "yes"}, ValueError, "distributed must be"),
        ({"distributed": 3}, TypeError, "distributed must be"),
        ({"scale_by_world_size": 1}, TypeError, "scale_by_world_size must be a bool"),
        (
            {"distributed": ThreadAllReduce(1), "scale_by_world_size": True},
            ValueError,
            "needs a known world size",
        ),
    ],
)
def test_errors(change, error, message):
    logp, logq, rewards, mask = make_batch(40)
    args = {"logp": logp, "logq": logq, "rewards": rewards, "mask": mask}
    options = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(error, match=message):
        is_reshape_loss(**args, **options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": "tokens"}, "level must be one of"),
        ({"form": "ppo"}, "form must be one of"),
        ({"loss_agg_mode": "sum"}, "loss_agg_mode must be one of"),
        ({"gamma": "bisection"}, "gamma must be one of"),
    ],
)
def test_module_rejects_bad_options_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ISReshapeLoss(**kwargs)


@pytest.mark.parametrize("level", LEVELS)
def test_precomputed_gamma_tensor_matches_plain_torch_and_carries_no_gradient(level):
    logp, logq, rewards, mask = make_batch(21, B=6, T=5, noise=1.0)
    gammas = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=F64, requires_grad=True)
    loss, metrics = is_reshape_loss(logp, logq, rewards, mask, gamma=gammas, level=level)
    (grad,) = torch.autograd.grad(loss, logp)
    assert gammas.grad is None and not metrics["gamma"].requires_grad
    # Row b's terms of the plain-torch loss at gamma_b, with the whole batch's normaliser.
    want = 0.0
    for b in range(6):
        r_b = torch.zeros_like(rewards)
        r_b[b] = rewards[b]
        g_b = gammas[b].item()
        want = want + reference_loss(logp, logq, r_b, mask, g_b, level, "token-mean")
    (want_grad,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    # A 0-d tensor is the same as the number, through the module's per-call gamma too.
    by_number = ISReshapeLoss(gamma=0.3, level=level)(logp, logq, rewards, mask)
    by_tensor = ISReshapeLoss(level=level)(
        logp, logq, rewards, mask, gamma=torch.tensor(0.3, dtype=F64)
    )
    torch.testing.assert_close(by_tensor[0], by_number[0], rtol=0, atol=0)


def test_precomputed_gamma_compiles_without_graph_break():
    logp, logq, rewards, mask = make_batch(22, B=8, T=4)
    gammas = torch.linspace(0.1, 0.9, 8, dtype=F64)

    def fn(lp, lq, r, m, g):
        return is_reshape_loss(lp, lq, r, m, gamma=g, level="sequence")

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(logp, logq, rewards, mask, gammas)
    assert explained.graph_break_count == 0
    eager = fn(logp, logq, rewards, mask, gammas)[0]
    compiled = torch.compile(fn, fullgraph=True)(logp, logq, rewards, mask, gammas)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-14)


def test_precomputed_gamma_errors():
    logp, logq, rewards, mask = make_batch(23)
    with pytest.raises(TypeError, match=r"gamma must be a torch\.Tensor"):
        is_reshape_loss(logp, logq, rewards, mask, gamma=np.full(6, 0.5))
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        is_reshape_loss(logp, logq, rewards, mask, gamma=torch.full((6,), 1.5, dtype=F64))
    with pytest.raises(ValueError, match="gamma is on meta"):
        is_reshape_loss(logp, logq, rewards, mask, gamma=torch.zeros(6, device="meta"))
