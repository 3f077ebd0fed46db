"""hapo-kernels: fused Triton kernels for GRPO-family RL and HAPO (see DESIGN.md section 8)."""
from .options import IGNORE_INDEX
from .outputs import LossOutput

__all__ = ["IGNORE_INDEX", "LossOutput"]
__version__ = "0.1.0"
