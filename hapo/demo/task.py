"""Synthetic sparse-reward tasks: reverse a digit string.

A prompt is ``[BOS, d_1 .. d_L, SEP]`` over ``K`` digit symbols; the answer is the ``L``
digits reversed. An untrained policy spreads its mass over the whole vocabulary, so it
succeeds with probability about ``V^-L`` per rollout: every group of rollouts fails,
group-normalised advantages collapse to 0 and GRPO gets no signal.

* ``ReverseTask`` (the ``exact-teacher`` scenario): reward 1 only for the exact answer; the
  teacher demonstration is the answer, so the teacher earns the best reward there is.
* ``StyledReverseTask`` (``suboptimal-teacher``): the completion is the answer followed by
  one closing token. Closing with ``END`` earns 1.0, with ``STYLE`` (the teacher's habit)
  ``style_reward`` (0.6), anything else 0. The teacher writes the answer and ``STYLE``: it is
  verified (its answer is right, and 0.6 counts as a success for the gate) but earns less
  than the policy can, so imitating it for ever costs reward.

Each task carries its reward function (``reward``), its teacher (``demo``), the teacher's
reward (``teacher_reward``) and the completion length the trainer samples
(``completion_len``); ``hapo.demo.scenarios`` pairs a task with run settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

PAD, BOS, SEP = 0, 1, 2
FIRST_DIGIT = 3
END, STYLE = 3, 4                 # StyledReverseTask's closing tokens (digits follow them)


@dataclass(frozen=True)
class ReverseTask:
    """Reverse ``length`` digits; reward 1.0 for an exact match, else 0."""
    length: int = 4          # L digits
    digits: int = 10         # K digit symbols

    @property
    def first_digit(self) -> int:
        """The token id of digit 0."""
        return FIRST_DIGIT

    @property
    def vocab_size(self) -> int:
        """Digits plus the special tokens."""
        return self.first_digit + self.digits

    @property
    def prompt_len(self) -> int:
        """BOS, the digits and SEP."""
        return self.length + 2

    @property
    def completion_len(self) -> int:
        """Tokens the trainer samples per rollout."""
        return self.length

    @property
    def teacher_reward(self) -> float:
        """The reward the teacher's demonstration earns."""
        return 1.0

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random prompts ``[n, prompt_len]``."""
        d = torch.randint(0, self.digits, (n, self.length), generator=generator) \
            + self.first_digit
        bos = torch.full((n, 1), BOS)
        sep = torch.full((n, 1), SEP)
        return torch.cat([bos, d, sep], dim=1)

    def answer(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The correct completion of each prompt (its digits reversed)."""
        return prompt_ids[:, 1:1 + self.length].flip(1)

    def answered(self, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
                 completion_mask: torch.Tensor) -> torch.Tensor:
        """Bool per rollout: its first L tokens are the reversed digits (all unmasked)."""
        want = self.answer(prompt_ids)
        got = completion_ids[:, :self.length]
        if got.shape[1] < self.length:
            return torch.zeros(got.shape[0], dtype=torch.bool)
        return (got == want).all(1) & completion_mask[:, :self.length].bool().all(1)

    def reward(self, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
               completion_mask: torch.Tensor) -> torch.Tensor:
        """1.0 iff the first L completion tokens are exactly the reversed digits."""
        return self.answered(prompt_ids, completion_ids, completion_mask).float()

    def demo(self, key: Sequence[int]) -> torch.Tensor:
        """The teacher completion for a prompt key (the prompt's token tuple)."""
        return self.answer(torch.tensor([key]))[0]

    def random_success_rate(self) -> float:
        """The chance that a uniformly random completion is exactly right."""
        return float(self.vocab_size) ** -self.length


@dataclass(frozen=True)
class StyledReverseTask(ReverseTask):
    """Reverse the digits, then close: ``END`` earns 1.0, ``STYLE`` ``style_reward``.

    The teacher closes with ``STYLE``: a verified demonstration (right answer, a success
    for the gate at the default threshold 0.5) that earns ``style_reward`` < 1.
    """
    style_reward: float = 0.6

    @property
    def first_digit(self) -> int:
        """The token id of digit 0 (after the closing tokens)."""
        return STYLE + 1

    @property
    def completion_len(self) -> int:
        """The reversed digits and the closing token."""
        return self.length + 1

    @property
    def teacher_reward(self) -> float:
        """The teacher closes with ``STYLE``: it earns ``style_reward``."""
        return self.style_reward

    def reward(self, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
               completion_mask: torch.Tensor) -> torch.Tensor:
        """1.0 for the answer then END, ``style_reward`` for the answer then STYLE, else 0."""
        ok = self.answered(prompt_ids, completion_ids, completion_mask)
        if completion_ids.shape[1] <= self.length:
            return torch.zeros(ok.shape[0])
        close = completion_ids[:, self.length]
        closed = completion_mask[:, self.length].bool()
        value = torch.where(close == END, 1.0, torch.where(close == STYLE, self.style_reward,
                                                            0.0))
        return torch.where(ok & closed, value, torch.zeros_like(value))

    def demo(self, key: Sequence[int]) -> torch.Tensor:
        """The teacher's completion: the answer, then its STYLE token."""
        return torch.cat([super().demo(key), torch.tensor([STYLE])])
