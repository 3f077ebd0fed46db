"""The per-token objective of docs/design.md section 4: a table of objectives, in torch.

Each on-policy objective is one ``Objective`` entry: its name (the ``objective`` option),
its integer code (the Triton kernel's ``OBJECTIVE`` constexpr, see ``triton/objective.py``),
the ``LossOptions`` fields it reads, its per-token loss as a torch formula and its clip flags.
Teacher objectives (tokens of a demonstration put in by SSI) are a second, smaller table.

``token_objective`` assembles a token's loss from the tables (ratio, objective, teacher
objective, KL, entropy bonus) in any dtype and shape; the chunked CPU path evaluates it on
``[tokens]`` float32 vectors and takes its two derivatives by autograd (``token_terms``),
the float64 reference evaluates it in float64, and the Triton kernel's branch of each entry is
held to it by the tests. Adding an objective: an entry here, a branch in
``triton/objective.py`` (and a field in ``options.py`` if it has a new scalar option).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

if TYPE_CHECKING:                      # options imports the tables below
    from .options import LossOptions
    from .packed import Segments

Tensor = torch.Tensor


@dataclass(frozen=True)
class Objective:
    """One on-policy objective: ``loss(rho, logp, A, opts)`` per token and its clip flags.

    ``rho`` is the importance ratio (gradient flowing to ``logp``), ``logp`` the token's
    log-probability, ``A`` its advantage. ``clipped(rho, A, opts)`` gives the
    ``(low, high)`` flags the metrics count (``rho`` detached).
    """
    name: str
    code: int
    params: tuple
    loss: Callable[[Tensor, Tensor, Tensor, LossOptions], Tensor]
    clipped: Callable[[Tensor, Tensor, LossOptions], tuple]


def _clip_loss(rho, logp, A, opts):
    """PPO's clipped surrogate ``-min(rho A, clip(rho) A)`` with verl's dual clip."""
    clipped = torch.clamp(rho, 1.0 - opts.eps_low, 1.0 + opts.eps_high)
    loss = -torch.minimum(rho * A, clipped * A)
    if opts.dual_clip is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -opts.dual_clip * A), loss)
    return loss


def _clip_flags(rho, A, opts):
    return (rho < 1.0 - opts.eps_low) & (A < 0), (rho > 1.0 + opts.eps_high) & (A > 0)


def _cispo_loss(rho, logp, A, opts):
    """CISPO (MiniMax-M1; TRL's ``cispo``): the ratio capped at ``eps_high`` (the raw
    bound, no lower clip) and stopped from the gradient weights ``-A log p``, so every
    token keeps its gradient."""
    return -torch.clamp(rho, max=opts.eps_high).detach() * A * logp


def _cispo_flags(rho, A, opts):
    return torch.zeros_like(rho, dtype=torch.bool), (rho > opts.eps_high) & (A > 0)


OBJECTIVES = {o.name: o for o in (
    Objective("clip", 0, ("eps_low", "eps_high", "dual_clip"), _clip_loss, _clip_flags),
    Objective("cispo", 1, ("eps_high",), _cispo_loss, _cispo_flags),
)}


@dataclass(frozen=True)
class TeacherObjective:
    """The loss of a teacher token: ``loss(logp, A, on_policy_loss, opts)``."""
    name: str
    code: int
    params: tuple
    loss: Callable[[Tensor, Tensor, Tensor, LossOptions], Tensor]
    counts_clips: bool        # its tokens count in the clip fractions


def _shaped(logp, A, on_policy, opts):
    """LUFFY / HAPO: ``-A f(p)``, ``f(p) = p / (p + gamma)``, no ratio and no clip."""
    p = torch.exp(logp)
    return -A * p / (p + opts.teacher_gamma)


TEACHER_OBJECTIVES = {t.name: t for t in (
    TeacherObjective("shaped", 0, ("teacher_gamma",), _shaped, False),
    TeacherObjective("sft", 1, ("sft_weight",),
                     lambda logp, A, on_policy, opts: -opts.sft_weight * logp, False),
    TeacherObjective("ratio", 2, (), lambda logp, A, on_policy, opts: on_policy, True),
)}


class TokenObjective(NamedTuple):
    """What ``token_objective`` returns, each of ``logp``'s shape."""
    loss: Tensor                 # per-token loss, 0 on invalid tokens
    ratio: Tensor                # detached importance ratio
    clip_low: Tensor             # bool
    clip_high: Tensor            # bool
    kl: Optional[Tensor]         # detached k3, None without ref_logp


