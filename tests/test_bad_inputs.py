"""The catalogue of bad inputs (issue 14): every public function of the core that takes log
weights or log-probabilities, and the adapters' losses, over every kind of bad input, on every
backend (``xp``). Each must raise a clear error naming the argument, or give its documented
value; no finite input may give NaN.

Kinds: NaN, ``+inf``, a bool array, an integer array, a Python list instead of an array, a list
mask, a mask of the wrong shape, an empty sample axis, and extreme finite values (``+-1e300``,
a constant offset of ``1e15``, ``+-3e38`` in float32).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from _helpers import to_numpy

import isreshape_core as isr

S = 40  # samples per row: enough for a PSIS tail (S >= 25)


def _shape(l):
    return tuple(l.shape) if hasattr(l, "shape") else np.shape(l)


def _rewards_like(xp, l):
    # A copy: torch warns (once per process) when it wraps a read-only NumPy view.
    return xp.asarray(np.broadcast_to(np.linspace(-1.0, 2.0, _shape(l)[-1]), _shape(l)).copy())


def _const(xp, l, value):
    return xp.asarray(np.full(_shape(l), value))


REWARDS = np.array([1.0, -1.0])


def _outputs(value):
    """The array outputs of a call (tuples, dicts and the Diagnostics report flattened)."""
    if isinstance(value, isr.Diagnostics):
        return [v for v in vars(value).values() if hasattr(v, "shape")]
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, tuple):
        return [v for item in value for v in _outputs(item)]
    return [value]


#: name -> call on (xp, log weights of shape (2, S), mask or None)
LOG_W_FUNCTIONS = {
    "ess": lambda xp, l, m: isr.ess(l, 0.5, mask=m),
    "ess_ratio": lambda xp, l, m: isr.ess_ratio(l, 0.5, mask=m),
    "gradient_ess": lambda xp, l, m: isr.gradient_ess(l, _rewards_like(xp, l), 0.5, mask=m),
    "gamma_closed_form": lambda xp, l, m: isr.gamma_closed_form(l, 0.3, mask=m),
    "gamma_ess": lambda xp, l, m: isr.gamma_ess(l, 0.3, mask=m),
    "select_gamma": lambda xp, l, m: isr.select_gamma(l, 0.3, mask=m),
    "select_gamma_fixed": lambda xp, l, m: isr.select_gamma(l, method=0.5, mask=m),
    "gamma_psis": lambda xp, l, m: isr.gamma_psis(l, 0.3, mask=m),
    "gamma_tail": lambda xp, l, m: isr.gamma_tail(l, mask=m),
    "gamma_combined": lambda xp, l, m: isr.gamma_combined(l, 0.3, mask=m),
    "renyi_divergence": lambda xp, l, m: isr.renyi_divergence(l, 2.0, mask=m),
    "log_mean_tempered_weight": lambda xp, l, m: isr.log_mean_tempered_weight(l, 0.5, mask=m),
    "diagnose": lambda xp, l, m: isr.diagnose(l, mask=m),
    "objective": lambda xp, l, m: isr.objective(l, _rewards_like(xp, l), 0.5, mask=m),
    "objective_grad": lambda xp, l, m: isr.objective_grad(l, _rewards_like(xp, l), 0.5, mask=m),
    "reinforce_objective": lambda xp, l, m: isr.reinforce_objective(
        l, _const(xp, l, -1.0), _rewards_like(xp, l), 0.5, mask=m
    ),
    "tempered_weights": lambda xp, l, m: isr.tempered_weights(l, 0.5, mask=m),
    "step_gamma": lambda xp, l, m: isr.step_gamma(
        xp.reshape(l, (-1,)), 0.3, mask=None if m is None else xp.reshape(m, (-1,))
    ),
    "psis": lambda xp, l, m: isr.psis(l),
    "psis_tail_fit": lambda xp, l, m: isr.psis_tail_fit(l),
    "log_weights": lambda xp, l, m: isr.log_weights(l, _const(xp, l, -1.0), m),
    "loss": lambda xp, l, m: isr.is_reshape_loss_and_grad(
        l, _const(xp, l, -1.0), xp.asarray(REWARDS), m, gamma="ess"
    ),
    "loss_token_reinforce": lambda xp, l, m: isr.is_reshape_loss_and_grad(
        l,
        _const(xp, l, -1.0),
        xp.asarray(REWARDS),
        m,
        level="token",
        form="reinforce",
        gamma=0.7,
    ),
}
#: The functions whose first argument is not called log_w.
FIRST_ARG = {"log_weights": "logp", "loss": "logp", "loss_token_reinforce": "logp"}
#: Functions that take no mask.
NO_MASK = {"psis", "psis_tail_fit"}


def _clean():
    return np.random.default_rng(0).normal(0.0, 1.0, size=(2, S))


@pytest.mark.parametrize("name", list(LOG_W_FUNCTIONS))
def test_nan_and_plus_inf_are_refused(xp, name):
    fn = LOG_W_FUNCTIONS[name]
    for value in (math.nan, math.inf):
        l = _clean()
        l[1, 3] = value
        with pytest.raises(ValueError, match=r"NaN|\+inf"):
            fn(xp, xp.asarray(l), None)


@pytest.mark.parametrize("name", list(LOG_W_FUNCTIONS))
def test_bool_and_integer_arrays_are_refused(xp, name):
    fn = LOG_W_FUNCTIONS[name]
    arg = FIRST_ARG.get(name, "log_w")
    for bad in (_clean() > 0, np.round(_clean() * 10).astype(np.int64)):
        with pytest.raises(TypeError, match=f"{arg} must have a real floating dtype"):
            fn(xp, xp.asarray(bad), None)


@pytest.mark.parametrize("name", [n for n in LOG_W_FUNCTIONS if n != "step_gamma"])
def test_lists_are_refused_by_name(xp, name):
    fn = LOG_W_FUNCTIONS[name]
    arg = FIRST_ARG.get(name, "log_w")
    with pytest.raises(TypeError, match=f"{arg} must be an array"):
        fn(xp, _clean().tolist(), None)
    if name in NO_MASK:
        return
    l = xp.asarray(_clean())
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        fn(xp, l, np.ones((2, S), dtype=bool).tolist())
    with pytest.raises((ValueError, TypeError), match="mask"):
        fn(xp, l, xp.asarray(np.ones((3, 7), dtype=bool)))


ELEMENTWISE = {"tempered_weights", "log_weights"}  # no reduction: an empty axis is fine


@pytest.mark.parametrize(
    "name", [n for n in LOG_W_FUNCTIONS if not n.startswith("loss") and n not in ELEMENTWISE]
)
def test_an_empty_sample_axis_is_refused(xp, name):
    fn = LOG_W_FUNCTIONS[name]
    with pytest.raises(ValueError, match=r"no samples|no outcomes|empty|shape"):
        fn(xp, xp.asarray(np.zeros((2, 0))), None)


#: Functions whose value is not defined on every kind of extreme input (none: the objective
#: and its REINFORCE form saturate at the largest float, their gradients too).
INDETERMINATE: set[str] = set()


def _extremes(dtype):
    rng = np.random.default_rng(4)
    big = 1e300 if dtype == np.float64 else 3e38
    rows = {
        "span": np.where(rng.random((2, S)) < 0.5, big, -big),
        "offset": rng.normal(0.0, 2.0, (2, S)) + (1e15 if dtype == np.float64 else 1e6),
        "huge_negative": -big * rng.random((2, S)),
    }
    return {k: v.astype(dtype) for k, v in rows.items()}


@pytest.mark.parametrize("name", list(LOG_W_FUNCTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_finite_inputs_give_no_nan_and_no_warning(xp, name, dtype):
    fn = LOG_W_FUNCTIONS[name]
    kinds = _extremes(dtype)
    if name in INDETERMINATE:
        # Documented: terms of +inf and -inf (out of range) sum to NaN; the loss rescales.
        kinds = {"huge_negative": kinds["huge_negative"]}
    l = np.concatenate(list(kinds.values()))  # one call for every kind: 2 rows each
    mask = np.random.default_rng(1).random(l.shape) < 0.8
    # Near float32's limit a sum of log ratios is itself out of range (+-inf, honestly, in
    # log_weights); at +-1e300 in float64 no step may even overflow.
    over = "raise" if dtype == np.float64 else "ignore"
    with warnings.catch_warnings(), np.errstate(over=over, invalid="raise", divide="raise"):
        warnings.simplefilter("error" if dtype == np.float64 else "ignore")
        if name.startswith("loss"):
            r = xp.asarray(np.resize(REWARDS, l.shape[0]))
            out = isr.is_reshape_loss_and_grad(
                xp.asarray(l),
                _const(xp, l, -1.0),
                r,
                xp.asarray(mask),
                gamma="ess",
                form="reinforce" if "reinforce" in name else "objective",
                level="token" if "token" in name else "sequence",
            )
        else:
            out = fn(xp, xp.asarray(l), None if name in NO_MASK else xp.asarray(mask))
    for value in _outputs(out):
        v = to_numpy(value)
        if v.dtype.kind == "f":
            assert not np.any(np.isnan(v)), (name, list(kinds), v)
    if name.startswith("objective") or name.startswith("reinforce_objective"):
        # No term is infinite by definition here (finite log weights): finite, saturated.
        v = to_numpy(out)
        assert np.all(np.isfinite(v)) and np.all(np.abs(v) <= np.finfo(dtype).max), (name, v)
    if name.startswith("loss"):
        loss, grad = to_numpy(out[0]), to_numpy(out[1])
        assert np.isfinite(loss) and np.all(np.isfinite(grad)), name
        assert np.all(grad[~mask] == 0.0), name


def test_targets_refuse_bool_log_probabilities(xp):
    logq = xp.asarray(np.array([True, False, True]))
    r = xp.asarray(np.ones(3))
    for fn in (
        lambda: isr.target_log_probs(logq, r, 0.5, 1.0),
        lambda: isr.stationary_log_probs(logq, r, 0.5),
    ):
        with pytest.raises(TypeError, match="logq must have a real floating dtype"):
            fn()


# --------------------------------------------------------------------------------------------
# The adapters (each in its own nox session; skipped where the framework is missing).


def _adapter_calls():
    calls = {}
    try:
        import torch

        import isreshape_torch

        def torch_loss(lp, lq, r, m=None, **kw):
            return isreshape_torch.is_reshape_loss(
                torch.as_tensor(lp),
                torch.as_tensor(lq),
                torch.as_tensor(r),
                None if m is None else torch.as_tensor(m),
                distributed=False,
                **kw,
            )

        calls["torch"] = torch_loss
    except ImportError:
        pass
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        import isreshape_jax

        def jax_loss(lp, lq, r, m=None, **kw):
            return isreshape_jax.is_reshape_loss(
                jnp.asarray(lp),
                jnp.asarray(lq),
                jnp.asarray(r),
                None if m is None else jnp.asarray(m),
                **kw,
            )

        calls["jax"] = jax_loss
    except ImportError:
        pass
    from cupy_adapter._kernel_mirrors import reference_row_stats, reference_token_grad

    import isreshape_cupy
    from isreshape_cupy.loss import _fused_loss_and_grad

    def cupy_cpu(lp, lq, r, m=None, **kw):  # NumPy arrays: the CPU-reachable path
        loss, _, metrics = isreshape_cupy.is_reshape_loss_and_grad(lp, lq, r, m, **kw)
        return loss, metrics

    def cupy_fused_cpu(lp, lq, r, m=None, **kw):  # the fused path with the kernels' mirrors
        full = {"gamma": "ess", "rho_min": 0.3, "level": "sequence", "form": "objective"}
        full.update({"loss_agg_mode": "token-mean", "group_size": None})
        full.update({"loss_scale_factor": None, **kw})
        loss, _, metrics = _fused_loss_and_grad(
            lp,
            lq,
            r,
            m,
            row_stats=reference_row_stats,
            token_grad=reference_token_grad,
            **full,
        )
        return loss, metrics

    calls["cupy_cpu"] = cupy_cpu
    calls["cupy_fused_cpu"] = cupy_fused_cpu
    return calls


ADAPTERS = _adapter_calls()


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_losses_refuse_bad_inputs(adapter):
    call = ADAPTERS[adapter]
    lp = np.random.default_rng(0).normal(-1.0, 0.2, (2, 5))
    lq = lp - 0.1
    r = np.array([1.0, -1.0])
    bad = lp.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        call(bad, lq, r)
    inf_q = lq.copy()
    inf_q[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"logq contains \+inf"):
        call(lp, inf_q, r)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        call(lp, lq, r, gamma=1.5)
    for factor in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="loss_scale_factor must be a positive finite"):
            call(lp, lq, r, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=factor)
    with pytest.raises(TypeError, match=r"real floating|floating dtype"):
        call(lp.astype(np.float32) > -1, lq, r)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_losses_stay_finite_in_float32(adapter):
    call = ADAPTERS[adapter]
    lq = np.zeros((2, 2), dtype=np.float32)
    lp = np.array([[100.0, 0.0], [0.1, 0.0]], dtype=np.float32)
    mask = np.array([[True, False], [True, True]])
    for r in ([1.0, 1.0], [0.0, 1.0]):
        out = call(lp, lq, np.array(r, dtype=np.float32), mask, gamma=1.0)
        assert np.isfinite(
            float(np.asarray(out[0].detach() if hasattr(out[0], "detach") else out[0]))
        )
        if out[1] is not None:
            assert float(np.asarray(out[1]["n_capped"])) == (1.0 if r[0] else 0.0)
