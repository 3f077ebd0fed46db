"""ThompsonGate: decisions by hand, sampling, persistent memory, exact P(inject), state."""
import math

import pytest
import torch

from hapo import ThompsonGate, schedules
from hapo.gate import regularized_incomplete_beta


def groups_with_successes(counts, G=8):
    """Binary rewards [P*G]; group p has counts[p] successes at shuffled positions."""
    rows = []
    for s in counts:
        r = torch.zeros(G)
        r[torch.randperm(G)[:s]] = 1.0
        rows.append(r)
    return torch.cat(rows)


def test_mean_gate_injects_iff_at_most_six_of_eight():
    gate = ThompsonGate()          # mean, gamma 0.8, prior (1, 1)
    decision = gate.decide(groups_with_successes(range(9)), 8)
    assert decision.dtype == torch.bool and decision.shape == (9,)
    assert decision.tolist() == [True] * 7 + [False, False]


def test_mean_gate_by_hand_other_prior_and_threshold():
    # (a0 + S) / (a0 + b0 + N) < gamma with a0 = 2, b0 = 3, N = 4, gamma = 0.5:
    # S = 0..4 -> 2/9, 3/9, 4/9, 5/9, 6/9 -> inject for S <= 2.
    gate = ThompsonGate(threshold=0.5, prior=(2.0, 3.0))
    assert gate.decide(groups_with_successes(range(5), G=4), 4).tolist() == \
        [True, True, True, False, False]


def test_success_threshold_counts_rewards_at_or_above():
    gate = ThompsonGate(threshold=0.5, success_threshold=0.7)
    r = torch.tensor([0.7, 0.9, 0.69, 0.0,   0.2, 0.3, 0.69, 0.7])
    # group 0: S = 2 -> (1+2)/6 = 0.5, not < 0.5; group 1: S = 1 -> 2/6 < 0.5.
    assert gate.decide(r, 4).tolist() == [False, True]


def test_no_injection_without_demo():
    gate = ThompsonGate()
    r = torch.zeros(24)
    assert gate.decide(r, 8, has_demo=torch.tensor([True, False, True])).tolist() == \
        [True, False, True]
    with pytest.raises(ValueError, match="has_demo"):
        gate.decide(r, 8, has_demo=torch.tensor([True, False]))


