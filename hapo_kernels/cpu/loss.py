"""The fused HAPO/GRPO loss on CPU tensors: chunked torch (DESIGN sections 3-5).

Token-level importance sampling runs chunk by chunk over rows, in one sweep: the chunk's
row statistics (torch's fused softmax), the per-token objective and its two scalar
derivatives ``dL/dlogp`` and ``dL/dentropy`` (``token_terms``), then the chunk's gradient
rows while the chunk is still in cache. Peak extra memory is the gradient (nothing more
with ``inplace_grad``) plus two float32 chunk temporaries. Chunks with a non-finite logit
take the NaN-safe ``cpu.logprobs.row_stats`` / ``grad_logits`` route instead.

``token_terms`` evaluates ``reference.token_objective``, the one statement of the formula,
on ``[tokens]``-sized float32 vectors and takes the derivatives by autograd; the Triton
kernel's inline copy of the formula is held to it by the tests. Sequence-level importance
sampling (GSPO) couples the tokens of a sequence, so it runs as three steps over all rows:
``sequence_level`` does that for either backend, given its ``row_stats`` / ``grad_logits``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import reference
from ..layout import row_layout, rows_2d
from ..options import LossOptions
from . import logprobs


@dataclass
class RowInputs:
    """Per-token inputs of the loss, flat ``[rows]`` and contiguous (rows = B * T)."""
    B: int
    T: int
    targets: torch.Tensor               # caller's integer dtype, ignore_index kept
    ignore_index: int
    valid: torch.Tensor                 # bool: mask and ignore_index folded
    advantages: torch.Tensor            # float32
    old_logp: Optional[torch.Tensor]    # float32 or None
    ref_logp: Optional[torch.Tensor]    # float32 or None
    teacher: torch.Tensor               # bool
    weights: torch.Tensor               # float32 aggregation weights, loss = sum(w * l)
    segments: Optional[object] = None   # packed.Segments: sequences of packed rows (GSPO)
    vocab_shard: Optional[object] = None  # distributed.VocabShard: logits hold a vocab slice

    def rows(self, sl: slice) -> dict:
        """The vectors of ``token_terms`` for a slice of rows."""
        def cut(t):
            return None if t is None else t[sl]
        return dict(valid=self.valid[sl], advantages=self.advantages[sl],
                    old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp),
                    teacher=self.teacher[sl], weights=self.weights[sl])

    def seqs(self) -> dict:
        """The vectors of ``token_terms`` shaped ``[B, T]`` (sequence-level ratios)."""
        def shape(t):
            return None if t is None else t.view(self.B, self.T)
        vec = {k: shape(v) for k, v in self.rows(slice(None)).items()}
        if self.segments is not None:       # packed: the sequences are cu_seqlens' segments
            vec["segments"] = self.segments
        return vec


def token_terms(logp, entropy, *, valid, advantages, old_logp, ref_logp, teacher, weights,
                opts: LossOptions, need_grad: bool, segments=None) -> dict:
    """``w * l`` per token, ``d(sum w*l)/dlogp`` and ``/dentropy``, and the metric tensors.

    Any shape (``[tokens]`` for token-level ratios, ``[B, T]`` for sequence-level ones).
    """
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(need_grad)
        en = entropy.detach().requires_grad_(need_grad)
        obj = reference.token_objective(lp, en, advantages, valid, old_logp=old_logp,
                                        ref_logp=ref_logp, teacher=teacher, opts=opts,
                                        segments=segments)
        wl = weights * obj["loss"]
        g_logp = g_ent = None
        if need_grad:
            g_logp, g_ent = torch.autograd.grad(wl.sum(), (lp, en), allow_unused=True,
                                                materialize_grads=True)
    obj["loss"] = wl.detach()
    obj["g_logp"], obj["g_ent"] = g_logp, g_ent
    return obj


def _write_terms(out: dict, sl: slice, valid, logp, entropy, terms: dict):
    zero = torch.zeros((), dtype=torch.float32)
    out["loss"][sl] = terms["loss"].reshape(-1)
    out["logp"][sl] = torch.where(valid, logp, zero).reshape(-1)
    out["entropy"][sl] = torch.where(valid, entropy, zero).reshape(-1)
    out["ratio"][sl] = terms["ratio"].reshape(-1)
    out["clip_low"][sl] = terms["clip_low"].reshape(-1)
    out["clip_high"][sl] = terms["clip_high"].reshape(-1)
    if out.get("kl") is not None:
        out["kl"][sl] = terms["kl"].reshape(-1)


def row_ranges(tensor: torch.Tensor, step: int):
    """``(r0, r1)`` chunks of at most ``step`` rows that ``row_view`` can view without a copy.

    Where the rows have no flat ``[rows, V]`` view (e.g. ``logits[:, :-1]``), chunks stay
    inside one sequence.
    """
    L = row_layout(tensor)
    if rows_2d(tensor) is not None:
        return [(r0, min(L.rows, r0 + step)) for r0 in range(0, L.rows, step)]
    return [(b * L.T + t0, b * L.T + min(L.T, t0 + step))
            for b in range(L.B) for t0 in range(0, L.T, step)]


def row_view(tensor: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0..r1`` of ``[B, T, V]`` / ``[N, V]`` as a ``[r1 - r0, V]`` view."""
    flat = rows_2d(tensor)
    if flat is not None:
        return flat[r0:r1]
    T = row_layout(tensor).T
    b = r0 // T
    return tensor[b, r0 - b * T:r1 - b * T]


