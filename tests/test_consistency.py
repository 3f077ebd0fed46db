"""Asymptotic consistency: P(inject) -> 0 as the policy improves (docs/design.md section 7)."""
import math

import pytest

from hapo import ThompsonGate, schedules
from hapo.demo import consistency


def test_mean_gate_reference_value():
    # N = 8, gamma = 0.8: inject iff S <= 6, P = P(S <= 6 | mu = 0.9) = 0.187.
    assert ThompsonGate().injection_probability(0.9, 8) == pytest.approx(0.18690, abs=1e-5)


def test_injection_probability_falls_to_zero_as_success_rate_tends_to_one():
    rates = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]
    gate = ThompsonGate()
    p = gate.injection_probability(rates, 8).tolist()
    assert all(a > b for a, b in zip(p, p[1:-1]))
    assert p[-2] < 1e-4 and p[-1] == 0.0
    # Bounded by Hoeffding: inject iff S/N < g' with g' = (gamma (a0+b0+N) - a0) / N.
    for mu, pm in zip(rates, p):
        assert pm <= consistency.hoeffding_bound(mu, gate) + 1e-12
    # Larger groups: the bound tends to 0, and so does P(inject) at a fixed mu = 0.95.
    big = [gate.injection_probability(0.95, n) for n in (8, 32, 128, 512)]
    assert all(a > b for a, b in zip(big, big[1:])) and big[-1] < 1e-6


def test_thompson_step_gate_has_a_floor_that_annealing_lowers():
    # With one step of memory, S = N still leaves P(theta < gamma) = gamma^(a0 + N).
    gate = ThompsonGate(mode="thompson")
    assert gate.injection_probability(1.0, 8) == pytest.approx(0.8 ** 9, rel=1e-9)
    annealed = ThompsonGate(mode="thompson", schedule=schedules.cosine(0.8, 0.5, 100))
    assert annealed.injection_probability(1.0, 8, step=100) == pytest.approx(0.5 ** 9)
    # ... and it decreases monotonically in mu on the way.
    p = gate.injection_probability([0.5, 0.7, 0.9, 0.99], 8).tolist()
    assert all(a > b for a, b in zip(p, p[1:]))


def test_annealing_below_a_limiting_success_rate_of_0_9():
    mu = 0.9
    for mode in ("mean", "thompson"):
        gate = ThompsonGate(mode=mode, schedule=schedules.cosine(0.8, 0.5, total_steps=100))
        p = [gate.injection_probability(mu, 8, step=t) for t in (0, 50, 100, 1000)]
        assert all(a > b for a, b in zip(p, p[1:3])) and p[2] == p[3]
        assert p[2] < {"mean": 1e-3, "thompson": 0.05}[mode]
    # Annealing gamma_t -> 0.5 below the limit 0.9 and growing N: P -> 0.
    gate = ThompsonGate(threshold=0.5)
    big = [gate.injection_probability(mu, n) for n in (8, 16, 32)]
    assert big[-1] < 1e-8 and big[0] > big[1] > big[2]


def test_empirical_gate_on_a_simulated_improving_policy():
    steps = 300
    rates = {}
    for name, gate in consistency.empirical_gates(steps, seed=0).items():
        rates[name] = consistency.simulate(gate, steps=steps, prompts=64, seed=0)
    late = {k: sum(v[-50:]) / 50 for k, v in rates.items()}
    early = {k: sum(v[:20]) / 20 for k, v in rates.items()}
    assert all(early[k] > 0.9 for k in rates)            # a failing policy: the gate opens
    # Constant gamma = 0.8: the empirical rate matches the analytic P at the limit 0.9.
    p_mean = ThompsonGate().injection_probability(0.9, 8)
    p_thompson = ThompsonGate(mode="thompson").injection_probability(0.9, 8)
    sd = math.sqrt(0.25 / (50 * 64))
    assert abs(late["mean, gamma=0.8"] - p_mean) < 5 * sd + 0.01
    assert abs(late["thompson, gamma=0.8"] - p_thompson) < 5 * sd + 0.01
    # Annealed to 0.5 below the limit: the gate (nearly) closes.
    assert late["mean, annealed"] < 0.005
    assert late["thompson, annealed"] < 0.06
    assert late["thompson, annealed + persistent (0.9)"] < 0.001


def test_table_script_writes_markdown(tmp_path):
    text = consistency.main(["--out", str(tmp_path)])
    assert "0.1869" in text
    assert (tmp_path / "consistency.md").read_text() == text
    assert (tmp_path / "consistency.png").stat().st_size > 1000
