"""Selective log-softmax on CPU tensors: torch, chunked over rows.

Same math and internal API as ``hapo_kernels.triton.logprobs`` (DESIGN section 3):

    row_stats(logits, target_ids, temperature, ignore_index) -> (logp, entropy, lse, sum_pz)
    grad_logits(logits, target_ids, lse, sum_pz, g_logp, g_ent, temperature, ignore_index,
                out=None) -> gradient with the logits' shape and dtype

Only a chunk of rows is ever held in float32 (about ``CHUNK_BYTES`` per temporary, a few
temporaries alive at once), never an fp32 copy of the whole logits. Statistics are kept
relative to the row max ``m`` so that ``entropy = log s - sum e*(z-m) / s`` involves only
O(log V)-sized numbers (no cancellation of two large ``lse`` values).
"""
from __future__ import annotations

import torch

from ..layout import row_layout, rows_2d

# Size of one float32 [chunk, V] temporary; about four are alive at once.
CHUNK_BYTES = 16 << 20


def chunk_rows(V: int) -> int:
    """Rows per chunk so that one float32 [chunk, V] temporary stays within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(V, 1)))


def _row_index(logits: torch.Tensor, r0: int, r1: int):
    """(b, t) indices of rows r0..r1 for tensors without a [rows, V] view."""
    L = row_layout(logits)
    r = torch.arange(r0, r1, device=logits.device)
    return r // L.T, r % L.T


def _read_rows(logits: torch.Tensor, flat, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 as [c, V]: a view when one exists, else a gather of just those rows."""
    if flat is not None:
        return flat[r0:r1]
    b, t = _row_index(logits, r0, r1)
    return logits[b, t] if logits.dim() == 3 else logits[t]


def _write_rows(out: torch.Tensor, flat, r0: int, r1: int, value: torch.Tensor):
    if flat is not None:
        flat[r0:r1].copy_(value)
        return
    b, t = _row_index(out, r0, r1)
    if out.dim() == 3:
        out[b, t] = value.to(out.dtype)
    else:
        out[t] = value.to(out.dtype)


def _targets(target_ids: torch.Tensor, ignore_index: int):
    y = target_ids.reshape(-1)
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y)).long()
    return safe, valid


def row_stats(logits, target_ids, temperature=1.0, ignore_index=-100, *, out=None):
    """float32 ``(logp, entropy, lse, sum_pz)`` per row (``[target_ids.numel()]`` each).

    ``logp`` and ``entropy`` are 0 on ignored rows; ``lse`` and ``sum_pz`` are 0 there too
    (the Triton kernel skips reading those rows). ``out``: optional tuple of four float32
    ``[rows]`` buffers to write into.
    """
    rows, V = target_ids.numel(), logits.shape[-1]
    if out is None:
        out = tuple(torch.empty(rows, dtype=torch.float32, device=logits.device)
                    for _ in range(4))
    logp, ent, lse, spz = out
    safe, valid = _targets(target_ids, ignore_index)
    flat = rows_2d(logits)
    inv_t = 1.0 / float(temperature)
    step = chunk_rows(V)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        # The one fp32 slice. A new tensor: never .mul_, since .float() of fp32 is the input.
        z = _read_rows(logits, flat, r0, r1).float() * inv_t
        m = z.amax(dim=-1, keepdim=True)
        z_y = z.gather(1, safe[r0:r1, None])
        d = z.sub_(m)                                                 # z - m, in place
        e = d.exp()
        s = e.sum(dim=-1)
        # e * d is 0 * -inf = NaN where a logit is -inf; that token has p = 0, term 0.
        w = (e * torch.where(e > 0, d, 0.0)).sum(dim=-1)
        log_s = s.log()
        v = valid[r0:r1]
        mm = m.squeeze(1)
        logp[r0:r1] = torch.where(v, (z_y.squeeze(1) - mm) - log_s, 0.0)
        ent[r0:r1] = torch.where(v, log_s - w / s, 0.0)
        lse[r0:r1] = torch.where(v, mm + log_s, 0.0)
        spz[r0:r1] = torch.where(v, mm + w / s, 0.0)
    return logp, ent, lse, spz


def grad_logits(logits, target_ids, lse, sum_pz, g_logp, g_ent, temperature=1.0,
                ignore_index=-100, out=None):
    """``d logits = ((onehot - p) * g_logp - p * (z - sum_pz) * g_ent) / T``, 0 on ignored rows.

    ``g_logp`` / ``g_ent`` are per-row upstream gradients (``None``: that term is skipped).
    The result has the logits' shape and dtype and is written into ``out`` when given
    (``out`` may be ``logits`` itself: each chunk is read before it is overwritten).
    A target outside ``[0, V)`` (other than ``ignore_index``) adds no one-hot term: a
    vocab-parallel shard that does not hold the target (as in the Triton kernel).
    """
    rows, V = target_ids.numel(), logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    safe, valid = _targets(target_ids, ignore_index)
    held = (safe >= 0) & (safe < V)
    safe = torch.where(held, safe, 0)
    src, dst = rows_2d(logits), rows_2d(out)
    inv_t = 1.0 / float(temperature)
    lse = lse.reshape(-1).float()
    spz = sum_pz.reshape(-1).float()
    gl = None if g_logp is None else g_logp.reshape(-1).float()
    ge = None if g_ent is None else g_ent.reshape(-1).float()
    step = chunk_rows(V)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        v = valid[r0:r1, None]
        z = _read_rows(logits, src, r0, r1).float() * inv_t
        p = (z - lse[r0:r1, None]).exp_()
        grad = torch.zeros_like(z)
        if ge is not None:
            # p * (z - sum_pz) is 0 * -inf = NaN at a -inf logit; that token has p = 0.
            grad = (p * torch.where(p > 0, z - spz[r0:r1, None], 0.0)).mul_(-ge[r0:r1, None])
        if gl is not None:
            g = gl[r0:r1, None]
            grad.sub_(p * g)
            grad.scatter_add_(1, safe[r0:r1, None], g * held[r0:r1, None])
        grad = torch.where(v, grad.mul_(inv_t), 0.0)
        _write_rows(out, dst, r0, r1, grad.to(out.dtype))
    return out
