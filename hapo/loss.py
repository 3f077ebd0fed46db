"""``HAPOLoss``: the HAPO objective as an ``nn.Module``, configured from a ``HAPOConfig``."""
from __future__ import annotations

from typing import Any, Optional

import torch

from hapo_kernels import FusedHAPOLoss, LossOutput

from .config import HAPOConfig

__all__ = ["HAPOLoss"]


class HAPOLoss(FusedHAPOLoss):
    """``hapo_kernels.FusedHAPOLoss`` with a ``HAPOConfig``'s loss options.

    ``HAPOLoss(config)`` takes ``config.loss`` (a ``LossOptions``); keyword overrides with
    the names of ``fused_hapo_loss`` (``eps_low``, ``teacher_objective``, ...) replace its
    fields. ``forward`` returns the ``LossOutput``; ``.loss`` is the scalar to
    back-propagate.
    """

    def __init__(self, config: Optional[HAPOConfig] = None, **overrides: Any) -> None:
        super().__init__((config or HAPOConfig()).loss, **overrides)

    def forward(self, logits: torch.Tensor, target_ids: torch.Tensor,
                advantages: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
                ref_logp: Optional[torch.Tensor] = None,
                teacher_mask: Optional[torch.Tensor] = None, **call_options: Any) -> LossOutput:
        """The HAPO loss of a batch: ``hapo_kernels.fused_hapo_loss`` with the config's options.

        ``logits`` ``[B, T, V]`` of the completion tokens ``target_ids`` ``[B, T]``;
        ``advantages`` ``[B]`` (e.g. from ``hk.group_advantages``) or ``rewards=`` with
        ``group_size=`` and ``inject=`` (the gate's decisions: the replaced members are then
        trained as teacher tokens); ``mask`` 0/1 over valid tokens; ``old_logp`` /
        ``ref_logp`` ``[B, T]``; ``teacher_mask`` ``[B]`` or ``[B, T]`` marks the tokens SSI put
        in (trained with the shaped teacher objective). Returns the ``LossOutput``:
        ``.loss`` to back-propagate, the metrics (``kl``, ``clip_low``, ``teacher_fraction``,
        ...) detached.
        """
        return super().forward(logits, target_ids, advantages, mask, old_logp, ref_logp,
                               teacher_mask, **call_options)