def importance_ratio(logp: Tensor, old_logp: Optional[Tensor], valid: Tensor,
                     opts: LossOptions, segments: Optional[Segments] = None) -> Tensor:
    """``rho``: per token, or per sequence (GSPO: the exp of the mean log-ratio of a
    sequence, a row of ``[B, T]`` or a segment of packed tokens), gradient to ``logp``."""
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    log_ratio = torch.where(valid, logp - old, torch.zeros_like(logp))
    if not opts.sequence_level:
        return torch.exp(log_ratio)
    m = valid.to(logp.dtype)
    if segments is not None:
        return torch.exp(segments.mean(log_ratio, m))
    seq = (m * log_ratio).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.exp(seq).expand_as(logp)


def token_objective(logp: Tensor, entropy: Optional[Tensor], advantages: Tensor,
                    valid: Tensor, *, old_logp: Optional[Tensor] = None,
                    ref_logp: Optional[Tensor] = None, teacher: Optional[Tensor] = None,
                    opts: LossOptions, segments: Optional[Segments] = None) -> TokenObjective:
    """Per-token loss and metrics of docs/design.md section 4, in ``logp``'s dtype.

    Every tensor has one shape: ``[B, T]`` (a sequence per row) or packed tokens with
    ``segments`` (a ``packed.Segments``). ``entropy`` may be None when
    ``opts.entropy_coef == 0``. Differentiable w.r.t. ``logp`` and ``entropy``.
    """
    dt = logp.dtype
    A = advantages.to(dt)
    rho = importance_ratio(logp, old_logp, valid, opts, segments)
    objective = OBJECTIVES[opts.objective]
    on_policy = objective.loss(rho, logp, A, opts)
    if teacher is None:
        teacher = torch.zeros_like(valid)
    teacher_objective = TEACHER_OBJECTIVES[opts.teacher_objective]
    loss = torch.where(teacher, teacher_objective.loss(logp, A, on_policy, opts), on_policy)

    kl = None
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.to(dt) - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1.0
        if opts.beta > 0:
            loss = loss + opts.beta * kl
    if opts.entropy_coef != 0:
        loss = loss - opts.entropy_coef * entropy

    counted = valid if teacher_objective.counts_clips else valid & ~teacher
    rd = rho.detach()
    low, high = objective.clipped(rd, A, opts)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    return TokenObjective(loss=torch.where(valid, loss, zero), ratio=rd,
                          clip_low=counted & low, clip_high=counted & high,
                          kl=None if kl is None else kl.detach())


class TokenTerms(NamedTuple):
    """``token_terms``' result: the weighted loss, its two derivatives and the metrics."""
    weighted_loss: Tensor        # w * l per token (detached)
    g_logp: Optional[Tensor]     # d(sum w l) / d logp, None without need_grad
    g_entropy: Optional[Tensor]  # d(sum w l) / d entropy
    objective: TokenObjective


def token_terms(logp: Tensor, entropy: Tensor, *, valid: Tensor, advantages: Tensor,
                old_logp: Optional[Tensor], ref_logp: Optional[Tensor], teacher: Tensor,
                weights: Tensor, opts: LossOptions, need_grad: bool,
                segments: Optional[Segments] = None) -> TokenTerms:
    """``w * l`` per token and the scalar derivatives ``d(sum w l)/dlogp``, ``/dentropy``.

    The chain rule through the logits needs only these two per-token scalars, so every
    backend's gradient pass takes them (any shape: ``[tokens]`` for token-level ratios,
    ``[B, T]`` or packed with ``segments`` for sequence-level ones).
    """
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(need_grad)
        en = entropy.detach().requires_grad_(need_grad)
        obj = token_objective(lp, en, advantages, valid, old_logp=old_logp,
                              ref_logp=ref_logp, teacher=teacher, opts=opts,
                              segments=segments)
        wl = weights * obj.loss
        g_logp = g_ent = None
        if need_grad:
            g_logp, g_ent = torch.autograd.grad(wl.sum(), (lp, en), allow_unused=True,
                                                materialize_grads=True)
    return TokenTerms(wl.detach(), g_logp, g_ent, obj._replace(loss=obj.loss.detach()))
