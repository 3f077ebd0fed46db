"""A synthetic sparse-reward task: reverse a digit string, reward 1 only for an exact match.

A prompt is ``[BOS, d_1 .. d_L, SEP]`` over ``K`` digit symbols; the answer is the
``L`` digits reversed. An untrained policy spreads its mass over the whole vocabulary, so
it succeeds with probability about ``V^-L`` per rollout: every group of rollouts fails,
group-normalised advantages collapse to 0 and GRPO gets no signal. The teacher
demonstration for a prompt is its answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

PAD, BOS, SEP = 0, 1, 2
FIRST_DIGIT = 3


@dataclass(frozen=True)
class ReverseTask:
    length: int = 4          # L digits
    digits: int = 10         # K digit symbols

    @property
    def vocab_size(self) -> int:
        return FIRST_DIGIT + self.digits

    @property
    def prompt_len(self) -> int:
        return self.length + 2

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        d = torch.randint(0, self.digits, (n, self.length), generator=generator) + FIRST_DIGIT
        bos = torch.full((n, 1), BOS)
        sep = torch.full((n, 1), SEP)
        return torch.cat([bos, d, sep], dim=1)

    def answer(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return prompt_ids[:, 1:1 + self.length].flip(1)

    def reward(self, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
               completion_mask: torch.Tensor) -> torch.Tensor:
        """1.0 iff the first L completion tokens are exactly the reversed digits."""
        want = self.answer(prompt_ids)
        got = completion_ids[:, :self.length]
        ok = (got == want).all(1) & completion_mask[:, :self.length].bool().all(1)
        return ok.float()

    def demo(self, key: Sequence[int]) -> torch.Tensor:
        """The teacher completion for a prompt key (the prompt's token tuple)."""
        return self.answer(torch.tensor([key]))[0]

    def random_success_rate(self) -> float:
        return float(self.vocab_size) ** -self.length
