"""``group_advantages``: group-normalised advantages with SSI substitution (DESIGN section 6).

Validates, then dispatches: the Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``),
the float32 CPU path otherwise. Both follow ``reference.group_advantages``.
"""
from __future__ import annotations

import torch

from . import options as O
from . import reference
from .dispatch import backend_for


def group_advantages(rewards, group_size, inject=None, teacher_reward=O.TEACHER_REWARD,
                     scale="group", stats="all", eps=O.ADVANTAGE_EPS, *, process_group=None,
                     cu_seqlens=None):
    """Advantages ``[P*G]`` (float32) and the replaced member index per group (int64, -1: none).

    ``rewards`` is ``[P*G]`` with the G rollouts of prompt p at ``p*G .. p*G+G-1``;
    ``inject`` ``[P]`` bool marks the groups whose worst member (lowest reward, first index on
    ties) is replaced by a teacher demonstration with reward ``teacher_reward``. ``scale``:
    ``"group"`` ``(r - mean) / (std + eps)``, ``"batch"`` (one std for the batch) or
    ``"none"`` ``(r - mean)``; ``stats``: ``"all"`` members or ``"on-policy"`` (teacher
    excluded from mean and std). Never NaN.

    ``process_group`` (data-parallel): ``rewards`` is this rank's contiguous slice of the
    global batch in rank order (groups may span ranks); the rewards are all-gathered,
    ``inject`` is ``[P]`` for the whole batch (the group's first rank's is used), and the
    result is this rank's slice of the advantages with every group's replaced index.
    ``cu_seqlens``: accepted for symmetry with the loss on packed input; rewards are one
    per sequence, so it only checks that ``rewards`` has ``len(cu_seqlens) - 1`` entries.
    """
    if cu_seqlens is not None:
        from .packed import check_cu_seqlens
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D tensor [S + 1]")
        check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if cu_seqlens.numel() else 0,
                         cu_seqlens.device)
        if isinstance(rewards, torch.Tensor) and rewards.numel() != cu_seqlens.numel() - 1:
            raise ValueError(f"rewards must hold one reward per sequence of cu_seqlens "
                             f"({cu_seqlens.numel() - 1}), got {rewards.numel()}")
    if process_group is not None:
        from .distributed import group_advantages as across_ranks
        return across_ranks(rewards, group_size, inject, process_group=process_group,
                            teacher_reward=teacher_reward, scale=scale, stats=stats, eps=eps)
    reference.check_groups(rewards, group_size, inject)
    scale, stats = O.check_scale(scale), O.check_stats(stats)
    eps = O._number("eps", eps, low=0.0)
    teacher_reward = O._number("teacher_reward", teacher_reward)
    if rewards.dtype.is_complex:
        raise ValueError(f"rewards must be real, got {rewards.dtype}")
    if inject is not None and inject.dtype != torch.bool:
        raise ValueError(f"inject must be a bool tensor, got {inject.dtype}")
    if backend_for(rewards) == "triton":
        from .triton.advantages import group_advantages as run
    else:
        from .cpu.advantages import group_advantages as run
    return run(rewards, group_size, inject, teacher_reward, scale, stats, eps)
