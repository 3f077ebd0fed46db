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
from .rows import block_v, num_warps, row_frame_heuristics, row_offset, vector_width

if TYPE_CHECKING:
    from ..backends import RowStats


LOG2E = tl.constexpr(1.4426950408889634)
# A clamp for d = z - m before it multiplies exp(d): a -inf logit gives e = 0 and d = -inf,
# and 0 * -inf would be NaN; clamped, that token adds exactly 0 to the entropy sum.
NEG_BIG = tl.constexpr(-1.0e30)
# The same for z - sum_pz in the gradient, small enough that times any sane upstream
# derivative it stays finite (p is exactly 0 long before a logit gets there).
CLAMP_Z = tl.constexpr(-1.0e20)


@triton.jit
def block_index(k, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Columns of block ``k`` as a ``[BLOCK_V // VEC, VEC]`` tile: each tile row is one
    128-bit vector, held by one thread, so reductions along axis 1 stay in registers."""
    return (k * BLOCK_V + tl.arange(0, BLOCK_V // VEC)[:, None] * VEC
            + tl.arange(0, VEC)[None, :])


@triton.jit
def row_frame(x_ptr, dx_ptr, off, doff, VEC: tl.constexpr, ALIGNED: tl.constexpr,
              SAME_FRAME: tl.constexpr):
    """``(x_base, dx_base, lead)``: the row's columns are ``lead .. lead + V`` from
    ``x_base`` (and ``dx_base``), with ``x_base`` a multiple of ``VEC`` elements.

    Aligned rows (every row start 16-byte aligned, ``ALIGNED``) have ``lead = 0`` and every
    full block is read with 128-bit loads. Otherwise the row is read from the aligned
    element before it, the first and last blocks masked: still 128-bit loads in between
    (V = 32001). ``SAME_FRAME``: the gradient rows sit at the same offset modulo ``VEC``,
    so its stores are 128-bit too; else they are as wide as the addresses allow.
    The ``// VEC * VEC`` tells the compiler the divisibility the launcher checked.
    """
    if ALIGNED:
        lead = off * 0
        x_base = x_ptr + (off // VEC) * VEC
        dx_base = dx_ptr + (doff // VEC) * VEC
    else:
        lead = off % VEC
        x_base = x_ptr + ((off - lead) // VEC) * VEC
        if SAME_FRAME:
            dx_base = dx_ptr + ((doff - lead) // VEC) * VEC
        else:
            dx_base = dx_ptr + (doff - lead)
    return x_base, dx_base, lead


@triton.jit
def row_end(lead, n_cols, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """Where the row's columns end in its frame; aligned rows end on a whole vector
    (``V % VEC == 0``, checked by the launcher), which the ``// VEC * VEC`` tells the
    compiler, so that even the masked tail block is read 128 bits at a time."""
    if ALIGNED:
        return (n_cols // VEC) * VEC
    else:
        return lead + n_cols


@triton.jit
def block_mask(idx, lead, end, ALIGNED: tl.constexpr):
    """The columns of a masked block that belong to the row."""
    if ALIGNED:
        return idx < end
    else:
        return (idx >= lead) & (idx < end)


@triton.jit
def stats_block(x_base, k, lead, end, m, s, w, inv_temp, MASKED: tl.constexpr,
                ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold block ``k`` into the per-lane state ``(m, s, w)`` (one value per 128-bit lane).

    For the scaled logits ``z = x / T``: ``m`` the lane's running max,
    ``s = sum exp(z - m)``, ``w = sum exp(z - m) (z - m)``. ``d = z - m`` is one fused
    multiply-add from the raw logit, ``exp(d)`` one multiply by log2(e) and ``exp2``: the
    subtraction happens before any rounding of log2(e), so large logits keep their accuracy.
    The max and sums reduce over the lane's ``VEC`` elements in registers: no shuffles and
    no barriers in the loop; ``row_logsumexp`` combines the lanes once per row.
    """
    idx = block_index(k, VEC, BLOCK_V)
    if MASKED:
        x = tl.load(x_base + idx, mask=block_mask(idx, lead, end, ALIGNED),
                    other=float("-inf"), eviction_policy="evict_last")
    else:
        # Kept in L2 where it can be: the gradient pass re-reads the row.
        x = tl.load(x_base + idx, eviction_policy="evict_last")
    x = x.to(tl.float32)
    # 1/T > 0, so max(x / T) = max(x) / T: one multiply per lane, not per element.
    m_new = tl.maximum(m, tl.max(x, axis=1) * inv_temp)
    # While a lane has seen only -inf, any shift will do: 0 (-inf - -inf would be NaN).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = x * inv_temp - shift[:, None]
    e = tl.exp2(d * LOG2E)
    alpha = tl.exp2((m - shift) * LOG2E)
    # Re-basing w from m to the shift: sum e_old (u - shift) = alpha (w + s (m - shift)).
    # Guarded: while s = 0, m - shift may be -inf.
    w = alpha * (w + s * tl.where(s > 0, m - shift, 0.0)) \
        + tl.sum(e * tl.maximum(d, NEG_BIG), axis=1)
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, w


@triton.jit
def row_logsumexp(x_base, lead, n_cols, inv_temp, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """``(lse, entropy, sum_pz)`` of the scaled logits ``x / T`` at columns
    ``lead .. lead + n_cols`` of ``x_base`` (``row_frame``); ``n_cols = 0`` reads nothing
    (an ignored row: ``lse = -inf``, entropy and ``sum_pz`` NaN; callers mask them).

    One read of the row: the full blocks unmasked, one masked block at each end where the
    row does not fill it (``stats_block``), then the per-lane states combined.
    """
    m = tl.full([BLOCK_V // VEC], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V // VEC], tl.float32)
    w = tl.zeros([BLOCK_V // VEC], tl.float32)
    end = row_end(lead, n_cols, ALIGNED, VEC)
    n_full = end // BLOCK_V
    first = 0
    if not ALIGNED:                    # block 0 starts before the row: masked
        m, s, w = stats_block(x_base, 0, lead, end, m, s, w, inv_temp, True, ALIGNED, VEC,
                              BLOCK_V)
        first = 1
        n_full = tl.maximum(n_full, 1)
    for k in range(first, n_full):
        m, s, w = stats_block(x_base, k, lead, end, m, s, w, inv_temp, False, ALIGNED, VEC,
                              BLOCK_V)
    if n_full * BLOCK_V < end:         # the tail block
        m, s, w = stats_block(x_base, n_full, lead, end, m, s, w, inv_temp, True, ALIGNED, VEC,
                              BLOCK_V)
    # Once per row: the lanes' states re-based to the row max and summed.
    m_row = tl.max(m, axis=0)
    shift = tl.where(m_row == float("-inf"), 0.0, m_row)
    alpha = tl.exp2((m - shift) * LOG2E)
    s_row = tl.sum(s * alpha, axis=0)
    w_row = tl.sum(alpha * (w + s * tl.where(s > 0, m - shift, 0.0)), axis=0)
    log_s = tl.log(s_row)
    return m_row + log_s, log_s - w_row / s_row, m_row + w_row / s_row


@triton.jit
def grad_block(x_base, dx_base, k, lead, end, inv_temp, lse, sum_pz, a_logp, a_ent,
               MASKED: tl.constexpr,
               ZERO: tl.constexpr, USE_ENT: tl.constexpr, ALIGNED: tl.constexpr,
               VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Write block ``k`` of a gradient row: ``p q`` with ``p = exp(x / T - lse)`` and
    ``q = -(x / T - sum_pz) a_ent - a_logp`` (``grad_row``); ``ZERO``: zeros, the logits
    not read."""
    idx = block_index(k, VEC, BLOCK_V)
    if MASKED:
        mask = block_mask(idx, lead, end, ALIGNED)
    if ZERO:
        dz = tl.zeros([BLOCK_V // VEC, VEC], tl.float32)
    else:
        # The last read of the row: no need to keep it.
        if MASKED:
            x = tl.load(x_base + idx, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(x_base + idx, eviction_policy="evict_first")
        x = x.to(tl.float32)
        p = tl.exp2((x * inv_temp - lse) * LOG2E)
        if USE_ENT:
            # p (z - sum_pz) is 0 * -inf at a -inf logit. Clamped, z - sum_pz stays finite
            # and only changes where p is exactly 0, so such a token gets exactly 0.
            t = tl.maximum(x * inv_temp - sum_pz, CLAMP_Z)
            dz = p * (t * -a_ent - a_logp)
        else:
            dz = p * -a_logp
    dz = dz.to(dx_base.dtype.element_ty)
    if MASKED:
        tl.store(dx_base + idx, dz, mask=mask, eviction_policy="evict_first")
    else:
        tl.store(dx_base + idx, dz, eviction_policy="evict_first")


@triton.jit
def grad_row(x_base, dx_base, lead, V, y, x_y, inv_temp, lse, sum_pz, a_logp, a_ent,
             ZERO: tl.constexpr, USE_ENT: tl.constexpr, ALIGNED: tl.constexpr,
             VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """One gradient row ``dz = (onehot(y) - p) a_logp - p (z - sum_pz) a_ent`` (``a_*``
    already divided by T), written over columns ``lead .. lead + V`` of ``dx_base``.

    Written as ``dz = p q + onehot a_logp``, ``q = -(z - sum_pz) a_ent - a_logp``, so the
    loop does no compare: the target column is rewritten once after it, from ``x_y``
    (the target logit, read before the loop: ``dx`` may be the logits themselves).
    ``y`` outside ``[0, V)`` (a target on another vocabulary shard) adds no one-hot term.
    Blocks in reverse order: the blocks the statistics pass read last are the likeliest in
    L2. ``ZERO``: a zero row (an ignored token), the logits not read.
    """
    end = row_end(lead, V, ALIGNED, VEC)
    n_full = end // BLOCK_V
    first = 0
    if not ALIGNED:
        first = 1
        n_full = tl.maximum(n_full, 1)
    if n_full * BLOCK_V < end:
        grad_block(x_base, dx_base, n_full, lead, end, inv_temp, lse, sum_pz, a_logp, a_ent,
                   True, ZERO, USE_ENT, ALIGNED, VEC, BLOCK_V)
    for i in range(first, n_full):
        grad_block(x_base, dx_base, n_full - 1 + first - i, lead, end, inv_temp, lse, sum_pz,
                   a_logp, a_ent, False, ZERO, USE_ENT, ALIGNED, VEC, BLOCK_V)
    if not ALIGNED:
        grad_block(x_base, dx_base, 0, lead, end, inv_temp, lse, sum_pz, a_logp, a_ent, True,
                   ZERO, USE_ENT, ALIGNED, VEC, BLOCK_V)
    if not ZERO:
        # Every thread's stores above land before the target column is rewritten.
        tl.debug_barrier()
        p_y = tl.exp2((x_y * inv_temp - lse) * LOG2E)
        q_y = tl.maximum(x_y * inv_temp - sum_pz, CLAMP_Z) * -a_ent - a_logp
        dz_y = a_logp + p_y * q_y
        tl.store(dx_base + lead + y, dz_y.to(dx_base.dtype.element_ty),
                 mask=(y >= 0) & (y < V))


@triton.heuristics(row_frame_heuristics(with_grad=False))
@triton.jit
def row_stats_kernel(x_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr, spz_ptr,
                     T, V, stride_b, stride_t, inv_temp, ignore_index,
                     VEC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    off = row_offset(row, T, stride_b, stride_t)
    x_base, _, lead = row_frame(x_ptr, x_ptr, off, off, VEC, ALIGNED, True)
    y = tl.load(y_ptr + row).to(tl.int32)
    valid = y != ignore_index
    # An ignored row is not scanned: its loop runs over zero columns.
    n_cols = tl.where(valid, V, 0)
    lse, ent, spz = row_logsumexp(x_base, lead, n_cols, inv_temp, ALIGNED, VEC, BLOCK_V)
    # The target logit: one element, unmasked (column 0 stands in on ignored rows).
    z_y = tl.load(x_base + lead + tl.where(valid, y, 0)).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(valid, z_y - lse, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(spz_ptr + row, tl.where(valid, spz, 0.0))


@triton.heuristics(dict(row_frame_heuristics(with_grad=True),
                        HAS_LOGP=lambda args: args["gl_ptr"] is not None,
                        HAS_ENT=lambda args: args["ge_ptr"] is not None))
@triton.jit
def grad_logits_kernel(x_ptr, y_ptr, lse_ptr, spz_ptr, gl_ptr, ge_ptr, dx_ptr,
                       T, V, stride_b, stride_t, dstride_b, dstride_t, inv_temp, ignore_index,
                       HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, VEC: tl.constexpr,
                       ALIGNED: tl.constexpr, SAME_FRAME: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_base, dx_base, lead = row_frame(
        x_ptr, dx_ptr, row_offset(row, T, stride_b, stride_t),
        row_offset(row, T, dstride_b, dstride_t), VEC, ALIGNED, SAME_FRAME)
    y = tl.load(y_ptr + row).to(tl.int32)
    valid = y != ignore_index
    g_logp = 0.0
    g_ent = 0.0
    if HAS_LOGP:
        g_logp = tl.load(gl_ptr + row)
    if HAS_ENT:
        g_ent = tl.load(ge_ptr + row)
    in_row = (y >= 0) & (y < V)
    x_y = tl.load(x_base + lead + tl.where(in_row, y, 0)).to(tl.float32)
    if valid:
        grad_row(x_base, dx_base, lead, V, y, x_y, inv_temp, tl.load(lse_ptr + row),
                 tl.load(spz_ptr + row), g_logp * inv_temp, g_ent * inv_temp, False, HAS_ENT,
                 ALIGNED, VEC, BLOCK_V)
    else:                               # an ignored row is not read, only zero-filled
        grad_row(x_base, dx_base, lead, V, y, x_y, inv_temp, 0.0, 0.0, 0.0, 0.0, True,
                 HAS_ENT, ALIGNED, VEC, BLOCK_V)


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
    vec = vector_width(logits)
    block = block_v(L.V, vec)
    row_stats_kernel[(rows,)](
        logits, y, *out, L.T, L.V, L.stride_b, L.stride_t,
        1.0 / float(temperature), int(ignore_index),
        BLOCK_V=block, num_warps=num_warps(block, vec))
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
    vec = vector_width(logits)
    block = block_v(L.V, vec)
    grad_logits_kernel[(rows,)](
        logits, y, lse, spz, gl, ge, out, L.T, L.V, L.stride_b, L.stride_t, D.stride_b,
        D.stride_t, 1.0 / float(temperature), int(ignore_index),
        BLOCK_V=block, num_warps=num_warps(block, vec))
    return out
