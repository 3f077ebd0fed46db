"""Group advantages with SSI substitution on CPU tensors (docs/design.md section 6).

Vectorised over groups in float32: substitute the worst member of each injected group
(lowest reward, first index on ties), then the mean and Bessel std per group (or one std
for the batch) over the counted members.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..options import AdvantageOptions


def group_advantages(rewards: torch.Tensor, group_size: int, inject: Optional[torch.Tensor],
                     opts: AdvantageOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 advantages ``[P*G]`` and int64 replaced indices ``[P]`` (validated inputs)."""
    G = group_size
    P = rewards.numel() // G
    r = rewards.to(torch.float32).reshape(P, G).clone()
    replaced = torch.full((P,), -1, dtype=torch.long, device=rewards.device)
    teacher = torch.zeros(P, G, dtype=torch.bool, device=rewards.device)
    if inject is not None and bool(inject.any()):
        k = torch.argmin(r, dim=1)                      # first index on ties
        rows = torch.nonzero(inject.bool()).squeeze(1)
        r[rows, k[rows]] = float(opts.teacher_reward)
        teacher[rows, k[rows]] = True
        replaced[rows] = k[rows]
    member = ~teacher if opts.stats == "on-policy" else torch.ones_like(teacher)
    w = member.to(torch.float32)
    n = w.sum(1, keepdim=True)
    mean = (w * r).sum(1, keepdim=True) / n.clamp(min=1.0)
    if opts.scale == "none":
        return (r - mean).reshape(-1), replaced
    if opts.scale == "group":
        var = (w * (r - mean) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1.0)
        std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
    else:  # "batch": one std over every counted member of the batch
        nb = w.sum()
        mb = (w * r).sum() / nb.clamp(min=1.0)
        var = (w * (r - mb) ** 2).sum() / (nb - 1).clamp(min=1.0)
        std = var.sqrt() if nb >= 2 else torch.zeros_like(var)
    denom = std + opts.eps
    # eps = 0 with a constant group would be 0/0: such a group has no signal, A = 0.
    adv = torch.where(denom > 0, (r - mean) / torch.where(denom > 0, denom, 1.0),
                      torch.zeros_like(r))
    return adv.reshape(-1), replaced
