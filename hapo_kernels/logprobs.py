"""``selective_log_softmax``: log-probabilities (and entropy) of target tokens (DESIGN 3, 8).

A drop-in for TRL's ``selective_log_softmax`` and verl's ``logprobs_from_logits`` that never
materialises the ``[tokens, vocab]`` log-softmax: the forward reads the logits once and keeps
four floats per row; the backward recomputes ``p`` from the saved ``lse``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import options as O
from .cpu import logprobs as cpu_logprobs
from .dispatch import backend_for
from .packed import packed_segments


def _impl(backend):
    """A backend's module by name, or an object with the same API (vocab-parallel ops)."""
    if not isinstance(backend, str):
        return backend
    if backend == "cpu":
        return cpu_logprobs
    from .triton import logprobs as triton_logprobs   # imported lazily: triton is optional
    return triton_logprobs


class SelectiveLogSoftmax(torch.autograd.Function):
    """``(logp, entropy)`` float32 of ``target_ids``' shape; differentiable w.r.t. logits.

    Inputs must be validated (``selective_log_softmax`` does it). Gradients flow through
    both outputs; an unused output costs nothing in the backward.
    """

    @staticmethod
    def forward(ctx, logits, target_ids, temperature, ignore_index, backend,
                need_entropy=True):
        impl = _impl(backend)
        # Without the entropy output (need_entropy=False) its gradient is never asked for.
        kw = {} if need_entropy else {"need_entropy": False}
        logp, ent, lse, spz = impl.row_stats(logits, target_ids, temperature, ignore_index,
                                             **kw)
        ctx.save_for_backward(logits, target_ids, lse, spz)
        ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
        ctx.set_materialize_grads(False)
        shape = target_ids.shape
        return logp.reshape(shape), ent.reshape(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, target_ids, lse, spz = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return None, None, None, None, None, None
        grad = _impl(ctx.backend).grad_logits(logits, target_ids, lse, spz, g_logp, g_ent,
                                             ctx.temperature, ctx.ignore_index)
        return grad, None, None, None, None, None


def selective_log_softmax(logits, target_ids, temperature=1.0, ignore_index=O.IGNORE_INDEX,
                          return_entropy=False, *, cu_seqlens=None, vocab_parallel_group=None):
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
    if vocab_parallel_group is not None:
        from .distributed import vocab_shard
        shard = vocab_shard(logits, vocab_parallel_group)
    O.check_logits_and_targets(logits, target_ids, ignore_index,
                               vocab_size=None if shard is None else shard.vocab_size)
    packed_segments(logits, target_ids, cu_seqlens)
    temperature = O.check_temperature(temperature)
    backend = backend_for(logits)
    if shard is not None:
        from .distributed import VocabParallelOps
        backend = VocabParallelOps(_impl(backend), shard)
    logp, ent = SelectiveLogSoftmax.apply(logits, target_ids, temperature, ignore_index,
                                          backend, return_entropy or shard is not None)
    return (logp, ent) if return_entropy else logp
