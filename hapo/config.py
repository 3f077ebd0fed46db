"""``HAPOConfig``: every loss, advantage, gate and trainer option in one dataclass.

Defaults follow the paper (Wu et al., arXiv 2603.11321): G = 8 rollouts per prompt,
gate threshold gamma = 0.8 with the posterior-mean rule, the shaped teacher objective
``p / (p + 0.1)``, clip eps 0.2, no KL term. Validation reuses ``hapo_kernels.options``
so a name or range is checked in one place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from hapo_kernels import options as O

from .gate import ThompsonGate
from .schedules import SCHEDULES, make_schedule

__all__ = ["HAPOConfig", "INJECT_MODES"]

# "gate": HAPO; "never": plain GRPO; "always": inject into every group (LUFFY-style).
INJECT_MODES = ("gate", "never", "always")


@dataclass
class HAPOConfig:
    # --- rollouts
    group_size: int = 8                 # G rollouts per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0            # sampling and loss temperature
    eos_token_id: Optional[int] = None  # stop a rollout after this token (kept, masked in)
    pad_token_id: int = 0
    success_threshold: float = 0.5      # reward >= this counts as a success
    # --- SSI and the gate (DESIGN sections 6-7)
    inject: str = "gate"
    gate_mode: str = "mean"
    gate_threshold: float = 0.8         # gamma (the start value when annealed)
    gate_prior: Tuple[float, float] = (1.0, 1.0)
    gate_memory: str = "step"
    gate_discount: float = 1.0
    gate_schedule: str = "constant"     # constant | linear | cosine | exponential
    gate_gamma_min: float = 0.5
    gate_schedule_steps: int = 1000
    gate_seed: Optional[int] = None
    teacher_reward: float = O.TEACHER_REWARD
    # --- advantages
    scale: str = "group"
    stats: str = "all"
    adv_eps: float = O.ADVANTAGE_EPS
    # --- loss (DESIGN sections 4-5): the defaults are hapo_kernels' own (one source)
    eps_low: float = O.LossOptions.eps_low
    eps_high: float = O.LossOptions.eps_high
    dual_clip: Optional[float] = O.LossOptions.dual_clip
    beta: float = O.LossOptions.beta
    entropy_coef: float = O.LossOptions.entropy_coef
    importance_sampling: str = O.LossOptions.importance_sampling
    teacher_objective: str = O.LossOptions.teacher_objective
    teacher_gamma: float = O.LossOptions.teacher_gamma
    sft_weight: float = O.LossOptions.sft_weight
    aggregation: str = O.LossOptions.aggregation
    # --- optimisation
    ppo_epochs: int = 1                 # optimizer steps per batch of rollouts
    micro_batch_size: Optional[int] = None   # sequences per forward/backward (None: all)
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0                       # sampling generator of the trainer
    progress: bool = True               # tqdm bar in HAPOTrainer.train
    # --- memory: the LM head fused into the loss (hapo_kernels.fused_linear_hapo_loss)
    fused_linear: bool = False          # never materialise [tokens, V] logits in the loss
    fused_linear_chunk_size: Optional[int] = None   # tokens per chunk (None: from memory)

    def __post_init__(self):
        self.gate_prior = tuple(self.gate_prior)
        for name in ("group_size", "max_new_tokens", "ppo_epochs", "gate_schedule_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if self.micro_batch_size is not None and (not isinstance(self.micro_batch_size, int)
                                                  or self.micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be a positive int or None, got "
                             f"{self.micro_batch_size!r}")
        if not isinstance(self.fused_linear, bool):
            raise ValueError(f"fused_linear must be a bool, got {self.fused_linear!r}")
        c = self.fused_linear_chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"fused_linear_chunk_size must be a positive int or None, got "
                             f"{c!r}")
        O._choice("inject", self.inject, INJECT_MODES)
        O._choice("gate_schedule", self.gate_schedule, tuple(SCHEDULES))
        O.check_scale(self.scale)
        O.check_stats(self.stats)
        O._number("adv_eps", self.adv_eps, low=0.0)
        O._number("teacher_reward", self.teacher_reward)
        O._number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True,
                  allow_none=True)
        self.loss_options()     # raises on a bad loss option
        self.make_gate()        # raises on a bad gate option

    def loss_kwargs(self) -> dict:
        """Keyword arguments of ``hk.fused_hapo_loss`` / ``HAPOLoss``."""
        return dict(temperature=self.temperature, eps_low=self.eps_low,
                    eps_high=self.eps_high, dual_clip=self.dual_clip, beta=self.beta,
                    entropy_coef=self.entropy_coef,
                    importance_sampling=self.importance_sampling,
                    teacher_objective=self.teacher_objective,
                    teacher_gamma=self.teacher_gamma, sft_weight=self.sft_weight,
                    aggregation=self.aggregation)

    def loss_options(self) -> O.LossOptions:
        return O.parse_loss_options(**self.loss_kwargs())

    def advantage_kwargs(self) -> dict:
        return dict(teacher_reward=self.teacher_reward, scale=self.scale, stats=self.stats,
                    eps=self.adv_eps)

    def make_schedule(self):
        if self.gate_schedule == "constant":
            return None
        return make_schedule(self.gate_schedule, self.gate_threshold, self.gate_gamma_min,
                             self.gate_schedule_steps)

    def make_gate(self) -> ThompsonGate:
        return ThompsonGate(threshold=self.gate_threshold, mode=self.gate_mode,
                            prior=self.gate_prior, success_threshold=self.success_threshold,
                            memory=self.gate_memory, discount=self.gate_discount,
                            schedule=self.make_schedule(), seed=self.gate_seed)

    def to_dict(self) -> dict:
        return asdict(self)
