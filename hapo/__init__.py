"""HAPO training layer: gate, SSI operator, loss module and trainer (docs/design.md section 8)."""
from hapo_kernels.version import __version__  # noqa: E402  (one version for both packages)

from . import schedules
from .config import HAPOConfig
from .gate import ThompsonGate
from .loss import HAPOLoss
from .ssi import RolloutBatch, inject_successes
from .trainer import HAPOTrainer

__all__ = ["ThompsonGate", "inject_successes", "RolloutBatch", "HAPOLoss", "HAPOConfig",
           "HAPOTrainer", "schedules", "__version__"]
