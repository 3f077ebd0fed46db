"""The float64 reference of docs/design.md sections 3-6, written literally in plain torch.

The test oracle: every fast path is tested against this module, and no library module
imports it. It is meant to be obvious, not fast: it materialises float64 copies of the
logits, gradients come from torch autograd, and group advantages loop over groups.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .aggregation import token_normalizer
from .inputs import check_logits_and_targets, group_offsets_of, loss_inputs
from .objective import token_objective
from .options import (
    IGNORE_INDEX,
    LOGIT_DTYPES,
    AdvantageOptions,
    LossOptions,
    check_temperature,
    split_options,
)
from .outputs import LossOutput

# The reference also takes float64 logits, so tests can differentiate it in float64.
REFERENCE_DTYPES = LOGIT_DTYPES + (torch.float64,)


# --------------------------------------------------------------------------- section 3
def log_probs(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0,
              ignore_index: int = IGNORE_INDEX) -> tuple:
    """float64 ``(logp, entropy)`` of the target tokens; 0 where ``target == ignore_index``."""
    check_logits_and_targets(logits, target_ids, ignore_index, dtypes=REFERENCE_DTYPES)
    temperature = check_temperature(temperature)
    z = logits.double() / temperature
    lse = torch.logsumexp(z, dim=-1)
    valid = target_ids != ignore_index
    safe = torch.where(valid, target_ids, torch.zeros_like(target_ids)).long()
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.softmax(z, dim=-1)
    # A -inf logit (a masked vocabulary entry) has p = 0 and adds nothing: not 0 * -inf.
    entropy = lse - torch.where(p > 0, p * z, torch.zeros_like(p)).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


# --------------------------------------------------------------------------- section 4
# The per-token objective is ``objective.token_objective``: one torch statement of each
# table entry, evaluated here in float64. The Triton branches and the peers' own functions
# (TRL, Liger, verl) are held to it by the tests.


# --------------------------------------------------------------------------- section 5
def aggregate(per_token_loss: torch.Tensor, valid: torch.Tensor,
              opts: LossOptions) -> torch.Tensor:
    """The aggregation modes of docs/design.md section 5, literally."""
    m = valid.to(per_token_loss.dtype)
    ml = m * per_token_loss
    B, T = per_token_loss.shape
    agg = opts.aggregation_mode
    if agg == "token-mean":
        loss = ml.sum() / token_normalizer(valid, opts).to(ml.dtype)
    elif agg == "token-sum":
        loss = ml.sum()
    else:
        n_tok = m.sum(-1)
        # verl's names leave fully masked sequences out; TRL's aliases count them as 0.
        counted = n_tok > 0 if opts.aggregation == agg else torch.ones_like(n_tok, dtype=bool)
        if opts.num_sequences is not None:
            n_seq = torch.tensor(opts.num_sequences, dtype=ml.dtype)
        else:
            n_seq = counted.sum().clamp(min=1).to(ml.dtype)
        if agg == "seq-mean-token-mean":
            seq = ml.sum(-1) / n_tok.clamp(min=1.0)
        else:
            seq = ml.sum(-1)
        loss = seq[counted].sum() / n_seq
        if agg == "seq-mean-token-sum-norm":
            loss = loss / (opts.max_len if opts.max_len is not None else T)
    return loss * opts.dp_size


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the ``valid`` entries, in float64 (0 when none is valid)."""
    m = valid.to(torch.float64)
    return (x.to(torch.float64) * m).sum() / m.sum().clamp(min=1.0)


