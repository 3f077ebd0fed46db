"""Schedules for the gate threshold ``gamma_t`` (docs/design.md section 7).

Annealing ``gamma_t`` below the policy's limiting success rate is what makes the gate
close for a policy that never becomes perfect (asymptotic consistency). A schedule is a
plain callable ``step -> gamma_t``; the classes below are picklable and print their
parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hapo_kernels.options import number

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "Exponential", "constant", "linear",
           "cosine", "exponential", "make_schedule", "SCHEDULES"]


def _check_step(step) -> int:
    if isinstance(step, bool) or not float(step).is_integer() or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


@dataclass(frozen=True)
class Schedule:
    """Base: ``gamma`` at step 0 moving to ``gamma_min`` at ``total_steps`` (then held)."""
    gamma: float = 0.8
    gamma_min: float = 0.8
    total_steps: int = 1

    def __post_init__(self):
        number("gamma", self.gamma, low=0.0, high=1.0)
        number("gamma_min", self.gamma_min, low=0.0, high=1.0)
        if self.gamma_min > self.gamma:
            raise ValueError(f"gamma_min={self.gamma_min} must not exceed gamma={self.gamma} "
                             "(schedules anneal the threshold downwards)")
        if isinstance(self.total_steps, bool) or not float(self.total_steps).is_integer() \
                or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")

    def progress(self, step: int) -> float:
        """How far along the schedule ``step`` is: ``step / total_steps``, at most 1."""
        return min(_check_step(step) / self.total_steps, 1.0)

    def shape(self, frac: float) -> float:
        """Fraction of the way from ``gamma`` to ``gamma_min`` at progress ``frac``."""
        return 0.0

    def __call__(self, step: int) -> float:
        """The threshold ``gamma_t`` at ``step``."""
        return self.gamma - (self.gamma - self.gamma_min) * self.shape(self.progress(step))


class Constant(Schedule):
    """gamma_t = gamma at every step."""
    def __init__(self, gamma: float = 0.8) -> None:
        super().__init__(gamma=gamma, gamma_min=gamma, total_steps=1)


class Linear(Schedule):
    """gamma_t falls linearly from gamma to gamma_min over ``total_steps``."""
    def shape(self, frac: float) -> float:
        """``frac`` itself: the threshold moves linearly."""
        return frac


class Cosine(Schedule):
    """gamma_t falls from gamma to gamma_min along a half cosine over ``total_steps``."""
    def shape(self, frac: float) -> float:
        """``(1 - cos(pi frac)) / 2``: slow at both ends, fastest halfway."""
        return 0.5 * (1.0 - math.cos(math.pi * frac))


@dataclass(frozen=True)
class Exponential(Schedule):
    """``gamma_min + (gamma - gamma_min) * exp(-rate * t / total_steps)``; ``rate=5`` leaves
    0.7% of the gap at ``total_steps``. It is not clamped: the gap keeps shrinking after."""
    rate: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        number("rate", self.rate, low=0.0, low_open=True)

    def __call__(self, step: int) -> float:
        """The threshold ``gamma_t`` at ``step`` (the formula above)."""
        t = _check_step(step) / self.total_steps
        return self.gamma_min + (self.gamma - self.gamma_min) * math.exp(-self.rate * t)


def constant(gamma: float = 0.8) -> Schedule:
    """A ``Constant`` schedule."""
    return Constant(gamma)


def linear(gamma: float = 0.8, gamma_min: float = 0.5, total_steps: int = 1000) -> Schedule:
    """A ``Linear`` schedule."""
    return Linear(gamma, gamma_min, total_steps)


def cosine(gamma: float = 0.8, gamma_min: float = 0.5, total_steps: int = 1000) -> Schedule:
    """A ``Cosine`` schedule."""
    return Cosine(gamma, gamma_min, total_steps)


def exponential(gamma: float = 0.8, gamma_min: float = 0.5, total_steps: int = 1000,
                rate: float = 5.0) -> Schedule:
    """An ``Exponential`` schedule."""
    return Exponential(gamma, gamma_min, total_steps, rate)


SCHEDULES = {"constant": constant, "linear": linear, "cosine": cosine,
             "exponential": exponential}


def make_schedule(name: str, gamma: float = 0.8, gamma_min: float = 0.5,
                  total_steps: int = 1000, **kwargs: Any) -> Schedule:
    """Build a schedule by name; ``constant`` ignores ``gamma_min`` and ``total_steps``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not one of {list(SCHEDULES)}")
    if name == "constant":
        if kwargs:
            raise ValueError(f"constant schedule takes no options, got {sorted(kwargs)}")
        return constant(gamma)
    return SCHEDULES[name](gamma, gamma_min, total_steps, **kwargs)
