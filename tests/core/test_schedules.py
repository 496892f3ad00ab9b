"""Tests of isreshape_core/schedules.py against the closed-form ramps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import to_numpy

import isreshape_core as isr


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_warmup_values(xp, kind):
    make = isr.linear_warmup if kind == "linear" else isr.cosine_warmup
    schedule = make(0.3, 1.0, transition_steps=40)
    for step in (0, 10, 20, 39, 40, 100, -5):
        frac = min(max(step / 40, 0.0), 1.0)
        if kind == "linear":
            want = 0.3 + 0.7 * frac
        else:
            want = 1.0 - 0.7 * 0.5 * (1 + math.cos(math.pi * frac))
        assert schedule(step) == pytest.approx(want, abs=1e-12)
        got = to_numpy(schedule(xp.asarray(step)))
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_schedule_bounds_gamma_through_select_gamma(xp):
    schedule = isr.linear_warmup(0.3, 1.0, transition_steps=10)
    l = xp.asarray(np.random.default_rng(0).normal(0, 0.1, 64))  # unconstrained gamma is 1
    for step in (0, 5, 10):
        got = float(to_numpy(isr.select_gamma(l, 0.3, gamma_max=schedule(step))))
        assert got == pytest.approx(schedule(step))


def test_sensitivity_guard(xp):
    assert isr.sensitivity_guard(0.9, 0.05, s_max=10.0) == pytest.approx(0.5)
    assert isr.sensitivity_guard(0.2, 0.05, s_max=10.0) == 0.2
    gamma = xp.asarray(np.array([0.9, 0.2, 1.0]))
    tau = xp.asarray(np.array([0.05, 0.05, 1.0]))
    np.testing.assert_allclose(to_numpy(isr.sensitivity_guard(gamma, tau, 10.0)), [0.5, 0.2, 1.0])
    with pytest.raises(ValueError, match="tau must be > 0"):
        isr.sensitivity_guard(0.5, 0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        isr.sensitivity_guard(gamma, xp.asarray(np.array([0.1, -1.0, 1.0])))
    with pytest.raises(ValueError, match="s_max"):
        isr.sensitivity_guard(0.5, 1.0, s_max=0.0)


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="transition_steps"):
        isr.linear_warmup(0.3, 1.0, transition_steps=0)
    with pytest.raises(ValueError, match="init_value"):
        isr.cosine_warmup(-0.1, 1.0, transition_steps=10)
    with pytest.raises(ValueError, match="end_value"):
        isr.linear_warmup(0.3, 2.0, transition_steps=10)
