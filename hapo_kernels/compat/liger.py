"""Liger-Kernel 0.8.5's GRPO losses on hapo-kernels: Liger's signatures, defaults and outputs.

    from hapo_kernels.compat.liger import triton_grpo_loss, LigerFusedLinearGRPOLoss

replaces ``from liger_kernel.transformers.grpo_loss import triton_grpo_loss`` and
``from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss`` with no other change:
the same arguments (names, order, defaults: Liger's ``temperature=0.9``, ``beta=0.04``,
``eps_high=0.4`` for ``triton_grpo_loss``), the same return values, Liger's aggregation of
each ``loss_type`` (including its own ``luspo`` formula, which differs from TRL 1.16's) and
its ``num_items_in_batch`` normaliser. Unlike Liger, both run on CPU tensors too.

``triton_grpo_loss`` reads the logits once in the forward (loss, KL and clip flags, no
gradient) and once more in the backward, where it writes the gradient: into the logits'
storage with ``inplace=True`` (Liger's default, and Liger's behaviour: the logits hold
their gradient after ``backward``), so the peak memory is the logits alone.

Every Liger option runs: the loss types grpo, bnpo, dr_grpo, dapo, cispo, sapo, vespo and
luspo, token- and sequence-level ratios, ``delta``, ``use_bias_correction_kl``,
``vllm_is_ratio`` and ``num_items_in_batch``. Liger's own restrictions stay (a
``ValueError``, as in Liger): sequence-level ratios with cispo, sapo or vespo, and in
``triton_grpo_loss`` ``delta`` with those three. One exception:
``LigerFusedLinearGRPOLoss`` with ``"luspo"`` runs with sequence-level ratios and
``beta=0`` only; otherwise Liger's chunked loss also counts the padded tokens' loss, which
these kernels never compute. And with ``"vespo"``, Liger sums ``log vllm_is_ratio`` into the
sequence weight over every position, padding included, these kernels over the valid tokens:
the same wherever padded positions hold 1, as TRL's ratios do.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import head
from ..aggregation import aggregation_weights
from ..inputs import LossInputs, check_logits_and_targets
from ..linear import FusedLinearHAPOLossFunction, fused_linear_selective_log_softmax
from ..loss import loss_output, prepare_loss, run_loss
from ..options import AdvantageOptions, LossOptions
from ..outputs import TokenResults

__all__ = ["triton_grpo_loss", "LigerFusedLinearGRPOLoss", "LigerGRPOLossFunction",
           "liger_options", "liger_weights", "liger_rollout_weights", "LIGER_VERSION",
           "LOSS_TYPES"]

LIGER_VERSION = "0.8.5"     # the version whose signatures and numbers this module follows
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
# Liger's loss types that are an objective of the table; the others are "clip" (PPO).
OBJECTIVE_OF = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}


def liger_options(*, temperature: float, beta: float, eps_low: float, eps_high: float,
                  loss_type: str, importance_sampling_level: str, delta: Optional[float],
                  use_bias_correction_kl: bool, has_ref: bool,
                  sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                  vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                  vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0) -> LossOptions:
    """Liger's options as a ``LossOptions`` (the aggregation is ``liger_weights``'), with
    Liger's checks: a ``ValueError`` for what Liger rejects."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of Liger's loss types "
                         f"{list(LOSS_TYPES)}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{importance_sampling_level!r}")
    objective = OBJECTIVE_OF.get(loss_type, "clip")
    if importance_sampling_level == "sequence" and objective != "clip":
        raise ValueError(f"Sequence-level importance sampling is not supported for "
                         f"loss_type='{loss_type}'. Use importance_sampling_level='token' "
                         f"instead.")
    if beta != 0.0 and not has_ref:
        raise ValueError("beta != 0 needs ref_logp (the reference policy's log-probs)")
    return LossOptions(temperature=temperature, beta=beta, eps_low=eps_low, eps_high=eps_high,
                       objective=objective, importance_sampling=importance_sampling_level,
                       delta=delta if objective == "clip" else None,
                       kl_bias_correction=bool(use_bias_correction_kl) and beta != 0.0,
                       sapo_temperature_pos=sapo_temperature_pos,
                       sapo_temperature_neg=sapo_temperature_neg,
                       vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
                       vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)


