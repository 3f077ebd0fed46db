"""The LM head fused with the loss: from hidden states to loss and gradients, never ``[N, V]``.

``fused_linear_hapo_loss(hidden, weight, target_ids, advantages, ...)`` equals
``fused_hapo_loss(hidden @ weight.T + bias, target_ids, advantages, ...)`` and
``fused_linear_selective_log_softmax`` equals ``selective_log_softmax`` on the same logits,
but the logits only ever exist one chunk of tokens at a time (``head``; a chunk of
tokens times a block of vocabulary where even that is too large). Like ``fused_hapo_loss``,
the loss computes its gradients during the forward: per chunk, logits by matmul, the
backend's loss kernel writes the logits' gradient over them, and two more matmuls push it
into ``hidden``'s and ``weight``'s gradients; the backward only scales by ``grad_output``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from . import head
from .backends import backend_for
from .inputs import LossInputs, check_target_ids
from .loss import call_arguments, data_parallel, finish_forward, loss_output, prepare_loss
from .options import (
    IGNORE_INDEX,
    LOGIT_DTYPES,
    AdvantageOptions,
    LossOptions,
    check_bool,
    check_ignore_index,
    check_temperature,
    split_options,
)
from .outputs import LossOutput, TokenResults, first_order_backward, new_buffer
from .twopass import two_pass_loss


# --------------------------------------------------------------------------- validation
def check_linear_inputs(hidden: Any, weight: Any, bias: Any, target_ids: Any,
                        ignore_index: int) -> int:
    """Shapes, dtypes and devices of the head, then ``target_ids`` against ``hidden``'s rows
    and ``V`` (``inputs.check_target_ids``); returns ``V``. Reads only the targets."""
    check_ignore_index(ignore_index)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or packed [N, H], got shape "
                         f"{tuple(hidden.shape)}")
    if hidden.dtype not in LOGIT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in LOGIT_DTYPES)
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
    check_target_ids(target_ids, hidden.shape[:-1], V, hidden.device, ignore_index,
                     source="hidden", source_shape=hidden.shape)
    return V


def _wants(hidden: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor]) -> Tuple[bool, bool, bool]:
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)


# --------------------------------------------------------------------------- the loss
class FusedLinearHAPOLossFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, inputs, opts, chunks, wants, fp32_accumulate)``:
    ``hidden`` ``[N, H]``, ``inputs`` a validated ``LossInputs``,
    ``wants`` which of hidden / weight / bias autograd will ask for (decided outside: grad
    mode is off inside ``forward``). Returns ``(loss, per_token_loss, logp, entropy, ratio,
    clip_low, clip_high, kl)`` like ``FusedHAPOLossFunction``; only ``loss`` is
    differentiable.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], inputs: LossInputs, opts: LossOptions,
                chunks: head.Chunks, wants: Tuple[bool, bool, bool],
                fp32_accumulate: bool) -> tuple:
        """Loss, per-token results and every wanted gradient, chunk by chunk."""
        device, n = hidden.device, hidden.shape[0]
        out = TokenResults.allocate(n, inputs.ref_logp is not None, device)
        grads = head.Grads(hidden, weight, bias, *wants, fp32_accumulate)
        backend = backend_for(hidden)
        V = weight.shape[0]
        if not opts.statistics_first and not chunks.split(V):
            head.fused_pass(hidden, weight, bias, inputs, opts, out, grads, chunks, backend)
        else:
            # Sequence or batch statistics couple tokens of different chunks, and vocabulary blocks
            # need every block's statistics first: the two-pass loss (statistics, [B, T]
            # objective, gradient), the logits made twice (masked rows skipped).
            targets = torch.where(inputs.valid, inputs.targets,
                                  torch.full_like(inputs.targets, inputs.ignore_index))
            two_pass_loss(hidden, dataclasses.replace(inputs, targets=targets), opts, out,
                          grads if grads.any else None,
                          head.HeadOps(weight, bias, chunks, backend))
        # Kept on ctx, not save_for_backward: the backward hands them over and drops its own
        # reference, so autograd can adopt them as .grad without a copy (no second [V, H]).
        ctx.grads = grads.finish()
        return finish_forward(ctx, out, device)

    @staticmethod
    @first_order_backward("fused_linear_hapo_loss")
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple:
        """Hands over the gradients computed in the forward, scaled by ``grad_loss``."""
        if ctx.grads is None:
            raise RuntimeError("fused_linear_hapo_loss: backward ran twice; its gradients are "
                               "computed once in the forward and handed over by the first")
        grads, ctx.grads = list(ctx.grads), None
        if grad_loss is not None:       # in place, no host read of grad_loss on CUDA
            for g in grads:
                if g is not None:
                    backend_for(g).scale_gradient_(g, grad_loss)
        return (*grads, None, None, None, None, None)


def fused_linear_hapo_loss(hidden: torch.Tensor, weight: torch.Tensor,
                           target_ids: torch.Tensor,
                           advantages: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None,
                           chunk_size: Optional[int] = None, *,
                           mask: Optional[torch.Tensor] = None,
                           old_logp: Optional[torch.Tensor] = None,
                           ref_logp: Optional[torch.Tensor] = None,
                           teacher_mask: Optional[torch.Tensor] = None,
                           options: Optional[LossOptions] = None,
                           advantage_options: Optional[AdvantageOptions] = None,
                           inplace_grad: bool = False, ignore_index: int = IGNORE_INDEX,
                           rewards: Optional[torch.Tensor] = None,
                           group_size: Optional[int] = None,
                           inject: Optional[torch.Tensor] = None,
                           cu_seqlens: Optional[torch.Tensor] = None,
                           per_sequence: Optional[bool] = None,
                           process_group: Any = None, vocab_chunk_size: Optional[int] = None,
                           fp32_accumulate: bool = True,
                           rollout_is_weights: Optional[torch.Tensor] = None,
                           sampling_logp: Optional[torch.Tensor] = None,
                           **option_values: Any) -> LossOutput:
    """``fused_hapo_loss(hidden @ weight.T + bias, ...)`` without ever holding the logits.

    ``hidden`` ``[B, T, H]`` (targets ``[B, T]``) or packed ``[N, H]`` (targets ``[N]``);
    ``weight`` ``[V, H]`` (``lm_head.weight``) and ``bias`` ``[V]`` or None, all of one dtype
    (fp32, bf16, fp16) and device. Every option of ``fused_hapo_loss`` is accepted with the
    same meaning, ``rewards=`` / ``group_size=``, ``cu_seqlens`` (packed ``[N, H]`` hidden
    states), ``per_sequence`` and ``process_group`` included; ``inplace_grad`` is accepted
    for compatibility and changes nothing (the logits chunks are internal and always
    reused). Not supported: ``vocab_parallel_group`` (a vocabulary-sharded head).

    ``out.loss`` is differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. The gradients
    are computed in the forward; ``weight``'s is skipped entirely when it does not require
    grad (a frozen head, as with LoRA). ``weight`` / ``bias`` gradients are summed in float32
    when they are bf16 / fp16 (``fp32_accumulate=False``: in their own dtype, saving
    ``4 V H`` bytes at the cost of ``N / chunk_size`` roundings).

    Memory: ``chunk_size`` tokens at a time; by default as many as fit a ``[chunk, V]``
    slice in 256 MiB on CUDA (in the logits' dtype: 883 rows at V = 151936 in bf16) or in
    32 MiB of float32 on CPU (256 rows at V = 32768); see ``head.plan_chunks``. Where
    that is fewer than 128 (CUDA) / 16 (CPU) rows, the vocabulary is also split
    (``vocab_chunk_size`` columns per block; an online logsumexp joins the blocks).
    Token-level ratios with full-width chunks make each chunk's logits once; sequence-level
    ratios (GSPO) or vocabulary blocks make them twice (a statistics pass, then the gradient pass).
    """
    (opts, adv_opts), (mask, old_logp, ref_logp, rollout_is_weights, sampling_logp) = \
        call_arguments(option_values, options, advantage_options, mask=mask, old_logp=old_logp,
                       ref_logp=ref_logp, rollout_is_weights=rollout_is_weights,
                       sampling_logp=sampling_logp)
    error = chunks = None
    try:
        check_bool("inplace_grad", inplace_grad)
        check_bool("fp32_accumulate", fp32_accumulate)
        V = check_linear_inputs(hidden, weight, bias, target_ids, ignore_index)
        chunks = head.plan_chunks(target_ids.numel(), V, hidden.device, hidden.dtype,
                                  chunk_size, vocab_chunk_size)
    except ValueError as e:
        if not data_parallel(opts, process_group):
            raise
        error = e                       # raised by every rank together (prepare_loss)
    inputs = prepare_loss(
        hidden, target_ids, advantages, opts, adv_opts, source_name="hidden",
        ignore_index=ignore_index, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
        teacher_mask=teacher_mask, rewards=rewards, group_size=group_size, inject=inject,
        cu_seqlens=cu_seqlens, process_group=process_group, per_sequence=per_sequence,
        rollout_is_weights=rollout_is_weights, sampling_logp=sampling_logp,
        error=error, op="fused_linear_hapo_loss")
    results = FusedLinearHAPOLossFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, inputs, opts, chunks,
        _wants(hidden, weight, bias), fp32_accumulate)
    return loss_output(results, inputs)


# --------------------------------------------------------------------------- log-probs
class FusedLinearSelectiveLogSoftmaxFunction(torch.autograd.Function):
    """``(logp, entropy)`` float32 ``[N]`` of ``hidden2d @ weight.T + bias``; the forward keeps
    four floats per row, the backward makes the logits again chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], targets: torch.Tensor, temperature: float,
                ignore_index: int, chunks: head.Chunks) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logp, entropy)`` per row; keeps four floats per row for the backward."""
        n = hidden.shape[0]
        stats = tuple(new_buffer(n, torch.float32, hidden.device) for _ in range(4))
        head.stats_pass(hidden, weight, bias, targets, temperature, ignore_index, chunks,
                        backend_for(hidden), stats)
        logp, ent, lse, spz = stats
        ctx.save_for_backward(hidden, weight, bias, targets, lse, spz)
        ctx.args = (temperature, ignore_index, chunks)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    @first_order_backward("fused_linear_selective_log_softmax")
    def backward(ctx: Any, g_logp: Optional[torch.Tensor],
                 g_ent: Optional[torch.Tensor]) -> tuple:
        """Makes each chunk's logits again and accumulates the input gradients."""
        hidden, weight, bias, targets, lse, spz = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if not any(need) or (g_logp is None and g_ent is None):
            return (None,) * 7
        temperature, ignore_index, chunks = ctx.args
        grads = head.Grads(hidden, weight, bias, *need, True)
        head.grad_pass(hidden, weight, bias, targets, lse, spz,
                       None if g_logp is None else g_logp.float().contiguous(),
                       None if g_ent is None else g_ent.float().contiguous(),
                       temperature, ignore_index, chunks, backend_for(hidden), grads)
        return (*grads.finish(), None, None, None, None)


