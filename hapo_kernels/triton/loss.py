"""The fused HAPO/GRPO loss: one Triton launch from logits to loss and gradient (DESIGN 3-5).

Token-level ratios: one program per row, or a persistent grid (``triton/rows.py``); int64
offsets; strided ``[B, T, V]`` read in place through ``layout.row_layout``:

1. pass over V in blocks: online max / sum-exp / sum p*z and the target logit;
2. per-token scalars: logp, entropy, ratio, the objective, KL, entropy bonus, ``w * l``,
   and the two scalar derivatives ``dL/dlogp``, ``dL/dentropy``;
3. second pass over the row, last block first (the blocks pass 1 read last are the
   likeliest to be in L2 still), writing the gradient row.

So forward plus backward read the logits once from memory and write the gradient once; the
backward only scales the saved gradient by ``grad_output``. ``_token_objective`` is the only
second copy of the per-token formula (``reference.token_objective`` is the first); the tests
hold the two together. Sequence-level ratios (GSPO) couple the tokens of a sequence and run
as ``cpu.loss.sequence_level`` over the Triton ``row_stats`` / ``grad_logits`` kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..cpu.loss import RowInputs, sequence_level
from ..layout import row_layout
from ..options import LossOptions
from . import logprobs
from .logprobs import row_logsumexp
from .rows import row_grid, row_offset

MAX_BLOCK_V = 4096


@triton.jit
def _token_objective(logp, A, old, ref, is_teacher, eps_low, eps_high, dual_clip, beta,
                     teacher_gamma, sft_weight, HAS_DUAL: tl.constexpr, USE_KL: tl.constexpr,
                     TEACHER_OBJ: tl.constexpr):
    """Per-token ``l`` (before the entropy bonus), ``dl/dlogp``, the ratio and the k3 KL."""
    # On-policy: l = -min(rho*A, clip(rho)*A). The clipped branch is constant in logp.
    rho = tl.exp(logp - old)
    clipped = tl.minimum(tl.maximum(rho, 1.0 - eps_low), 1.0 + eps_high)
    unclipped_obj = rho * A
    clipped_obj = clipped * A
    pg = -tl.minimum(unclipped_obj, clipped_obj)
    g_pg = tl.where(unclipped_obj <= clipped_obj, -A * rho, 0.0)
    if HAS_DUAL:                                   # A < 0: l = min(l, -c*A)
        cap = -dual_clip * A
        capped = (A < 0) & (pg > cap)
        pg = tl.where(capped, cap, pg)
        g_pg = tl.where(capped, 0.0, g_pg)

    # Teacher tokens (codes: options.TEACHER_OBJECTIVE_CODE).
    if TEACHER_OBJ == 0:                           # "shaped": -A * p / (p + gamma)
        p = tl.exp(logp)
        l_t = -A * p / (p + teacher_gamma)
        g_t = -A * teacher_gamma * p / ((p + teacher_gamma) * (p + teacher_gamma))
    elif TEACHER_OBJ == 1:                         # "sft": -w * logp
        l_t = -sft_weight * logp
        g_t = tl.zeros_like(logp) - sft_weight
    else:                                          # "ratio": the on-policy formula
        l_t = pg
        g_t = g_pg
    loss = tl.where(is_teacher, l_t, pg)
    g_logp = tl.where(is_teacher, g_t, g_pg)

    d = ref - logp                                 # k3: exp(d) - d - 1, d = ref - logp
    ed = tl.exp(d)
    kl = ed - d - 1.0
    if USE_KL:
        loss += beta * kl
        g_logp += beta * (1.0 - ed)
    return loss, g_logp, rho, kl


@triton.jit
def _loss_row(
        row, x_ptr, dx_ptr, y_ptr, valid_ptr, adv_ptr, old_ptr, ref_ptr, teacher_ptr, w_ptr,
        loss_ptr, logp_ptr, ent_ptr, ratio_ptr, clip_lo_ptr, clip_hi_ptr, kl_ptr,
        T, V, stride_b, stride_t, dstride_b, dstride_t, inv_temp,
        eps_low, eps_high, dual_clip, beta, entropy_coef, teacher_gamma, sft_weight,
        HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
        USE_KL: tl.constexpr, USE_ENT: tl.constexpr, TEACHER_OBJ: tl.constexpr,
        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row (token): the loss, the per-token outputs and the gradient row."""
    x_row = x_ptr + row_offset(row, T, stride_b, stride_t)
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = tl.load(valid_ptr + row) != 0          # mask and ignore_index folded
    n_read = tl.where(valid, V, 0)                 # an invalid row is never read
    cols = tl.arange(0, BLOCK_V)

    # ---- pass 1: online logsumexp relative to the running max m (triton/logprobs.py):
    #   s = sum exp(z - m),  w = sum exp(z - m) * (z - m);  entropy = log s - w / s.
    m, s, w = row_logsumexp(x_row, n_read, V, inv_temp, BLOCK_V)
    log_s = tl.log(s)
    z_y = tl.load(x_row + y, mask=valid, other=0.0).to(tl.float32) * inv_temp
    logp = tl.where(valid, (z_y - m) - log_s, 0.0)
    ent = tl.where(valid, log_s - w / s, 0.0)

    # ---- per-token scalars. Invalid tokens: log-ratio 0 (ratio 1), KL 0, loss 0.
    A = tl.load(adv_ptr + row)
    wt = tl.load(w_ptr + row)
    is_teacher = tl.load(teacher_ptr + row) != 0
    old = logp                                     # old_logp None: stop_grad(logp), ratio 1
    if HAS_OLD:
        old = tl.where(valid, tl.load(old_ptr + row), logp)
    ref = logp
    if HAS_REF:
        ref = tl.where(valid, tl.load(ref_ptr + row), logp)
    loss, g_logp, rho, kl = _token_objective(
        logp, A, old, ref, is_teacher, eps_low, eps_high, dual_clip, beta, teacher_gamma,
        sft_weight, HAS_DUAL, USE_KL, TEACHER_OBJ)
    g_ent = 0.0
    if USE_ENT:
        loss -= entropy_coef * ent
        g_ent = -entropy_coef
    # tl.minimum / tl.maximum drop NaN (IEEE minNum), so a NaN logit or log-ratio could
    # come out of the clip as a finite loss. DESIGN section 9: non-finite in, non-finite out.
    loss = tl.where((logp != logp) | (ent != ent) | (rho != rho), float("nan"), loss)
    # Clip fractions count on-policy tokens (and teacher tokens under "ratio").
    counted = valid & (~is_teacher)
    if TEACHER_OBJ == 2:
        counted = valid
    tl.store(loss_ptr + row, tl.where(valid, wt * loss, 0.0))
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(ratio_ptr + row, rho)
    tl.store(clip_lo_ptr + row, (counted & (rho < 1.0 - eps_low) & (A < 0)).to(tl.int8))
    tl.store(clip_hi_ptr + row, (counted & (rho > 1.0 + eps_high) & (A > 0)).to(tl.int8))
    if HAS_REF:
        tl.store(kl_ptr + row, kl)

    # ---- pass 2: d x = w * ((onehot - p) * dl/dlogp - p * (z - sum_pz) * dl/dentropy) / T
    # Blocks in reverse order: the last blocks pass 1 read are the likeliest still in L2.
    if WRITE_GRAD:
        dx_row = dx_ptr + row_offset(row, T, dstride_b, dstride_t)
        lse = m + log_s
        spz = m + w / s
        a_logp = tl.where(valid, wt * g_logp * inv_temp, 0.0)
        a_ent = tl.where(valid, wt * g_ent * inv_temp, 0.0)
        n_blocks = tl.cdiv(V, BLOCK_V)
        for i in range(0, n_blocks):
            idx = (n_blocks - 1 - i) * BLOCK_V + cols
            z = tl.load(x_row + idx, mask=idx < n_read, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            dz = (tl.where(idx == y, 1.0, 0.0) - p) * a_logp
            if USE_ENT:
                dz -= tl.where(p > 0, p * (z - spz), 0.0) * a_ent
            dx = tl.where(valid, dz, 0.0)
            tl.store(dx_row + idx, dx.to(dx_ptr.dtype.element_ty), mask=idx < V)


@triton.jit
def _hapo_loss_kernel(
        x_ptr, dx_ptr, y_ptr, valid_ptr, adv_ptr, old_ptr, ref_ptr, teacher_ptr, w_ptr,
        loss_ptr, logp_ptr, ent_ptr, ratio_ptr, clip_lo_ptr, clip_hi_ptr, kl_ptr,
        n_rows, T, V, stride_b, stride_t, dstride_b, dstride_t, inv_temp,
        eps_low, eps_high, dual_clip, beta, entropy_coef, teacher_gamma, sft_weight,
        HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
        USE_KL: tl.constexpr, USE_ENT: tl.constexpr, TEACHER_OBJ: tl.constexpr,
        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # One row per program, or a persistent grid (triton/rows.py): rows pid, pid + grid, ...
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        _loss_row(
            tl.cast(r, tl.int64), x_ptr, dx_ptr, y_ptr, valid_ptr, adv_ptr, old_ptr, ref_ptr,
            teacher_ptr, w_ptr, loss_ptr, logp_ptr, ent_ptr, ratio_ptr, clip_lo_ptr,
            clip_hi_ptr, kl_ptr, T, V, stride_b, stride_t, dstride_b, dstride_t,
            inv_temp, eps_low, eps_high, dual_clip, beta, entropy_coef, teacher_gamma,
            sft_weight, HAS_OLD, HAS_REF, HAS_DUAL, USE_KL, USE_ENT, TEACHER_OBJ,
            WRITE_GRAD, BLOCK_V)


def _block_v(V: int) -> int:
    return min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))


