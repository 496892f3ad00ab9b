"""The core traces: the same functions under ``jax.jit`` and ``torch.compile(fullgraph=True)``
give the eager results (no host sync, no data-dependent Python control flow)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from array_api_compat import array_namespace

import isreshape_core as isr

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def functions():
    return {
        "ess": lambda l, m: isr.ess(l, 0.7, mask=m),
        "ess_ratio": lambda l, m: isr.ess_ratio(l, 0.4, mask=m),
        "gamma_ess": lambda l, m: isr.gamma_ess(l, 0.3, mask=m),
        "gamma_closed_form": lambda l, m: isr.gamma_closed_form(l, 0.3, mask=m),
        "select_gamma_fixed": lambda l, m: isr.select_gamma(l, method=0.5, mask=m),
        "log_weights": lambda l, m: isr.log_weights(l, 0.5 * l, m, level="geometric"),
        "step_gamma": lambda l, m: isr.step_gamma(l[0], 0.3, mask=m[0])[0],
        "step_gamma_groups": lambda l, m: isr.step_gamma(
            l[0], 0.3, mask=m[0], group_ids=_ids(m[1]), num_groups=2
        )[0],
        "tempered_weights": lambda l, m: isr.tempered_weights(l, 0.5, mask=m),
    }


def _ids(m):
    """Group indices 0/1 built inside the traced function, from a boolean row."""
    xp = array_namespace(m)
    return xp.astype(m, xp.int64)


def inputs():
    rng = np.random.default_rng(0)
    l = rng.standard_t(3, size=(4, 64)) * 2.0
    l[0, 5] = -np.inf
    mask = rng.random((4, 64)) < 0.9
    return l, mask


@pytest.mark.parametrize("name", list(functions()))
def test_jax_jit_equals_eager(name):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    fn = functions()[name]
    l, mask = inputs()
    if name == "log_weights":
        l = np.where(np.isfinite(l), l, 0.0)
    args = (jnp.asarray(l), jnp.asarray(mask))
    eager = np.asarray(fn(*args))
    traced = np.asarray(jax.jit(fn)(*args))
    np.testing.assert_allclose(traced, eager, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(functions()))
def test_torch_compile_fullgraph_equals_eager(name):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    fn = functions()[name]
    l, mask = inputs()
    if name == "log_weights":
        l = np.where(np.isfinite(l), l, 0.0)
    args = (torch.tensor(l, dtype=torch.float64), torch.tensor(mask))
    eager = fn(*args).numpy()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True)
    np.testing.assert_allclose(compiled(*args).numpy(), eager, rtol=1e-12, atol=1e-14)
