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

import math
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
    log-probability, ``A`` its advantage. ``clipped(rho, A, opts, log_ratio)`` gives the
    ``(low, high)`` flags the metrics count (``rho`` detached; ``log_ratio`` the token's own
    ``logp - old_logp``, detached, which GMPO's flags read).

    ``ratio``, where set, is the objective's own importance ratio in place of
    ``importance_ratio``'s: ``ratio(log_ratio, A, valid, opts, segments)`` with gradient
    (GMPO: the geometric mean of a sequence's clipped token ratios). It is per sequence, so
    such an objective runs statistics-first too.

    ``sequence_weight``, where set, is a per-sequence weight without gradient that multiplies
    the token's loss (VESPO's gamma weight): ``sequence_weight(log_ratio, A, valid,
    rollout_is, opts, segments)`` per token. It needs the whole sequence's log-ratios, so
    such an objective runs statistics-first (``twopass.py``) and has no branch in the fused
    Triton kernel; the caller's rollout importance weights enter it instead of multiplying
    the loss.
    """
    name: str
    code: int
    params: tuple
    loss: Callable[[Tensor, Tensor, Tensor, LossOptions], Tensor]
    clipped: Callable[[Tensor, Tensor, LossOptions], tuple]
    sequence_weight: Optional[Callable[..., Tensor]] = None
    ratio: Optional[Callable[..., Tensor]] = None

    @property
    def fused(self) -> bool:
        """Whether the fused Triton kernel has a branch for it: per-token terms only."""
        return self.sequence_weight is None and self.ratio is None


def _capped(rho, opts):
    """TRL's ``delta``: the unclipped branch's ratio ``min(rho, delta)``."""
    return rho if opts.delta is None else torch.clamp(rho, max=opts.delta)


def _clip_loss(rho, logp, A, opts):
    """PPO's clipped surrogate ``-min(min(rho, delta) A, clip(rho) A)`` (TRL's ``delta``:
    the cap on the unclipped branch only) with verl's dual clip."""
    clipped = torch.clamp(rho, 1.0 - opts.eps_low, 1.0 + opts.eps_high)
    loss = -torch.minimum(_capped(rho, opts) * A, clipped * A)
    if opts.dual_clip is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -opts.dual_clip * A), loss)
    return loss


def _clip_flags(rho, A, opts, log_ratio):
    # TRL counts the clip regions on the delta-capped ratio.
    r = _capped(rho, opts)
    return (r < 1.0 - opts.eps_low) & (A < 0), (r > 1.0 + opts.eps_high) & (A > 0)


def _cispo_loss(rho, logp, A, opts):
    """CISPO (MiniMax-M1; TRL's ``cispo``): the ratio capped at ``eps_high`` (the raw
    bound, no lower clip) and stopped from the gradient weights ``-A log p``, so every
    token keeps its gradient."""
    return -torch.clamp(rho, max=opts.eps_high).detach() * A * logp


def _cispo_flags(rho, A, opts, log_ratio):
    return torch.zeros_like(rho, dtype=torch.bool), (rho > opts.eps_high) & (A > 0)


def _sapo_loss(rho, logp, A, opts):
    """SAPO (TRL's ``sapo``): a soft gate ``-(4 / tau) sigmoid(tau (rho - 1)) A`` instead of a
    hard clip, ``tau`` = ``sapo_temperature_pos`` for ``A > 0``, else ``_neg``."""
    tau = torch.where(A > 0, torch.full_like(A, opts.sapo_temperature_pos),
                      torch.full_like(A, opts.sapo_temperature_neg))
    return -torch.sigmoid(tau * (rho - 1.0)) * (4.0 / tau) * A


def _no_flags(rho, A, opts, log_ratio):
    none = torch.zeros_like(rho, dtype=torch.bool)
    return none, none


def _vespo_loss(rho, logp, A, opts):
    """VESPO (TRL's ``vespo``): ``-phi A logp``; ``phi`` is the sequence weight below."""
    return -A * logp


LOG_1E_8 = math.log(1e-8)


