"""``group_advantages``: group-normalised advantages with SSI substitution (design section 6).

Validates, then runs on the backend that serves the rewards (the Triton kernel on CUDA or
under ``TRITON_INTERPRET=1``, the float32 CPU path otherwise). With a ``process_group`` the
rewards of every rank are gathered first (``distributed.gather_rewards``), so a group may
span ranks, and each rank keeps its own slice of the result.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import distributed
from .backends import backend_for
from .inputs import check_replacement, group_offsets_of
from .options import AdvantageOptions, split_options
from .packed import check_cu_seqlens


def group_advantages(rewards: torch.Tensor, group_size: Optional[int] = None,
                     inject: Optional[torch.Tensor] = None, *,
                     group_offsets: Optional[torch.Tensor] = None,
                     replace_index: Optional[torch.Tensor] = None,
                     teacher_rewards: Optional[torch.Tensor] = None,
                     options: Optional[AdvantageOptions] = None, process_group: Any = None,
                     cu_seqlens: Optional[torch.Tensor] = None,
                     **option_values: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Advantages ``[P*G]`` (float32) and the replaced member per group (int64, -1: none).

    ``rewards`` is ``[P*G]`` with the G rollouts of prompt p at ``p*G .. p*G+G-1``; or,
    with ``group_offsets`` ``[P + 1]`` instead of ``group_size`` (verl's uneven groups),
    group p is ``rewards[o[p]:o[p+1]]``, of any size >= 1 (a group of one rollout has mean 0
    and std 1, as in verl's GRPO: its advantage is its reward over ``1 + eps``);
    ``inject`` ``[P]`` bool marks the groups one of whose members is replaced by a teacher
    demonstration with reward ``teacher_reward``: the worst (lowest reward, first index on
    ties) with ``replace="worst"``, else ``replace_index[p]`` (``[P]`` int, the member the
    caller chose, counted from the group's first: drawn for ``"random"``, set for
    ``"fixed"``, member 0 when not given). ``teacher_rewards`` ``[P]`` float: the
    demonstration's reward per group (the reward function's score of it), in place of the
    constant ``teacher_reward``. Options
    (``AdvantageOptions``, as keywords or ``options=``): ``scale`` ``"group"``
    ``(r - mean) / (std + eps)``, ``"batch"`` (one std for the batch) or ``"none"``
    ``(r - mean)``; ``stats`` ``"all"`` members or ``"on-policy"`` (teacher excluded from
    mean and std, and a zero std counts as 1, LUFFY's rule); ``eps``; ``teacher_reward``.
    A non-finite reward is a ``ValueError`` naming its group, raised before any kernel or
    collective. Never NaN.

    ``process_group`` (data-parallel): ``rewards`` is this rank's contiguous slice of the
    global batch in rank order (groups may span ranks); the rewards are all-gathered,
    ``inject`` is ``[P]`` for the whole batch (the group's first rank's is used), and the
    result is this rank's slice of the advantages with every group's replaced index
    (``group_offsets`` then index the gathered batch).
    ``cu_seqlens``: accepted for symmetry with the loss on packed input; rewards are one
    per sequence, so it only checks that ``rewards`` has ``len(cu_seqlens) - 1`` entries.
    """
    if options is not None and option_values:
        options = options.updated(**option_values)
    elif options is None:
        _, options = split_options(option_values)
    error = None
    try:
        if process_group is None:                       # before any kernel
            offsets = group_offsets_of(rewards, group_size, group_offsets, inject)
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
                raise ValueError("cu_seqlens must be a 1-D tensor [S + 1]")
            check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if cu_seqlens.numel() else 0,
                             cu_seqlens.device)
            if isinstance(rewards, torch.Tensor) and \
                    rewards.numel() != cu_seqlens.numel() - 1:
                raise ValueError(f"rewards must hold one reward per sequence of cu_seqlens "
                                 f"({cu_seqlens.numel() - 1}), got {rewards.numel()}")
    except ValueError as e:
        if process_group is None:
            raise
        error = e                               # raised by every rank together, below
    start = 0
    n_local = None
    if process_group is not None and (replace_index is not None or teacher_rewards is not None):
        # Raised by every rank together (the handshake), like any other error here.
        error = error or ValueError("replace_index= and teacher_rewards= are not supported "
                                    "with process_group= yet: compute the advantages on one "
                                    "process")
    if process_group is not None:
        local = rewards
        rewards, start = _gather(rewards, group_size, group_offsets, inject, options,
                                 process_group, error)
        n_local = local.numel()
        if inject is not None:
            inject = distributed.broadcast_decisions(inject, process_group)
        # The whole batch, the same on every rank: any error is raised on every rank.
        offsets = group_offsets_of(rewards, group_size, group_offsets, inject)
    if inject is not None and inject.dtype != torch.bool:
        raise ValueError(f"inject must be a bool tensor, got {inject.dtype}")
    replace_index, teacher_rewards = check_replacement(replace_index, teacher_rewards, inject,
                                                       offsets, options)
    adv, replaced = backend_for(rewards).group_advantages(
        rewards, offsets, inject, options, replace_index=replace_index,
        teacher_rewards=teacher_rewards)
    if n_local is not None:
        adv = adv[start:start + n_local]
    return adv, replaced


