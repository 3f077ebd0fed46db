"""The float64 reference of DESIGN sections 3-6, written literally in plain torch.

Every fast path is tested against this module. It is meant to be obvious, not fast:
it materialises float64 copies of the logits, and gradients come from torch autograd.
``token_objective`` is dtype-generic so that the chunked CPU path can reuse the very same
per-token formula on ``[tokens]``-sized vectors.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import options as O
from .aggregation import token_normalizer
from .outputs import LossOutput


# --------------------------------------------------------------------------- section 3
def log_probs(logits, target_ids, temperature=1.0, ignore_index=O.IGNORE_INDEX):
    """float64 ``(logp, entropy)`` of the target tokens; 0 where ``target == ignore_index``."""
    O.check_logits_and_targets(logits, target_ids, ignore_index, dtypes=O.REFERENCE_DTYPES)
    temperature = O.check_temperature(temperature)
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
def token_objective(logp, entropy, advantages, valid, *, old_logp=None, ref_logp=None,
                    teacher=None, opts: O.LossOptions, segments=None):
    """Per-token loss ``l`` (0 on invalid tokens) and per-token metric tensors.

    All tensors are ``[B, T]`` (a sequence per row), or packed tokens with ``segments``
    (a ``packed.Segments``: a sequence per segment). Returns a dict with ``loss``, ``ratio``, ``clip_low``,
    ``clip_high`` and ``kl`` (``None`` without ``ref_logp``).
    """
    dt = logp.dtype
    m = valid.to(dt)
    A = advantages.to(dt)
    old = logp.detach() if old_logp is None else old_logp.to(dt)
    log_ratio = torch.where(valid, logp - old, torch.zeros_like(logp))
    if opts.importance_sampling == "sequence" and segments is not None:
        rho = torch.exp(segments.mean(log_ratio, m))     # GSPO on packed sequences
    elif opts.importance_sampling == "sequence":         # GSPO: one ratio per sequence
        seq = (m * log_ratio).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        rho = torch.exp(seq).expand_as(logp)
    else:
        rho = torch.exp(log_ratio)
    clipped = torch.clamp(rho, 1.0 - opts.eps_low, 1.0 + opts.eps_high)
    pg = -torch.minimum(rho * A, clipped * A)
    if opts.dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -opts.dual_clip * A), pg)

    if teacher is None:
        teacher = torch.zeros_like(valid)
    if opts.teacher_objective == "shaped":
        p = torch.exp(logp)
        teacher_loss = -A * p / (p + opts.teacher_gamma)
    elif opts.teacher_objective == "sft":
        teacher_loss = -opts.sft_weight * logp
    else:  # "ratio": the on-policy formula
        teacher_loss = pg
    loss = torch.where(teacher, teacher_loss, pg)

    kl = None
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.to(dt) - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1.0
        if opts.beta > 0:
            loss = loss + opts.beta * kl
    if opts.entropy_coef != 0:
        loss = loss - opts.entropy_coef * entropy

    clips = valid & (~teacher if opts.teacher_objective != "ratio" else torch.ones_like(valid))
    rd = rho.detach()
    zero = torch.zeros((), dtype=dt, device=logp.device)
    return {
        "loss": torch.where(valid, loss, zero),
        "ratio": rd,
        "clip_low": clips & (rd < 1.0 - opts.eps_low) & (A < 0),
        "clip_high": clips & (rd > 1.0 + opts.eps_high) & (A > 0),
        "kl": None if kl is None else kl.detach(),
    }


# --------------------------------------------------------------------------- section 5
def aggregate(per_token_loss, valid, opts: O.LossOptions):
    """The aggregation modes of DESIGN section 5, literally."""
    m = valid.to(per_token_loss.dtype)
    ml = m * per_token_loss
    B, T = per_token_loss.shape
    agg = opts.aggregation
    if agg == "token-mean":
        return ml.sum() / token_normalizer(valid, opts).to(ml.dtype)
    if agg == "seq-mean-token-mean":
        return (ml.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if agg == "seq-mean-token-sum":
        return ml.sum(-1).mean()
    max_len = opts.max_len if opts.max_len is not None else T
    return ml.sum() / (B * max_len)


def masked_mean(x, valid):
    m = valid.to(torch.float64)
    return (x.to(torch.float64) * m).sum() / m.sum().clamp(min=1.0)


def hapo_loss(logits, target_ids, advantages, mask=None, old_logp=None, ref_logp=None,
              teacher_mask=None, ignore_index=O.IGNORE_INDEX, **options) -> LossOutput:
    """float64 loss of DESIGN sections 3-5; ``loss`` is differentiable w.r.t. ``logits``.

    Takes the options of ``fused_hapo_loss`` (not ``rewards=``: pass advantages from
    ``group_advantages``). Metric fields are float64 here.
    """
    opts = O.parse_loss_options(**options)
    t = O.check_loss_tensors(logits, target_ids, advantages, mask=mask, old_logp=old_logp,
                             ref_logp=ref_logp, teacher_mask=teacher_mask,
                             ignore_index=ignore_index, opts=opts,
                             dtypes=O.REFERENCE_DTYPES)
    shape2d = t.targets.shape
    logp, ent = log_probs(logits.reshape(*shape2d, logits.shape[-1]), t.targets,
                          opts.temperature, ignore_index)
    obj = token_objective(logp, ent, t.advantages.double(), t.valid,
                          old_logp=None if t.old_logp is None else t.old_logp.double(),
                          ref_logp=None if t.ref_logp is None else t.ref_logp.double(),
                          teacher=t.teacher, opts=opts)
    zero = torch.zeros((), dtype=torch.float64, device=logp.device)
    v = t.valid
    return LossOutput(
        loss=aggregate(obj["loss"], v, opts),
        per_token_logp=torch.where(v, logp, zero).detach().reshape(t.batch_shape),
        per_token_entropy=torch.where(v, ent, zero).detach().reshape(t.batch_shape),
        logp=masked_mean(logp.detach(), v),
        entropy=masked_mean(ent.detach(), v),
        kl=None if obj["kl"] is None else masked_mean(obj["kl"], v),
        clip_low=masked_mean(obj["clip_low"], v),
        clip_high=masked_mean(obj["clip_high"], v),
        ratio=masked_mean(obj["ratio"], v),
        teacher_fraction=masked_mean(t.teacher, v),
    )


# --------------------------------------------------------------------------- section 6
def check_groups(rewards, group_size, inject=None):
    """Validate group inputs; return the number of groups P."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor [P*G], got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (group-normalised advantages need at least "
                         f"two rollouts), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of "
                         f"{rewards.numel()} rewards")
    P = rewards.numel() // group_size
    if inject is not None:
        if not isinstance(inject, torch.Tensor) or tuple(inject.shape) != (P,):
            raise ValueError(f"inject must be a bool tensor of shape ({P},), got "
                             f"{getattr(inject, 'shape', type(inject).__name__)}")
        if inject.device != rewards.device:
            raise ValueError(f"inject is on {inject.device} but rewards on {rewards.device}")
    return P


