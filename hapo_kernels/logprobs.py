"""``selective_log_softmax``: log-probabilities and entropies of target tokens.

docs/design.md sections 3 and 8.

A drop-in for TRL's ``selective_log_softmax`` and verl's ``logprobs_from_logits`` that never
materialises the ``[tokens, vocab]`` log-softmax: the forward reads the logits once and keeps
four floats per row; the backward recomputes ``p`` from the saved ``lse``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from .backends import Backend, backend_for
from .distributed import VocabParallelOps, VocabShard, checksum, handshake, vocab_shard
from .inputs import UNBOUNDED, check_logits_and_targets, check_target_ids
from .options import IGNORE_INDEX, check_bool, check_temperature
from .outputs import first_order_backward
from .packed import packed_segments


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    """``(logp, entropy)`` float32 of ``target_ids``' shape; differentiable w.r.t. logits.

    Inputs must be validated (``selective_log_softmax`` does it). Gradients flow through
    both outputs; an unused output costs nothing in the backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target_ids: torch.Tensor, temperature: float,
                ignore_index: int, backend: Backend,
                need_entropy: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        # Without the entropy output (need_entropy=False) its gradient is never asked for.
        """``(logp, entropy)`` per row on the given backend; keeps ``lse`` and ``sum p*z``."""
        kw = {} if need_entropy else {"need_entropy": False}
        logp, ent, lse, spz = backend.row_stats(logits, target_ids, temperature, ignore_index,
                                                **kw)
        ctx.save_for_backward(logits, target_ids, lse, spz)
        ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
        ctx.set_materialize_grads(False)
        shape = target_ids.shape
        return logp.reshape(shape), ent.reshape(shape)

    @staticmethod
    @first_order_backward("selective_log_softmax")
    def backward(ctx: Any, g_logp: Optional[torch.Tensor],
                 g_ent: Optional[torch.Tensor]) -> tuple:
        """The logits' gradient from the upstream gradients of ``logp`` and ``entropy``."""
        logits, target_ids, lse, spz = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None, None
        grad = ctx.backend.grad_logits(logits, target_ids, lse, spz, g_logp, g_ent,
                                       ctx.temperature, ctx.ignore_index)
        return grad, None, None, None, None, None


def selective_log_softmax(logits: torch.Tensor, target_ids: torch.Tensor,
                          temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                          return_entropy: bool = False, *,
                          cu_seqlens: Optional[torch.Tensor] = None,
                          vocab_parallel_group: Any = None
                          ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of each target token under ``softmax(logits / temperature)``.

    ``logits`` ``[B, T, V]`` (strided views such as ``logits[:, :-1]`` are read in place) with
    ``target_ids`` ``[B, T]``, or packed ``[N, V]`` with ``[N]``; fp32, bf16 or fp16.
    Returns float32 ``logp`` of ``target_ids``' shape, and the entropy of each row's
    distribution when ``return_entropy=True``. Positions where ``target_ids == ignore_index``
    give 0 and no gradient.

    ``cu_seqlens`` (packed input; see ``hapo_kernels.packed``) is validated and changes
    nothing: a token's log-probability does not depend on its sequence.
    ``vocab_parallel_group``: ``logits`` holds this rank's contiguous slice of the
    vocabulary (rank order, uneven allowed), ``target_ids`` are global; every rank gets
    the unsharded ``logp`` / entropy and, from a loss computed the same way on every rank,
    the gradient of its own slice (``hapo_kernels.distributed``).
    """
    shard = None
    if vocab_parallel_group is None:
        check_bool("return_entropy", return_entropy)
        check_logits_and_targets(logits, target_ids, ignore_index)
        packed_segments(logits, target_ids, cu_seqlens)
        temperature = check_temperature(temperature)
    else:
        temperature, shard = _vocab_parallel_checks(logits, target_ids, temperature,
                                                    ignore_index, return_entropy, cu_seqlens,
                                                    vocab_parallel_group)
    backend = backend_for(logits)
    if shard is not None:
        backend = VocabParallelOps(backend, shard)
    logp, ent = SelectiveLogSoftmaxFunction.apply(logits, target_ids, temperature,
                                                  ignore_index, backend,
                                                  return_entropy or shard is not None)
    return (logp, ent) if return_entropy else logp


def _vocab_parallel_checks(logits: Any, target_ids: Any, temperature: Any, ignore_index: Any,
                           return_entropy: Any, cu_seqlens: Any,
                           group: Any) -> Tuple[float, VocabShard]:
    """This rank's checks, then one ``handshake`` with the other slices' ranks: the
    temperature, ``ignore_index``, the targets (shape and an exact checksum) and the rows
    must be the same on every rank (else every rank raises); returns the temperature and
    this rank's ``VocabShard``. The target range is checked against the whole vocabulary."""
    error = None
    try:
        check_bool("return_entropy", return_entropy)
        check_logits_and_targets(logits, target_ids, ignore_index, vocab_size=UNBOUNDED)
        packed_segments(logits, target_ids, cu_seqlens)
        temperature = check_temperature(temperature)
    except ValueError as e:
        error = e
    ok = error is None
    fields = {"temperature": temperature if ok else None,
              "ignore_index": ignore_index if ok else None,
              "target_ids shape": tuple(target_ids.shape) if ok else None,
              "target_ids": checksum(target_ids) if ok else 0,
              "logits dtype": str(logits.dtype) if ok else None}
    rows = handshake(group, "selective_log_softmax", fields, error=error,
                     counts=[logits.shape[-1] if ok else 0])
    shard = vocab_shard(group, [row[0] for row in rows])
    check_target_ids(target_ids, target_ids.shape, shard.vocab_size, target_ids.device,
                     ignore_index)                # the same targets on every rank
    return temperature, shard


class SelectiveLogSoftmax(nn.Module):
    """``selective_log_softmax`` as a module (``temperature`` and ``return_entropy`` fixed)."""

    def __init__(self, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 return_entropy: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.ignore_index = ignore_index
        self.return_entropy = check_bool("return_entropy", return_entropy)

    def forward(self, logits: torch.Tensor, target_ids: torch.Tensor, **kwargs: Any
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Log-probabilities of ``target_ids`` (see ``selective_log_softmax``)."""
        return selective_log_softmax(logits, target_ids, self.temperature, self.ignore_index,
                                     self.return_entropy, **kwargs)

    def extra_repr(self) -> str:
        """The options that differ from the defaults, for ``repr``."""
        return f"temperature={self.temperature}, return_entropy={self.return_entropy}"