def fused_linear_selective_log_softmax(
        hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor,
        bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
        return_entropy: bool = False, ignore_index: int = IGNORE_INDEX,
        chunk_size: Optional[int] = None, vocab_chunk_size: Optional[int] = None
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``selective_log_softmax(hidden @ weight.T + bias, target_ids, ...)`` chunk by chunk.

    Same shapes as ``fused_linear_hapo_loss``; returns float32 ``logp`` of ``target_ids``'
    shape (and the entropy with ``return_entropy=True``), differentiable w.r.t. ``hidden``,
    ``weight`` and ``bias``. The backward makes each chunk's logits again (one matmul more
    than the materialised path) and holds only one chunk of them. Chunking as in
    ``fused_linear_hapo_loss``.
    """
    temperature = check_temperature(temperature)
    check_bool("return_entropy", return_entropy)
    V = check_linear_inputs(hidden, weight, bias, target_ids, ignore_index)
    chunks = head.plan_chunks(target_ids.numel(), V, hidden.device, hidden.dtype, chunk_size,
                              vocab_chunk_size)
    logp, ent = FusedLinearSelectiveLogSoftmaxFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        target_ids.reshape(-1).contiguous(), temperature, ignore_index, chunks)
    shape = target_ids.shape
    logp, ent = logp.reshape(shape), ent.reshape(shape)
    return (logp, ent) if return_entropy else logp


class FusedLinearHAPOLoss(nn.Module):
    """``fused_linear_hapo_loss`` as a module over an LM head's ``weight`` / ``bias``.

    ``FusedLinearHAPOLoss(beta=0.04)`` or ``(options=opts, chunk_size=...)``;
    ``forward(hidden, weight, target_ids, advantages, bias=None, **call_options)`` returns
    the ``LossOutput``; ``call_options`` are per-call keywords of ``fused_linear_hapo_loss``.
    """

    def __init__(self, options: Optional[LossOptions] = None, *,
                 chunk_size: Optional[int] = None, fp32_accumulate: bool = True,
                 **option_values: Any) -> None:
        super().__init__()
        self.options, self.advantage_options = split_options(option_values, options)
        self.chunk_size = chunk_size
        self.fp32_accumulate = check_bool("fp32_accumulate", fp32_accumulate)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor,
                advantages: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, **call_options: Any) -> LossOutput:
        """The loss of ``hidden @ weight.T + bias`` (see ``fused_linear_hapo_loss``)."""
        call_options.setdefault("chunk_size", self.chunk_size)
        call_options.setdefault("fp32_accumulate", self.fp32_accumulate)
        return fused_linear_hapo_loss(hidden, weight, target_ids, advantages, bias,
                                      options=self.options,
                                      advantage_options=self.advantage_options,
                                      **call_options)
