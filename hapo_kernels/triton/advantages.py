"""Group advantages with SSI substitution: a Triton kernel (docs/design.md section 6).

One program per group; group p is ``rewards[offsets[p]:offsets[p+1]]`` (any sizes) and its
rewards sit in one block (the largest group padded to a power of two). The program
substitutes one member of an injected group (the given index, else the worst, first index
on ties) by the teacher's reward (per group, else ``teacher_reward``), computes the group
mean and Bessel std over the counted members (``stats``; "on-policy" counts a zero std as 1,
LUFFY's rule; a group of one rollout has mean 0 and std 1, verl's GRPO rule), and writes the
advantages and the replaced index. ``scale="batch"`` needs one std over the whole batch: a
first launch writes the substituted rewards, torch reduces them, and a second launch divides
by that std.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..options import SCALE_CODE, STATS_CODE, AdvantageOptions


@triton.heuristics({"HAS_INJECT": lambda args: args["inject_ptr"] is not None,
                    "HAS_INDEX": lambda args: args["index_ptr"] is not None,
                    "HAS_TEACHER_R": lambda args: args["teacher_r_ptr"] is not None})
@triton.jit
def group_advantages_kernel(r_ptr, offsets_ptr, inject_ptr, index_ptr, teacher_r_ptr, adv_ptr,
                             r_sub_ptr, member_ptr, replaced_ptr, batch_std_ptr, teacher_reward,
                             eps, HAS_INJECT: tl.constexpr, HAS_INDEX: tl.constexpr,
                             HAS_TEACHER_R: tl.constexpr, SCALE: tl.constexpr,
                             STATS: tl.constexpr, BLOCK_G: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + group)
    G = tl.load(offsets_ptr + group + 1) - start
    single = G == 1
    cols = tl.arange(0, BLOCK_G)
    in_group = cols < G
    offs = start + cols
    r = tl.load(r_ptr + offs, mask=in_group, other=0.0).to(tl.float32)

    # SSI: the given member, else the lowest reward (first index on ties), becomes the
    # teacher demonstration.
    teacher = cols < 0
    replaced = tl.full((), -1, tl.int64)
    if HAS_INJECT:
        inject = tl.load(inject_ptr + group) != 0
        if HAS_INDEX:
            k = tl.load(index_ptr + group).to(tl.int32)
        else:
            r_min = tl.min(tl.where(in_group, r, float("inf")), axis=0)
            k = tl.min(tl.where(in_group & (r == r_min), cols, BLOCK_G), axis=0)
        teacher = (cols == k) & inject
        t_reward = teacher_reward
        if HAS_TEACHER_R:
            t_reward = tl.load(teacher_r_ptr + group).to(tl.float32)
        r = tl.where(teacher, t_reward, r)
        replaced = tl.where(inject, k.to(tl.int64), replaced)
    tl.store(replaced_ptr + group, replaced)

    member = in_group                               # STATS == 0: "all"
    if STATS == 1:                                  # "on-policy": the teacher is not counted
        member = in_group & (~teacher)
    wm = member.to(tl.float32)
    n = tl.sum(wm, axis=0)
    mean = tl.where(single, 0.0, tl.sum(wm * r, axis=0) / tl.maximum(n, 1.0))
    centred = r - mean
    if SCALE == 2:                                  # "none" (Dr. GRPO)
        adv = centred
    else:
        if SCALE == 0:                              # "group": Bessel std of this group
            var = tl.sum(wm * centred * centred, axis=0) / tl.maximum(n - 1.0, 1.0)
            std = tl.where(n >= 2, tl.sqrt(var), 0.0)
            std = tl.where(single, 1.0, std)
        else:                                       # "batch": reduced by the caller
            std = tl.load(batch_std_ptr)
        if STATS == 1:                              # LUFFY: a zero on-policy std counts as 1
            std = tl.where(std == 0.0, 1.0, std)
        denom = std + eps
        # eps = 0 with a constant group would be 0/0: no signal, A = 0. Never NaN.
        adv = tl.where(denom > 0, centred / tl.where(denom > 0, denom, 1.0), 0.0)
    tl.store(adv_ptr + offs, adv, mask=in_group)
    tl.store(r_sub_ptr + offs, r, mask=in_group)
    tl.store(member_ptr + offs, member.to(tl.int8), mask=in_group)


def _batch_std(r_sub: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Bessel std over every counted member of the batch (0 with fewer than two)."""
    w = member.to(torch.float32)
    n = w.sum()
    mean = (w * r_sub).sum() / n.clamp(min=1.0)
    var = (w * (r_sub - mean) ** 2).sum() / (n - 1).clamp(min=1.0)
    return torch.where(n >= 2, var.sqrt(), torch.zeros_like(var)).reshape(1)


def group_advantages(rewards: torch.Tensor, offsets: torch.Tensor, inject: Optional[torch.Tensor],
                     opts: AdvantageOptions, *, replace_index: Optional[torch.Tensor] = None,
                     teacher_rewards: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 advantages ``[N]`` and int64 replaced indices ``[P]`` (validated inputs;
    group p is ``rewards[offsets[p]:offsets[p+1]]``)."""
    device = rewards.device
    P = offsets.numel() - 1
    N = rewards.numel()
    adv = torch.empty(N, dtype=torch.float32, device=device)
    replaced = torch.empty(P, dtype=torch.int64, device=device)
    if P == 0:
        return adv, replaced
    r = rewards.reshape(-1).to(torch.float32).contiguous()
    offs = offsets.to(torch.int64).contiguous()
    r_sub = torch.empty_like(adv)
    member = torch.empty(N, dtype=torch.int8, device=device)
    inj = None if inject is None else inject.reshape(-1).to(torch.int8).contiguous()
    index = None if replace_index is None else replace_index.to(torch.int64).contiguous()
    teacher_r = (None if teacher_rewards is None
                 else teacher_rewards.to(torch.float32).contiguous())
    # Every group in one block: the largest one sets the block (one host read of the sizes).
    block = max(16, triton.next_power_of_2(int((offs[1:] - offs[:-1]).max())))

    def launch(scale_code, batch_std):
        group_advantages_kernel[(P,)](
            r, offs, inj, index, teacher_r, adv, r_sub, member, replaced, batch_std,
            float(opts.teacher_reward),
            float(opts.eps), SCALE=scale_code, STATS=STATS_CODE[opts.stats], BLOCK_G=block)

    if opts.scale == "batch":
        launch(SCALE_CODE["none"], None)            # substituted rewards and members
        launch(SCALE_CODE["batch"], _batch_std(r_sub, member))
    else:
        launch(SCALE_CODE[opts.scale], None)
    return adv, replaced
