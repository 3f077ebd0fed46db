"""Group advantages with SSI substitution on CPU tensors (docs/design.md section 6).

Vectorised over groups in float32: the groups (``offsets``, any sizes) are laid out as the
rows of a ``[P, G_max]`` block with a membership mask; then substitute one member of each
injected group (the given ``replace_index``, else the lowest reward, first index on ties),
then the mean and Bessel std per group (or one std for the batch) over the counted members;
with ``stats="on-policy"`` a zero std counts as 1 (LUFFY). A group of one rollout has mean 0
and std 1 (verl's GRPO rule: its advantage is its reward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..options import AdvantageOptions


def group_advantages(rewards: torch.Tensor, offsets: torch.Tensor, inject: Optional[torch.Tensor],
                     opts: AdvantageOptions, *, replace_index: Optional[torch.Tensor] = None,
                     teacher_rewards: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 advantages ``[N]`` and int64 replaced indices ``[P]`` (validated inputs;
    group p is ``rewards[offsets[p]:offsets[p+1]]``)."""
    device = rewards.device
    P = offsets.numel() - 1
    replaced = torch.full((P,), -1, dtype=torch.long, device=device)
    if P == 0:
        return torch.zeros(0, dtype=torch.float32, device=device), replaced
    lengths = offsets[1:] - offsets[:-1]
    cols = torch.arange(int(lengths.max()), device=device)
    in_group = cols[None, :] < lengths[:, None]
    index = (offsets[:-1, None] + cols[None, :]).clamp(max=rewards.numel() - 1)
    r = torch.where(in_group, rewards.to(torch.float32)[index], 0.0)
    teacher = torch.zeros_like(in_group)
    if inject is not None and bool(inject.any()):
        k = (torch.argmin(torch.where(in_group, r, float("inf")), dim=1)  # first on ties
             if replace_index is None else replace_index)
        rows = torch.nonzero(inject.bool()).squeeze(1)
        r[rows, k[rows]] = (float(opts.teacher_reward) if teacher_rewards is None
                            else teacher_rewards[rows].to(torch.float32))
        teacher[rows, k[rows]] = True
        replaced[rows] = k[rows]
    member = in_group & ~teacher if opts.stats == "on-policy" else in_group
    single = (lengths == 1)[:, None]
    w = member.to(torch.float32)
    n = w.sum(1, keepdim=True)
    mean = torch.where(single, 0.0, (w * r).sum(1, keepdim=True) / n.clamp(min=1.0))
    if opts.scale == "none":
        return (r - mean)[in_group], replaced
    if opts.scale == "group":
        var = (w * (r - mean) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1.0)
        std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
        std = torch.where(single, 1.0, std)
    else:  # "batch": one std over every counted member of the batch
        nb = w.sum()
        mb = (w * r).sum() / nb.clamp(min=1.0)
        var = (w * (r - mb) ** 2).sum() / (nb - 1).clamp(min=1.0)
        std = var.sqrt() if nb >= 2 else torch.zeros_like(var)
    if opts.stats == "on-policy":
        # LUFFY's rule: a zero on-policy std counts as 1. Else a group whose rollouts all
        # failed would give its teacher (1 - 0) / eps.
        std = torch.where(std == 0, torch.ones_like(std), std)
    denom = std + opts.eps
    # eps = 0 with a constant group would be 0/0: such a group has no signal, A = 0.
    adv = torch.where(denom > 0, (r - mean) / torch.where(denom > 0, denom, 1.0),
                      torch.zeros_like(r))
    return adv[in_group], replaced
