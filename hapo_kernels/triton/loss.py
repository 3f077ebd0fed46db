"""The fused token-level loss: one Triton launch from logits to loss and gradient.

One program per row, or a persistent grid (``triton/rows.py``); int64 offsets; strided
``[B, T, V]`` read in place through ``layout.row_layout``. Per row:

1. a pass over V in blocks: online max / sum-exp / sum p*z and the target logit;
2. per-token scalars (``triton/objective.py``): logp, entropy, ratio, the objective, KL,
   entropy bonus, ``w * l``, and the two scalar derivatives ``dL/dlogp``, ``dL/dentropy``;
3. a second pass over the row, last block first (the blocks pass 1 read last are the
   likeliest to be in L2 still), writing the gradient row.

So forward plus backward read the logits once from memory and write the gradient once; the
backward only scales the saved gradient by ``grad_output``. The flags (which inputs exist,
which terms are on) come from ``triton.heuristics`` over the arguments: the launch passes
tensors, the layout and the options' ``kernel_params`` and nothing else.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..inputs import LossInputs
from ..layout import row_layout
from ..objective import OBJECTIVES, TEACHER_OBJECTIVES
from ..options import KERNEL_PARAMS, LossOptions
from ..outputs import TokenResults
from .logprobs import grad_row, row_frame, row_logsumexp
from .objective import token_objective
from .rows import (
    block_v,
    default_programs_per_sm,
    grid_programs_per_sm,
    num_warps,
    register_cap,
    row_frame_heuristics,
    row_grid,
    row_offset,
    vector_width,
)


@triton.heuristics(dict(
    row_frame_heuristics(with_grad=True),
    HAS_OLD=lambda args: args["old_ptr"] is not None,
    HAS_REF=lambda args: args["ref_ptr"] is not None,
    WRITE_GRAD=lambda args: args["dx_ptr"] is not None,
    HAS_DUAL=lambda args: args["option_params"][KERNEL_PARAMS.index("dual_clip")] > 0,
    HAS_DELTA=lambda args: args["option_params"][KERNEL_PARAMS.index("delta")] > 0,
    KL_BIAS=lambda args: args["option_params"][KERNEL_PARAMS.index("kl_bias_correction")] != 0,
    HAS_PW=lambda args: args["pw_ptr"] is not None,
    USE_KL=lambda args: args["option_params"][KERNEL_PARAMS.index("beta")] > 0,
    USE_ENT=lambda args: args["option_params"][KERNEL_PARAMS.index("entropy_coef")] != 0,
))
@triton.jit
def hapo_loss_kernel(
        x_ptr, dx_ptr, y_ptr, valid_ptr, adv_ptr, old_ptr, ref_ptr, teacher_ptr, w_ptr,
        loss_ptr, logp_ptr, ent_ptr, ratio_ptr, clip_lo_ptr, clip_hi_ptr, kl_ptr,
        n_rows, T, V, stride_b, stride_t, dstride_b, dstride_t, inv_temp, option_params,
        pw_ptr, OBJECTIVE: tl.constexpr, TEACHER_OBJ: tl.constexpr,
        HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr, USE_KL: tl.constexpr,
        KL_BIAS: tl.constexpr, USE_ENT: tl.constexpr, HAS_PW: tl.constexpr,
        VEC: tl.constexpr, ALIGNED: tl.constexpr, SAME_FRAME: tl.constexpr,
        BLOCK_V: tl.constexpr):
    # One row per program, or a persistent grid (triton/rows.py): rows pid, pid + grid, ...
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        if WRITE_GRAD:
            grad_ptr = dx_ptr
        else:                                      # no gradient: a stand-in, never written
            grad_ptr = x_ptr
        x_base, dx_base, lead = row_frame(
            x_ptr, grad_ptr, row_offset(row, T, stride_b, stride_t),
            row_offset(row, T, dstride_b, dstride_t), VEC, ALIGNED, SAME_FRAME)
        y = tl.load(y_ptr + row).to(tl.int32)
        valid = tl.load(valid_ptr + row) != 0      # mask and ignore_index folded
        n_read = tl.where(valid, V, 0)             # an invalid row is never read

        # ---- pass 1: the row's statistics (triton/logprobs.py): one read, per-lane state.
        lse, ent, spz = row_logsumexp(x_base, lead, n_read, inv_temp, ALIGNED, VEC, BLOCK_V)
        x_y = tl.load(x_base + lead + tl.where(valid, y, 0)).to(tl.float32)
        logp = tl.where(valid, x_y * inv_temp - lse, 0.0)
        ent = tl.where(valid, ent, 0.0)

        # ---- per-token scalars. Invalid tokens: log-ratio 0 (ratio 1), KL 0, loss 0.
        A = tl.load(adv_ptr + row)
        wt = tl.load(w_ptr + row)
        is_teacher = tl.load(teacher_ptr + row) != 0
        old = logp                                 # old_logp None: stop_grad(logp), ratio 1
        if HAS_OLD:
            old = tl.where(valid, tl.load(old_ptr + row), logp)
        ref = logp
        if HAS_REF:
            ref = tl.where(valid, tl.load(ref_ptr + row), logp)
        pw = 1.0                                   # rollout importance weight
        if HAS_PW:
            pw = tl.load(pw_ptr + row)
        loss, g_logp, g_ent, rho, kl, clip_lo, clip_hi = token_objective(
            logp, ent, A, old, ref, is_teacher, valid, pw, option_params, OBJECTIVE,
            TEACHER_OBJ, HAS_DUAL, HAS_DELTA, USE_KL, KL_BIAS, USE_ENT)
        tl.store(loss_ptr + row, tl.where(valid, wt * loss, 0.0))
        tl.store(logp_ptr + row, logp)
        tl.store(ent_ptr + row, ent)
        tl.store(ratio_ptr + row, rho)
        tl.store(clip_lo_ptr + row, clip_lo.to(tl.int8))
        tl.store(clip_hi_ptr + row, clip_hi.to(tl.int8))
        if HAS_REF:
            tl.store(kl_ptr + row, kl)

        # ---- pass 2: dx = w ((onehot - p) dl/dlogp - p (z - sum_pz) dl/dentropy) / T,
        # last block first (grad_row); an invalid row's gradient is zeros, the row not read.
        if WRITE_GRAD:
            if valid:
                grad_row(x_base, dx_base, lead, V, y, x_y, inv_temp, lse, spz,
                         wt * g_logp * inv_temp, wt * g_ent * inv_temp, False, USE_ENT,
                         ALIGNED, VEC, BLOCK_V)
            else:
                grad_row(x_base, dx_base, lead, V, y, x_y, inv_temp, 0.0, 0.0, 0.0, 0.0, True,
                         USE_ENT, ALIGNED, VEC, BLOCK_V)


def token_loss(logits: torch.Tensor, inputs: LossInputs, opts: LossOptions,
               out: TokenResults, grad: Optional[torch.Tensor]) -> None:
    """Token-level ratios: everything in one launch over all rows."""
    rows = inputs.rows
    if rows == 0:
        return
    if opts.statistics_first:
        raise ValueError(f"the fused token-level kernel cannot run options that need "
                         f"sequence or batch statistics ({opts.objective!r}, ...); "
                         "twopass.two_pass_loss runs them")
    L = row_layout(logits)
    D = row_layout(grad) if grad is not None else L
    vec = vector_width(logits)
    block = block_v(L.V, vec)
    warps = num_warps(block, vec)
    per_sm = default_programs_per_sm(block, logits.element_size())
    hapo_loss_kernel[row_grid(rows, logits.device, per_sm)](
        logits, grad, inputs.targets, inputs.valid.to(torch.int8), inputs.advantages,
        inputs.old_logp, inputs.ref_logp, inputs.teacher.to(torch.int8), inputs.weights,
        out.loss, out.logp, out.entropy, out.ratio, out.clip_low, out.clip_high, out.kl,
        rows, L.T, L.V, L.stride_b, L.stride_t, D.stride_b, D.stride_t,
        1.0 / opts.temperature, opts.kernel_params(), inputs.rollout_is,
        OBJECTIVE=OBJECTIVES[opts.objective].code,
        TEACHER_OBJ=TEACHER_OBJECTIVES[opts.teacher_objective].code,
        BLOCK_V=block, num_warps=warps,
        maxnreg=register_cap(grid_programs_per_sm(logits.device, per_sm), warps))
