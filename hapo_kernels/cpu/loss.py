"""The fused token-level loss on CPU tensors: chunked torch (docs/design.md sections 3-5).

One sweep over chunks of rows: the chunk's row statistics (``cpu.logprobs.chunk_stats``:
torch's fused softmax), the per-token objective and its two scalar derivatives
``dL/dlogp`` and ``dL/dentropy`` (``objective.token_terms``, the library's one torch
statement of the formula), then the chunk's gradient rows while the chunk is still in
cache. Peak extra memory is the gradient (nothing more with ``inplace_grad``) plus two
float32 chunk temporaries.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..inputs import LossInputs
from ..objective import token_terms
from ..options import LossOptions
from ..outputs import TokenResults
from . import logprobs


def token_loss(logits: torch.Tensor, inputs: LossInputs, opts: LossOptions,
               out: TokenResults, grad: Optional[torch.Tensor]) -> None:
    """Token-level ratios: stats, objective and gradient chunk by chunk, in one sweep.

    ``grad`` may be ``logits`` itself: a chunk is read before it is overwritten.
    """
    inv_t = 1.0 / opts.temperature
    safe, held, _ = logprobs.safe_targets(inputs.targets, inputs.ignore_index,
                                          logits.shape[-1])
    for r0, r1 in logprobs.row_ranges(logits, logprobs.chunk_rows(logits.shape[-1])):
        sl = slice(r0, r1)
        vec = inputs.token_vectors(sl)
        z, owned = logprobs.scaled_rows(logprobs.row_view(logits, r0, r1), inv_t)
        lp, p, _, ent, logp = logprobs.chunk_stats(z, owned, safe[sl],
                                                   for_grad=grad is not None)
        del z                                 # the chunk copy: now lp, in place
        terms = token_terms(logp.view(-1), ent.view(-1), **vec, opts=opts,
                            need_grad=grad is not None)
        if grad is not None:
            g_ent = terms.g_entropy if opts.entropy_coef != 0 else None
            logprobs.chunk_grad(lp, p, ent, (terms.g_logp * inv_t).view(-1, 1),
                                None if g_ent is None else (g_ent * inv_t).view(-1, 1),
                                safe[sl], held[sl], vec["valid"],
                                logprobs.row_view(grad, r0, r1))
        out.write(sl, vec["valid"], logp.view(-1), ent.view(-1), terms)
