"""Aggregation (docs/design.md section 5) as per-token weights, shared by the fast paths.

verl's names follow verl's ``agg_loss`` (fully masked sequences left out of the sequence
means, ``dp_size`` and the global counts ``normalizer`` / ``num_sequences`` / ``max_len``);
TRL's aliases follow TRL (every row counted). Every aggregation mode is a weighted sum
``loss = sum_it w_it * l_it`` whose weights depend only on the mask, so the fast paths
compute them once before the launch; the backward then only scales by ``grad_output``.
The float64 reference implements the modes literally and the tests hold the two against
each other.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .options import AGGREGATION_ALIASES, LossOptions


def token_normalizer(valid: torch.Tensor, opts: LossOptions, group: Any = None) -> torch.Tensor:
    """N for ``token-mean``: the ``normalizer`` argument, else the token count.

    For the ``dapo`` alias the count is global: all-reduced over ``group`` (the default
    process group when None) when torch.distributed is initialised, divided by the group's
    size (TRL's ``num_items_in_batch / num_processes``). Given an explicit ``group``,
    ``token-mean`` by its canonical name counts globally too; ``bnpo`` stays per batch.
    """
    if opts.normalizer is not None:
        return torch.tensor(opts.normalizer, dtype=torch.float64, device=valid.device)
    count = valid.sum(dtype=torch.float64)
    alias = opts.aggregation
    global_count = alias == "dapo" or (group is not None and alias == "token-mean")
    if global_count and dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count, group=group)
        return count.clamp(min=1.0) / dist.get_world_size(group)
    return count.clamp(min=1.0)


def sequence_count(valid: torch.Tensor, opts: LossOptions, segments: Any = None) -> torch.Tensor:
    """B of the ``seq-mean-*`` modes: ``num_sequences`` if given, else the sequences that
    hold a valid token (verl's ``agg_loss`` leaves fully masked ones out), or every
    sequence under TRL's aliases (``grpo``, ``dr_grpo``: a fully masked row counts as 0).
    float64 scalar; at least 1."""
    if opts.num_sequences is not None:
        return torch.tensor(opts.num_sequences, dtype=torch.float64, device=valid.device)
    if segments is None:
        n_seq = valid.shape[0]
        nonempty = valid.reshape(n_seq, -1).any(-1).sum(dtype=torch.float64) if n_seq else None
    else:
        n_seq = segments.count
        nonempty = (segments.sum(valid.reshape(-1).to(torch.float64)) > 0).sum(
            dtype=torch.float64) if n_seq else None
    if opts.aggregation in AGGREGATION_ALIASES or nonempty is None:
        return torch.tensor(float(max(n_seq, 1)), dtype=torch.float64, device=valid.device)
    return nonempty.clamp(min=1.0)


def aggregation_weights(valid: torch.Tensor, opts: LossOptions, segments: Any = None,
                        group: Any = None) -> torch.Tensor:
    """float32 weights with ``loss = sum(w * l)``; zero on invalid tokens.

    ``valid`` is ``[B, T]`` (sequences are rows, the padded width is T), or packed ``[N]``
    with ``segments`` (a ``packed.Segments``: sequences are its segments, the padded width
    its longest one), which gives the same weights as the padded batch. ``group``: see
    ``token_normalizer``. Every weight is multiplied by ``opts.dp_size`` and
    ``opts.loss_scale``.
    """
    if segments is None:
        m = valid.to(torch.float64)
        seq_tokens = m.sum(-1, keepdim=True)          # each token's sequence length
        width = valid.shape[-1]
    else:
        m = valid.reshape(-1).to(torch.float64)
        seq_tokens = segments.broadcast(segments.sum(m))
        width = segments.max_len
    agg = opts.aggregation_mode
    if agg == "token-mean":
        w = m / token_normalizer(valid, opts, group)
    elif agg == "token-sum":
        w = m
    else:
        n_seq = sequence_count(valid, opts, segments)
        if agg == "seq-mean-token-mean":
            w = m / (seq_tokens.clamp(min=1.0) * n_seq)
        elif agg == "seq-mean-token-sum":
            w = m / n_seq
        elif agg == "seq-mean-token-sum-norm":
            w = m / (n_seq * (opts.max_len if opts.max_len is not None else width))
        else:  # LossOptions has already rejected anything else
            raise ValueError(f"aggregation={agg!r} is not known")
    # A known scale (gradient accumulation) rides on the weights: no pass of its own.
    return (w * (opts.dp_size * opts.loss_scale)).to(torch.float32)