def _gather(rewards: Any, group_size: Any, group_offsets: Any, inject: Any,
            options: AdvantageOptions, group: Any,
            error: Optional[BaseException]) -> Tuple[torch.Tensor, int]:
    """The rewards of every rank after a ``distributed.handshake``: this rank's checks, the
    options, the group size, the dtype and ``inject``'s shape agree, or every rank raises.
    A non-finite reward on any rank is named by its global index and group, on every rank,
    before the rewards are gathered."""
    bad = -1                                    # this rank's first non-finite reward
    try:
        if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
            raise ValueError("rewards must be a 1-D tensor (this rank's rollouts), got "
                             f"{getattr(rewards, 'shape', type(rewards).__name__)}")
        if rewards.dtype.is_complex or rewards.dtype == torch.bool:
            raise ValueError(f"rewards must be real numbers, got {rewards.dtype}")
        if (group_size is None) == (group_offsets is None):
            raise ValueError("pass exactly one of group_size (equal groups) and group_offsets "
                             "(group p is rewards[o[p]:o[p+1]] of the gathered batch)")
        if group_offsets is None and (isinstance(group_size, bool)
                                      or not isinstance(group_size, int) or group_size < 2):
            raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
        if group_offsets is not None:
            group_offsets = torch.as_tensor(group_offsets).to("cpu", torch.int64)
        if inject is not None and (not isinstance(inject, torch.Tensor)
                                   or inject.dtype != torch.bool or inject.dim() != 1):
            raise ValueError(f"inject must be a 1-D bool tensor, got "
                             f"{getattr(inject, 'dtype', type(inject).__name__)}")
        if rewards.dtype.is_floating_point and not bool(torch.isfinite(rewards).all()):
            bad = int(torch.nonzero(~torch.isfinite(rewards))[0])
    except ValueError as e:
        error = error or e
    fields = {"group_size": group_size if error is None else None,
              "group_offsets": (distributed.checksum(group_offsets)
                                if error is None and group_offsets is not None else 0),
              "advantage options": options.as_dict(),
              "rewards dtype": None if error else str(rewards.dtype),
              "inject shape": None if error or inject is None else tuple(inject.shape)}
    rows = distributed.handshake(group, "group_advantages", fields, error=error,
                                 counts=[0 if error else rewards.numel(), bad])
    sizes = [row[0] for row in rows]
    for k, (_, first_bad) in enumerate(rows):
        if first_bad >= 0:
            i = sum(sizes[:k]) + first_bad
            if group_offsets is None:
                p, lo, hi = i // group_size, i - i % group_size, i - i % group_size + group_size
            else:
                o = group_offsets.tolist()
                p = next((q for q in range(len(o) - 1) if o[q] <= i < o[q + 1]), -1)
                lo, hi = (o[p], o[p + 1]) if p >= 0 else (i, i + 1)
            raise ValueError(f"rewards must be finite: the reward of rollout {i} (rank {k}'s "
                             f"rewards[{first_bad}]) is not, in group {p} (rollouts {lo} .. "
                             f"{hi - 1})")
    return distributed.gather_rewards(rewards, group, sizes)
