"""The LM head fused with the loss: from hidden states to loss and gradients, never ``[N, V]``.

``fused_linear_hapo_loss(hidden, weight, target_ids, advantages, ...)`` equals
``fused_hapo_loss(hidden @ weight.T + bias, target_ids, advantages, ...)`` and
``fused_linear_selective_log_softmax`` equals ``selective_log_softmax`` on the same logits,
but the logits only ever exist one chunk of tokens at a time (``cpu.linear``; a chunk of
tokens times a block of vocabulary where even that is too large). Like ``fused_hapo_loss``,
the loss computes its gradients during the forward: per chunk, logits by matmul, the
backend's loss kernel writes the logits' gradient over them, and two more matmuls push it
into ``hidden``'s and ``weight``'s gradients; the backward only scales by ``grad_output``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from . import options as O
from .cpu import linear as impl
from .cpu.loss import RowInputs, sequence_level
from .dispatch import backend_for
from .loss import loss_and_extras, loss_output, per_token_buffers, prepare_rows
from .outputs import LossOutput


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer written row by row comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _ops(tensor):
    """The backend's ``(loss, logprobs)`` modules for chunks of ``tensor``'s device."""
    if backend_for(tensor) == "triton":
        from .triton import logprobs, loss
    else:
        from .cpu import logprobs, loss
    return loss, logprobs


# --------------------------------------------------------------------------- validation
def check_linear_inputs(hidden, weight, bias, target_ids, ignore_index):
    """Shapes, dtypes and devices of the head, then ``target_ids`` against ``hidden``'s rows
    and ``V`` (``options.check_target_ids``); returns ``V``. Reads only the targets."""
    O.check_ignore_index(ignore_index)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or packed [N, H], got shape "
                         f"{tuple(hidden.shape)}")
    if hidden.dtype not in O.LOGIT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in O.LOGIT_DTYPES)
        raise ValueError(f"hidden must be one of {names}; got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H] (the LM head, nn.Linear layout), got shape "
                         f"{tuple(weight.shape)}")
    V, H = weight.shape
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight [V, H] has H={H} but hidden has H={hidden.shape[-1]} "
                         f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})")
    if V < 1:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; they must "
                         "match (cast one, e.g. under autocast, before the call)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias is {bias.dtype} but hidden is {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden on {hidden.device}")
    O.check_target_ids(target_ids, hidden.shape[:-1], V, hidden.device, ignore_index,
                       source="hidden", source_shape=hidden.shape)
    return V


def _wants(hidden, weight, bias):
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)


# --------------------------------------------------------------------------- the loss
class FusedLinearHAPOLoss(torch.autograd.Function):
    """``FusedLinearHAPOLoss.apply(hidden, weight, bias, rows, opts, chunks, wants,
    fp32_accumulate)``: ``hidden`` ``[N, H]``, ``rows`` a validated ``cpu.loss.RowInputs``,
    ``wants`` which of hidden / weight / bias autograd will ask for (decided outside: grad
    mode is off inside ``forward``). Returns ``(loss, per_token_loss, logp, entropy, ratio,
    clip_low, clip_high, kl)`` like ``FusedHAPOLoss``; only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows: RowInputs, opts: O.LossOptions,
                chunks: impl.Chunks, wants, fp32_accumulate: bool):
        device, n = hidden.device, hidden.shape[0]
        out = per_token_buffers(n, rows.ref_logp is not None, device, _empty)
        grads = impl.Grads(hidden, weight, bias, *wants, fp32_accumulate, _empty)
        loss_ops, logprob_ops = _ops(hidden)
        V = weight.shape[0]
        if opts.importance_sampling == "token" and not chunks.split(V):
            impl.fused_pass(hidden, weight, bias, rows, opts, out, grads, chunks, loss_ops)
        else:
            # Sequence-level ratios couple tokens of different chunks, and vocabulary blocks
            # need every block's statistics first: ``sequence_level``'s stats pass, [B, T]
            # objective and gradient pass, the logits made twice (masked rows skipped).
            targets = torch.where(rows.valid, rows.targets,
                                  torch.full_like(rows.targets, rows.ignore_index))
            sequence_level(hidden, dataclasses.replace(rows, targets=targets), opts, out,
                           grads if grads.any else None,
                           impl.HeadOps(weight, bias, chunks, logprob_ops))
        # Kept on ctx, not save_for_backward: the backward hands them over and drops its own
        # reference, so autograd can adopt them as .grad without a copy (no second [V, H]).
        ctx.grads = grads.finish()
        return loss_and_extras(ctx, out, device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_hapo_loss: backward ran twice; its gradients are "
                               "computed once in the forward and handed over by the first")
        grads, ctx.grads = list(ctx.grads), None
        if grad_loss is not None and float(grad_loss) != 1.0:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (*grads, None, None, None, None, None)


