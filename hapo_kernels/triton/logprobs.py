"""Selective log-softmax: Triton kernels (docs/design.md section 3).

Internal API, the same as ``hapo_kernels.cpu.logprobs``:

    row_stats(logits, target_ids, temperature, ignore_index) -> (logp, entropy, lse, sum_pz)
    grad_logits(logits, target_ids, lse, sum_pz, g_logp, g_ent, temperature, ignore_index,
                out=None) -> gradient with the logits' shape and dtype

One program per row (a 1-D grid, so no 65,535 limit). A row ``r`` of ``[B, T, V]`` is read
at ``(r // T) * stride_b + (r % T) * stride_t`` (``layout.row_layout``), so strided views
like ``logits[:, :-1]`` are read in place. Offsets are int64. Ignored rows are never read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import triton
import triton.language as tl

from ..layout import row_layout
from .rows import block_v, num_warps, row_offset

if TYPE_CHECKING:
    from ..backends import RowStats


@triton.jit
def online_lse_block(m, s, w, z):
    """Fold a block ``z`` of scaled logits into the running ``(m, s, w)`` of a row.

    ``m`` is the running max, ``s = sum exp(z - m)`` and ``w = sum exp(z - m) * (z - m)``,
    so that ``lse = m + log s`` and ``entropy = log s - w / s`` never subtract two large
    numbers. Shared by every kernel that reads a logits row (here and ``triton/loss.py``).
    """
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # While every logit so far is -inf (a masked vocabulary range) s = w = 0 and any
    # shift will do: use 0, since -inf - -inf would be NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = z - shift
    e = tl.exp(d)
    # e * d is 0 * -inf where a logit is -inf (or masked); such a token adds 0.
    w_blk = tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
    s_blk = tl.sum(e, axis=0)
    alpha = tl.exp(m - shift)
    # Re-basing w from m to the shift: sum e_old * (z - shift) = alpha * (w + s * (m - shift)).
    # Guarded: while s = 0, m - shift may be -inf.
    w = alpha * (w + s * tl.where(s > 0, m - shift, 0.0)) + w_blk
    s = s * alpha + s_blk
    return m_new, s, w


@triton.jit
def row_logsumexp(x_row, n_cols, V, inv_temp, BLOCK_V: tl.constexpr):
    """``(m, s, w)`` of the first ``n_cols`` scaled logits of a row (``online_lse_block``):
    one read of the row in ``BLOCK_V`` blocks. ``n_cols = 0`` skips the row (ignored)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        idx = start + cols
        z = tl.load(x_row + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m, s, w = online_lse_block(m, s, w, z * inv_temp)
    return m, s, w


@triton.jit
def row_stats_kernel(x_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr, spz_ptr,
                      T, V, stride_b, stride_t, inv_temp, ignore_index,
                      BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_offset(row, T, stride_b, stride_t)
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    # An ignored row is not scanned: its loop runs over zero columns.
    n_cols = tl.where(valid, V, 0)
    m, s, w = row_logsumexp(x_row, n_cols, V, inv_temp, BLOCK_V)

    s = tl.where(valid, s, 1.0)         # ignored rows: no 0/0, outputs are zeroed below
    log_s = tl.log(s)
    # The target logit: one element, unmasked (column 0 stands in on ignored rows).
    z_y = tl.load(x_row + tl.where(valid, y, 0)).to(tl.float32) * inv_temp
    logp = (z_y - m) - log_s
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, log_s - w / s, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, m + log_s, 0.0))
    tl.store(spz_ptr + row, tl.where(valid, m + w / s, 0.0))


@triton.heuristics({"HAS_LOGP": lambda args: args["gl_ptr"] is not None,
                    "HAS_ENT": lambda args: args["ge_ptr"] is not None})
