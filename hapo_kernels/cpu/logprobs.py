"""Selective log-softmax on CPU tensors: torch, chunked over rows.

Same math and internal API as ``hapo_kernels.triton.logprobs`` (docs/design.md section 3):

    row_stats(logits, target_ids, temperature, ignore_index) -> (logp, entropy, lse, sum_pz)
    grad_logits(logits, target_ids, lse, sum_pz, g_logp, g_ent, temperature, ignore_index,
                out=None) -> gradient with the logits' shape and dtype

Only a chunk of rows is ever held in float32 (``CHUNK_BYTES`` per temporary, two or three
alive at once), never an fp32 copy of the whole logits. This module also holds the chunk
primitives that every CPU path shares (``cpu.loss``, ``cpu.linear``, ``distributed``):

* ``row_ranges`` / ``row_view`` / ``scaled_rows``: which rows a chunk holds, read in place;
* ``softmax_stats``: the fast statistics of a chunk, one fused ``log_softmax`` and one ``exp``;
* ``chunk_grad``: the gradient rows of a chunk from those statistics.

A chunk with a non-finite logit (a masked ``-inf`` vocabulary entry makes ``p * z`` a
``0 * -inf``) takes the slower NaN-safe route, ``safe_row_stats`` / ``safe_grad_logits``,
whose statistics are kept relative to the row max ``m`` (no cancellation of large values).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from ..layout import row_layout, rows_2d

if TYPE_CHECKING:
    from ..backends import RowStats

# Size of one float32 [chunk, V] temporary; a chunk keeps about five alive (the input
# chunk in float32, d, e^d, a product inside vecdot, the gradient chunk), so 8 MiB holds
# the loss path near 40 MiB beyond its gradient, and the chunk in L2/L3 for the gradient.
CHUNK_BYTES = 8 << 20


def chunk_rows(V: int) -> int:
    """Rows per chunk so that one float32 [chunk, V] temporary stays within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(V, 1)))


# --------------------------------------------------------------------------- chunking
def row_ranges(tensor: torch.Tensor, step: int) -> List[Tuple[int, int]]:
    """``(r0, r1)`` chunks of at most ``step`` rows that ``row_view`` views without a copy.

    Where the rows have no flat ``[rows, V]`` view (e.g. ``logits[:, :-1]``), a chunk holds
    whole sequences when they are short, else a piece of one sequence.
    """
    L = row_layout(tensor)
    if L.rows == 0:                   # [B, 0, V] or [0, V]: nothing to read
        return []
    if rows_2d(tensor) is not None:
        return [(r0, min(L.rows, r0 + step)) for r0 in range(0, L.rows, step)]
    if L.T <= step:
        per = step // L.T
        return [(b0 * L.T, min(L.B, b0 + per) * L.T) for b0 in range(0, L.B, per)]
    return [(b * L.T + t0, b * L.T + min(L.T, t0 + step))
            for b in range(L.B) for t0 in range(0, L.T, step)]


