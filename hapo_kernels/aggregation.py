"""Aggregation (DESIGN section 5) as per-token weights, shared by the fast paths.

Every aggregation mode is a weighted sum ``loss = sum_it w_it * l_it`` whose weights depend
only on the mask, so the fast paths compute them once before the launch; the backward then
only scales by ``grad_output``. The float64 reference implements the modes literally and the
tests hold the two against each other.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .options import LossOptions


def token_normalizer(valid: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """N for ``token-mean``: the ``normalizer`` argument, else the token count.

    For the ``dapo`` alias the count is global: all-reduced over the default process group
    when torch.distributed is initialised, divided by the world size (TRL's
    ``num_items_in_batch / num_processes``).
    """
    if opts.normalizer is not None:
        return torch.tensor(opts.normalizer, dtype=torch.float64, device=valid.device)
    count = valid.sum(dtype=torch.float64)
    if opts.aggregation_alias == "dapo" and dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        return count.clamp(min=1.0) / dist.get_world_size()
    return count.clamp(min=1.0)


def aggregation_weights(valid: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """float32 ``[B, T]`` weights with ``loss = sum(w * l)``; zero on invalid tokens."""
    B, T = valid.shape
    m = valid.to(torch.float64)
    agg = opts.aggregation
    if agg == "token-mean":
        w = m / token_normalizer(valid, opts)
    elif agg == "seq-mean-token-mean":
        w = m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)
    elif agg == "seq-mean-token-sum":
        w = m / B
    elif agg == "seq-mean-token-sum-norm":
        w = m / (B * (opts.max_len if opts.max_len is not None else T))
    else:  # parse_loss_options has already rejected anything else
        raise ValueError(f"aggregation={agg!r} is not known")
    return w.to(torch.float32)