@triton.jit
def grad_logits_kernel(x_ptr, y_ptr, lse_ptr, spz_ptr, gl_ptr, ge_ptr, dx_ptr,
                        T, V, stride_b, stride_t, dstride_b, dstride_t, inv_temp, ignore_index,
                        HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_offset(row, T, stride_b, stride_t)
    dx_row = dx_ptr + row_offset(row, T, dstride_b, dstride_t)
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    n_read = tl.where(valid, V, 0)      # an ignored row is not read, only zero-filled
    lse = tl.load(lse_ptr + row)
    spz = tl.load(spz_ptr + row)
    g_logp = 0.0
    g_ent = 0.0
    if HAS_LOGP:
        g_logp = tl.load(gl_ptr + row)
    if HAS_ENT:
        g_ent = tl.load(ge_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    # d z = (onehot - p) * g_logp - p * (z - sum_pz) * g_ent;  d x = d z / T.
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        in_row = idx < V
        # Lanes not read hold -inf, so p = 0 there (no overflow in unused lanes).
        z = tl.load(x_row + idx, mask=idx < n_read, other=float("-inf")).to(tl.float32)
        z = z * inv_temp
        p = tl.exp(z - lse)
        dz = tl.zeros((BLOCK_V,), tl.float32)
        if HAS_LOGP:
            dz = (tl.where(idx == y, 1.0, 0.0) - p) * g_logp
        if HAS_ENT:
            # p * (z - sum_pz) is 0 * -inf at a -inf logit; that token has p = 0.
            dz -= p * tl.where(p > 0, z - spz, 0.0) * g_ent
        dx = tl.where(valid, dz * inv_temp, 0.0)
        tl.store(dx_row + idx, dx.to(dx_ptr.dtype.element_ty), mask=in_row)


def row_stats(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0,
              ignore_index: int = -100, *, out: Optional[RowStats] = None,
              need_entropy: bool = True) -> RowStats:
    """float32 ``(logp, entropy, lse, sum_pz)`` per row; all four are 0 on ignored rows.

    ``out``: optional tuple of four float32 contiguous ``[rows]`` buffers to write into.
    ``need_entropy`` is accepted for the CPU path's sake: on a GPU the entropy rides along
    with the one read of the row at no cost in memory traffic.
    """
    rows = target_ids.numel()
    if out is None:
        out = tuple(torch.empty(rows, dtype=torch.float32, device=logits.device)
                    for _ in range(4))
    if rows == 0:
        return out
    L = row_layout(logits)
    y = target_ids.reshape(-1).contiguous()     # the kernels index it as y_ptr + row
    block = block_v(L.V)
    row_stats_kernel[(rows,)](
        logits, y, *out, L.T, L.V, L.stride_b, L.stride_t,
        1.0 / float(temperature), int(ignore_index),
        BLOCK_V=block, num_warps=num_warps(block))
    return out


def grad_logits(logits: torch.Tensor, target_ids: torch.Tensor, lse: torch.Tensor,
                sum_pz: torch.Tensor, g_logp: Optional[torch.Tensor],
                g_ent: Optional[torch.Tensor], temperature: float = 1.0,
                ignore_index: int = -100, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``d logits = ((onehot - p) * g_logp - p * (z - sum_pz) * g_ent) / T`` in one launch.

    Rows with ``target == ignore_index`` get a zero gradient. ``g_logp`` / ``g_ent`` may be
    ``None`` (that term is skipped). Written into ``out`` when given (any layout with
    vocabulary stride 1; ``out`` may be ``logits`` itself: each block is read, then written).
    """
    rows = target_ids.numel()
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if rows == 0:
        return out
    L, D = row_layout(logits), row_layout(out)
    y = target_ids.reshape(-1).contiguous()     # the kernels index it as y_ptr + row

    def per_row(t):
        return None if t is None else t.reshape(-1).to(torch.float32).contiguous()

    lse, spz, gl, ge = per_row(lse), per_row(sum_pz), per_row(g_logp), per_row(g_ent)
    block = block_v(L.V)
    grad_logits_kernel[(rows,)](
        logits, y, lse, spz, gl, ge, out, L.T, L.V, L.stride_b, L.stride_t, D.stride_b,
        D.stride_t, 1.0 / float(temperature), int(ignore_index),
        BLOCK_V=block, num_warps=num_warps(block))
    return out
