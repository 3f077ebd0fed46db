"""Every Triton kernel compiles for an H100 (sm_90), on this CPU-only machine.

The interpreter (``TRITON_INTERPRET=1``) accepts code that the CUDA compiler rejects (non-
constexpr shapes, scalar masks, mixed types in loop-carried values). ``triton.compile`` with
a CUDA target runs the real front end, the MLIR passes and the bundled ``ptxas`` without a
GPU, so those mistakes surface in CI instead of on the first lent GPU. Each kernel is built
for every dtype and for the constexpr variants the wrappers launch.
"""
import itertools

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from hapo_kernels.objective import OBJECTIVES
from hapo_kernels.options import KERNEL_PARAMS
from hapo_kernels.triton import advantages, logprobs, loss

SM90 = GPUTarget("cuda", 90, 32)
LOGIT_TYPES = ["*fp32", "*bf16", "*fp16"]


def compile_for_sm90(kernel, signature, constexprs):
    """Compile ``kernel`` (a ``triton.jit`` function, or one under ``triton.heuristics``,
    whose flags the test then gives as constexprs); a ``None`` pointer is a constexpr."""
    fn = kernel
    while not isinstance(fn, JITFunction):     # unwrap triton.heuristics / autotune
        fn = fn.fn
    constexprs = dict(constexprs, **{k: None for k, v in signature.items() if v is None})
    sig = dict({k: v for k, v in signature.items() if v is not None},
               **{k: "constexpr" for k in constexprs})
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=SM90)
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0


ROW = {"T": "i32", "V": "i32", "stride_b": "i64", "stride_t": "i64", "inv_temp": "fp32"}


@pytest.mark.parametrize("x", LOGIT_TYPES)
def test_row_stats_kernel(x):
    compile_for_sm90(logprobs.row_stats_kernel,
                     dict(x_ptr=x, y_ptr="*i64", logp_ptr="*fp32", ent_ptr="*fp32",
                          lse_ptr="*fp32", spz_ptr="*fp32", ignore_index="i32", **ROW),
                     {"BLOCK_V": 4096})


@pytest.mark.parametrize("x", LOGIT_TYPES)
@pytest.mark.parametrize("has_logp,has_ent", [(True, True), (True, False), (False, True)])
def test_grad_logits_kernel(x, has_logp, has_ent):
    compile_for_sm90(logprobs.grad_logits_kernel,
                     dict(x_ptr=x, y_ptr="*i64", lse_ptr="*fp32", spz_ptr="*fp32",
                          gl_ptr="*fp32" if has_logp else None,
                          ge_ptr="*fp32" if has_ent else None, dx_ptr=x, dstride_b="i64",
                          dstride_t="i64", ignore_index="i32", **ROW),
                     {"HAS_LOGP": has_logp, "HAS_ENT": has_ent, "BLOCK_V": 4096})


# Every value of every flag of the loss kernel appears, and every objective of the table
# that has a kernel branch (one with a sequence weight runs statistics-first); dtypes rotate.
KERNEL_OBJECTIVES = [o.code for o in OBJECTIVES.values() if o.sequence_weight is None]
LOSS_VARIANTS = [dict(HAS_OLD=o, HAS_REF=r, HAS_DUAL=d, USE_KL=r and k, USE_ENT=e,
                      TEACHER_OBJ=t, WRITE_GRAD=g, HAS_DELTA=dl, KL_BIAS=r and k and kb,
                      HAS_PW=pw, OBJECTIVE=KERNEL_OBJECTIVES[i % len(KERNEL_OBJECTIVES)])
                 for i, (o, r, d, k, e, t, g, dl, kb, pw) in enumerate([
                     (True, True, True, True, True, 0, True, True, True, True),
                     (False, False, False, False, False, 1, True, False, False, False),
                     (True, True, False, False, True, 2, False, True, False, True),
                     (False, True, True, True, False, 0, False, False, True, False),
                     (True, False, True, False, True, 2, True, True, False, True),
                     (True, True, False, True, False, 1, True, False, False, True)])]


@pytest.mark.parametrize("variant,x", list(zip(LOSS_VARIANTS, itertools.cycle(LOGIT_TYPES))))
def test_hapo_loss_kernel(variant, x):
    f32 = "*fp32"
    compile_for_sm90(loss.hapo_loss_kernel,
                     dict(x_ptr=x, dx_ptr=x if variant["WRITE_GRAD"] else None, y_ptr="*i64",
                          valid_ptr="*i8", adv_ptr=f32,
                          old_ptr=f32 if variant["HAS_OLD"] else None,
                          ref_ptr=f32 if variant["HAS_REF"] else None, teacher_ptr="*i8",
                          w_ptr=f32, loss_ptr=f32, logp_ptr=f32, ent_ptr=f32, ratio_ptr=f32,
                          clip_lo_ptr="*i8", clip_hi_ptr="*i8",
                          kl_ptr=f32 if variant["HAS_REF"] else None,
                          pw_ptr=f32 if variant["HAS_PW"] else None, dstride_b="i64",
                          dstride_t="i64", n_rows="i32",
                          params=tuple("fp32" for _ in KERNEL_PARAMS), **ROW),
                     dict(variant, BLOCK_V=4096))


@pytest.mark.parametrize("has_inject,scale,stats,has_index,has_teacher_r",
                         [(True, 0, 0, False, False), (False, 1, 1, False, False),
                          (True, 2, 1, True, True), (True, 1, 0, True, False),
                          (True, 0, 1, False, True)])
def test_group_advantages_kernel(has_inject, scale, stats, has_index, has_teacher_r):
    compile_for_sm90(advantages.group_advantages_kernel,
                     dict(r_ptr="*fp32", offsets_ptr="*i64",
                          inject_ptr="*i8" if has_inject else None,
                          index_ptr="*i64" if has_index else None,
                          teacher_r_ptr="*fp32" if has_teacher_r else None,
                          adv_ptr="*fp32", r_sub_ptr="*fp32", member_ptr="*i8",
                          replaced_ptr="*i64", batch_std_ptr="*fp32" if scale == 1 else None,
                          teacher_reward="fp32", eps="fp32"),
                     dict(HAS_INJECT=has_inject, HAS_INDEX=has_index,
                          HAS_TEACHER_R=has_teacher_r, SCALE=scale, STATS=stats, BLOCK_G=16))