def fused_linear_hapo_loss(hidden, weight, target_ids, advantages=None, bias=None,
                           chunk_size=None, *, mask=None, old_logp=None, ref_logp=None,
                           teacher_mask=None, temperature=1.0, eps_low=0.2, eps_high=0.2,
                           dual_clip=None, beta=0.0, entropy_coef=0.0,
                           importance_sampling="token", teacher_objective="shaped",
                           teacher_gamma=O.TEACHER_GAMMA, sft_weight=1.0,
                           aggregation="token-mean", normalizer=None, max_len=None,
                           inplace_grad=False, ignore_index=O.IGNORE_INDEX, rewards=None,
                           group_size=None, scale="group", stats="all", eps=O.ADVANTAGE_EPS,
                           inject=None, teacher_reward=O.TEACHER_REWARD, cu_seqlens=None,
                           process_group=None, vocab_chunk_size=None,
                           fp32_accumulate=True) -> LossOutput:
    """``fused_hapo_loss(hidden @ weight.T + bias, ...)`` without ever holding the logits.

    ``hidden`` ``[B, T, H]`` (targets ``[B, T]``) or packed ``[N, H]`` (targets ``[N]``);
    ``weight`` ``[V, H]`` (``lm_head.weight``) and ``bias`` ``[V]`` or None, all of one dtype
    (fp32, bf16, fp16) and device. Every option of ``fused_hapo_loss`` is accepted with the
    same meaning, ``rewards=`` / ``group_size=``, ``cu_seqlens`` (packed ``[N, H]`` hidden
    states) and ``process_group`` included; ``inplace_grad`` is accepted for compatibility
    and changes nothing (the logits chunks are internal and always reused). Not supported:
    ``vocab_parallel_group`` (a vocabulary-sharded head).

    ``out.loss`` is differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. The gradients
    are computed in the forward; ``weight``'s is skipped entirely when it does not require
    grad (a frozen head, as with LoRA). ``weight`` / ``bias`` gradients are summed in float32
    when they are bf16 / fp16 (``fp32_accumulate=False``: in their own dtype, saving
    ``4 V H`` bytes at the cost of ``N / chunk_size`` roundings).

    Memory: ``chunk_size`` tokens at a time; by default as many as fit a ``[chunk, V]``
    slice in 256 MiB on CUDA (in the logits' dtype: 883 rows at V = 151936 in bf16) or in
    32 MiB of float32 on CPU (256 rows at V = 32768); see ``cpu.linear.plan_chunks``. Where
    that is fewer than 128 (CUDA) / 16 (CPU) rows, the vocabulary is also split
    (``vocab_chunk_size`` columns per block; an online logsumexp joins the blocks). Token-level ratios with full-width chunks
    make each chunk's logits once; sequence-level ratios (GSPO) or vocabulary blocks make
    them twice (a statistics pass, then the gradient pass).
    """
    O.check_bool("inplace_grad", inplace_grad)
    O.check_bool("fp32_accumulate", fp32_accumulate)
    V = check_linear_inputs(hidden, weight, bias, target_ids, ignore_index)
    chunks = impl.plan_chunks(target_ids.numel(), V, hidden.device, hidden.dtype, chunk_size,
                              vocab_chunk_size)
    prep = prepare_rows(
        hidden, target_ids, advantages, source_name="hidden", ignore_index=ignore_index,
        mask=mask, old_logp=old_logp, ref_logp=ref_logp, teacher_mask=teacher_mask,
        rewards=rewards, group_size=group_size, scale=scale, stats=stats, eps=eps,
        inject=inject, teacher_reward=teacher_reward, cu_seqlens=cu_seqlens,
        process_group=process_group, temperature=temperature,
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta,
        entropy_coef=entropy_coef, importance_sampling=importance_sampling,
        teacher_objective=teacher_objective, teacher_gamma=teacher_gamma,
        sft_weight=sft_weight, aggregation=aggregation, normalizer=normalizer,
        max_len=max_len)
    results = FusedLinearHAPOLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, prep.rows, prep.opts, chunks,
        _wants(hidden, weight, bias), fp32_accumulate)
    return loss_output(results, prep)


