"""``HAPOLoss``: an ``nn.Module`` over ``hapo_kernels.fused_hapo_loss``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import hapo_kernels as hk
from hapo_kernels.options import parse_loss_options

from .config import HAPOConfig

__all__ = ["HAPOLoss"]


class HAPOLoss(nn.Module):
    """The HAPO/GRPO objective of DESIGN sections 4-5 as a module.

    Options come from a ``HAPOConfig`` (its loss fields) and/or keyword overrides with the
    names of ``fused_hapo_loss`` (``eps_low``, ``teacher_objective``, ...). The forward
    returns the ``LossOutput``; ``.loss`` is the scalar to back-propagate.
    """

    def __init__(self, config: Optional[HAPOConfig] = None, **overrides):
        super().__init__()
        options = (config or HAPOConfig()).loss_kwargs()
        options.update(overrides)
        parse_loss_options(**options)        # a bad option fails here, not mid-training
        self.options = options

    def forward(self, logits: torch.Tensor, target_ids: torch.Tensor,
                advantages: torch.Tensor, mask=None, old_logp=None, ref_logp=None,
                teacher_mask=None, normalizer=None, max_len=None):
        return hk.fused_hapo_loss(logits, target_ids, advantages, mask=mask,
                                  old_logp=old_logp, ref_logp=ref_logp,
                                  teacher_mask=teacher_mask, normalizer=normalizer,
                                  max_len=max_len, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