def liger_rollout_weights(vllm_is_ratio: Optional[torch.Tensor], loss_type: str,
                          mask: Optional[torch.Tensor], shape: Tuple[int, int]
                          ) -> Optional[torch.Tensor]:
    """Liger's ``vllm_is_ratio`` (``(B, L)``, ``(B, 1)`` or ``(B,)``) as our
    ``rollout_is_weights``.

    For VESPO Liger adds a per-sequence ratio's log to the sequence weight once, where ours
    sums per-token logs over the valid tokens: the ratio goes on each sequence's first
    valid token (of ``mask``, all valid when None) and 1 on the others, the same sum.
    """
    ratio = vllm_is_ratio
    if not isinstance(ratio, torch.Tensor):
        return ratio
    if ratio.dim() == 2 and ratio.shape[1] == 1:
        ratio = ratio.reshape(-1)
    if loss_type == "vespo" and ratio.dim() == 1 and ratio.shape[0] == shape[0]:
        valid = (torch.ones(shape, dtype=torch.bool, device=ratio.device) if mask is None
                 else mask != 0)
        first = valid & (valid.long().cumsum(-1) == 1)
        ratio = torch.where(first, ratio[:, None].to(torch.float32),
                            torch.ones((), device=ratio.device))
    return ratio


def liger_weights(mask: torch.Tensor, loss_type: str, max_completion_length: Optional[int],
                  num_items_in_batch: Any = None, *, per_sequence_luspo: bool = False
                  ) -> torch.Tensor:
    """float32 ``[B, T]`` weights with Liger's aggregated loss ``= sum(w * l)``.

    ``mask`` is ``[B, T]`` (0/1). grpo: mean over sequences of the token mean; bnpo: the
    batch's token mean; dr_grpo: ``/ (B * max_completion_length)`` (default T); dapo and
    cispo: ``/ max(num_items_in_batch / world_size, 1)``, or the token count all-reduced
    when torch.distributed runs; luspo (Liger's formula): ``mean(l * n_b)`` over all
    ``B * T`` entries, or over the ``B`` sequences with ``per_sequence_luspo`` (a loss that
    is one value per sequence, Liger's ``[B, 1]``).
    """
    valid = mask != 0
    m = valid.to(torch.float64)
    B, T = mask.shape
    if loss_type == "luspo":
        if per_sequence_luspo:      # l is one value per sequence, on each of its n_b tokens
            return (m / B).to(torch.float32)
        return (m * m.sum(-1, keepdim=True) / (B * T)).to(torch.float32)
    if loss_type in ("dapo", "cispo", "vespo") and num_items_in_batch is not None:
        world = (torch.distributed.get_world_size() if torch.distributed.is_available()
                 and torch.distributed.is_initialized() else 1)
        normalizer = max(float(num_items_in_batch) / world, 1.0)
        return (m / normalizer).to(torch.float32)
    aggregation = {"cispo": "dapo", "vespo": "dapo", "sapo": "grpo"}.get(loss_type, loss_type)
    opts = LossOptions(aggregation=aggregation, max_len=max_completion_length)
    return aggregation_weights(valid, opts)


