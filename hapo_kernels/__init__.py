"""hapo-kernels: fused Triton kernels for GRPO-family RL and HAPO (docs/design.md section 8)."""
from .advantages import group_advantages
from .backends import force_backend, set_default_backend
from .inputs import value_checks
from .linear import (
                     FusedLinearHAPOLoss,
                     FusedLinearHAPOLossFunction,
                     FusedLinearSelectiveLogSoftmaxFunction,
                     fused_linear_hapo_loss,
                     fused_linear_selective_log_softmax,
)
from .logprobs import SelectiveLogSoftmax, SelectiveLogSoftmaxFunction, selective_log_softmax
from .loss import FusedHAPOLoss, FusedHAPOLossFunction, fused_hapo_loss
from .objective import OBJECTIVES, TEACHER_OBJECTIVES
from .options import IGNORE_INDEX, AdvantageOptions, LossOptions
from .outputs import LossOutput
from .version import __version__

__all__ = ["IGNORE_INDEX", "LossOptions", "AdvantageOptions", "LossOutput", "OBJECTIVES",
           "TEACHER_OBJECTIVES", "selective_log_softmax", "SelectiveLogSoftmax",
           "SelectiveLogSoftmaxFunction", "group_advantages", "fused_hapo_loss",
           "FusedHAPOLoss", "FusedHAPOLossFunction", "fused_linear_hapo_loss",
           "FusedLinearHAPOLoss", "FusedLinearHAPOLossFunction",
           "fused_linear_selective_log_softmax", "FusedLinearSelectiveLogSoftmaxFunction",
           "force_backend", "set_default_backend", "value_checks", "__version__"]