def group_advantages(rewards, group_size, inject=None, teacher_reward=O.TEACHER_REWARD,
                     scale="group", stats="all", eps=O.ADVANTAGE_EPS, dtype=torch.float64):
    """Advantages ``[P*G]`` (float64, or ``dtype``) and the replaced index per group (-1: none).

    ``dtype=torch.float32`` is the CPU path of ``hapo_kernels.group_advantages``.
    """
    P = check_groups(rewards, group_size, inject)
    scale, stats = O.check_scale(scale), O.check_stats(stats)
    eps = O._number("eps", eps, low=0.0)
    G = group_size
    r = rewards.to(dtype).reshape(P, G).clone()
    replaced = torch.full((P,), -1, dtype=torch.long, device=rewards.device)
    teacher = torch.zeros(P, G, dtype=torch.bool, device=rewards.device)
    if inject is not None and bool(inject.any()):
        k = torch.argmin(r, dim=1)                      # first index on ties
        rows = torch.nonzero(inject.bool()).squeeze(1)
        r[rows, k[rows]] = float(teacher_reward)
        teacher[rows, k[rows]] = True
        replaced[rows] = k[rows]
    member = ~teacher if stats == "on-policy" else torch.ones_like(teacher)
    w = member.to(dtype)
    n = w.sum(1, keepdim=True)
    mean = (w * r).sum(1, keepdim=True) / n.clamp(min=1.0)
    if scale == "none":
        adv = r - mean
    else:
        if scale == "group":
            var = (w * (r - mean) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1.0)
            std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
        else:  # "batch": one std over every counted member of the batch
            nb = w.sum()
            mb = (w * r).sum() / nb.clamp(min=1.0)
            var = (w * (r - mb) ** 2).sum() / (nb - 1).clamp(min=1.0)
            std = var.sqrt() if nb >= 2 else torch.zeros_like(var)
        denom = std + eps
        # eps = 0 with a constant group would be 0/0: such a group has no signal, A = 0.
        adv = torch.where(denom > 0, (r - mean) / torch.where(denom > 0, denom, 1.0),
                          torch.zeros_like(r))
    return adv.reshape(-1), replaced