class LigerGRPOLossFunction(torch.autograd.Function):
    """The Function behind ``triton_grpo_loss``: Liger's ``GrpoLossFunction`` contract.

    ``apply(logits, inputs, opts, inplace, weights)``: ``logits`` ``[B, T + 1, V]`` (the last
    position is not scored and gets a zero gradient), ``inputs`` the ``LossInputs`` of
    ``logits[:, :-1]``. ``weights`` ``[B, T]``: the aggregated loss ``sum(w * l)`` is
    returned; ``None``: the per-token loss ``[B, T]`` (0 where masked) is returned and the
    backward takes its upstream gradient per token. Then ``(kl, is_clipped)`` ``[B, T]``
    float32, non-differentiable (``kl`` empty without a reference).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, inputs: LossInputs, opts: LossOptions,
                inplace: bool, weights: Optional[torch.Tensor]) -> tuple:
        """Per-token loss, KL and clip flags without a gradient; the loss summed with
        ``weights`` when given."""
        view = logits[:, :-1]
        out = TokenResults.allocate(inputs.rows, inputs.ref_logp is not None, logits.device)
        per_token = dataclasses.replace(inputs, weights=inputs.valid.to(torch.float32))
        run_loss(view, per_token, opts, out, None)
        shape = (inputs.B, inputs.T)
        loss = out.loss.view(shape)
        if weights is not None:
            loss = (loss.double() * weights).sum().to(torch.float32)
        m = inputs.valid.to(torch.float32)
        kl = out.kl * m if out.kl is not None else torch.empty(0, device=logits.device)
        clipped = ((out.clip_low != 0) | (out.clip_high != 0)).to(torch.float32) * m
        ctx.save_for_backward(logits)
        ctx.inputs, ctx.opts, ctx.inplace, ctx.weights = inputs, opts, inplace, weights
        extras = (kl.view(shape) if kl.numel() else kl, clipped.view(shape))
        ctx.mark_non_differentiable(*extras)
        return (loss,) + extras

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple:
        """The logits' gradient of ``sum(upstream * l)``, written in a second pass (into the
        logits with ``inplace``)."""
        (logits,) = ctx.saved_tensors
        inputs = ctx.inputs
        if ctx.weights is not None:
            w = ctx.weights * grad_loss.to(torch.float32)
        else:
            w = grad_loss.to(torch.float32)
        # Liger masks the upstream gradient before any sequence-level sum, as here.
        w = (w.reshape(-1) * inputs.valid).to(torch.float32).contiguous()
        grad = logits.detach() if ctx.inplace else torch.empty_like(logits)
        out = TokenResults.allocate(inputs.rows, inputs.ref_logp is not None, logits.device)
        run_loss(logits[:, :-1], dataclasses.replace(inputs, weights=w), ctx.opts, out,
                 grad[:, :-1])
        grad[:, -1] = 0
        return grad, None, None, None, None


def triton_grpo_loss(logits: torch.Tensor, old_logp: Optional[torch.Tensor],
                     ref_logp: Optional[torch.Tensor], completion_ids: torch.Tensor,
                     advantages: torch.Tensor, completion_mask: Optional[torch.Tensor] = None,
                     temperature: float = 0.9, beta: float = 0.04, eps_low: float = 0.2,
                     eps_high: float = 0.4, inplace: bool = True, loss_type: str = "dapo",
                     max_completion_length: Optional[int] = None,
                     importance_sampling_level: str = "token", reduce: bool = False,
                     sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                     vllm_is_ratio: Optional[torch.Tensor] = None,
                     delta: Optional[float] = None, use_bias_correction_kl: bool = False,
                     num_items_in_batch: Any = None, vespo_k_pos: float = 2.0,
                     vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                     vespo_lambda_neg: float = 2.0
                     ) -> Union[Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor],
                                Tuple[torch.Tensor, List[torch.Tensor]]]:
    """Liger 0.8.5's ``triton_grpo_loss`` on hapo-kernels (same arguments and results).

    ``logits`` ``(B, L + 1, V)``; ``old_logp`` / ``ref_logp`` ``(B, L)`` or None (``ref_logp``
    is needed when ``beta != 0``); ``completion_ids`` ``(B, L)``; ``advantages`` ``(B,)``;
    ``completion_mask`` ``(B, L)`` or None. ``reduce=False``: ``(per_token_loss,
    per_token_kl or None, is_clipped)``, all ``(B, L)`` float32 and 0 where masked, the loss
    differentiable per token. ``reduce=True``: ``(loss, metrics)`` with ``metrics`` =
    ``[kl_mean]`` (when ``beta != 0``) ``+ [clip_ratio]``, masked means, and ``loss``
    aggregated as ``loss_type`` (``liger_weights``). ``vllm_is_ratio`` ``(B, L)``, ``(B, 1)``
    or ``(B,)`` multiplies each token's policy loss before the KL is added (VESPO folds it
    into its sequence weight).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] < 2:
        raise ValueError("logits must be (B, L + 1, V) with L >= 1, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if delta is not None and OBJECTIVE_OF.get(loss_type, "clip") != "clip":
        raise ValueError(f"delta (two-sided clipping) is not supported for "
                         f"loss_type='{loss_type}'.")
    opts = liger_options(temperature=temperature, beta=beta, eps_low=eps_low,
                         eps_high=eps_high, loss_type=loss_type,
                         importance_sampling_level=importance_sampling_level, delta=delta,
                         use_bias_correction_kl=use_bias_correction_kl,
                         has_ref=ref_logp is not None,
                         sapo_temperature_pos=sapo_temperature_pos,
                         sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
                         vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                         vespo_lambda_neg=vespo_lambda_neg)
    if not isinstance(inplace, bool) or not isinstance(reduce, bool):
        raise ValueError(f"inplace and reduce must be bools, got {inplace!r}, {reduce!r}")
    view = logits[:, :-1]
    check_logits_and_targets(view, completion_ids)
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 2 \
            and advantages.shape[1] == 1:
        advantages = advantages.reshape(-1)         # Liger reads (B, 1) as (B,)
    # Liger ignores ref_logp when beta == 0 (no KL term, no KL output).
    inputs = prepare_loss(view, completion_ids, advantages, opts, AdvantageOptions(),
                          source_name="logits", ignore_index=-100, mask=completion_mask,
                          old_logp=old_logp, ref_logp=ref_logp if beta != 0.0 else None,
                          teacher_mask=None, rewards=None, group_size=None, inject=None,
                          cu_seqlens=None, process_group=None,
                          rollout_is_weights=liger_rollout_weights(
                              vllm_is_ratio, loss_type, completion_mask,
                              tuple(completion_ids.shape)))
    B, L = completion_ids.shape
    mask = inputs.valid.view(B, L)
    weights = (liger_weights(mask, loss_type, max_completion_length, num_items_in_batch)
               .double() if reduce else None)
    loss, kl, clipped = LigerGRPOLossFunction.apply(logits, inputs, opts, inplace, weights)
    kl = kl if kl.numel() else None
    if not reduce:
        return loss, kl, clipped
    count = mask.sum().clamp(min=1).to(torch.float32)
    metrics = [kl.sum() / count] if beta != 0.0 else []
    metrics.append(clipped.sum() / count)
    return loss, metrics


class LigerFusedLinearGRPOLoss(nn.Module):
    """Liger 0.8.5's ``LigerFusedLinearGRPOLoss`` on hapo-kernels' fused LM head.

    Same constructor (Liger's defaults: ``beta=0.04``, ``epsilon_low = epsilon_high = 0.2``,
    ``loss_type="dapo"``) and ``forward``; returns ``(loss, metrics)`` with ``metrics`` =
    ``([kl_mean] if beta != 0) + (clip_ratio,)`` like Liger. ``compiled`` and ``chunk_size``
    are accepted and unused (the chunking is sized by memory, ``head.plan_chunks``).
    ``use_ref_model`` as in Liger: when True, ``ref_per_token_logps`` or ``ref_input``
    (with ``ref_weight`` / ``ref_bias``) is required; when False the KL term is 0.
    ``dr_grpo`` needs ``max_completion_length``, as in Liger.
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: Optional[int] = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False,
                 vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0) -> None:
        super().__init__()
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got "
                             f"{sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got "
                             f"{sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        # Checked now (the reference tensors come at call time; has_ref is re-checked there).
        liger_options(temperature=temperature, beta=beta, eps_low=epsilon_low,
                      eps_high=epsilon_high, loss_type=loss_type,
                      importance_sampling_level=importance_sampling_level, delta=delta,
                      use_bias_correction_kl=use_bias_correction_kl, has_ref=True,
                      sapo_temperature_pos=sapo_temperature_pos,
                      sapo_temperature_neg=sapo_temperature_neg)
        if loss_type == "luspo" and (importance_sampling_level != "sequence" or beta != 0.0):
            raise ValueError("loss_type='luspo' is supported with "
                             "importance_sampling_level='sequence' and beta=0 (otherwise "
                             "Liger's chunked loss also counts the padded tokens' loss)")
        self.beta, self.compiled, self.use_ref_model = beta, compiled, use_ref_model
        self.chunk_size, self.epsilon_low, self.epsilon_high = chunk_size, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length = loss_type, max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = (sapo_temperature_pos,
                                                                sapo_temperature_neg)
        self.temperature, self.delta = temperature, delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg

    def forward(self, _input: torch.Tensor, lin_weight: torch.Tensor,
                selected_token_ids: torch.Tensor, attention_mask: torch.Tensor,
                advantages: torch.Tensor, bias: Optional[torch.Tensor] = None,
                ref_per_token_logps: Optional[torch.Tensor] = None,
                old_per_token_logps: Optional[torch.Tensor] = None,
                ref_input: Optional[torch.Tensor] = None,
                ref_weight: Optional[torch.Tensor] = None,
                ref_bias: Optional[torch.Tensor] = None,
                vllm_is_ratio: Optional[torch.Tensor] = None,
                num_items_in_batch: Any = None) -> Tuple[torch.Tensor, tuple]:
        """Liger's GRPO loss of ``_input @ lin_weight.T + bias`` (``_input`` ``(B, T, H)``,
        ``selected_token_ids`` / ``attention_mask`` ``(B, T)``, ``advantages`` ``(B,)``);
        the logits are never materialised. Returns ``(loss, metrics)``."""
        if not isinstance(_input, torch.Tensor) or _input.dim() != 3:
            raise ValueError("_input must be (B, T, H), got "
                             f"{getattr(_input, 'shape', type(_input).__name__)}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if self.use_ref_model and ref_per_token_logps is None and ref_input is None:
            raise ValueError("If use_ref_model is True, ref_per_token_logps or ref_input "
                             "must be provided")
        ref = None
        if self.use_ref_model and self.beta != 0.0:
            ref = ref_per_token_logps
            if ref is None and ref_input is not None:
                with torch.no_grad():
                    ref = fused_linear_selective_log_softmax(
                        ref_input, ref_weight, selected_token_ids, bias=ref_bias,
                        temperature=self.temperature)
        # Without a reference Liger compares the policy with itself: a KL of 0, no gradient.
        beta = self.beta if ref is not None else 0.0
        # Liger's chunked loss applies delta to the PPO clip only (ignored for the others).
        opts = liger_options(temperature=self.temperature, beta=beta,
                             eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                             loss_type=self.loss_type,
                             importance_sampling_level=self.importance_sampling_level,
                             delta=self.delta,
                             use_bias_correction_kl=self.use_bias_correction_kl,
                             has_ref=ref is not None,
                             sapo_temperature_pos=self.sapo_temperature_pos,
                             sapo_temperature_neg=self.sapo_temperature_neg,
                             vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos,
                             vespo_k_neg=self.vespo_k_neg, vespo_lambda_neg=self.vespo_lambda_neg)
        inputs = prepare_loss(_input, selected_token_ids, advantages, opts, AdvantageOptions(),
                              source_name="hidden", ignore_index=-100, mask=attention_mask,
                              old_logp=old_per_token_logps, ref_logp=ref, teacher_mask=None,
                              rewards=None, group_size=None, inject=None, cu_seqlens=None,
                              process_group=None,
                              rollout_is_weights=liger_rollout_weights(
                                  vllm_is_ratio, self.loss_type, attention_mask,
                                  tuple(selected_token_ids.shape)))
        B, T = selected_token_ids.shape
        mask = inputs.valid.view(B, T)
        weights = liger_weights(mask, self.loss_type, self.max_completion_length,
                                num_items_in_batch, per_sequence_luspo=True)
        inputs = dataclasses.replace(inputs, weights=weights.reshape(-1).contiguous())
        V = lin_weight.shape[0]
        chunks = head.plan_chunks(B * T, V, _input.device, _input.dtype, None, None)
        wants = (_input.requires_grad, lin_weight.requires_grad,
                 bias is not None and bias.requires_grad)
        results = FusedLinearHAPOLossFunction.apply(
            _input.reshape(-1, _input.shape[-1]), lin_weight, bias, inputs, opts, chunks,
            tuple(w and torch.is_grad_enabled() for w in wants), True)
        out = loss_output(results, inputs)
        metrics = []
        if self.beta != 0.0:
            metrics.append(out.kl if out.kl is not None else torch.zeros((), device=_input.device))
        metrics.append(out.clip_low + out.clip_high)
        return out.loss, tuple(metrics)