def high_entropy_mask(entropy: torch.Tensor, valid: torch.Tensor,
                      quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` on one batch: entropy >= the ``1 - quantile``
    quantile of the valid tokens' entropies."""
    values = entropy.detach()[valid]
    if values.numel() == 0:
        return torch.zeros_like(valid)
    return (entropy.detach() >= torch.quantile(values, 1.0 - quantile)) & valid


def off_policy_mask(logp: torch.Tensor, sampling_logp: torch.Tensor, valid: torch.Tensor,
                    advantages: torch.Tensor, threshold: float) -> torch.Tensor:
    """TRL's ``get_off_policy_mask``: keep ``A >= 0`` or a sequence mean drift <= threshold."""
    m = valid.double()
    drift = torch.nan_to_num(sampling_logp.double() - logp.detach(), nan=0.0)
    mean = (drift * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return (advantages >= 0) | (mean <= threshold)


def hapo_loss(logits: torch.Tensor, target_ids: torch.Tensor, advantages: torch.Tensor,
              mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
              ref_logp: Optional[torch.Tensor] = None,
              teacher_mask: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX,
              rollout_is_weights: Optional[torch.Tensor] = None,
              sampling_logp: Optional[torch.Tensor] = None,
              options: Optional[LossOptions] = None, **option_values: Any) -> LossOutput:
    """float64 loss of docs/design.md sections 3-5; ``loss`` is differentiable w.r.t.
    ``logits``. Takes the loss options of ``fused_hapo_loss`` (not ``rewards=``: pass
    advantages from ``group_advantages``). Metric fields are float64 here.
    """
    opts, _ = split_options(option_values, options)
    check_logits_and_targets(logits, target_ids, ignore_index, dtypes=REFERENCE_DTYPES)
    x = loss_inputs(logits, target_ids, advantages, opts, source_name="logits",
                    ignore_index=ignore_index, mask=mask, old_logp=old_logp,
                    ref_logp=ref_logp, teacher_mask=teacher_mask,
                    rollout_is_weights=rollout_is_weights, sampling_logp=sampling_logp,
                    dtype=torch.float64)
    shape2d = (x.B, x.T)

    def rows(t):
        return None if t is None else t.view(shape2d).double()

    targets = torch.where(x.valid, x.targets, torch.full_like(x.targets, ignore_index))
    logp, ent = log_probs(logits.reshape(*shape2d, logits.shape[-1]), targets.view(shape2d),
                          opts.temperature, ignore_index)
    v = x.valid.view(shape2d)
    adv = rows(x.advantages)
    keep = torch.ones_like(v)
    entropy_tokens = v
    if opts.top_entropy_quantile < 1.0:
        high = high_entropy_mask(ent, v, opts.top_entropy_quantile)
        keep = keep & high
        entropy_tokens = v & high
    if opts.off_policy_mask_threshold is not None:
        sampler = rows(x.sampling_logp)
        if sampler is None:
            sampler = rows(x.old_logp) if x.old_logp is not None else logp.detach()
        keep = keep & off_policy_mask(logp, sampler, v, adv, opts.off_policy_mask_threshold)
    obj = token_objective(logp, ent, adv, v, old_logp=rows(x.old_logp),
                          ref_logp=rows(x.ref_logp), teacher=x.teacher.view(shape2d),
                          rollout_is=rows(x.rollout_is), policy_mask=keep.double(),
                          opts=opts)
    loss = aggregate(obj.loss, v, opts)
    if opts.entropy_mean and opts.entropy_coef != 0:      # TRL: a batch mean of the entropy
        loss = loss - opts.entropy_coef * masked_mean(ent, entropy_tokens)
    loss = loss * opts.loss_scale
    zero = torch.zeros((), dtype=torch.float64, device=logp.device)
    return LossOutput(
        loss=loss,
        per_token_logp=torch.where(v, logp, zero).detach().reshape(x.batch_shape),
        per_token_entropy=torch.where(v, ent, zero).detach().reshape(x.batch_shape),
        logp=masked_mean(logp.detach(), v),
        entropy=masked_mean(ent.detach(), v),
        kl=None if obj.kl is None else masked_mean(obj.kl, v),
        clip_low=masked_mean(obj.clip_low, v),
        clip_high=masked_mean(obj.clip_high, v),
        ratio=masked_mean(obj.ratio, v),
        teacher_fraction=masked_mean(x.teacher.view(shape2d), v),
        per_token_ratio=obj.ratio.reshape(x.batch_shape),
        per_token_kl=None if obj.kl is None else obj.kl.reshape(x.batch_shape),
        per_token_clip_low=obj.clip_low.reshape(x.batch_shape),
        per_token_clip_high=obj.clip_high.reshape(x.batch_shape),
    )


# --------------------------------------------------------------------------- section 6
def group_advantages(rewards: torch.Tensor, group_size: Optional[int] = None,
                     inject: Optional[torch.Tensor] = None,
                     options: Optional[AdvantageOptions] = None, *,
                     group_offsets: Optional[torch.Tensor] = None,
                     replace_index: Optional[torch.Tensor] = None,
                     teacher_rewards: Optional[torch.Tensor] = None,
                     **option_values: Any) -> tuple:
    """float64 advantages ``[N]`` and the replaced index per group (-1: none), one group
    at a time, exactly as section 6 reads (groups of ``group_size`` or ``group_offsets``):
    the replaced member is ``replace_index[p]`` (``replace`` "random" / "fixed"; member 0
    for "fixed" without it) or the lowest reward, its reward ``teacher_rewards[p]`` or the
    constant ``teacher_reward``."""
    offsets = group_offsets_of(rewards, group_size, group_offsets, inject).tolist()
    opts = AdvantageOptions.from_kwargs(options, **option_values)
    P = len(offsets) - 1
    groups = [rewards[offsets[p]:offsets[p + 1]].double().clone() for p in range(P)]
    replaced = torch.full((P,), -1, dtype=torch.long, device=rewards.device)
    counted = [torch.ones(len(g), dtype=torch.bool, device=rewards.device) for g in groups]
    for p in range(P):
        if inject is not None and bool(inject[p]):
            if opts.replace == "worst":
                k = int(torch.argmin(groups[p]))         # the lowest reward, first on ties
            else:
                k = 0 if replace_index is None else int(replace_index[p])
            groups[p][k] = float(opts.teacher_reward if teacher_rewards is None
                                 else teacher_rewards[p])
            replaced[p] = k
            if opts.stats == "on-policy":
                counted[p][k] = False
    batch_std = None
    if opts.scale == "batch":
        batch_std = _std(torch.cat([g[c] for g, c in zip(groups, counted)]) if P else
                         torch.zeros(0, dtype=torch.float64))
    adv = []
    for p in range(P):
        r, members = groups[p], groups[p][counted[p]]
        single = r.numel() == 1                          # verl: mean 0, std 1
        zero = torch.zeros((), dtype=r.dtype)
        mean = zero if single or not members.numel() else members.mean()
        if opts.scale == "none":
            adv.append(r - mean)
            continue
        std = batch_std if opts.scale == "batch" else (zero + 1 if single else _std(members))
        if opts.stats == "on-policy" and std == 0:
            std = torch.ones_like(std)                   # LUFFY: a zero std counts as 1
        denom = std + opts.eps
        # eps = 0 with a constant group would be 0/0: no signal, A = 0.
        adv.append((r - mean) / denom if denom > 0 else torch.zeros_like(r))
    out = torch.cat(adv) if adv else torch.zeros(0, dtype=torch.float64)
    return out, replaced


def _std(x: torch.Tensor) -> torch.Tensor:
    """Bessel standard deviation; 0 for fewer than two values."""
    if x.numel() < 2:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x.std(unbiased=True)