# One float32 [chunk, V] temporary (two are alive at once): large enough that per-op
# overheads vanish, small enough that a chunk is still in cache for its gradient.
CHUNK_BYTES = 16 << 20


def _stats_and_grad(chunk, y, valid, inv_t, terms_fn, grad_out):
    """One chunk: row statistics, ``terms_fn(logp, entropy)``, then the gradient rows.

    Built on torch's fused ``softmax`` so that a chunk costs few passes and one ``exp``:
    ``lse = z[y] - log p[y]`` (a ``logsumexp`` for the rare rows where ``p[y]`` is too small
    for that), ``logp = z[y] - lse``, ``entropy = lse - sum p z``. ``p`` is then reused in
    place for the gradient. Returns the terms, or ``None`` where a row holds a non-finite
    logit (a ``-inf`` logit makes ``p * z`` 0 * -inf): the caller then takes the NaN-safe
    ``cpu.logprobs`` route for the chunk.
    """
    z = chunk if (chunk.dtype == torch.float32 and inv_t == 1.0) else chunk.float() * inv_t
    p = torch.softmax(z, dim=-1)
    z_y, p_y = z.gather(1, y[:, None]), p.gather(1, y[:, None])
    lse = z_y - p_y.log()
    tiny = p_y < 1e-30                    # log p_y would lose digits (or underflow)
    if bool(tiny.any()):
        rows = tiny.view(-1)
        lse[rows] = torch.logsumexp(z[rows], dim=-1, keepdim=True)
    sum_pz = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1, 1)
    if not bool(torch.isfinite(sum_pz).all() and torch.isfinite(lse).all()):
        return None
    logp = (z_y - lse).view(-1)
    terms = terms_fn(logp, (lse - sum_pz).view(-1))
    if grad_out is None:
        return terms
    # d z = a * (onehot - p) - b * p * (z - sum_pz);  d x = d z / T  (a, b carry the 1/T)
    a = (terms["g_logp"] * inv_t).view(-1, 1)
    direct = grad_out.dtype == torch.float32 and grad_out.is_contiguous()
    if terms["g_ent"] is None:
        g = torch.mul(p, -a, out=grad_out) if direct else p.mul_(-a)
    else:
        b = (terms["g_ent"] * inv_t).view(-1, 1)
        # p * (-b z - (a - b sum_pz)); grad_out may alias z (inplace_grad): elementwise, safe
        g = torch.mul(z, -b, out=grad_out) if direct else z.mul(-b)
        g.sub_(a - b * sum_pz).mul_(p)
    g.scatter_add_(1, y[:, None], a)
    if not bool(valid.all()):
        g.masked_fill_(~valid[:, None], 0.0)
    if not direct:
        grad_out.copy_(g)
    return terms


