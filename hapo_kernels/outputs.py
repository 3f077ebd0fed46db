"""The result type of the loss, shared by the reference, the CPU path and the kernels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LossOutput:
    """What ``fused_hapo_loss`` returns.

    ``loss`` is a differentiable scalar. Everything else is detached: per-token tensors
    have the shape of ``target_ids`` (0 where masked); the rest are masked means over the
    valid tokens (0 when there is none).
    """
    loss: torch.Tensor
    per_token_logp: torch.Tensor
    per_token_entropy: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    kl: Optional[torch.Tensor]          # None when ref_logp was not given
    clip_low: torch.Tensor              # fraction of valid tokens clipped below (A < 0)
    clip_high: torch.Tensor             # fraction of valid tokens clipped above (A > 0)
    ratio: torch.Tensor                 # mean importance ratio
    teacher_fraction: torch.Tensor      # fraction of valid tokens that are teacher tokens
    advantages: Optional[torch.Tensor] = None   # the advantages used (set when computed)
    replaced: Optional[torch.Tensor] = None     # SSI replaced index per group, or None

    def metrics(self) -> dict:
        """Plain floats for logging."""
        out = {"logp": self.logp, "entropy": self.entropy, "clip_low": self.clip_low,
               "clip_high": self.clip_high, "ratio": self.ratio,
               "teacher_fraction": self.teacher_fraction}
        if self.kl is not None:
            out["kl"] = self.kl
        return {k: float(v) for k, v in out.items()}
