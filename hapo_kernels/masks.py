"""Masks of the policy term that need statistics of the whole batch or sequence first.

TRL's ``top_entropy_quantile`` (keep the policy term only on the batch's high-entropy
tokens) and ``off_policy_mask_threshold`` (drop the negative-advantage sequences that the
sampler drifted away from), and the batch-mean entropy bonus's weights. They read the
current policy's per-token log-probs and entropies, so the loss computes them between its
statistics pass and its gradient pass (``twopass.py``); none carries a gradient.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import distributed
from .options import LossOptions
from .packed import Segments

Tensor = torch.Tensor


def entropy_keep(entropy: Tensor, valid: Tensor, opts: LossOptions,
                 process_group: Any = None) -> Optional[Tensor]:
    """TRL's ``get_high_entropy_mask``: valid tokens whose entropy is at or above the
    ``1 - top_entropy_quantile`` quantile (linear interpolation) of the valid tokens'
    entropies, gathered over ``process_group`` when given; None when the option is off."""
    if opts.top_entropy_quantile >= 1.0:
        return None
    local = entropy.detach()[valid].float()
    gathered = local
    if process_group is not None:
        gathered, _ = distributed.gather_values(local, process_group)
    if gathered.numel() == 0:
        return torch.zeros_like(valid)
    threshold = torch.quantile(gathered, 1.0 - opts.top_entropy_quantile)
    return (entropy.detach().float() >= threshold) & valid


def off_policy_keep(logp: Tensor, valid: Tensor, advantages: Tensor,
                    old_logp: Optional[Tensor], sampling_logp: Optional[Tensor],
                    opts: LossOptions, segments: Optional[Segments] = None
                    ) -> Optional[Tensor]:
    """TRL's off-policy sequence mask: a token is kept if its advantage is >= 0 or its
    sequence's mean ``sampling_logp - logp`` (``sampling_logp`` defaults to ``old_logp``,
    then to ``logp``: no drift) is at most ``off_policy_mask_threshold``; None when off."""
    if opts.off_policy_mask_threshold is None:
        return None
    lp = logp.detach().to(torch.float64)
    sampler = sampling_logp if sampling_logp is not None else old_logp
    if sampler is None:
        drift = torch.zeros_like(lp)
    else:
        drift = torch.nan_to_num(sampler.to(torch.float64) - lp, nan=0.0)
    m = valid.to(torch.float64)
    if segments is not None:
        mean = segments.broadcast(segments.sum(drift * m) / segments.sum(m).clamp(min=1.0))
        mean = mean.reshape(lp.shape)
    else:
        mean = ((drift * m).sum(-1, keepdim=True)
                / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(lp)
    return (advantages >= 0) | (mean <= opts.off_policy_mask_threshold)


def policy_mask(logp: Tensor, entropy: Tensor, valid: Tensor, advantages: Tensor,
                old_logp: Optional[Tensor], sampling_logp: Optional[Tensor],
                opts: LossOptions, segments: Optional[Segments] = None,
                process_group: Any = None) -> tuple:
    """``(policy_mask, entropy_keep)``: the product of the masks that are on (float32, or
    None when neither is) and the entropy-quantile mask alone (or None)."""
    keep_h = entropy_keep(entropy, valid, opts, process_group)
    keep_o = off_policy_keep(logp, valid, advantages, old_logp, sampling_logp, opts, segments)
    masks = [k for k in (keep_h, keep_o) if k is not None]
    if not masks:
        return None, keep_h
    both = masks[0] if len(masks) == 1 else masks[0] & masks[1]
    return both.to(torch.float32), keep_h


def entropy_mean_weights(valid: Tensor, keep: Optional[Tensor]) -> Tensor:
    """The entropy bonus's per-token weights, ``m / max(sum m, 1)`` with ``m`` the valid
    tokens (and the entropy-quantile mask's, where it is on): TRL's batch mean."""
    m = valid if keep is None else valid & keep
    m = m.to(torch.float64)
    return (m / m.sum().clamp(min=1.0)).to(torch.float32)