def token_level(logits: torch.Tensor, x: RowInputs, opts: LossOptions, out: dict,
                grad: Optional[torch.Tensor]):
    """Token-level ratios: stats, objective and gradient chunk by chunk, in one sweep.

    Writes the per-token results into ``out`` and, when ``grad`` is given, ``dL/dlogits``
    into it (``grad`` may be ``logits`` itself: a chunk is read before it is overwritten).
    """
    inv_t = 1.0 / opts.temperature
    step = max(1, CHUNK_BYTES // (4 * max(logits.shape[-1], 1)))
    safe_targets = torch.where(x.valid, x.targets, torch.zeros_like(x.targets)).long()
    for r0, r1 in row_ranges(logits, step):
        sl = slice(r0, r1)
        chunk, vec = row_view(logits, r0, r1), x.rows(sl)
        grad_chunk = None if grad is None else row_view(grad, r0, r1)
        kept = {}

        def terms_fn(logp, ent):
            kept["logp"], kept["ent"] = logp, ent
            terms = token_terms(logp, ent, **vec, opts=opts, need_grad=grad is not None)
            if opts.entropy_coef == 0:
                terms["g_ent"] = None
            return terms

        terms = _stats_and_grad(chunk, safe_targets[sl], vec["valid"], inv_t, terms_fn,
                                grad_chunk)
        if terms is None:                     # non-finite logits: the NaN-safe route
            y = x.targets[sl]
            logp, ent, lse, spz = logprobs.row_stats(chunk, y, opts.temperature,
                                                     x.ignore_index)
            terms = terms_fn(logp, ent)
            if grad is not None:
                logprobs.grad_logits(chunk, y, lse, spz, terms["g_logp"], terms["g_ent"],
                                     opts.temperature, x.ignore_index, out=grad_chunk)
        _write_terms(out, sl, vec["valid"], kept["logp"], kept["ent"], terms)


def sequence_level(logits: torch.Tensor, x: RowInputs, opts: LossOptions, out: dict,
                   grad: Optional[torch.Tensor], ops):
    """Sequence-level ratios (GSPO): a stats pass, ``[B, T]`` coefficients, a gradient pass.

    ``ops`` is a backend's logprobs module (``row_stats``, ``grad_logits``): the same three
    steps serve the CPU path and the Triton kernels.
    """
    device = logits.device
    stats = tuple(torch.empty(x.B * x.T, dtype=torch.float32, device=device) for _ in range(4))
    logp, ent, lse, spz = ops.row_stats(logits, x.targets, opts.temperature, x.ignore_index,
                                        out=stats)
    vec = x.seqs()
    shape = (x.B, x.T)
    terms = token_terms(logp.view(shape), ent.view(shape), **vec, opts=opts,
                        need_grad=grad is not None)
    _write_terms(out, slice(None), vec["valid"], logp.view(shape), ent.view(shape), terms)
    if grad is not None:
        g_ent = terms["g_ent"] if opts.entropy_coef != 0 else None
        ops.grad_logits(logits, x.targets, lse, spz, terms["g_logp"], g_ent, opts.temperature,
                        x.ignore_index, out=grad)


def hapo_loss_rows(logits, x: RowInputs, opts: LossOptions, out: dict,
                   grad: Optional[torch.Tensor]):
    """The CPU path's entry point (see ``hapo_kernels.loss``)."""
    if opts.importance_sampling == "sequence":
        sequence_level(logits, x, opts, out, grad, logprobs)
    else:
        token_level(logits, x, opts, out, grad)
