"""The demo's scenarios: a task (its reward and teacher), an evaluation and run settings.

``python -m hapo.demo --scenario NAME``. A scenario is pluggable data: any object with the
task interface of ``hapo.demo.task`` (``sample_prompts``, ``reward``, ``demo``,
``teacher_reward``, ``completion_len``, ``vocab_size``, ``prompt_len``) and an evaluation
``(policy, task, prompts, samples, generator) -> {"reward", "success", "greedy_reward"}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence

from .task import ReverseTask, StyledReverseTask


@dataclass(frozen=True)
class Settings:
    """One run's sizes: steps, seeds, prompts per step, group size, model and evaluation."""
    steps: int = 100
    seeds: Sequence[int] = (0, 1, 2, 3)
    prompts_per_step: int = 16
    group_size: int = 8
    d_model: int = 64
    lr: float = 1e-2
    eval_prompts: int = 128
    eval_samples: int = 8
    methods: Sequence[str] = ()          # empty: every method of experiment.METHODS


@dataclass(frozen=True)
class Scenario:
    """A named task with its default (full) and ``--quick`` settings."""
    name: str
    description: str
    task: Any
    full: Settings
    quick: Settings
    evaluate: Callable[..., Dict[str, float]] = field(default=None)   # None: sampled_eval


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    Scenario("exact-teacher",
             "reverse 4 digits; reward 1 only for the exact answer; the teacher gives the "
             "answer (reward 1.0, the best there is)",
             ReverseTask(length=4, digits=10),
             full=Settings(steps=100, seeds=(0, 1, 2, 3)),
             quick=Settings(steps=40, seeds=(0, 1))),
    Scenario("suboptimal-teacher",
             "reverse 4 digits, then close: END earns 1.0, STYLE 0.6, anything else 0; the "
             "teacher gives the answer and STYLE (verified, reward 0.6)",
             StyledReverseTask(length=4, digits=10, style_reward=0.6),
             full=Settings(steps=200, seeds=tuple(range(16))),
             quick=Settings(steps=100, seeds=(0, 1))),
)}
