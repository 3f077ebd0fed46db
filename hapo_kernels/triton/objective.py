"""The per-token objective inside the Triton loss kernel: a branch per table entry.

``objective.py`` holds the tables (names, codes, torch formulas); this file holds each
entry's Triton branch, with the derivative ``dl/dlogp`` written out, and the scalar options
read from the kernel's ``params`` tuple (``options.KERNEL_PARAMS`` order). The tests hold
every branch to the torch formula.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..objective import OBJECTIVES, TEACHER_OBJECTIVES
from ..options import KERNEL_PARAMS

# Objective codes (the OBJECTIVE / TEACHER_OBJ constexprs).
CLIP = tl.constexpr(OBJECTIVES["clip"].code)
CISPO = tl.constexpr(OBJECTIVES["cispo"].code)
VERL_CISPO = tl.constexpr(OBJECTIVES["verl_cispo"].code)
SAPO = tl.constexpr(OBJECTIVES["sapo"].code)
# VESPO's per-sequence weight and GMPO's per-sequence ratio need a statistics pass: they
# never reach this kernel (``Objective.fused``).
UNCLIPPED = tl.constexpr(OBJECTIVES["unclipped"].code)
SHAPED = tl.constexpr(TEACHER_OBJECTIVES["shaped"].code)
SFT = tl.constexpr(TEACHER_OBJECTIVES["sft"].code)
RATIO = tl.constexpr(TEACHER_OBJECTIVES["ratio"].code)


def param(name: str) -> tl.constexpr:
    """The position of scalar option ``name`` in the kernel's ``params`` tuple."""
    return tl.constexpr(KERNEL_PARAMS.index(name))


EPS_LOW = param("eps_low")
EPS_HIGH = param("eps_high")
DUAL_CLIP = param("dual_clip")
BETA = param("beta")
ENTROPY_COEF = param("entropy_coef")
TEACHER_GAMMA = param("teacher_gamma")
SFT_WEIGHT = param("sft_weight")
DELTA = param("delta")
SAPO_POS = param("sapo_temperature_pos")
SAPO_NEG = param("sapo_temperature_neg")
LOG_RATIO_CLAMP = param("log_ratio_clamp")


