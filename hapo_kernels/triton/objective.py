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


@triton.jit
def on_policy_objective(logp, A, rho, params, OBJECTIVE: tl.constexpr,
                        HAS_DUAL: tl.constexpr):
    """``(l, dl/dlogp, clipped low, clipped high)`` of an on-policy token with ratio ``rho``
    (``d rho / d logp = rho`` for token-level ratios)."""
    eps_low = params[EPS_LOW]
    eps_high = params[EPS_HIGH]
    if OBJECTIVE == CISPO:                         # l = -sg(min(rho, eps_high)) A logp
        weight = tl.minimum(rho, eps_high)
        loss = -weight * A * logp
        g_logp = -weight * A
        low = rho < 0.0                            # no lower bound: never
        high = (rho > eps_high) & (A > 0)
    else:                                          # CLIP: l = -min(rho A, clip(rho) A)
        # The clipped branch is constant in logp.
        clipped = tl.minimum(tl.maximum(rho, 1.0 - eps_low), 1.0 + eps_high)
        unclipped_obj = rho * A
        clipped_obj = clipped * A
        loss = -tl.minimum(unclipped_obj, clipped_obj)
        g_logp = tl.where(unclipped_obj <= clipped_obj, -A * rho, 0.0)
        if HAS_DUAL:                               # A < 0: l = min(l, -c A)
            cap = -params[DUAL_CLIP] * A
            capped = (A < 0) & (loss > cap)
            loss = tl.where(capped, cap, loss)
            g_logp = tl.where(capped, 0.0, g_logp)
        low = (rho < 1.0 - eps_low) & (A < 0)
        high = (rho > 1.0 + eps_high) & (A > 0)
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
def token_objective(logp, ent, A, old, ref, is_teacher, valid, params,
                    OBJECTIVE: tl.constexpr, TEACHER_OBJ: tl.constexpr,
                    HAS_DUAL: tl.constexpr, USE_KL: tl.constexpr, USE_ENT: tl.constexpr):
    """A token's loss ``l``, ``dl/dlogp``, ``dl/dentropy``, ratio, k3 KL and clip flags."""
    rho = tl.exp(logp - old)
    pg, g_pg, low, high = on_policy_objective(logp, A, rho, params, OBJECTIVE, HAS_DUAL)
    l_t, g_t = teacher_objective(logp, A, pg, g_pg, params, TEACHER_OBJ)
    loss = tl.where(is_teacher, l_t, pg)
    g_logp = tl.where(is_teacher, g_t, g_pg)

    d = ref - logp                                 # k3: exp(d) - d - 1, d = ref - logp
    ed = tl.exp(d)
    kl = ed - d - 1.0
    if USE_KL:
        loss += params[BETA] * kl
        g_logp += params[BETA] * (1.0 - ed)
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
