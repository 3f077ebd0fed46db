"""hapo-kernels: fused Triton kernels for GRPO-family RL and HAPO (see DESIGN.md section 8)."""
from .options import IGNORE_INDEX
from .outputs import LossOutput
from .logprobs import SelectiveLogSoftmax, selective_log_softmax
from .advantages import group_advantages
from .loss import FusedHAPOLoss, fused_hapo_loss
from .linear import (FusedLinearHAPOLoss, FusedLinearSelectiveLogSoftmax,
                     fused_linear_hapo_loss, fused_linear_selective_log_softmax)

__all__ = ["IGNORE_INDEX", "LossOutput", "SelectiveLogSoftmax", "selective_log_softmax",
           "group_advantages", "FusedHAPOLoss", "fused_hapo_loss",
           "FusedLinearHAPOLoss", "FusedLinearSelectiveLogSoftmax", "fused_linear_hapo_loss",
           "fused_linear_selective_log_softmax"]
__version__ = "0.1.1"