# --------------------------------------------------------------------------- log-probs
class FusedLinearSelectiveLogSoftmax(torch.autograd.Function):
    """``(logp, entropy)`` float32 ``[N]`` of ``hidden2d @ weight.T + bias``; the forward keeps
    four floats per row, the backward makes the logits again chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, chunks):
        n = hidden.shape[0]
        stats = tuple(_empty(n, torch.float32, hidden.device) for _ in range(4))
        impl.stats_pass(hidden, weight, bias, targets, temperature, ignore_index, chunks,
                        _ops(hidden)[1], stats)
        logp, ent, lse, spz = stats
        ctx.save_for_backward(hidden, weight, bias, targets, lse, spz)
        ctx.args = (temperature, ignore_index, chunks)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, spz = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if not any(need) or (g_logp is None and g_ent is None):
            return (None,) * 7
        temperature, ignore_index, chunks = ctx.args
        grads = impl.Grads(hidden, weight, bias, *need, True, _empty)
        impl.grad_pass(hidden, weight, bias, targets, lse, spz,
                       None if g_logp is None else g_logp.float().contiguous(),
                       None if g_ent is None else g_ent.float().contiguous(),
                       temperature, ignore_index, chunks, _ops(hidden)[1], grads)
        return (*grads.finish(), None, None, None, None)


def fused_linear_selective_log_softmax(hidden, weight, target_ids, bias=None, temperature=1.0,
                                       return_entropy=False, ignore_index=O.IGNORE_INDEX,
                                       chunk_size=None, vocab_chunk_size=None):
    """``selective_log_softmax(hidden @ weight.T + bias, target_ids, ...)`` chunk by chunk.

    Same shapes as ``fused_linear_hapo_loss``; returns float32 ``logp`` of ``target_ids``'
    shape (and the entropy with ``return_entropy=True``), differentiable w.r.t. ``hidden``,
    ``weight`` and ``bias``. The backward makes each chunk's logits again (one matmul more
    than the materialised path) and holds only one chunk of them. Chunking as in
    ``fused_linear_hapo_loss``.
    """
    temperature = O.check_temperature(temperature)
    V = check_linear_inputs(hidden, weight, bias, target_ids, ignore_index)
    chunks = impl.plan_chunks(target_ids.numel(), V, hidden.device, hidden.dtype, chunk_size,
                              vocab_chunk_size)
    logp, ent = FusedLinearSelectiveLogSoftmax.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        target_ids.reshape(-1).contiguous(), temperature, ignore_index, chunks)
    shape = target_ids.shape
    logp, ent = logp.reshape(shape), ent.reshape(shape)
    return (logp, ent) if return_entropy else logp
