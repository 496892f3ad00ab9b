"""Tests of adapters/isreshape_torch/distributed.py: 2 and 4 processes (gloo, CPU, 127.0.0.1)
each hold a slice of the batch; gamma, the loss and each rank's gradient must equal the
single-process result on the whole batch, and DDP with ``scale_by_world_size`` must produce the
single-process parameter gradient.

(Named ``test_torch_distributed.py``: pytest imports these test files by basename, and other
adapters' ``test_distributed.py`` would collide.)
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from isreshape_torch import is_reshape_loss  # noqa: E402

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

B, T, D, V = 12, 5, 3, 7
# Slices per world size: uneven, and on multiples of 2 (the group size of the grouped case).
CUTS = {2: [0, 4, 12], 4: [0, 2, 6, 8, 12]}
CASES = [
    {"level": "sequence", "gamma": "ess", "loss_agg_mode": "token-mean"},
    {"level": "token", "gamma": "ess", "loss_agg_mode": "seq-mean-token-mean"},
    {"level": "geometric", "gamma": "closed_form", "loss_agg_mode": "seq-mean-token-sum"},
    {
        "level": "sequence",
        "gamma": 0.5,
        "loss_agg_mode": "seq-mean-token-sum-norm",
        "form": "reinforce",
    },
    {"level": "sequence", "gamma": "ess", "group_size": 2},
    {"level": "token", "gamma": "ess", "loss_agg_mode": "token-mean", "scale_by_world_size": True},
]


def batch():
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    logq = logp + rng.normal(0, 1.2, (B, T))
    lengths = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    rewards = rng.normal(0, 1, B)
    return (
        torch.tensor(logp, dtype=torch.float64),
        torch.tensor(logq, dtype=torch.float64),
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(mask),
    )


def policy_inputs():
    """A tiny policy: a linear map from features to token logits; the sampled tokens."""
    rng = np.random.default_rng(1)
    features = torch.tensor(rng.normal(0, 1, (B, T, D)), dtype=torch.float64)
    tokens = torch.tensor(rng.integers(0, V, (B, T)))
    return features, tokens


def make_policy():
    torch.manual_seed(0)
    return torch.nn.Linear(D, V, dtype=torch.float64)  # explicit: other tests change the default


def policy_logp(model, features, tokens):
    logits = model(features)
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


def one_step(logp, logq, rewards, mask, **kw):
    logp = logp.detach().clone().requires_grad_()
    loss, metrics = is_reshape_loss(logp, logq, rewards, mask, **kw)
    loss.backward()
    return {"loss": loss.detach(), "grad": logp.grad, "gamma": metrics["gamma"], **metrics}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        a, b = CUTS[world][rank], CUTS[world][rank + 1]
        logp, logq, rewards, mask = (x[a:b] for x in batch())
        out = {"cases": [one_step(logp, logq, rewards, mask, **kw) for kw in CASES]}
        # An explicit process group behaves like the default one.
        group = dist.new_group(list(range(world)))
        out["group"] = one_step(logp, logq, rewards, mask, distributed=group, **CASES[0])

        # DDP: each rank's slice, the loss scaled by the world size, DDP averages the gradients.
        features, tokens = policy_inputs()
        model = torch.nn.parallel.DistributedDataParallel(make_policy())
        lp = policy_logp(model, features[a:b], tokens[a:b])
        loss, _ = is_reshape_loss(lp, logq, rewards, mask, level="token", scale_by_world_size=True)
        loss.backward()
        out["ddp"] = [p.grad.clone() for p in model.module.parameters()]

        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_the_single_process_result(world, tmp_path):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(world)]
    whole = batch()
    for i, kw in enumerate(CASES):
        single_kw = {k: v for k, v in kw.items() if k != "scale_by_world_size"}
        want = one_step(*whole, distributed=False, **single_kw)
        scale = world if kw.get("scale_by_world_size") else 1
        if kw["gamma"] == "ess" and "group_size" not in kw:
            assert want["gamma"].item() < 1.0  # the constraint binds: a real test of the merge
        for r in ranks:
            got = r["cases"][i]
            torch.testing.assert_close(got["loss"], scale * want["loss"], rtol=1e-12, atol=1e-14)
            if "group_size" not in kw:  # per-group gammas are rank-local; their mean is too
                for name in ("gamma", "sigma2", "ess_ratio", "ess_ratio_at_1", "max_weight"):
                    torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)
        grads = torch.cat([r["cases"][i]["grad"] for r in ranks])
        torch.testing.assert_close(grads, scale * want["grad"], rtol=1e-12, atol=1e-14)

    want = one_step(*whole, distributed=False, **CASES[0])
    for r in ranks:
        torch.testing.assert_close(r["group"]["loss"], want["loss"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        torch.cat([r["group"]["grad"] for r in ranks]), want["grad"], rtol=1e-12, atol=1e-14
    )

    # DDP's averaged parameter gradient equals the single-process gradient of the whole batch.
    model = make_policy()
    features, tokens = policy_inputs()
    _, logq, rewards, mask = whole
    loss, _ = is_reshape_loss(
        policy_logp(model, features, tokens), logq, rewards, mask, level="token", distributed=False
    )
    loss.backward()
    for r in ranks:
        for got, p in zip(r["ddp"], model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=1e-12, atol=1e-14)


def test_collectives_compile_without_graph_break():
    """With a process group (one rank, in this process), the reducer's functional collectives
    trace into one graph, and the compiled loss equals the eager one."""
    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        logp, logq, rewards, mask = batch()
        logp.requires_grad_()

        def fn(lp, lq, r, m):
            # max_iter=3 (default 16): fewer collectives in the graph, a faster compile.
            return is_reshape_loss(lp, lq, r, m, level="token", distributed=True, max_iter=3)

        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(logp, logq, rewards, mask)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        c_loss, c_metrics = torch.compile(fn, fullgraph=True)(logp, logq, rewards, mask)
        (c_grad,) = torch.autograd.grad(c_loss, logp)
        want = one_step(logp, logq, rewards, mask, level="token", distributed=False, max_iter=3)
        assert want["gamma"].item() < 1.0
        torch.testing.assert_close(c_loss.detach(), want["loss"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c_metrics["gamma"], want["gamma"], rtol=1e-12, atol=0)
        torch.testing.assert_close(c_grad, want["grad"], rtol=1e-12, atol=1e-14)
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()