def _vespo_weight(log_ratio, A, valid, rollout_is, opts, segments):
    """TRL's ``get_gamma_weights``: ``phi = exp(lambda + k log w - lambda w)`` with
    ``log w = clamp(sum_t clamp(log-ratio, -20, 20) + sum_t clamp(log is_t, ln 1e-8, 20),
    ln 1e-8, 20)`` over the sequence's valid tokens; ``(k, lambda)`` by ``A >= 0``; no
    gradient; a non-finite ``phi`` is 0."""
    with torch.no_grad():
        zero = torch.zeros_like(log_ratio)
        terms = torch.where(valid, torch.clamp(log_ratio.detach(), -20.0, 20.0), zero)
        if rollout_is is not None:
            log_is = torch.clamp(torch.log(rollout_is.to(log_ratio.dtype)), LOG_1E_8, 20.0)
            terms = terms + torch.where(valid, log_is, zero)
        if segments is not None:
            seq = segments.broadcast(segments.sum(terms)).reshape(terms.shape)
        else:
            seq = terms.sum(-1, keepdim=True).expand_as(terms)
        log_w = torch.clamp(seq, LOG_1E_8, 20.0)
        nonneg = A >= 0
        k = torch.where(nonneg, torch.full_like(A, opts.vespo_k_pos),
                        torch.full_like(A, opts.vespo_k_neg))
        lam = torch.where(nonneg, torch.full_like(A, opts.vespo_lambda_pos),
                          torch.full_like(A, opts.vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _unclipped_loss(rho, logp, A, opts):
    """The importance-weighted policy gradient without a clip, ``-rho A`` (LUFFY's released
    training setting ``loss_remove_clip=True``)."""
    return -rho * A


def _verl_cispo_loss(rho, logp, A, opts):
    """verl's ``cispo``: the ratio clipped to ``[1 - eps_low, 1 + eps_high]`` (both sides,
    unlike TRL's raw cap) and stopped from the gradient weights ``-A log p``."""
    return -torch.clamp(rho, 1.0 - opts.eps_low, 1.0 + opts.eps_high).detach() * A * logp


def _verl_cispo_flags(rho, A, opts, log_ratio):
    """verl counts every token whose ratio the clip moved, whatever the sign of A."""
    return rho < 1.0 - opts.eps_low, rho > 1.0 + opts.eps_high


def sequence_mean(x: Tensor, valid: Tensor, segments: Optional[Segments] = None) -> Tensor:
    """Each token gets the mean of ``x`` over its sequence's valid tokens (0 for a sequence
    without one), in ``x``'s shape: a row of ``[B, T]`` or a segment of packed tokens.
    Differentiable w.r.t. ``x``."""
    m = valid.to(x.dtype)
    if segments is not None:
        return segments.mean(x, m)
    return ((m * x).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(x)


def _geo_mean_ratio(log_ratio, A, valid, opts, segments):
    """GMPO (verl's ``geo_mean``): per sequence, ``exp`` of the mean over its valid tokens of
    each token's log-ratio clipped on the side its advantage makes pessimistic,
    ``sgn(A) min(sgn(A) r, sgn(A) clip(r, -eps_low, eps_high))``: for ``A > 0`` at most
    ``eps_high``, for ``A < 0`` at least ``-eps_low``, for ``A = 0`` zero (the clip is in log
    space). No gradient where the clip bites (torch's ``minimum``, as verl)."""
    sgn = torch.sign(A)
    clipped = torch.clamp(log_ratio, -opts.eps_low, opts.eps_high)
    pessimistic = sgn * torch.minimum(sgn * log_ratio, sgn * clipped)
    return torch.exp(sequence_mean(pessimistic, valid, segments))


def _geo_mean_loss(rho, logp, A, opts):
    """GMPO: ``-A rho`` with ``rho`` the sequence's geometric-mean ratio; averaged over a
    sequence's tokens (``seq-mean-token-mean``) it is verl's ``-mean(A) rho`` per sequence."""
    return -rho * A


def _geo_mean_flags(rho, A, opts, log_ratio):
    """verl's geo_mean counts a token whose own log-ratio is outside ``[-eps_low, eps_high]``
    (either side): as clipped high where ``A > 0``, low where ``A < 0``."""
    outside = (log_ratio < -opts.eps_low) | (log_ratio > opts.eps_high)
    return outside & (A < 0), outside & (A > 0)


def _geo_mean_weight(log_ratio, A, valid, rollout_is, opts, segments):
    """verl's geo_mean takes the rollout weights per sequence, as their geometric mean over
    its valid tokens ``exp(mean_t log(w_t + 1e-10))`` (1 without weights); no gradient."""
    if rollout_is is None:
        return torch.ones_like(log_ratio)
    with torch.no_grad():
        log_w = torch.log(rollout_is.to(log_ratio.dtype) + 1e-10)
        return torch.exp(sequence_mean(torch.where(valid, log_w, torch.zeros_like(log_w)),
                                       valid, segments))


OBJECTIVES = {o.name: o for o in (
    Objective("clip", 0, ("eps_low", "eps_high", "dual_clip", "delta"), _clip_loss,
              _clip_flags),
    Objective("cispo", 1, ("eps_high",), _cispo_loss, _cispo_flags),
    Objective("sapo", 2, ("sapo_temperature_pos", "sapo_temperature_neg"), _sapo_loss,
              _no_flags),
    Objective("vespo", 3, ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                           "vespo_lambda_neg"), _vespo_loss, _no_flags, _vespo_weight),
    Objective("unclipped", 4, (), _unclipped_loss, _no_flags),
    Objective("verl_cispo", 5, ("eps_low", "eps_high"), _verl_cispo_loss, _verl_cispo_flags),
    Objective("geo_mean", 6, ("eps_low", "eps_high"), _geo_mean_loss, _geo_mean_flags,
              _geo_mean_weight, _geo_mean_ratio),
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
    kl: Optional[Tensor]         # detached k3 (times rho with kl_bias_correction); None
    #                              without ref_logp


def log_ratio(logp: Tensor, old_logp: Optional[Tensor], valid: Tensor) -> Tensor:
    """``logp - old_logp`` on valid tokens, 0 elsewhere (no ``old_logp``: ``stop_grad(logp)``,
    so 0 with gradient 1)."""
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    return torch.where(valid, logp - old, torch.zeros_like(logp))


def importance_ratio(logp: Tensor, old_logp: Optional[Tensor], valid: Tensor,
                     opts: LossOptions, segments: Optional[Segments] = None,
                     advantages: Optional[Tensor] = None) -> Tensor:
    """``rho``: per token, or per sequence (GSPO: the exp of the mean log-ratio of a
    sequence, a row of ``[B, T]`` or a segment of packed tokens), gradient to ``logp``;
    the log-ratio clamped by ``opts.log_ratio_clamp`` when set. An objective with its own
    ratio (GMPO) gets each token's log-ratio, clamped to ``[-c, c]`` first, and
    ``advantages``."""
    r = log_ratio(logp, old_logp, valid)
    c = opts.log_ratio_clamp
    own_ratio = OBJECTIVES[opts.objective].ratio
    if own_ratio is not None:
        return own_ratio(r if c is None else torch.clamp(r, -c, c), advantages, valid, opts,
                         segments)
    if not opts.sequence_level:
        # torch.clamp passes no gradient where it clamps, as verl's ratio does.
        return torch.exp(r if c is None else torch.clamp(r, -c, c))
    seq = sequence_mean(r, valid, segments)
    if opts.importance_sampling == "sequence_token":
        # GSPO-token (verl's gspo): the value is the sequence's, the gradient the token's.
        seq = r - r.detach() + seq.detach()
    if c is not None:                  # verl's gspo clamps the sequence log-ratio above only
        seq = torch.clamp(seq, max=c)
    return torch.exp(seq)


def token_objective(logp: Tensor, entropy: Optional[Tensor], advantages: Tensor,
                    valid: Tensor, *, old_logp: Optional[Tensor] = None,
                    ref_logp: Optional[Tensor] = None, teacher: Optional[Tensor] = None,
                    rollout_is: Optional[Tensor] = None,
                    policy_mask: Optional[Tensor] = None,
                    opts: LossOptions, segments: Optional[Segments] = None) -> TokenObjective:
    """Per-token loss and metrics of docs/design.md section 4, in ``logp``'s dtype.

    Every tensor has one shape: ``[B, T]`` (a sequence per row) or packed tokens with
    ``segments`` (a ``packed.Segments``). ``entropy`` may be None when
    ``opts.entropy_coef == 0``. Differentiable w.r.t. ``logp`` and ``entropy``.

    ``rollout_is`` (the caller's rollout importance weights, TRL's
    ``importance_sampling_ratio``, verl's ``rollout_is_weights``) and ``policy_mask`` (the
    entropy-quantile and off-policy masks, ``masks.py``) multiply the on-policy objective
    of each token, never the KL or the entropy bonus (TRL's order); an objective with a
    ``sequence_weight`` (VESPO) takes ``rollout_is`` into that weight instead. With
    ``opts.entropy_mean`` the entropy bonus is left to the caller (``token_terms``): it is
    a batch mean, not a per-token term.
    """
    dt = logp.dtype
    A = advantages.to(dt)
    rho = importance_ratio(logp, old_logp, valid, opts, segments, A)
    objective = OBJECTIVES[opts.objective]
    on_policy = objective.loss(rho, logp, A, opts)
    if objective.sequence_weight is not None:
        on_policy = on_policy * objective.sequence_weight(
            log_ratio(logp, old_logp, valid), A, valid, rollout_is, opts, segments)
    elif rollout_is is not None:
        on_policy = on_policy * rollout_is.to(dt)
    if policy_mask is not None:
        on_policy = on_policy * policy_mask.to(dt)
    if teacher is None:
        teacher = torch.zeros_like(valid)
    teacher_objective = TEACHER_OBJECTIVES[opts.teacher_objective]
    loss = torch.where(teacher, teacher_objective.loss(logp, A, on_policy, opts), on_policy)

    kl = None
    if ref_logp is not None:
        d = torch.where(valid, ref_logp.to(dt) - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1.0
        if opts.kl_bias_correction:      # TRL: k3 times the un-clipped ratio, both with grad
            kl = kl * rho
        if opts.beta > 0:
            loss = loss + opts.beta * kl
    if opts.entropy_coef != 0 and not opts.entropy_mean:
        loss = loss - opts.entropy_coef * entropy

    counted = valid if teacher_objective.counts_clips else valid & ~teacher
    rd = rho.detach()
    low, high = objective.clipped(rd, A, opts, log_ratio(logp.detach(), old_logp, valid))
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
                rollout_is: Optional[Tensor] = None, policy_mask: Optional[Tensor] = None,
                entropy_weights: Optional[Tensor] = None,
                segments: Optional[Segments] = None) -> TokenTerms:
    """``w * l`` per token and the scalar derivatives ``d(sum w l)/dlogp``, ``/dentropy``.

    The chain rule through the logits needs only these two per-token scalars, so every
    backend's gradient pass takes them (any shape: ``[tokens]`` for token-level ratios,
    ``[B, T]`` or packed with ``segments`` for sequence-level ones). With
    ``opts.entropy_mean`` the bonus ``-entropy_coef * entropy_weights * entropy`` is added
    per token (``entropy_weights``: the batch-mean weights, ``masks.entropy_mean_weights``).
    """
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(need_grad)
        en = entropy.detach().requires_grad_(need_grad)
        obj = token_objective(lp, en, advantages, valid, old_logp=old_logp,
                              ref_logp=ref_logp, teacher=teacher, rollout_is=rollout_is,
                              policy_mask=policy_mask, opts=opts, segments=segments)
        wl = weights * obj.loss
        if opts.entropy_mean and opts.entropy_coef != 0:
            wl = wl - opts.loss_scale * opts.entropy_coef * entropy_weights * torch.where(
                valid, en, torch.zeros_like(en))
        g_logp = g_ent = None
        if need_grad:
            g_logp, g_ent = torch.autograd.grad(wl.sum(), (lp, en), allow_unused=True,
                                                materialize_grads=True)
    return TokenTerms(wl.detach(), g_logp, g_ent, obj._replace(loss=obj.loss.detach()))
