"""The loss in two passes over the logits, on any backend: statistics, then the gradient.

Used where a token's loss needs more than its own row: sequence-level importance ratios
(GSPO couples the tokens of a sequence), a vocabulary split over ranks (the statistics are
all-reduced first, ``distributed.VocabParallelOps``) and the fused LM head's vocabulary
blocks (``head.HeadOps``). ``ops`` is anything with a backend's ``row_stats`` and
``grad_logits`` (``backends.Backend``):

1. ``row_stats``: per row ``(logp, entropy, lse, sum_pz)``;
2. the batch's and sequences' statistics (``masks.py``: the entropy-quantile and
   off-policy masks, the batch-mean entropy bonus), then ``objective.token_terms`` on all
   rows at once (shaped ``[B, T]``, or packed with segments): the loss and the two
   per-token derivatives;
3. ``grad_logits``: the gradient rows from those derivatives.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import masks
from .inputs import LossInputs
from .objective import token_terms
from .options import LossOptions
from .outputs import TokenResults, new_buffer


def two_pass_loss(logits: Any, inputs: LossInputs, opts: LossOptions, out: TokenResults,
                  grad: Optional[Any], ops: Any) -> None:
    """The loss into ``out`` and, when ``grad`` is given, ``dL/dlogits`` into it."""
    rows = inputs.rows
    stats = tuple(new_buffer(rows, torch.float32, inputs.targets.device) for _ in range(4))
    logp, ent, lse, spz = ops.row_stats(logits, inputs.targets, opts.temperature,
                                        inputs.ignore_index, out=stats)
    vec = inputs.sequence_vectors()
    shape = (inputs.B, inputs.T)
    sampling = None if inputs.sampling_logp is None else inputs.sampling_logp.view(shape)
    policy_mask, keep_h = masks.policy_mask(
        logp.view(shape), ent.view(shape), vec["valid"], vec["advantages"], vec["old_logp"],
        sampling, opts, inputs.segments, inputs.process_group)
    entropy_weights = None
    if opts.entropy_mean and opts.entropy_coef != 0:
        entropy_weights = masks.entropy_mean_weights(vec["valid"], keep_h)
    terms = token_terms(logp.view(shape), ent.view(shape), **vec, opts=opts,
                        need_grad=grad is not None, policy_mask=policy_mask,
                        entropy_weights=entropy_weights)
    out.write(slice(None), vec["valid"], logp.view(shape), ent.view(shape), terms)
    if grad is not None:
        g_ent = terms.g_entropy if opts.entropy_coef != 0 else None
        ops.grad_logits(logits, inputs.targets, lse, spz, terms.g_logp, g_ent,
                        opts.temperature, inputs.ignore_index, out=grad)