@triton.jit
def on_policy_objective(logp, A, rho, live, params, OBJECTIVE: tl.constexpr,
                        HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """``(l, dl/dlogp, clipped low, clipped high)`` of an on-policy token with ratio ``rho``
    (``d rho / d logp = rho`` for token-level ratios where ``live``, 0 where the log-ratio
    was clamped)."""
    eps_low = params[EPS_LOW]
    eps_high = params[EPS_HIGH]
    if OBJECTIVE == CISPO:                         # l = -sg(min(rho, eps_high)) A logp
        weight = tl.minimum(rho, eps_high)
        loss = -weight * A * logp
        g_logp = -weight * A
        low = rho < 0.0                            # no lower bound: never
        high = (rho > eps_high) & (A > 0)
    elif OBJECTIVE == SAPO:                        # l = -(4 / tau) sigmoid(tau (rho - 1)) A
        tau = tl.where(A > 0, params[SAPO_POS], params[SAPO_NEG])
        sig = 1.0 / (1.0 + tl.exp(-tau * (rho - 1.0)))
        loss = -sig * (4.0 / tau) * A
        g_logp = tl.where(live, -4.0 * sig * (1.0 - sig) * rho * A, 0.0)
        low = rho < 0.0                            # no clip: never
        high = low
    elif OBJECTIVE == UNCLIPPED:                   # l = -rho A
        loss = -rho * A
        g_logp = tl.where(live, -rho * A, 0.0)    # 0 where the log-ratio was clamped
        low = rho < 0.0                            # no clip: never
        high = low
    elif OBJECTIVE == VERL_CISPO:                  # l = -sg(clip(rho, 1-lo, 1+hi)) A logp
        weight = tl.minimum(tl.maximum(rho, 1.0 - eps_low), 1.0 + eps_high)
        loss = -weight * A * logp
        g_logp = -weight * A
        low = rho < 1.0 - eps_low
        high = rho > 1.0 + eps_high
    else:                                          # CLIP: l = -min(min(rho, delta) A, clip(rho) A)
        clipped = tl.minimum(tl.maximum(rho, 1.0 - eps_low), 1.0 + eps_high)
        capped = rho
        g_unclipped = -A * rho
        if HAS_DELTA:                              # TRL's delta caps the unclipped branch
            capped = tl.minimum(rho, params[DELTA])
            g_unclipped = tl.where(rho <= params[DELTA], g_unclipped, 0.0)
        unclipped_obj = capped * A
        clipped_obj = clipped * A
        loss = -tl.minimum(unclipped_obj, clipped_obj)
        # The clipped branch moves with logp only inside the clip range; on a tie each
        # branch takes half (torch.minimum's rule), which sums to the full gradient there.
        in_range = (rho >= 1.0 - eps_low) & (rho <= 1.0 + eps_high)
        g_clipped = tl.where(in_range, -A * rho, 0.0)
        g_logp = tl.where(unclipped_obj < clipped_obj, g_unclipped,
                          tl.where(clipped_obj < unclipped_obj, g_clipped,
                                   0.5 * (g_unclipped + g_clipped)))
        g_logp = tl.where(live, g_logp, 0.0)      # a clamped log-ratio passes no gradient
        if HAS_DUAL:                               # A < 0: l = min(l, -c A)
            cap = -params[DUAL_CLIP] * A
            dual = (A < 0) & (loss > cap)
            loss = tl.where(dual, cap, loss)
            g_logp = tl.where(dual, 0.0, g_logp)
        low = (capped < 1.0 - eps_low) & (A < 0)  # TRL counts on the delta-capped ratio
        high = (capped > 1.0 + eps_high) & (A > 0)
    return loss, g_logp, low, high


@triton.jit
def teacher_objective(logp, A, on_policy_loss, on_policy_grad, params,
                      TEACHER_OBJ: tl.constexpr):
    """``(l, dl/dlogp)`` of a teacher token."""
    if TEACHER_OBJ == SHAPED:                      # -A p / (p + gamma)
        gamma = params[TEACHER_GAMMA]
        p = tl.exp(logp)
        loss = -A * p / (p + gamma)
        g_logp = -A * gamma * p / ((p + gamma) * (p + gamma))
    elif TEACHER_OBJ == SFT:                       # -w logp
        loss = -params[SFT_WEIGHT] * logp
        g_logp = tl.zeros_like(logp) - params[SFT_WEIGHT]
    else:                                          # RATIO: the on-policy objective
        loss = on_policy_loss
        g_logp = on_policy_grad
    return loss, g_logp


@triton.jit
def token_objective(logp, ent, A, old, ref, is_teacher, valid, policy_weight, params,
                    OBJECTIVE: tl.constexpr, TEACHER_OBJ: tl.constexpr,
                    HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr, USE_KL: tl.constexpr,
                    KL_BIAS: tl.constexpr, USE_ENT: tl.constexpr):
    """A token's loss ``l``, ``dl/dlogp``, ``dl/dentropy``, ratio, KL and clip flags.

    ``policy_weight`` (the rollout importance weight; 1.0 without one) multiplies the
    on-policy objective only, not the KL or the entropy bonus."""
    log_ratio = logp - old
    c = params[LOG_RATIO_CLAMP]                    # 0: no clamp
    clamped = tl.minimum(tl.maximum(log_ratio, -c), c)
    # A NaN log-ratio stays NaN (tl.minimum / tl.maximum would drop it).
    live = (c == 0.0) | (clamped == log_ratio) | (log_ratio != log_ratio)
    rho = tl.exp(tl.where(live, log_ratio, clamped))
    pg, g_pg, low, high = on_policy_objective(logp, A, rho, live, params, OBJECTIVE, HAS_DUAL,
                                              HAS_DELTA)
    pg = pg * policy_weight
    g_pg = g_pg * policy_weight
    l_t, g_t = teacher_objective(logp, A, pg, g_pg, params, TEACHER_OBJ)
    loss = tl.where(is_teacher, l_t, pg)
    g_logp = tl.where(is_teacher, g_t, g_pg)

    d = ref - logp                                 # k3: exp(d) - d - 1, d = ref - logp
    ed = tl.exp(d)
    kl = ed - d - 1.0
    g_kl = 1.0 - ed
    if KL_BIAS:                                    # TRL: rho k3; d(rho k3)/dlogp = -rho d
        g_kl = tl.where(live, -rho * d, rho * g_kl)   # a clamped rho is constant
        kl = rho * kl
    if USE_KL:
        loss += params[BETA] * kl
        g_logp += params[BETA] * g_kl
    g_ent = 0.0
    if USE_ENT:
        loss -= params[ENTROPY_COEF] * ent
        g_ent = -params[ENTROPY_COEF]
    # tl.minimum / tl.maximum drop NaN (IEEE minNum), so a NaN logit or log-ratio could
    # come out of the clip as a finite loss. Non-finite in, non-finite out.
    loss = tl.where((logp != logp) | (ent != ent) | (rho != rho), float("nan"), loss)
    # Clip fractions count on-policy tokens (and teacher tokens under "ratio").
    counted = valid & (~is_teacher)
    if TEACHER_OBJ == RATIO:
        counted = valid
    return loss, g_logp, g_ent, rho, kl, counted & low, counted & high
