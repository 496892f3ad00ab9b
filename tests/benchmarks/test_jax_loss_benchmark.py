"""benchmarks/jax_loss.py end to end on tiny shapes, one round: every case in the table with
finite positive counts, times and ratios (no timing assertions), and its two op counters on
programs whose counts are known."""

from __future__ import annotations

import math

import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


def test_count_equations_recurses_into_sub_jaxprs(load_benchmark):
    bench = load_benchmark("jax_loss")

    def inner(x):
        return jnp.sin(x) + 1.0  # sin, add

    def outer(x):
        y = jax.jit(inner)(x) * 2.0  # the jit equation, its 2, mul
        # while: its condition and body once each, not once per iteration
        return jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] * 3.0), (0, y))

    jaxpr = jax.make_jaxpr(outer)(jnp.ones(3, jnp.float32)).jaxpr
    names = [e.primitive.name for e in jaxpr.eqns]
    assert names[:2] == ["jit", "mul"] and names[-1] == "while"
    while_eqn = jaxpr.eqns[-1]
    body = while_eqn.params["body_jaxpr"].jaxpr
    cond = while_eqn.params["cond_jaxpr"].jaxpr
    expected = len(jaxpr.eqns) + 2 + len(body.eqns) + len(cond.eqns)
    assert bench.count_equations(jaxpr) == expected
    assert bench.count_equations(jax.make_jaxpr(inner)(jnp.ones(3)).jaxpr) == 2


HLO = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[]}

%region_0.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%a, %b)
}

%fused_computation (param_0: f32[4]) -> f32[] {
  %param_0 = f32[4]{0} parameter(0)
  %exp.0 = f32[4]{0} exponential(%param_0)
  %constant.0 = f32[] constant(0)
  ROOT %reduce.0 = f32[] reduce(%exp.0, %constant.0), dimensions={0}, to_apply=%region_0.1
}

ENTRY %main.3 (x.1: f32[4]) -> (f32[], f32[4]) {
  %x.1 = f32[4]{0} parameter(0)
  %sum_fusion = f32[] fusion(%x.1), kind=kLoop, calls=%fused_computation
  %neg.1 = f32[4]{0} negate(%x.1)
  ROOT %tuple.1 = (f32[], f32[4]{0}) tuple(%sum_fusion, %neg.1)
}
"""


def test_count_hlo_on_a_known_module(load_benchmark):
    bench = load_benchmark("jax_loss")
    # 3 + 4 + 4 instruction lines; one fusion; executed: the fusion and the negate (parameter
    # and tuple run nothing; the fused computation and the reduction body are not separate).
    assert bench.count_hlo(HLO) == {"instructions": 11, "fusions": 1, "executed": 2}


def test_ppo_clip_baseline_matches_a_direct_computation(load_benchmark):
    bench = load_benchmark("jax_loss")
    logp = jnp.array([[0.0, -1.0], [-0.5, -2.0]], jnp.float32)
    old = jnp.array([[0.5, -1.0], [-0.5, -1.0]], jnp.float32)
    adv = jnp.array([1.0, -2.0], jnp.float32)
    mask = jnp.array([[True, True], [True, False]])
    expected = (max(-math.exp(-0.5), -0.8) + -1.0 + 2.0) / 3
    assert float(bench.ppo_clip_loss(logp, old, adv, mask)) == pytest.approx(expected, rel=1e-6)


def test_table_has_every_case(load_benchmark):
    bench = load_benchmark("jax_loss")
    text, summaries, counts = bench.run(B=4, T=16, rounds=1, warmup=0)
    names = [bench.BASELINE, *bench.OPTIONS]
    assert list(summaries) == list(counts) == names
    for name in names:
        assert f"| {name} |" in text
        s = summaries[name]
        for value in (s.median_s, s.ratio, s.q1, s.q3, s.lo, s.hi):
            assert math.isfinite(value) and value > 0
        assert all(k > 0 for k in counts[name].values())
    assert summaries[bench.BASELINE].ratio == 1.0
    assert text.count("\n| ") == len(names) + 1
