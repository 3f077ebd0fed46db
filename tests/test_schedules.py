"""Threshold schedules for the gate."""
import math

import pytest

from hapo import schedules
from hapo.schedules import make_schedule


@pytest.mark.parametrize("name", ["linear", "cosine", "exponential"])
def test_anneals_from_gamma_to_gamma_min(name):
    s = make_schedule(name, gamma=0.8, gamma_min=0.5, total_steps=100)
    values = [s(t) for t in range(0, 301, 10)]
    assert values[0] == pytest.approx(0.8)
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))      # non-increasing
    assert all(0.5 - 1e-12 <= v <= 0.8 + 1e-12 for v in values)
    assert s(1_000_000) == pytest.approx(0.5, abs=1e-9)


def test_values_by_hand():
    assert schedules.linear(0.8, 0.4, 10)(5) == pytest.approx(0.6)
    assert schedules.linear(0.8, 0.4, 10)(50) == pytest.approx(0.4)
    assert schedules.cosine(0.8, 0.4, 10)(5) == pytest.approx(0.6)
    assert schedules.cosine(0.8, 0.4, 10)(10) == pytest.approx(0.4)
    assert schedules.exponential(0.8, 0.4, 10, rate=2.0)(5) == \
        pytest.approx(0.4 + 0.4 * math.exp(-1.0))
    assert schedules.constant(0.7)(12345) == 0.7
    assert make_schedule("constant", gamma=0.6)(3) == 0.6


@pytest.mark.parametrize("call,name", [
    (lambda: make_schedule("step"), "schedule"),
    (lambda: schedules.linear(0.5, 0.8, 10), "gamma_min"),
    (lambda: schedules.linear(1.5, 0.5, 10), "gamma"),
    (lambda: schedules.cosine(0.8, 0.5, 0), "total_steps"),
    (lambda: schedules.exponential(0.8, 0.5, 10, rate=0.0), "rate"),
    (lambda: schedules.linear()(-1), "step"),
    (lambda: make_schedule("constant", gamma=0.8, rate=3.0), "constant"),
])
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()
