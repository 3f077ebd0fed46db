"""The HAPO gate: decide per group and step whether SSI injects a teacher demonstration.

docs/design.md section 7. A group of ``N`` rollouts with ``S`` successes has the posterior
``Beta(a0 + S, b0 + N - S)`` over its success rate. ``mode="mean"`` (the paper's rule)
injects iff the posterior mean is below ``gamma_t``; ``mode="thompson"`` draws ``theta``
from the posterior and injects iff ``theta < gamma_t``. ``comparison="<="`` injects also
at equality; it matters for the mean gate, whose posterior mean takes a few discrete values:
at N = 8 and gamma = 0.8, S = 7 gives exactly 0.8, so ``"<"`` does not inject there and
``"<="`` does (P(inject) at a success rate of 0.9: 0.1869 against 0.5695). As the
policy's success rate tends to 1 (or ``gamma_t`` is annealed below its limit) P(inject)
tends to 0, so the teacher fades and the gradient returns to the on-policy one.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

from hapo_kernels.inputs import group_offsets_of
from hapo_kernels.options import choice, number

__all__ = ["ThompsonGate", "regularized_incomplete_beta"]

MODES = ("mean", "thompson")
MEMORIES = ("step", "persistent")
COMPARISONS = ("<", "<=")


# --------------------------------------------------------------------------- Beta CDF
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the CDF of ``Beta(a, b)`` at ``x``, to about 1e-15 (no scipy)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be positive, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _binomial_pmf(n: int, mu: float) -> list:
    return [math.comb(n, s) * mu ** s * (1.0 - mu) ** (n - s) for s in range(n + 1)]


# --------------------------------------------------------------------------- the gate
class ThompsonGate:
    """Per-group injection decisions (docs/design.md section 7).

    Args:
        threshold: ``gamma``, used when ``schedule`` is None. In ``[0, 1]``; 1.0 with
            ``mode="mean"`` always injects (the posterior mean is below 1).
        mode: ``"mean"`` (the paper's rule) or ``"thompson"`` (a posterior sample).
        prior: ``(a0, b0)`` of the Beta prior, both > 0.
        success_threshold: a rollout counts as a success iff ``reward >= success_threshold``.
        memory: ``"step"`` (this group's rollouts only) or ``"persistent"`` (a posterior
            per prompt id carried across steps; needs ``prompt_ids`` in ``decide``).
        discount: ``lambda`` in ``(0, 1]``: persistent counts decay by it each time the
            prompt is seen again (1.0 keeps every count).
        schedule: a callable ``step -> gamma_t`` (see ``hapo.schedules``); overrides
            ``threshold``.
        seed: seeds the generator of ``mode="thompson"`` (reproducible given the seed).
        comparison: ``"<"`` (default: inject iff the statistic is below ``gamma_t``) or
            ``"<="`` (also at equality; see the module docstring for when it matters).
    """

    def __init__(self, threshold: float = 0.8, mode: str = "mean",
                 prior: Sequence[float] = (1.0, 1.0), success_threshold: float = 0.5,
                 memory: str = "step", discount: float = 1.0,
                 schedule: Optional[Callable[[int], float]] = None,
                 seed: Optional[int] = None, comparison: str = "<") -> None:
        self.threshold = number("threshold", threshold, low=0.0, high=1.0)
        self.mode = choice("mode", mode, MODES)
        if not isinstance(prior, (tuple, list)) or len(prior) != 2:
            raise ValueError(f"prior must be a pair (a0, b0), got {prior!r}")
        self.prior = (number("prior[0]", prior[0], low=0.0, low_open=True),
                      number("prior[1]", prior[1], low=0.0, low_open=True))
        self.success_threshold = number("success_threshold", success_threshold)
        self.memory = choice("memory", memory, MEMORIES)
        self.comparison = choice("comparison", comparison, COMPARISONS)
        self.discount = number("discount", discount, low=0.0, high=1.0, low_open=True)
        if schedule is not None and not callable(schedule):
            raise ValueError(f"schedule must be a callable step -> gamma_t, got {schedule!r}")
        self.schedule = schedule
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self.step = 0                       # decide() calls so far: the default schedule step
        self.counts: dict = {}              # persistent memory: prompt id -> (successes, fails)

    # ------------------------------------------------------------------ pieces
    def gamma(self, step: Optional[int] = None) -> float:
        """``gamma_t`` at ``step`` (the gate's own call count when None)."""
        step = self.step if step is None else step
        if self.schedule is None:
            return self.threshold
        # A threshold outside [0, 1] would make the gate always (or never) inject.
        return number("schedule(step)", self.schedule(step), low=0.0, high=1.0)

    def successes(self, rewards: torch.Tensor, group_size: Optional[int] = None, *,
                  group_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``S`` per group, float64 ``[P]`` (groups of ``group_size`` or ``group_offsets``)."""
        offsets = group_offsets_of(rewards, group_size, group_offsets).cpu()
        hit = (rewards.detach().cpu() >= self.success_threshold).double()
        return torch.cat([hit.new_zeros(1), hit.cumsum(0)])[offsets].diff()

    def _keys(self, prompt_ids, P) -> list:
        if prompt_ids is None:
            raise ValueError('memory="persistent" needs prompt_ids (one hashable id per group)')
        keys = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        if len(keys) != P:
            raise ValueError(f"prompt_ids must hold one id per group ({P}), got {len(keys)}")
        return [tuple(k) if isinstance(k, list) else k for k in keys]

    def _sample_beta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # torch.distributions.Beta takes no generator: Beta(a, b) = X / (X + Y) with
        # X ~ Gamma(a), Y ~ Gamma(b), both drawn from the gate's own seeded generator.
        x = torch._standard_gamma(a, generator=self.generator)
        y = torch._standard_gamma(b, generator=self.generator)
        return x / (x + y)

    def _below(self, statistic: Any, gamma_t: float) -> Any:
        """``statistic < gamma_t`` (or ``<=`` with ``comparison="<="``)."""
        return statistic <= gamma_t if self.comparison == "<=" else statistic < gamma_t

    # ------------------------------------------------------------------ decide
    def decide(self, rewards: torch.Tensor, group_size: Optional[int] = None, *,
               group_offsets: Optional[torch.Tensor] = None,
               prompt_ids: Optional[Union[torch.Tensor, Sequence[Any]]] = None,
               has_demo: Optional[Union[torch.Tensor, Sequence[bool]]] = None,
               step: Optional[int] = None) -> torch.Tensor:
        """Bool ``[P]`` on the rewards' device: inject a demonstration into group p?

        ``rewards`` is ``[P * group_size]`` with groups contiguous, or groups of any sizes
        ``rewards[o[p]:o[p+1]]`` given ``group_offsets`` ``[P + 1]``. ``has_demo`` (bool
        ``[P]``) vetoes groups with no demonstration. ``step`` picks ``gamma_t``; by
        default the gate counts its own calls.
        """
        offsets = group_offsets_of(rewards, group_size, group_offsets).cpu()
        P = offsets.numel() - 1
        if has_demo is not None:            # checked before any state changes
            has_demo = torch.as_tensor(has_demo).bool().cpu()
            if tuple(has_demo.shape) != (P,):
                raise ValueError(f"has_demo must have shape ({P},), got "
                                 f"{tuple(has_demo.shape)}")
        keys = self._keys(prompt_ids, P) if self.memory == "persistent" else None
        N = offsets.diff().double()
        S = self.successes(rewards, group_offsets=offsets.to(rewards.device))
        gamma_t = self.gamma(step)
        a0, b0 = self.prior
        succ, fail = S, N - S
        if self.memory == "persistent":
            succ, fail = succ.clone(), fail.clone()
            for p, key in enumerate(keys):
                old = self.counts.get(key, (0.0, 0.0))
                s = self.discount * old[0] + float(S[p])
                f = self.discount * old[1] + float(N[p] - S[p])
                self.counts[key] = (s, f)
                succ[p], fail[p] = s, f
        a, b = a0 + succ, b0 + fail
        statistic = a / (a + b) if self.mode == "mean" else self._sample_beta(a, b)
        inject = self._below(statistic, gamma_t)
        if has_demo is not None:
            inject = inject & has_demo
        if step is None:
            self.step += 1
        return inject.to(rewards.device)

    # ------------------------------------------------------------------ analysis
    def injection_probability(self, success_rate: Union[float, Sequence[float], torch.Tensor],
                              group_size: int, step: Optional[int] = None
                              ) -> Union[float, torch.Tensor]:
        """Exact P(inject) for a group whose rollouts succeed i.i.d. with ``success_rate``.

        ``mean``: ``sum_S Binom(S; N, mu) [ (a0+S)/(a0+b0+N) < gamma_t ]`` (``<=`` with
        ``comparison="<="``).
        ``thompson``: ``sum_S Binom(S; N, mu) I_{gamma_t}(a0+S, b0+N-S)`` (Beta CDF).
        It is the one-step probability with a fresh posterior (``memory="step"``), a demo
        present; ``step`` picks ``gamma_t`` (the gate's current step when None).
        ``success_rate`` may be a float (returns a float) or a sequence/tensor.
        """
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        gamma_t = self.gamma(step)
        a0, b0 = self.prior
        N = group_size
        if self.mode == "mean":
            gate = [1.0 if self._below((a0 + s) / (a0 + b0 + N), gamma_t) else 0.0
                    for s in range(N + 1)]
        else:
            gate = [regularized_incomplete_beta(gamma_t, a0 + s, b0 + N - s)
                    for s in range(N + 1)]

        def one(mu):
            mu = number("success_rate", mu, low=0.0, high=1.0)
            return sum(w * g for w, g in zip(_binomial_pmf(N, mu), gate))

        if isinstance(success_rate, (list, tuple)) or (
                isinstance(success_rate, torch.Tensor) and success_rate.dim() > 0):
            rates = torch.as_tensor(success_rate, dtype=torch.float64)
            return torch.tensor([one(float(m)) for m in rates.reshape(-1)],
                                dtype=torch.float64).reshape(rates.shape)
        return one(success_rate)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume the gate: step, counts, random state, config."""
        return {"step": self.step, "counts": dict(self.counts),
                "generator": self.generator.get_state(),
                "config": {"threshold": self.threshold, "mode": self.mode,
                           "prior": self.prior, "success_threshold": self.success_threshold,
                           "memory": self.memory, "discount": self.discount,
                           "comparison": self.comparison, "seed": self.seed}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        mine = self.state_dict()["config"]
        theirs = state.get("config", mine)
        differ = {k for k in mine if k != "seed"
                  and _as_tuple(mine[k]) != _as_tuple(theirs.get(k, mine[k]))}
        if differ:
            raise ValueError(f"gate state was saved with different options: {sorted(differ)}")
        self.step = int(state["step"])
        self.counts = dict(state["counts"])
        self.generator.set_state(state["generator"])

    def __repr__(self):
        sched = f", schedule={self.schedule!r}" if self.schedule is not None else ""
        return (f"ThompsonGate(threshold={self.threshold}, mode={self.mode!r}, "
                f"prior={self.prior}, success_threshold={self.success_threshold}, "
                f"memory={self.memory!r}, discount={self.discount}, "
                f"comparison={self.comparison!r}{sched})")


def _as_tuple(v):
    """Options as a tuple, so that scalars and the prior pair compare alike."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