def token_level(logits, x: RowInputs, opts: LossOptions, out: dict,
                grad: Optional[torch.Tensor]):
    """Token-level ratios: everything in one launch over all rows."""
    rows = x.B * x.T
    if rows == 0:
        return
    L = row_layout(logits)
    D = row_layout(grad) if grad is not None else L
    valid, teacher = x.valid.to(torch.int8), x.teacher.to(torch.int8)   # bools as bytes
    dummy = x.advantages                      # stands in for absent optional pointers
    has_old, has_ref = x.old_logp is not None, x.ref_logp is not None
    block = _block_v(L.V)
    _hapo_loss_kernel[row_grid(rows, logits.device)](
        logits, grad if grad is not None else logits, x.targets, valid, x.advantages,
        x.old_logp if has_old else dummy, x.ref_logp if has_ref else dummy,
        teacher, x.weights,
        out["loss"], out["logp"], out["entropy"], out["ratio"], out["clip_low"],
        out["clip_high"], out["kl"] if has_ref else dummy,
        rows, L.T, L.V, L.stride_b, L.stride_t, D.stride_b, D.stride_t, 1.0 / opts.temperature,
        opts.eps_low, opts.eps_high, opts.dual_clip or 0.0, opts.beta, opts.entropy_coef,
        opts.teacher_gamma, opts.sft_weight,
        HAS_OLD=has_old, HAS_REF=has_ref, HAS_DUAL=opts.dual_clip is not None,
        USE_KL=opts.beta > 0, USE_ENT=opts.entropy_coef != 0,
        TEACHER_OBJ=opts.teacher_code, WRITE_GRAD=grad is not None,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def hapo_loss_rows(logits, x: RowInputs, opts: LossOptions, out: dict,
                   grad: Optional[torch.Tensor]):
    """The Triton path's entry point (see ``hapo_kernels.loss``)."""
    if opts.importance_sampling == "sequence":
        sequence_level(logits, x, opts, out, grad, logprobs)
    else:
        token_level(logits, x, opts, out, grad)
