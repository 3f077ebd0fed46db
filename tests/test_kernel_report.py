"""bench/kernel_report.py: its SASS reading and its model, on known inputs.

The report's numbers come from compiling the kernels (tests/test_compile_sm90.py compiles
them too); here the parts that turn SASS into numbers are checked on hand-written listings,
and the model on configurations whose answer is known by arithmetic.
"""
import pytest
import torch

from bench import kernel_report as kr

# A hand-made listing: a prologue, a loop of 6 instructions closed by a backward branch
# (with a nested self-branch trap at the end that is not a loop body), a second loop.
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.EL.128 R8, desc[UR4][R6.64] ;
        /*0030*/                   FMNMX R3, R8, R9, !PT ;
        /*0040*/                   MUFU.EX2 R10, R3 ;
        /*0050*/                   NOP ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/               @P0 BRA 0x20 ;
        /*0080*/                   STG.E.EF.128 desc[UR4][R6.64], R8 ;
        /*0090*/                   STG.E.U16 desc[UR4][R6.64], R2 ;
        /*00a0*/              @!P1 BRA 0x80 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_loops_of_a_listing():
    sass = kr.parse_sass(LISTING)
    assert sass[0] == (0, "MOV R1, c[0x0][0x28]") and len(sass) == 13
    loops = kr.loops_of(sass)
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x70), (0x80, 0xa0)]
    first, second = loops
    assert first.instrs == 5                     # the NOP is not counted
    assert (first.ldg128, first.ldg_narrow, first.bars, first.mufu) == (1, 0, 1, 1)
    assert first.load_bytes == 16 and first.store_bytes == 0
    assert (second.stg128, second.stg_narrow, second.store_bytes) == (1, 1, 18)


def test_innermost_loops_only():
    nested = LISTING.replace("@!P1 BRA 0x80", "@!P1 BRA 0x10")   # an outer loop 0x10..0xa0
    loops = kr.loops_of(kr.parse_sass(nested))
    assert [(lp.start, lp.end) for lp in loops] == [(0x20, 0x70)]


def test_l2_hit_fraction():
    row = 151936 * 2
    assert kr.l2_hit(132, row) == 1.0            # 40 MB of rows in flight fit in 50 MB
    assert kr.l2_hit(1056, row) == pytest.approx(kr.L2_BYTES / (1056 * row))


def test_lm_head_accumulator_below_the_matmuls():
    """At the production head (16k x 152k x 4096 bf16) the weight gradient's accumulator
    moves fewer bytes than the matmuls' operands, with the default chunks."""
    m = kr.lm_head_model()
    assert m["chunks"] == 10 and m["accumulator_gb"] < m["matmul_operand_gb"]
    assert kr.lm_head_model(fp32_accumulate=False)["accumulator_gb"] == \
        pytest.approx(m["accumulator_gb"] / 2, rel=0.01)


@pytest.mark.parametrize("V,aligned", [(40, True), (41, False)])
def test_capture_records_instead_of_running(V, aligned):
    from hapo_kernels.triton import logprobs
    logits = torch.randn(2, 3, V)
    out = tuple(torch.full((6,), 7.0) for _ in range(4))
    with kr.capture(logprobs.row_stats_kernel) as launches:
        logprobs.row_stats(logits, torch.zeros(2, 3, dtype=torch.long), out=out)
    assert len(launches) == 1 and launches[0].grid == (6,)
    assert all(torch.equal(t, torch.full((6,), 7.0)) for t in out)   # nothing ran
    # fp32: 4 per 128-bit vector; rows of 41 do not start on 16 bytes.
    assert launches[0].kwargs["VEC"] == 4 and launches[0].kwargs["ALIGNED"] is aligned
