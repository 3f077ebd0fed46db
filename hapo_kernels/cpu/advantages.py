"""Group advantages on CPU tensors (DESIGN section 6).

The float64 reference is already vectorised over groups (no Python loop), so the CPU path
is that very code run in float32: one statement of the SSI substitution and the statistics.
"""
from __future__ import annotations

import torch

from .. import reference


def group_advantages(rewards, group_size, inject, teacher_reward, scale, stats, eps):
    """float32 advantages ``[P*G]`` and int64 replaced indices ``[P]`` (validated inputs)."""
    return reference.group_advantages(rewards, group_size, inject, teacher_reward, scale,
                                      stats, eps, dtype=torch.float32)