def test_thompson_is_seeded_and_reproducible():
    r = groups_with_successes([3] * 64)
    a = ThompsonGate(mode="thompson", seed=7).decide(r, 8)
    b = ThompsonGate(mode="thompson", seed=7).decide(r, 8)
    c = ThompsonGate(mode="thompson", seed=8).decide(r, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_thompson_frequency_matches_beta_cdf():
    # S = 6 of 8: P(theta < 0.8) for theta ~ Beta(7, 3) = I_0.8(7, 3).
    gate = ThompsonGate(mode="thompson", seed=0)
    r = groups_with_successes([6] * 4000)
    freq = gate.decide(r, 8).double().mean().item()
    exact = regularized_incomplete_beta(0.8, 7, 3)
    assert abs(freq - exact) < 4 * math.sqrt(exact * (1 - exact) / 4000)


def test_schedule_sets_threshold_per_step():
    sched = schedules.linear(0.8, 0.5, total_steps=10)
    gate = ThompsonGate(schedule=sched)
    r = groups_with_successes([4])          # mean 5/10 = 0.5
    assert gate.decide(r, 8, step=0).item() is True       # 0.5 < 0.8
    assert gate.decide(r, 8, step=10).item() is False     # 0.5 < 0.5 is false
    assert gate.gamma(5) == pytest.approx(0.65)
    # Without step the gate counts its own decide() calls.
    g2 = ThompsonGate(schedule=sched)
    for _ in range(10):
        g2.decide(r, 8)
    assert g2.step == 10 and g2.decide(r, 8).item() is False


def test_persistent_memory_by_hand():
    gate = ThompsonGate(memory="persistent", discount=0.5)
    # prompt "a": S=8 (posterior mean 9/10 = 0.9, no inject); prompt "b": S=0.
    gate.decide(groups_with_successes([8, 0]), 8, prompt_ids=["a", "b"])
    assert gate.counts["a"] == (8.0, 0.0) and gate.counts["b"] == (0.0, 8.0)
    # Second visit of "a" with S = 4: counts 0.5*8 + 4 = 8 successes, 0.5*0 + 4 = 4 fails,
    # posterior mean (1 + 8) / (2 + 12) = 0.643 < 0.8 -> inject. A fresh "c" with S = 4
    # gives 5/10 < 0.8 -> inject; "a" again with S = 8: (1 + 4 + 8)/(2 + 6 + 8) = 0.8125.
    d = gate.decide(groups_with_successes([4, 4]), 8, prompt_ids=["a", "c"])
    assert d.tolist() == [True, True]
    assert gate.counts["a"] == (8.0, 4.0)
    d = gate.decide(groups_with_successes([8]), 8, prompt_ids=["a"])
    assert d.tolist() == [False]
    assert gate.counts["a"] == (12.0, 2.0)


def test_persistent_memory_needs_prompt_ids():
    gate = ThompsonGate(memory="persistent")
    with pytest.raises(ValueError, match="prompt_ids"):
        gate.decide(torch.zeros(8), 8)
    with pytest.raises(ValueError, match="one id per group"):
        gate.decide(torch.zeros(16), 8, prompt_ids=[1])


def test_mean_injection_probability_is_the_binomial_sum():
    gate = ThompsonGate()
    mu = 0.9
    exact = 1 - 8 * mu ** 7 * (1 - mu) - mu ** 8      # P(S <= 6)
    assert gate.injection_probability(mu, 8) == pytest.approx(exact, abs=1e-12)
    assert round(gate.injection_probability(0.9, 8), 3) == 0.187
    assert gate.injection_probability(1.0, 8) == 0.0
    assert gate.injection_probability(0.0, 8) == 1.0
    rates = gate.injection_probability(torch.tensor([0.0, 0.9]), 8)
    assert rates.shape == (2,) and rates[1].item() == pytest.approx(exact)


def test_injection_probability_matches_simulation():
    for mode in ("mean", "thompson"):
        gate = ThompsonGate(mode=mode, seed=1)
        mu, P = 0.75, 4000
        r = (torch.rand(P * 8) < mu).float()
        freq = gate.decide(r, 8).double().mean().item()
        p = gate.injection_probability(mu, 8)
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / P) + 1e-3, mode


@pytest.mark.parametrize("a,b,x", [(1, 1, 0.3), (3, 6, 0.8), (9, 1, 0.8), (5, 5, 0.5),
                                   (1, 9, 0.05), (20, 3, 0.9)])
def test_incomplete_beta_integer_identity(a, b, x):
    n = a + b - 1
    binom = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(a, n + 1))
    assert regularized_incomplete_beta(x, a, b) == pytest.approx(binom, abs=1e-13)


def test_incomplete_beta_non_integer_by_quadrature():
    a, b, x = 2.5, 0.7, 0.6
    t = torch.linspace(0, x, 200_001, dtype=torch.float64)[1:]
    dens = t ** (a - 1) * (1 - t) ** (b - 1)
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    quad = torch.trapezoid(dens, t).item() / beta
    assert regularized_incomplete_beta(x, a, b) == pytest.approx(quad, rel=1e-6)
    assert regularized_incomplete_beta(0.0, a, b) == 0.0
    assert regularized_incomplete_beta(1.0, a, b) == 1.0


