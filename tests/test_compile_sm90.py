"""Every Triton kernel compiles for an H100/H200 (sm_90), on this CPU-only machine, as the
launchers really launch it.

The interpreter (``TRITON_INTERPRET=1``) accepts code that the CUDA compiler rejects (non-
constexpr shapes, scalar masks, mixed types in loop-carried values, an argument name that
Triton's launcher cannot bind). Here each launcher is called on CPU tensors with its kernel
call captured (``bench.kernel_report.capture``), and the captured arguments go through
Triton's own specialisation (pointer alignment, divisibility by 16 of integers), with the
``num_warps`` and block size the launcher picked, into ``triton.compile`` for sm_90 and the
bundled ``ptxas``. Every dtype, the loss kernel's flag combinations and objectives, aligned
and unaligned vocabularies. The hot-loop budget itself is ``bench.kernel_report``'s.
"""
import itertools

import pytest
import torch

from bench.kernel_report import capture, compile_sm90, hot_loop, loss_inputs_for
from hapo_kernels.objective import OBJECTIVES, TEACHER_OBJECTIVES
from hapo_kernels.options import AdvantageOptions, LossOptions
from hapo_kernels.outputs import TokenResults
from hapo_kernels.triton import advantages, logprobs, loss, scale

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Production vocabularies: a multiple of 16, a multiple of 8 only, odd; and a short row.
VOCABS = [151936, 151944, 32001, 40]


def only_launch(launches):
    assert len(launches) == 1, launches
    return launches[0]


@pytest.mark.parametrize("dtype,V", list(zip(itertools.cycle(DTYPES), VOCABS)))
def test_row_stats_kernel(dtype, V):
    with capture(logprobs.row_stats_kernel) as launches:
        logprobs.row_stats(torch.zeros(2, 3, V, dtype=dtype), torch.zeros(2, 3, dtype=torch.long))
    compiled = compile_sm90(only_launch(launches))
    assert compiled.local_bytes == 0                      # no spills


