"""``HAPOConfig``: every loss, advantage, gate and trainer option in one dataclass.

Defaults follow the paper (Wu et al., arXiv 2603.11321): G = 8 rollouts per prompt,
gate threshold gamma = 0.8 with the posterior-mean rule, the shaped teacher objective
``p / (p + 0.1)``, clip eps 0.2, no KL term. The loss and advantage options are the kernels'
own ``LossOptions`` / ``AdvantageOptions``, validated where they are built.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Tuple

from hapo_kernels import AdvantageOptions, LossOptions
from hapo_kernels.options import choice, number, positive_int, split_options

from .gate import ThompsonGate
from .schedules import SCHEDULES, Schedule, make_schedule

__all__ = ["HAPOConfig", "INJECT_MODES"]

# "gate": HAPO; "never": plain GRPO; "always": inject into every group (LUFFY-style).
INJECT_MODES = ("gate", "never", "always")


@dataclass
class HAPOConfig:
    """Every rollout, gate, loss and trainer option of HAPO.

    Rollouts: ``group_size`` G rollouts per prompt, up to ``max_new_tokens`` each, stopped
    after ``eos_token_id`` (kept and trained on), padded with ``pad_token_id``; a reward of
    at least ``success_threshold`` counts as a success (the gate's S). Sampling uses the
    loss's ``temperature``.

    SSI and the gate (docs/design.md sections 6-7): ``inject`` is ``"gate"`` (HAPO),
    ``"never"`` (GRPO) or ``"always"`` (every group with a demonstration). The gate:
    ``gate_mode`` ``"mean"`` (the paper's posterior-mean rule) or ``"thompson"``,
    ``gate_threshold`` gamma (the start value when annealed), ``gate_prior`` (a0, b0),
    ``gate_memory`` ``"step"`` or ``"persistent"`` with ``gate_discount``,
    ``gate_schedule`` for gamma (constant, linear, cosine, exponential) down to
    ``gate_gamma_min`` over ``gate_schedule_steps``, ``gate_seed`` for Thompson draws and
    ``gate_comparison`` (``"<"``, the paper's, or ``"<="``: inject also when the statistic
    equals gamma_t; see ``ThompsonGate``).

    The teacher's reward: with ``score_teacher`` (default) ``HAPOTrainer``'s SSI scores each
    demonstration with the trainer's reward function, as it scores the rollouts (a teacher
    that is verified but not optimal gets its true reward); ``score_teacher=False`` gives
    every demonstration the constant ``advantages.teacher_reward`` (as the TRL and verl
    integrations still do). Which member a demonstration
    replaces is ``advantages.replace``: ``"worst"`` (HAPO), ``"random"`` (drawn from a
    generator seeded by ``seed``) or ``"fixed"`` (member 0, LUFFY's layout).

    ``loss`` (a ``LossOptions``) and ``advantages`` (an ``AdvantageOptions``) are the
    kernels' own option objects, passed whole to the loss and to ``group_advantages``.

    Optimisation: ``ppo_epochs`` optimizer steps per batch of rollouts,
    ``micro_batch_size`` sequences per forward/backward (None: all), ``max_grad_norm``
    (None: no clipping), ``seed`` for sampling, ``progress`` for a tqdm bar.
    ``fused_linear``: the LM head fused into the loss (``[tokens, V]`` logits never built),
    ``fused_linear_chunk_size`` tokens per chunk (None: from memory).
    """
    # --- rollouts
    group_size: int = 8
    max_new_tokens: int = 64
    eos_token_id: Optional[int] = None
    pad_token_id: int = 0
    success_threshold: float = 0.5
    # --- SSI and the gate
    inject: str = "gate"
    gate_mode: str = "mean"
    gate_threshold: float = 0.8
    gate_prior: Tuple[float, float] = (1.0, 1.0)
    gate_memory: str = "step"
    gate_discount: float = 1.0
    gate_schedule: str = "constant"
    gate_gamma_min: float = 0.5
    gate_schedule_steps: int = 1000
    gate_seed: Optional[int] = None
    gate_comparison: str = "<"
    score_teacher: bool = True
    # --- the kernels' options
    loss: LossOptions = field(default_factory=LossOptions)
    advantages: AdvantageOptions = field(default_factory=AdvantageOptions)
    # --- optimisation
    ppo_epochs: int = 1
    micro_batch_size: Optional[int] = None
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    progress: bool = True
    fused_linear: bool = False
    fused_linear_chunk_size: Optional[int] = None

    def __post_init__(self) -> None:
        self.gate_prior = tuple(self.gate_prior)
        for name in ("group_size", "max_new_tokens", "ppo_epochs", "gate_schedule_steps"):
            positive_int(name, getattr(self, name))
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        positive_int("micro_batch_size", self.micro_batch_size, allow_none=True)
        positive_int("fused_linear_chunk_size", self.fused_linear_chunk_size, allow_none=True)
        for name in ("fused_linear", "score_teacher"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.loss, LossOptions):
            raise ValueError(f"loss must be a hapo_kernels.LossOptions, got "
                             f"{type(self.loss).__name__}")
        if not isinstance(self.advantages, AdvantageOptions):
            raise ValueError(f"advantages must be a hapo_kernels.AdvantageOptions, got "
                             f"{type(self.advantages).__name__}")
        choice("inject", self.inject, INJECT_MODES)
        choice("gate_schedule", self.gate_schedule, tuple(SCHEDULES))
        number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True, allow_none=True)
        self.make_gate()        # raises on a bad gate option

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> HAPOConfig:
        """A config from one flat set of keywords: ``HAPOConfig`` fields, ``LossOptions``
        fields (into ``loss``) and ``AdvantageOptions`` fields (into ``advantages``)."""
        own = {f.name for f in fields(cls)}
        loss, advantages = split_options({k: v for k, v in kwargs.items() if k not in own},
                                         kwargs.get("loss"), kwargs.get("advantages"))
        return cls(**{k: v for k, v in kwargs.items() if k in own},
                   **{"loss": loss, "advantages": advantages})

    @property
    def temperature(self) -> float:
        """The sampling temperature: the loss's, so that the ratios see the same policy."""
        return self.loss.temperature

    def make_schedule(self) -> Optional[Schedule]:
        """The gate threshold's schedule, or None for a constant threshold."""
        if self.gate_schedule == "constant":
            return None
        return make_schedule(self.gate_schedule, self.gate_threshold, self.gate_gamma_min,
                             self.gate_schedule_steps)

    def make_gate(self) -> ThompsonGate:
        """A new ``ThompsonGate`` with this config's gate options and schedule."""
        return ThompsonGate(threshold=self.gate_threshold, mode=self.gate_mode,
                            prior=self.gate_prior, success_threshold=self.success_threshold,
                            memory=self.gate_memory, discount=self.gate_discount,
                            schedule=self.make_schedule(), seed=self.gate_seed,
                            comparison=self.gate_comparison)

    def to_dict(self) -> dict:
        """Every field as plain Python values (the option objects as dicts), for JSON and
        checkpoints."""
        return asdict(self)
