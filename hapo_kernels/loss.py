"""``fused_hapo_loss``: the GRPO/HAPO loss and its gradient in one pass over the logits.

docs/design.md sections 3-5 and 8. The options become one ``LossOptions``; the tensors are
checked and laid out once (``inputs.loss_inputs``, with the aggregation weights, so that
``loss = sum w * l``); the forward writes the gradient of the logits at the same time as the
loss (``run_loss``: the backend's fused token-level pass, or ``twopass.two_pass_loss`` where
a token needs its sequence or other ranks). The backward only scales the saved gradient by
``grad_output``, and skips even that when ``grad_output`` is exactly 1.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .advantages import group_advantages
from .backends import backend_for
from .inputs import (
    UNBOUNDED,
    LossInputs,
    add_teachers,
    attach_weights,
    check_logits_and_targets,
    check_target_ids,
    loss_inputs,
)
from .layout import overlaps_itself
from .options import (
    IGNORE_INDEX,
    AdvantageOptions,
    LossOptions,
    canonical_arguments,
    check_bool,
    split_options,
)
from .outputs import LossOutput, TokenResults, first_order_backward, new_buffer
from .packed import packed_segments
from .twopass import two_pass_loss


def run_loss(logits: torch.Tensor, inputs: LossInputs, opts: LossOptions,
             out: TokenResults, grad: Optional[torch.Tensor]) -> None:
    """The loss into ``out`` and ``dL/dlogits`` into ``grad`` (when given), on the backend
    that serves ``logits``: one fused pass where each token needs only its own row."""
    backend = backend_for(logits)
    if inputs.vocab_shard is not None:     # a vocabulary slice: all-reduced statistics
        two_pass_loss(logits, inputs, opts, out, grad,
                      distributed.VocabParallelOps(backend, inputs.vocab_shard))
    elif opts.statistics_first:
        two_pass_loss(logits, inputs, opts, out, grad, backend)
    else:
        backend.token_loss(logits, inputs, opts, out, grad)


def finish_forward(ctx: Any, out: TokenResults, device: torch.device) -> tuple:
    """A loss Function's outputs: the summed loss, then ``out.as_tuple`` (non-differentiable)."""
    loss = out.loss.sum(dtype=torch.float64).to(torch.float32)
    extras = out.as_tuple(device)
    ctx.mark_non_differentiable(*extras)
    return (loss,) + extras


class FusedHAPOLossFunction(torch.autograd.Function):
    """The autograd Function behind ``fused_hapo_loss``.

    ``apply(logits, inputs, opts, inplace_grad, grad_wanted)`` with ``inputs`` a
    ``LossInputs`` and ``opts`` a ``LossOptions``; ``grad_wanted`` says whether autograd
    will want the gradient (grad mode on and ``logits.requires_grad``: inside ``forward``
    grad mode is always off). Returns ``(loss, per_token_loss, logp, entropy, ratio,
    clip_low, clip_high, kl)``: ``loss`` is differentiable w.r.t. ``logits``, the rest are
    flat ``[rows]`` float32 (clip flags int8; ``kl`` empty without ``ref_logp``).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, inputs: LossInputs, opts: LossOptions,
                inplace_grad: bool, grad_wanted: bool = True) -> tuple:
        """The loss and per-token results; the logits' gradient is written now and saved."""
        device = logits.device
        out = TokenResults.allocate(inputs.rows, inputs.ref_logp is not None, device)
        need_grad = ctx.needs_input_grad[0] and grad_wanted
        grad = None
        if need_grad:
            grad = logits if inplace_grad else new_buffer(logits.shape, logits.dtype, device)
        run_loss(logits, inputs, opts, out, grad)
        if need_grad and inplace_grad:
            # The logits now hold their gradient. Bump the version counter so that autograd
            # refuses any other use of them that saved them (no silent wrong gradients).
            torch.autograd.graph.increment_version(logits)
        ctx.inplace = inplace_grad
        if grad is not None:
            ctx.save_for_backward(grad)
        return finish_forward(ctx, out, device)

    @staticmethod
    @first_order_backward("fused_hapo_loss")
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple:
        """The saved gradient scaled by ``grad_loss`` in place, with no host read of
        ``grad_loss`` on CUDA (nothing to do when it is exactly 1)."""
        (grad,) = ctx.saved_tensors
        if grad_loss is not None:
            backend_for(grad).scale_gradient_(grad, grad_loss)
            # The saved gradient may have changed in place: a second backward through this
            # loss raises (autograd's version check) instead of rescaling it again.
            torch.autograd.graph.increment_version(grad)
        return grad, None, None, None, None