@pytest.mark.parametrize("has_logp,has_ent", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype,V", list(zip(DTYPES, VOCABS)))
def test_grad_logits_kernel(dtype, V, has_logp, has_ent):
    rows = 6
    g = torch.zeros(rows)
    with capture(logprobs.grad_logits_kernel) as launches:
        logprobs.grad_logits(torch.zeros(2, 3, V, dtype=dtype),
                             torch.zeros(2, 3, dtype=torch.long), g, g,
                             g if has_logp else None, g if has_ent else None)
    compile_sm90(only_launch(launches))


def test_strided_view_and_inplace_grad():
    """``logits[:, :-1]`` of an odd vocabulary (gradient rows in another frame), and the
    gradient written into the logits themselves."""
    V = 32001
    base = torch.zeros(2, 4, V, dtype=torch.bfloat16)
    g = torch.zeros(6)
    with capture(logprobs.grad_logits_kernel) as launches:
        logprobs.grad_logits(base[:, :-1], torch.zeros(2, 3, dtype=torch.long), g, g, g, g)
        view = base[:, :-1]
        logprobs.grad_logits(view, torch.zeros(2, 3, dtype=torch.long), g, g, g, g, out=view)
    assert [x.kwargs["SAME_FRAME"] for x in launches] == [False, True]
    for launch in launches:
        compile_sm90(launch)


def loss_launch(variant, V, dtype):
    """The fused-loss launch for a flag combination, through ``triton/loss.token_loss``."""
    objective = next(k for k, v in OBJECTIVES.items() if v.code == variant["OBJECTIVE"])
    teacher = next(k for k, v in TEACHER_OBJECTIVES.items()
                   if v.code == variant["TEACHER_OBJ"])
    opts = LossOptions(objective=objective, teacher_objective=teacher,
                       dual_clip=3.0 if variant["HAS_DUAL"] else None,
                       delta=2.0 if variant["HAS_DELTA"] else None,
                       beta=0.04 if variant["USE_KL"] else 0.0,
                       kl_bias_correction=variant["KL_BIAS"],
                       entropy_coef=0.01 if variant["USE_ENT"] else 0.0,
                       eps_high=5.0 if objective == "cispo" else 0.2)
    logits = torch.zeros(2, 3, V, dtype=dtype)
    inputs = loss_inputs_for(logits, opts, old=variant["HAS_OLD"], ref=variant["HAS_REF"],
                             rollout_is=variant["HAS_PW"])
    out = TokenResults.allocate(inputs.rows, inputs.ref_logp is not None, logits.device)
    grad = torch.empty_like(logits) if variant["WRITE_GRAD"] else None
    with capture(loss.hapo_loss_kernel) as launches:
        loss.token_loss(logits, inputs, opts, out, grad)
    launch = only_launch(launches)
    for flag, value in variant.items():
        assert launch.kwargs[flag] == value, flag
    return launch


# Every value of every flag of the loss kernel appears, and every objective of the table
# that has a kernel branch (one with a sequence weight runs statistics-first); dtypes and
# vocabularies rotate through them.
KERNEL_OBJECTIVES = [o.code for o in OBJECTIVES.values() if o.fused]
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


@pytest.mark.parametrize("variant,dtype,V", list(zip(LOSS_VARIANTS, itertools.cycle(DTYPES),
                                                     itertools.cycle(VOCABS))))
def test_hapo_loss_kernel(variant, dtype, V):
    compiled = compile_sm90(loss_launch(variant, V, dtype))
    assert compiled.local_bytes == 0




@pytest.mark.parametrize("V", [151944, 32001])
def test_hot_loops_read_and_write_128_bits(V):
    """A vocabulary that is not a multiple of 16 still streams in 128-bit vectors: the
    launcher's alignment check and the kernel's row frame, as compiled."""
    variant = dict(LOSS_VARIANTS[1], WRITE_GRAD=True)
    compiled = compile_sm90(loss_launch(variant, V, torch.bfloat16))
    for role in ("read", "rw"):
        loop = hot_loop(compiled, role)
        assert loop.ldg128 > 0 and loop.ldg_narrow == 0, (role, loop)
        assert loop.bars == 0 and loop.spill == 0, (role, loop)
        if role == "rw":
            assert loop.stg128 > 0 and loop.stg_narrow == 0, loop


@pytest.mark.parametrize("has_inject,scale,stats,has_index,has_teacher_r",
                         [(True, "group", "all", False, False),
                          (False, "batch", "on-policy", False, False),
                          (True, "none", "on-policy", True, True),
                          (True, "batch", "all", True, False),
                          (True, "group", "on-policy", False, True)])
def test_group_advantages_kernel(has_inject, scale, stats, has_index, has_teacher_r):
    inject = torch.tensor([True, False, True]) if has_inject else None
    with capture(advantages.group_advantages_kernel) as launches:
        advantages.group_advantages(
            torch.rand(12), torch.arange(0, 13, 4), inject,
            AdvantageOptions(scale=scale, stats=stats),
            replace_index=torch.tensor([1, 0, 3]) if has_index else None,
            teacher_rewards=torch.tensor([1.0, 0.5, 0.9]) if has_teacher_r else None)
    assert launches
    for launch in launches:
        assert (launch.kwargs["HAS_INDEX"], launch.kwargs["HAS_TEACHER_R"]) == \
            (has_index, has_teacher_r)
        compile_sm90(launch)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rows_kernel(dtype):
    """The backward's device-side scale: a data-dependent branch on a loaded scalar."""
    x = torch.zeros(2, 4, 32001, dtype=dtype)[:, :-1]
    with capture(scale.scale_rows_kernel) as launches:
        scale.scale_gradient_(x, torch.tensor(2.0))
    assert compile_sm90(only_launch(launches)).local_bytes == 0
