"""The fused HAPO/GRPO loss on CPU tensors: chunked torch (DESIGN sections 3-5).

Token-level importance sampling runs chunk by chunk over rows, in one sweep: the chunk's
row statistics (torch's fused softmax), the per-token objective and its two scalar
derivatives ``dL/dlogp`` and ``dL/dentropy`` (``token_terms``), then the chunk's gradient
rows while the chunk is still in cache. Peak extra memory is the gradient (nothing more
with ``inplace_grad``) plus two float32 chunk temporaries. The chunk primitives are
``cpu.logprobs``'s, shared by every CPU path.

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


def token_level(logits: torch.Tensor, x: RowInputs, opts: LossOptions, out: dict,
                grad: Optional[torch.Tensor]):
    """Token-level ratios: stats, objective and gradient chunk by chunk, in one sweep.

    Writes the per-token results into ``out`` and, when ``grad`` is given, ``dL/dlogits``
    into it (``grad`` may be ``logits`` itself: a chunk is read before it is overwritten).
    """
    inv_t = 1.0 / opts.temperature
    safe, held, _ = logprobs._targets(x.targets, x.ignore_index, logits.shape[-1])
    for r0, r1 in logprobs.row_ranges(logits, logprobs.chunk_rows(logits.shape[-1])):
        sl = slice(r0, r1)
        vec = x.rows(sl)
        z, owned = logprobs.scaled_rows(logprobs.row_view(logits, r0, r1), inv_t)
        lp, p, _, ent, logp = logprobs.chunk_stats(z, owned, safe[sl],
                                                   for_grad=grad is not None)
        del z                                 # the chunk copy: now lp, in place
        terms = token_terms(logp.view(-1), ent.view(-1), **vec, opts=opts,
                            need_grad=grad is not None)
        if grad is not None:
            g_ent = terms["g_ent"] if opts.entropy_coef != 0 else None
            logprobs.chunk_grad(lp, p, ent, (terms["g_logp"] * inv_t).view(-1, 1),
                                None if g_ent is None else (g_ent * inv_t).view(-1, 1),
                                safe[sl], held[sl], vec["valid"],
                                logprobs.row_view(grad, r0, r1))
        _write_terms(out, sl, vec["valid"], logp.view(-1), ent.view(-1), terms)


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
