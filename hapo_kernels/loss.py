"""``fused_hapo_loss`` / ``FusedHAPOLoss``: the HAPO/GRPO loss and its gradient in one pass.

DESIGN sections 3-5 and 8. Inputs are validated (``options``), the aggregation weights are
computed from the mask before the launch (``aggregation``: ``loss = sum w * l``), and the
forward writes the gradient of the logits at the same time as the loss (Triton kernel on
CUDA or under ``TRITON_INTERPRET=1``, chunked torch on CPU). The backward only scales the
saved gradient by ``grad_output``, and skips even that when ``grad_output`` is exactly 1.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import distributed
from . import options as O
from .advantages import group_advantages
from .aggregation import aggregation_weights
from .cpu.loss import RowInputs
from .dispatch import backend_for
from .logprobs import _impl as _logprobs_impl
from .outputs import LossOutput
from .packed import packed_segments, per_token

PER_TOKEN = ("loss", "logp", "entropy", "ratio", "clip_low", "clip_high", "kl")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the loss writes comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def per_token_buffers(n: int, has_ref: bool, device, empty) -> dict:
    """The flat ``[n]`` outputs a loss pass writes (``PER_TOKEN``; ``kl`` None without
    ``ref_logp``), from ``empty`` (each module's poisonable ``_empty``)."""
    out = {k: empty(n, torch.int8 if k.startswith("clip") else torch.float32, device)
           for k in PER_TOKEN if k != "kl" or has_ref}
    out.setdefault("kl", None)
    return out


def loss_and_extras(ctx, out: dict, device) -> tuple:
    """A loss Function's outputs from its filled buffers: ``(loss,)`` then ``PER_TOKEN``
    (``kl`` empty without ``ref_logp``), the per-token ones marked non-differentiable."""
    loss = out["loss"].sum(dtype=torch.float64).to(torch.float32)
    kl = out["kl"] if out["kl"] is not None else torch.empty(0, device=device)
    extras = tuple(out[k] for k in PER_TOKEN if k != "kl") + (kl,)
    ctx.mark_non_differentiable(*extras)
    return (loss,) + extras


def _backend(logits):
    if backend_for(logits) == "triton":
        from .triton import loss as impl
    else:
        from .cpu import loss as impl
    return impl


class FusedHAPOLoss(torch.autograd.Function):
    """The autograd Function behind ``fused_hapo_loss``.

    ``FusedHAPOLoss.apply(logits, rows, opts, inplace_grad, grad_wanted)`` with ``rows`` a
    ``cpu.loss.RowInputs`` (validated, flat per-token inputs and aggregation weights) and
    ``opts`` an ``options.LossOptions``; ``grad_wanted`` is whether autograd will want the
    gradient (grad mode on and ``logits.requires_grad``: inside ``forward`` grad mode is
    always off, and ``needs_input_grad`` ignores ``torch.no_grad``). Returns ``(loss,
    per_token_loss, logp, entropy, ratio, clip_low, clip_high, kl)``: ``loss`` is
    differentiable w.r.t. ``logits``, the rest are flat ``[rows]`` float32 (clip flags int8;
    ``kl`` empty without ``ref_logp``).
    """

    @staticmethod
    def forward(ctx, logits, rows: RowInputs, opts: O.LossOptions, inplace_grad: bool,
                grad_wanted: bool = True):
        device, n = logits.device, rows.B * rows.T
        out = per_token_buffers(n, rows.ref_logp is not None, device, _empty)
        need_grad = ctx.needs_input_grad[0] and grad_wanted
        grad = None
        if need_grad:
            grad = logits if inplace_grad else _empty(logits.shape, logits.dtype, device)
        if rows.vocab_shard is None:
            _backend(logits).hapo_loss_rows(logits, rows, opts, out, grad)
        else:                       # a vocabulary slice: all-reduced stats, slice gradient
            distributed.hapo_loss_rows(logits, rows, opts, out, grad,
                                       _logprobs_impl(backend_for(logits)), rows.vocab_shard)
        if need_grad and inplace_grad:
            # The logits now hold their gradient. Bump the version counter so that autograd
            # refuses any other use of them that saved them (no silent wrong gradients).
            torch.autograd.graph.increment_version(logits)
        ctx.inplace = inplace_grad
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss_and_extras(ctx, out, device)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        if grad_loss is not None and float(grad_loss) != 1.0:
            g = grad_loss.to(grad.dtype)
            # In place where the gradient already lives in the logits' storage; the saved
            # tensor's version then changes, so a second backward raises instead of rescaling.
            grad = grad.mul_(g) if ctx.inplace else grad * g
        return grad, None, None, None, None


def _rewards_to_advantages(rewards, group_size, inject, teacher_reward, scale, stats, eps,
                           n_seq, device, source, process_group=None):
    if group_size is None:
        raise ValueError("rewards= needs group_size= (rollouts per prompt)")
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if tuple(rewards.shape) != (n_seq,):
        raise ValueError(f"rewards must have shape ({n_seq},) (one per sequence), got "
                         f"{tuple(rewards.shape)}")
    if rewards.device != device:
        raise ValueError(f"rewards is on {rewards.device} but {source} on {device}")
    return group_advantages(rewards, group_size, inject=inject, teacher_reward=teacher_reward,
                            scale=scale, stats=stats, eps=eps, process_group=process_group)


def _ssi_teachers(replaced, group_size, n_seq, segments, device, process_group):
    """The members SSI replaced (global sequence index ``p * G + replaced[p]``) are teachers:
    ``[S]`` flags for this rank's sequences, ``[N]`` per token of a packed batch."""
    start = 0
    if process_group is not None:
        start = distributed.rank_offset(n_seq, device, process_group)
    seq = torch.arange(start, start + n_seq, device=device)
    hit = replaced[seq // group_size] == seq % group_size
    return hit if segments is None else segments.broadcast(hit)


class PreparedRows(NamedTuple):
    """What ``prepare_rows`` returns: everything a loss Function and ``loss_output`` need."""
    opts: O.LossOptions
    rows: RowInputs
    advantages: Optional[torch.Tensor]  # computed from rewards= (detached), else None
    replaced: Optional[torch.Tensor]    # SSI's replaced member per group, or None
    batch_shape: tuple                  # the caller's target shape, for per-token outputs


def prepare_rows(source, target_ids, advantages, *, source_name, ignore_index, mask,
                 old_logp, ref_logp, teacher_mask, rewards, group_size, scale, stats, eps,
                 inject, teacher_reward, cu_seqlens, process_group, vocab_shard=None,
                 **loss_options) -> PreparedRows:
    """The loss's inputs as validated flat rows: shared by ``fused_hapo_loss`` and
    ``linear.fused_linear_hapo_loss`` (same arguments, same meaning).

    ``source`` (named ``source_name`` in errors) is the logits or the fused head's hidden
    states, ``[B, T, *]`` or packed ``[N, *]``, whose shape and device the caller has already
    checked ``target_ids`` against; only its rank and device are read. ``loss_options`` are
    ``options.parse_loss_options``' arguments. Runs ``group_advantages`` for ``rewards=``;
    every other step only validates and lays out.
    """
    opts = O.parse_loss_options(**loss_options)
    device = source.device
    segments = packed_segments(source, target_ids, cu_seqlens)
    if segments is not None:
        n_seq = segments.count
    else:
        n_seq = target_ids.shape[0] if target_ids.dim() == 2 else 1
    replaced = None
    if rewards is not None:
        if advantages is not None:
            raise ValueError("pass either advantages or rewards= (with group_size=), not both")
        advantages, replaced = _rewards_to_advantages(
            rewards, group_size, inject, teacher_reward, scale, stats, eps,
            n_seq, device, source_name, process_group)
    elif group_size is not None or inject is not None:
        raise ValueError("group_size= and inject= go with rewards=; got advantages instead")
    t = O.check_token_tensors(target_ids, per_token("advantages", advantages, segments),
                              mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                              teacher_mask=per_token("teacher_mask", teacher_mask, segments),
                              ignore_index=ignore_index, opts=opts, device=device,
                              source=source_name)
    B, T = t.targets.shape
    teacher = t.teacher
    if replaced is not None and inject is not None:
        hit = _ssi_teachers(replaced, group_size, n_seq, segments, device, process_group)
        teacher = teacher | (hit[:, None] if segments is None else hit.view(B, T))
    weights = aggregation_weights(t.valid if segments is None else t.valid.reshape(-1), opts,
                                  segments, process_group)

    def flat(x, dtype=torch.float32):
        return None if x is None else x.reshape(-1).to(dtype).contiguous()

    rows = RowInputs(B=B, T=T, targets=t.targets.reshape(-1).contiguous(),
                     ignore_index=int(ignore_index), valid=flat(t.valid, torch.bool),
                     advantages=flat(t.advantages), old_logp=flat(t.old_logp),
                     ref_logp=flat(t.ref_logp), teacher=flat(teacher, torch.bool),
                     weights=flat(weights), segments=segments, vocab_shard=vocab_shard)
    computed = advantages.detach() if rewards is not None else None
    return PreparedRows(opts, rows, computed, replaced, t.batch_shape)


def loss_output(results, prep: PreparedRows) -> LossOutput:
    """``LossOutput`` from a loss Function's ``(loss, per_token_loss, logp, entropy, ratio,
    clip_low, clip_high, kl)``: per-token outputs in the caller's shape, masked means."""
    loss, _, logp, ent, ratio, clip_lo, clip_hi, kl = results
    rows = prep.rows
    m = rows.valid.to(torch.float32)
    count = m.sum().clamp(min=1.0)

    def mean(x):
        return (x.to(torch.float32) * m).sum() / count

    return LossOutput(
        loss=loss,
        per_token_logp=logp.reshape(prep.batch_shape),
        per_token_entropy=ent.reshape(prep.batch_shape),
        logp=mean(logp), entropy=mean(ent),
        kl=mean(kl) if rows.ref_logp is not None else None,
        clip_low=mean(clip_lo), clip_high=mean(clip_hi), ratio=mean(ratio),
        teacher_fraction=mean(rows.teacher),
        advantages=prep.advantages, replaced=prep.replaced,
    )


def fused_hapo_loss(logits, target_ids, advantages=None, mask=None, old_logp=None,
                    ref_logp=None, teacher_mask=None, temperature=1.0, eps_low=0.2,
                    eps_high=0.2, dual_clip=None, beta=0.0, entropy_coef=0.0,
                    importance_sampling="token", teacher_objective="shaped",
                    teacher_gamma=O.TEACHER_GAMMA, sft_weight=1.0, aggregation="token-mean",
                    normalizer=None, max_len=None, inplace_grad=False,
                    ignore_index=O.IGNORE_INDEX, *, rewards=None, group_size=None,
                    scale="group", stats="all", eps=O.ADVANTAGE_EPS, inject=None,
                    teacher_reward=O.TEACHER_REWARD, cu_seqlens=None,
                    vocab_parallel_group=None, process_group=None) -> LossOutput:
    """The HAPO/GRPO loss of DESIGN sections 3-5; ``out.loss`` is differentiable w.r.t. logits.

    ``logits`` ``[B, T, V]`` (strided views accepted without a copy) with ``target_ids``
    ``[B, T]``, or packed ``[N, V]`` with ``[N]``. ``advantages`` ``[B]`` or ``[B, T]``; or
    instead ``rewards`` ``[B]`` with ``group_size`` (and ``scale``, ``stats``, ``eps``,
    ``inject``, ``teacher_reward``): group advantages are computed in the call, and the
    members replaced by SSI (``inject``) are treated as teacher tokens in addition to
    ``teacher_mask``. ``inplace_grad=True`` writes the gradient into the logits' storage
    (the logits are consumed; autograd refuses other saved uses of them).

    Scale-out (docs/distributed.md):
    ``cu_seqlens`` ``[S + 1]`` with packed ``[N, V]`` logits: the sequences are its
    segments (per-sequence ``advantages``, ``teacher_mask`` and ``rewards`` are ``[S]``;
    every aggregation and GSPO work per segment; ``max_len`` defaults to the longest
    segment), equal to the right-padded ``[S, max_len]`` batch.
    ``vocab_parallel_group``: ``logits`` is this rank's contiguous vocabulary slice (rank
    order, uneven allowed), ``target_ids`` global; every rank gets the unsharded loss and
    metrics and the gradient of its own slice.
    ``process_group`` (data-parallel): ``aggregation="dapo"`` and ``"token-mean"`` divide
    by the group's token count over its size (with DDP's gradient mean: the global token
    mean); with ``rewards=``, groups may span the group's ranks (``rewards`` this rank's
    slice, ``inject`` the whole batch's, ``out.replaced`` every group's).
    """
    O.check_bool("inplace_grad", inplace_grad)
    shard = (None if vocab_parallel_group is None
             else distributed.vocab_shard(logits, vocab_parallel_group))
    O.check_logits_and_targets(logits, target_ids, ignore_index,
                               vocab_size=None if shard is None else shard.vocab_size)
    prep = prepare_rows(
        logits, target_ids, advantages, source_name="logits", ignore_index=ignore_index,
        mask=mask, old_logp=old_logp, ref_logp=ref_logp, teacher_mask=teacher_mask,
        rewards=rewards, group_size=group_size, scale=scale, stats=stats, eps=eps,
        inject=inject, teacher_reward=teacher_reward, cu_seqlens=cu_seqlens,
        process_group=process_group, vocab_shard=shard, temperature=temperature,
        eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, beta=beta,
        entropy_coef=entropy_coef, importance_sampling=importance_sampling,
        teacher_objective=teacher_objective, teacher_gamma=teacher_gamma,
        sft_weight=sft_weight, aggregation=aggregation, normalizer=normalizer,
        max_len=max_len)
    results = FusedHAPOLoss.apply(logits, prep.rows, prep.opts, inplace_grad,
                                  torch.is_grad_enabled() and logits.requires_grad)
    return loss_output(results, prep)