def check_inplace_target(logits: torch.Tensor) -> None:
    """``inplace_grad=True`` writes the gradient over ``logits``: refuse where that would be
    silently wrong. A leaf that requires grad would have its data replaced by its own
    gradient; memory that overlaps itself (an ``expand``, an ``as_strided``) would get
    several rows' gradients written into one place, read back as logits by later rows."""
    if logits.is_leaf:
        raise ValueError("inplace_grad=True would overwrite logits, a leaf tensor that "
                         "requires grad, with its own gradient; pass a non-leaf (the "
                         "model's output) or inplace_grad=False")
    if overlaps_itself(logits):
        raise ValueError(f"inplace_grad=True needs logits whose elements do not share "
                         f"memory; got shape {tuple(logits.shape)} with strides "
                         f"{logits.stride()} (an expand or as_strided view): pass "
                         f"inplace_grad=False or a .contiguous() copy")


def _ssi_teachers(replaced: torch.Tensor, group_size: int, n_seq: int, device: torch.device,
                  process_group: Any) -> torch.Tensor:
    """The members SSI replaced (global sequence index ``p * G + replaced[p]``) are
    teachers: ``[n_seq]`` flags for this rank's sequences."""
    start = 0
    if process_group is not None:
        start = distributed.rank_offset(n_seq, device, process_group)
    seq = torch.arange(start, start + n_seq, device=device)
    return replaced[seq // group_size] == seq % group_size


def prepare_loss(source: Any, target_ids: Any,
                 advantages: Optional[torch.Tensor], opts: LossOptions,
                 adv_opts: AdvantageOptions, *, source_name: str, ignore_index: int,
                 mask: Optional[torch.Tensor], old_logp: Optional[torch.Tensor],
                 ref_logp: Optional[torch.Tensor], teacher_mask: Optional[torch.Tensor],
                 rewards: Optional[torch.Tensor], group_size: Optional[int],
                 inject: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                 process_group: Any, vocab_parallel_group: Any = None,
                 rollout_is_weights: Optional[torch.Tensor] = None,
                 sampling_logp: Optional[torch.Tensor] = None,
                 per_sequence: Optional[bool] = None,
                 error: Optional[BaseException] = None, op: str = "fused_hapo_loss"
                 ) -> LossInputs:
    """The loss's ``LossInputs`` from a caller's arguments; shared by ``fused_hapo_loss`` and
    ``linear.fused_linear_hapo_loss`` (same arguments, same meaning).

    Every check first, on this rank (``error``: the caller's own checks already failed).
    Then, where the call spans ranks (``vocab_parallel_group``, ``process_group``, or
    ``"dapo"`` under torch.distributed), one ``distributed.handshake`` per group: every rank
    raises together if any rank's checks failed or the ranks disagree. Only then the
    collectives: ``group_advantages`` for ``rewards=``, the vocabulary slices, the global
    token count, the SSI teachers' offsets.
    """
    dp_group = process_group
    dp = data_parallel(opts, process_group)
    grouped = dp or vocab_parallel_group is not None
    checked = None
    if error is None:
        try:
            checked = _check_loss_inputs(source, target_ids, advantages, opts,
                                         source_name=source_name, ignore_index=ignore_index,
                                         mask=mask, old_logp=old_logp, ref_logp=ref_logp,
                                         teacher_mask=teacher_mask, rewards=rewards,
                                         group_size=group_size, inject=inject,
                                         cu_seqlens=cu_seqlens, per_sequence=per_sequence,
                                         process_group=process_group,
                                         rollout_is_weights=rollout_is_weights,
                                         sampling_logp=sampling_logp)
        except ValueError as e:
            if not grouped:
                raise
            error = e
    elif not grouped:
        raise error
    ok = error is None
    shard = None
    if vocab_parallel_group is not None:
        inputs = checked[0] if ok else None
        fields = {"options": opts.as_dict(),
                  "advantage options": adv_opts.as_dict() if rewards is not None else None,
                  "group_size": group_size, "per_sequence": per_sequence,
                  "ignore_index": ignore_index,
                  "logits dtype": str(source.dtype) if ok else None,
                  "target_ids shape": tuple(target_ids.shape) if ok else None,
                  "cu_seqlens": distributed.checksum(cu_seqlens) if ok else 0}
        for name in ("targets", "valid", "advantages", "old_logp", "ref_logp", "teacher",
                     "rollout_is", "sampling_logp"):
            fields[name] = distributed.checksum(getattr(inputs, name)) if ok else 0
        fields["rewards"] = distributed.checksum(rewards) if ok else 0
        fields["inject"] = distributed.checksum(inject) if ok else 0
        try:
            rows = distributed.handshake(vocab_parallel_group, op, fields, error=error,
                                         counts=[source.shape[-1] if ok else 0])
            shard = distributed.vocab_shard(vocab_parallel_group, [row[0] for row in rows])
            check_target_ids(target_ids, target_ids.shape, shard.vocab_size,
                             target_ids.device, ignore_index)
        except ValueError as e:
            error = error or e           # still join the data-parallel handshake below
    if dp:
        present = {name: t is not None for name, t in (
            ("mask", mask), ("old_logp", old_logp), ("ref_logp", ref_logp),
            ("teacher_mask", teacher_mask), ("rewards", rewards), ("inject", inject),
            ("cu_seqlens", cu_seqlens), ("rollout_is_weights", rollout_is_weights),
            ("sampling_logp", sampling_logp))}
        distributed.handshake(dp_group, op, {
            "options": opts.as_dict(),
            "advantage options": adv_opts.as_dict() if rewards is not None else None,
            "group_size": group_size, "per_sequence": per_sequence,
            "ignore_index": ignore_index, "inputs given": present,
            "dtype": str(source.dtype) if ok else None}, error=error)
    elif error is not None:
        raise error
    inputs, segments, n_seq = checked
    replaced = None
    if rewards is not None:
        advantages, replaced = group_advantages(rewards, group_size, inject,
                                                options=adv_opts, process_group=process_group)
        inputs = loss_inputs(source, target_ids, advantages, opts, source_name=source_name,
                             ignore_index=ignore_index, mask=mask, old_logp=old_logp,
                             ref_logp=ref_logp, teacher_mask=teacher_mask, segments=segments,
                             per_sequence=per_sequence, replaced=replaced,
                             computed_advantages=advantages.detach(),
                             process_group=process_group,
                             rollout_is_weights=rollout_is_weights,
                             sampling_logp=sampling_logp, weights=False)
    inputs.vocab_shard = shard
    attach_weights(inputs, opts, process_group)
    if replaced is not None and inject is not None:
        add_teachers(inputs, _ssi_teachers(replaced, group_size, n_seq, source.device,
                                           process_group))
    return inputs


def data_parallel(opts: LossOptions, process_group: Any) -> bool:
    """Whether a loss call makes collectives over a data-parallel group: a
    ``process_group``, or ``"dapo"`` counting tokens over the default group (torch.distributed
    initialised, no ``normalizer``)."""
    return process_group is not None or (
        opts.aggregation == "dapo" and opts.normalizer is None and dist.is_available()
        and dist.is_initialized())


def _check_loss_inputs(source: torch.Tensor, target_ids: torch.Tensor,
                       advantages: Optional[torch.Tensor], opts: LossOptions, *,
                       source_name: str, ignore_index: int, mask: Any, old_logp: Any,
                       ref_logp: Any, teacher_mask: Any, rewards: Any, group_size: Any,
                       inject: Any, cu_seqlens: Any, per_sequence: Any, process_group: Any,
                       rollout_is_weights: Any, sampling_logp: Any) -> tuple:
    """Every check of ``prepare_loss`` that needs no other rank: ``(inputs, segments,
    n_seq)`` with ``inputs`` laid out without weights (with ``rewards=``, zeros stand in
    for the advantages computed later)."""
    segments = packed_segments(source, target_ids, cu_seqlens)
    n_seq = segments.count if segments is not None else (
        target_ids.shape[0] if target_ids.dim() == 2 else 1)
    stand_in = None
    if rewards is not None:
        if advantages is not None:
            raise ValueError("pass either advantages or rewards= (with group_size=), not both")
        if group_size is None:
            raise ValueError("rewards= needs group_size= (rollouts per prompt)")
        if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (n_seq,):
            raise ValueError(f"rewards must be a tensor of shape ({n_seq},) (one per "
                             f"sequence), got {getattr(rewards, 'shape', type(rewards).__name__)}")
        if rewards.device != source.device:
            raise ValueError(f"rewards is on {rewards.device} but {source_name} on "
                             f"{source.device}")
        stand_in = advantages = torch.zeros(n_seq, device=source.device)
    elif group_size is not None or inject is not None:
        raise ValueError("group_size= and inject= go with rewards=; got advantages instead")
    inputs = loss_inputs(source, target_ids, advantages, opts, source_name=source_name,
                         ignore_index=ignore_index, mask=mask, old_logp=old_logp,
                         ref_logp=ref_logp, teacher_mask=teacher_mask, segments=segments,
                         per_sequence=per_sequence, computed_advantages=stand_in,
                         process_group=process_group, rollout_is_weights=rollout_is_weights,
                         sampling_logp=sampling_logp, weights=False)
    return inputs, segments, n_seq


def loss_output(results: tuple, inputs: LossInputs) -> LossOutput:
    """``LossOutput`` from a loss Function's ``(loss, per_token_loss, logp, entropy, ratio,
    clip_low, clip_high, kl)``: per-token outputs in the caller's shape, masked means."""
    loss, _, logp, ent, ratio, clip_lo, clip_hi, kl = results
    m = inputs.valid.to(torch.float32)
    count = m.sum().clamp(min=1.0)
    has_kl = inputs.ref_logp is not None
    shape = inputs.batch_shape

    def mean(x):
        return (x.to(torch.float32) * m).sum() / count

    return LossOutput(
        loss=loss,
        per_token_logp=logp.reshape(shape), per_token_entropy=ent.reshape(shape),
        logp=mean(logp), entropy=mean(ent), kl=mean(kl) if has_kl else None,
        clip_low=mean(clip_lo), clip_high=mean(clip_hi), ratio=mean(ratio),
        teacher_fraction=mean(inputs.teacher),
        advantages=inputs.computed_advantages, replaced=inputs.replaced,
        per_token_ratio=ratio.reshape(shape),
        per_token_kl=kl.reshape(shape) if has_kl else None,
        per_token_clip_low=clip_lo.bool().reshape(shape),
        per_token_clip_high=clip_hi.bool().reshape(shape),
    )


def call_arguments(option_values: dict, options: Optional[LossOptions],
                   advantage_options: Optional[AdvantageOptions],
                   **tensors: Optional[torch.Tensor]) -> Tuple[tuple, tuple]:
    """A loss call's options and per-token tensors under our names (other libraries'
    spellings taken out of ``option_values``): ``((opts, adv_opts), tensors in order)``."""
    option_values, named = canonical_arguments(option_values, **tensors)
    return (split_options(option_values, options, advantage_options),
            tuple(named[name] for name in tensors))


def fused_hapo_loss(logits: torch.Tensor, target_ids: torch.Tensor,
                    advantages: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None,
                    old_logp: Optional[torch.Tensor] = None,
                    ref_logp: Optional[torch.Tensor] = None,
                    teacher_mask: Optional[torch.Tensor] = None, *,
                    options: Optional[LossOptions] = None,
                    advantage_options: Optional[AdvantageOptions] = None,
                    inplace_grad: bool = False, ignore_index: int = IGNORE_INDEX,
                    rewards: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                    inject: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None,
                    per_sequence: Optional[bool] = None,
                    vocab_parallel_group: Any = None, process_group: Any = None,
                    rollout_is_weights: Optional[torch.Tensor] = None,
                    sampling_logp: Optional[torch.Tensor] = None,
                    **option_values: Any) -> LossOutput:
    """The GRPO/HAPO loss of docs/design.md sections 3-5; ``out.loss`` is differentiable
    w.r.t. ``logits``.

    ``logits`` ``[B, T, V]`` (strided views accepted without a copy) with ``target_ids``
    ``[B, T]``, or packed ``[N, V]`` with ``[N]``. ``advantages`` ``[B]`` or ``[B, T]``; or
    instead ``rewards`` ``[B]`` with ``group_size`` (and ``inject``): group advantages are
    computed in the call (``AdvantageOptions``: ``scale``, ``stats``, ``eps``,
    ``teacher_reward``) and the members replaced by SSI are treated as teacher tokens in
    addition to ``teacher_mask``.

    ``rollout_is_weights`` ``[B, T]`` or ``[B]`` (TRL's ``importance_sampling_ratio``,
    verl's ``rollout_is_weights``; no gradient) multiply each on-policy token's objective
    but not its KL or entropy bonus (VESPO takes them into its sequence weight).
    ``sampling_logp`` ``[B, T]``: the sampler's log-probs, read by the off-policy mask
    (default ``old_logp``).

    Options: every field of ``LossOptions`` (``temperature``, ``objective``, ``eps_low``,
    ``eps_high``, ``dual_clip``, ``delta``, ``beta``, ``kl_bias_correction``,
    ``entropy_coef``, ``entropy_mean``, ``importance_sampling``, ``teacher_objective``,
    ``teacher_gamma``, ``sft_weight``, ``aggregation``, ``normalizer``, ``max_len``, the
    SAPO and VESPO parameters, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
    ``loss_scale``) and of ``AdvantageOptions`` as a keyword, or the objects as ``options=`` /
    ``advantage_options=`` (keywords then override their fields).
    ``inplace_grad=True`` writes the gradient into the logits' storage (the logits are
    consumed; autograd refuses other saved uses of them); refused (``ValueError``) on a
    leaf tensor and on memory that overlaps itself. Second-order gradients (a backward
    with ``create_graph=True`` differentiated again) raise: the gradient is computed in
    the forward and is a constant to autograd.

    Scale-out (docs/distributed.md): ``cu_seqlens`` ``[S + 1]`` with packed ``[N, V]``
    logits: the sequences are its segments (per-sequence inputs are ``[S]``), equal to the
    right-padded ``[S, max_len]`` batch. ``per_sequence``: ``advantages`` and
    ``teacher_mask`` are one per sequence (``True``) or one per token (``False``); by
    default the shape says, and a shape that could mean both (packed, as many sequences
    as tokens) is a ``ValueError``. ``vocab_parallel_group``: ``logits`` is this
    rank's contiguous vocabulary slice (rank order, uneven allowed), ``target_ids`` global;
    every rank gets the unsharded loss and metrics and the gradient of its own slice.
    ``process_group`` (data-parallel): ``"dapo"`` and ``"token-mean"`` divide by the
    group's token count over its size; with ``rewards=``, groups may span its ranks.
    """
    (opts, adv_opts), (mask, old_logp, ref_logp, rollout_is_weights, sampling_logp) = \
        call_arguments(option_values, options, advantage_options, mask=mask, old_logp=old_logp,
                       ref_logp=ref_logp, rollout_is_weights=rollout_is_weights,
                       sampling_logp=sampling_logp)
    grad_wanted = torch.is_grad_enabled() and isinstance(logits, torch.Tensor) \
        and logits.requires_grad
    error = None
    try:
        if check_bool("inplace_grad", inplace_grad) and grad_wanted:
            check_inplace_target(logits)
        # A vocabulary slice's targets are checked against the whole vocabulary once the
        # ranks' handshake gave its size (prepare_loss).
        check_logits_and_targets(logits, target_ids, ignore_index,
                                 vocab_size=None if vocab_parallel_group is None else UNBOUNDED)
    except ValueError as e:
        if vocab_parallel_group is None and not data_parallel(opts, process_group):
            raise
        error = e                       # raised by every rank together (prepare_loss)
    inputs = prepare_loss(
        logits, target_ids, advantages, opts, adv_opts, source_name="logits",
        ignore_index=ignore_index, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
        teacher_mask=teacher_mask, rewards=rewards, group_size=group_size, inject=inject,
        cu_seqlens=cu_seqlens, process_group=process_group,
        vocab_parallel_group=vocab_parallel_group, per_sequence=per_sequence, error=error,
        rollout_is_weights=rollout_is_weights, sampling_logp=sampling_logp)
    results = FusedHAPOLossFunction.apply(logits, inputs, opts, inplace_grad, grad_wanted)
    return loss_output(results, inputs)


class FusedHAPOLoss(nn.Module):
    """``fused_hapo_loss`` as a module: options fixed at construction, tensors at call.

    ``FusedHAPOLoss(beta=0.04, aggregation="dapo")`` or ``FusedHAPOLoss(options=opts)``;
    ``forward(logits, target_ids, advantages, mask=None, old_logp=None, ref_logp=None,
    teacher_mask=None, **call_options)`` returns the ``LossOutput`` (``.loss`` to
    back-propagate). ``call_options`` are per-call keywords of ``fused_hapo_loss``
    (``normalizer``, ``max_len``, ``cu_seqlens``, ``rewards``, ...).
    """

    def __init__(self, options: Optional[LossOptions] = None, *, inplace_grad: bool = False,
                 **option_values: Any) -> None:
        super().__init__()
        self.options, self.advantage_options = split_options(option_values, options)
        self.inplace_grad = check_bool("inplace_grad", inplace_grad)

    def forward(self, logits: torch.Tensor, target_ids: torch.Tensor,
                advantages: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
                ref_logp: Optional[torch.Tensor] = None,
                teacher_mask: Optional[torch.Tensor] = None,
                **call_options: Any) -> LossOutput:
        """The loss of ``logits`` with this module's options: ``fused_hapo_loss``.

        ``logits`` ``[B, T, V]`` (or packed ``[N, V]``), ``target_ids`` ``[B, T]``,
        ``advantages`` ``[B]`` or ``[B, T]`` (or ``rewards=`` with ``group_size=``),
        ``mask`` (0/1, TRL's ``completion_mask``), ``old_logp`` / ``ref_logp`` ``[B, T]``
        float, ``teacher_mask`` ``[B]`` or ``[B, T]``. ``call_options``: per-call keywords of
        ``fused_hapo_loss`` (``normalizer``, ``max_len``, ``cu_seqlens``, ``inplace_grad``,
        ...). Returns the ``LossOutput``: ``.loss`` to back-propagate, metrics detached.
        """
        call_options.setdefault("inplace_grad", self.inplace_grad)
        return fused_hapo_loss(logits, target_ids, advantages, mask, old_logp, ref_logp,
                               teacher_mask, options=self.options,
                               advantage_options=self.advantage_options, **call_options)

    def extra_repr(self) -> str:
        """The options that differ from the defaults, for ``repr``."""
        defaults = LossOptions()
        return ", ".join(f"{k}={v!r}" for k, v in self.options.as_dict().items()
                         if v != getattr(defaults, k))