def row_view(tensor: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0..r1`` (from ``row_ranges``) as a view: ``[r1 - r0, V]``, or ``[b, T, V]``
    for whole sequences of a layout without a flat view."""
    flat = rows_2d(tensor)
    if flat is not None:
        return flat[r0:r1]
    T = row_layout(tensor).T
    b = r0 // T
    if r0 % T == 0 and r1 - r0 > T:
        return tensor[b:r1 // T]
    return tensor[b, r0 - b * T:r1 - b * T]


def scaled_rows(chunk: torch.Tensor, inv_t: float) -> Tuple[torch.Tensor, bool]:
    """``(z, owned)``: float32 ``[rows, V]`` of ``chunk / T``, and whether ``z`` is a new
    tensor that may be overwritten (``False``: it is the caller's chunk itself)."""
    if chunk.dtype == torch.float32 and inv_t == 1.0:
        z = chunk.reshape(-1, chunk.shape[-1])
        return z, z.data_ptr() != chunk.data_ptr()
    return (chunk.float() * inv_t).reshape(-1, chunk.shape[-1]), True


def store_rows(dst: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``[rows, V]`` ``value`` into a ``row_view`` (2-D or whole sequences)."""
    dst.copy_(value.view(dst.shape))


def safe_targets(target_ids: torch.Tensor, ignore_index: int,
                 V: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat safe targets (0 where ignored or outside ``[0, V)``), held and valid masks.

    A target outside ``[0, V)`` other than ``ignore_index`` is one that a vocabulary
    shard does not hold (``distributed``): it adds no one-hot term.
    """
    y = target_ids.reshape(-1)
    valid = y != ignore_index
    held = valid & (y >= 0) & (y < V)
    return torch.where(held, y, torch.zeros_like(y)).long(), held, valid


# --------------------------------------------------------------------------- chunk math
# Finite stand-in for log p = -inf at a masked (-inf) logit: p = 0 there, so any finite
# value gives the same gradient, and b * (lp + ent) stays finite for any sane b.
NEG_LOG_P = -1e30


def chunk_stats(z: torch.Tensor, owned: bool, y: torch.Tensor, *, for_grad: bool = True
                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor,
                       torch.Tensor, torch.Tensor]:
    """``(lp, p, lse, ent, logp)`` of a float32 ``[c, V]`` chunk (``[c, 1]`` but lp, p).

    Kept relative to the row max ``m``: ``d = z - m``, ``s = sum e^d``, ``w = sum e^d d``,
    ``lse = m + log s``, ``entropy = log s - w / s`` (docs/design.md section 3: the sum of
    ``p * z`` without cancelling two large numbers). ``lp = d - log s`` (log p) and
    ``p = e^d / s`` are returned for the gradient, in the two temporaries. A ``-inf``
    logit (masked vocabulary) adds nothing; a NaN, ``+inf`` or all ``-inf`` row gives NaN.
    ``owned``: ``z`` may be overwritten. ``for_grad=False`` skips finishing ``lp`` and
    ``p`` (two passes a statistics-only caller does not need; they come back as ``None``).
    """
    m = z.amax(dim=-1, keepdim=True)
    d = z.sub_(m) if owned else z - m
    e = d.exp()
    s = e.sum(dim=-1, keepdim=True)
    w = torch.linalg.vecdot(e, d).view(-1, 1)     # pairwise sum: bmm's lost ~1e-5
    if not bool(torch.isfinite(w).all()):
        # e * d is 0 * -inf at a -inf logit: count it as 0, and keep log p finite there.
        masked = d == float("-inf")
        w = torch.where(masked, 0.0, e * d).sum(dim=-1, keepdim=True)
        d.masked_fill_(masked & torch.isfinite(m), NEG_LOG_P)
    log_s = s.log()
    logp = d.gather(1, y[:, None]) - log_s
    ent = log_s - w / s
    if not for_grad:
        return None, None, m + log_s, ent, logp
    return d.sub_(log_s), e.div_(s), m + log_s, ent, logp


def chunk_grad(lp: torch.Tensor, p: torch.Tensor, ent: torch.Tensor, a: torch.Tensor,
               b: Optional[torch.Tensor], y: torch.Tensor, held: torch.Tensor,
               valid: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst <- a * (onehot - p) - b * p * (z - sum_pz)`` for one chunk.

    With ``lp = z - lse`` and ``z - sum_pz = lp + ent`` this is
    ``a * onehot - p * (a + b * (lp + ent))``. ``a``, ``b``, ``ent`` are ``[c, 1]`` (``a``
    and ``b`` already divided by T; ``b`` may be ``None``). ``lp`` and ``p`` are
    temporaries and are reused in place. ``dst`` is a ``row_view`` of the output (it may be
    the logits themselves: they are not read any more).
    """
    direct = dst.dtype == torch.float32 and dst.dim() == 2 and dst.is_contiguous()
    if b is None:
        g = torch.mul(p, -a, out=dst) if direct else p.mul_(-a)
    else:
        g = torch.mul(lp, -b, out=dst) if direct else lp.mul_(-b)
        g.sub_(a + b * ent).mul_(p)
    g.scatter_add_(1, y[:, None], a * held[:, None])
    if not bool(valid.all()):
        g.masked_fill_(~valid[:, None], 0.0)
    if not direct:
        store_rows(dst, g)


# --------------------------------------------------------------------------- public internals
def row_stats(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0,
              ignore_index: int = -100, *, out: Optional[RowStats] = None,
              need_entropy: bool = True) -> RowStats:
    """float32 ``(logp, entropy, lse, sum_pz)`` per row (``[target_ids.numel()]`` each).

    All four are 0 on ignored rows (the Triton kernel skips reading those rows). ``out``:
    optional tuple of four float32 ``[rows]`` buffers to write into. ``need_entropy=False``
    (log-probs only, as TRL's ``selective_log_softmax``): one fused ``logsumexp`` per chunk;
    ``entropy`` is then 0 and ``sum_pz`` is ``lse`` (no entropy gradient can be asked for).
    """
    rows, V = target_ids.numel(), logits.shape[-1]
    if out is None:
        out = tuple(torch.empty(rows, dtype=torch.float32, device=logits.device)
                    for _ in range(4))
    safe, _, valid = safe_targets(target_ids, ignore_index, V)
    inv_t = 1.0 / float(temperature)
    for r0, r1 in row_ranges(logits, chunk_rows(V)):
        z, owned = scaled_rows(row_view(logits, r0, r1), inv_t)
        if need_entropy:
            _, _, lse, ent, logp = chunk_stats(z, owned, safe[r0:r1], for_grad=False)
        else:
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            logp, ent = z.gather(1, safe[r0:r1, None]) - lse, torch.zeros_like(lse)
        v = valid[r0:r1]
        for buf, value in zip(out, (logp, ent, lse, lse - ent)):
            buf[r0:r1] = torch.where(v, value.view(-1), 0.0)
    return out


def grad_logits(logits: torch.Tensor, target_ids: torch.Tensor, lse: torch.Tensor,
                sum_pz: torch.Tensor, g_logp: Optional[torch.Tensor],
                g_ent: Optional[torch.Tensor], temperature: float = 1.0,
                ignore_index: int = -100, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``d logits = ((onehot - p) * g_logp - p * (z - sum_pz) * g_ent) / T``, 0 on ignored rows.

    ``g_logp`` / ``g_ent`` are per-row upstream gradients (``None``: that term is skipped).
    The result has the logits' shape and dtype and is written into ``out`` when given
    (``out`` may be ``logits`` itself). A target outside ``[0, V)`` (other than
    ``ignore_index``) adds no one-hot term: a vocabulary shard that does not hold it.
    """
    V = logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    safe, held, valid = safe_targets(target_ids, ignore_index, V)
    inv_t = 1.0 / float(temperature)
    lse, spz = lse.reshape(-1, 1).float(), sum_pz.reshape(-1, 1).float()
    a = (torch.zeros_like(lse) if g_logp is None else g_logp.reshape(-1, 1).float()) * inv_t
    b = None if g_ent is None else g_ent.reshape(-1, 1).float() * inv_t
    for r0, r1 in row_ranges(logits, chunk_rows(V)):
        z, owned = scaled_rows(row_view(logits, r0, r1), inv_t)
        lp = z.sub_(lse[r0:r1]) if owned else z - lse[r0:r1]
        p = lp.exp()
        if b is not None:             # a -inf logit: p = 0, keep p * (lp + ent) at 0
            lp.clamp_(min=NEG_LOG_P)
        chunk_grad(lp, p, (lse - spz)[r0:r1], a[r0:r1], None if b is None else b[r0:r1],
                   safe[r0:r1], held[r0:r1], valid[r0:r1], row_view(out, r0, r1))
    return out