def test_state_dict_round_trip_reproduces_decisions():
    r = groups_with_successes([2, 5, 7, 6])
    ids = [10, 11, 12, 13]
    gate = ThompsonGate(mode="thompson", memory="persistent", discount=0.9, seed=3)
    gate.decide(r, 8, prompt_ids=ids)
    state = gate.state_dict()
    expected = [gate.decide(r, 8, prompt_ids=ids) for _ in range(5)]
    fresh = ThompsonGate(mode="thompson", memory="persistent", discount=0.9, seed=99)
    fresh.load_state_dict(state)
    got = [fresh.decide(r, 8, prompt_ids=ids) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert fresh.counts == gate.counts and fresh.step == gate.step


def test_load_state_dict_rejects_other_options():
    state = ThompsonGate(mode="thompson").state_dict()
    with pytest.raises(ValueError, match="mode"):
        ThompsonGate(mode="mean").load_state_dict(state)


@pytest.mark.parametrize("kwargs,name", [
    (dict(mode="sample"), "mode"), (dict(memory="forever"), "memory"),
    (dict(threshold=1.5), "threshold"), (dict(threshold=-0.1), "threshold"),
    (dict(prior=(0.0, 1.0)), "prior"), (dict(prior=(1.0,)), "prior"),
    (dict(discount=0.0), "discount"), (dict(discount=1.2), "discount"),
    (dict(schedule=0.5), "schedule"), (dict(seed="x"), "seed"),
    (dict(success_threshold=float("nan")), "success_threshold"),
])
def test_bad_options_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ThompsonGate(**kwargs)


def test_bad_groups_raise():
    gate = ThompsonGate()
    with pytest.raises(ValueError, match="group_size"):
        gate.decide(torch.zeros(8), 1)
    with pytest.raises(ValueError, match="divide"):
        gate.decide(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="success_rate"):
        gate.injection_probability(1.5, 8)


def test_uneven_groups_decide_like_each_group_alone():
    """group_offsets: each group's posterior uses its own N (verl's uneven groups)."""
    rewards = torch.tensor([1.0, 0.0, 0.0,   1.0,   0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    offsets = torch.tensor([0, 3, 4, 11])
    gate = ThompsonGate(threshold=0.5)
    inject = gate.decide(rewards, group_offsets=offsets)
    # posterior means (1 + S) / (2 + N): 2/5, 2/3, 5/9
    assert inject.tolist() == [True, False, False]
    assert gate.successes(rewards, group_offsets=offsets).tolist() == [1.0, 1.0, 4.0]
    alone = [ThompsonGate(threshold=0.5).decide(rewards[a:b], group_offsets=torch.tensor(
        [0, b - a]))[0].item() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    assert alone == inject.tolist()
    with pytest.raises(ValueError, match="exactly one of group_size"):
        gate.decide(rewards, 11, group_offsets=offsets)


def test_comparison_at_the_boundary():
    """N = 8, gamma = 0.8: S = 7 gives a posterior mean of exactly 8/10 = 0.8, which "<"
    does not inject and "<=" does; S = 8 (9/10) neither."""
    rewards = groups_with_successes([6, 7, 8])
    assert ThompsonGate().decide(rewards, 8).tolist() == [True, False, False]
    assert ThompsonGate(comparison="<=").decide(rewards, 8).tolist() == [True, True, False]
    # P(inject | mu = 0.9) = P(S <= 6) against P(S <= 7) = 1 - 0.9^8.
    below = ThompsonGate().injection_probability(0.9, 8)
    at_or_below = ThompsonGate(comparison="<=").injection_probability(0.9, 8)
    assert below == pytest.approx(1 - 0.9 ** 8 - 8 * 0.1 * 0.9 ** 7)
    assert at_or_below == pytest.approx(1 - 0.9 ** 8)
    assert round(below, 4) == 0.1869 and round(at_or_below, 4) == 0.5695


def test_comparison_option_checked_and_saved():
    with pytest.raises(ValueError, match="comparison"):
        ThompsonGate(comparison="<<")
    state = ThompsonGate(comparison="<=").state_dict()
    assert state["config"]["comparison"] == "<="
    with pytest.raises(ValueError, match="comparison"):
        ThompsonGate().load_state_dict(state)
    # A state saved before the option existed loads into the default gate.
    del state["config"]["comparison"]
    ThompsonGate().load_state_dict(state)


@pytest.mark.parametrize("value", [2.0, -0.5, float("nan")])
def test_schedule_outside_zero_one_is_an_error(value):
    gate = ThompsonGate(schedule=lambda step: value)
    with pytest.raises(ValueError, match=r"schedule\(step\)"):
        gate.decide(torch.zeros(8), 4)


def test_non_finite_reward_is_not_a_failure():
    """A NaN reward used to count as a failure (and open the gate)."""
    gate = ThompsonGate()
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, float("nan"), 1.0, 1.0])
    with pytest.raises(ValueError, match="group 1"):
        gate.decide(rewards, 4)
    with pytest.raises(ValueError, match=r"group 2 \(rollouts 4 .. 7\)"):
        gate.decide(rewards, group_offsets=torch.tensor([0, 1, 4, 8]))
    assert gate.step == 0
