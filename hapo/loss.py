"""``HAPOLoss``: the HAPO objective as an ``nn.Module``, configured from a ``HAPOConfig``."""
from __future__ import annotations

from typing import Any, Optional

from hapo_kernels import FusedHAPOLoss

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
