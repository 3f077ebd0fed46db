"""What the Triton kernels compile to on an H100/H200 (sm_90), read on any machine.

``python -m bench.kernel_report [--json PATH]``

No GPU needed: Triton's own compiler, ``ptxas`` and ``cuobjdump`` (bundled with the triton
package) build every kernel the launchers would start at the production configurations, and
the report reads the SASS. A launch is captured, not run: the launcher is called on small
CPU tensors with the production vocabulary and dtype, its kernel call is intercepted, and
the arguments go through Triton's own specialisation (the divisibility and alignment it
would see on a GPU), ``num_warps`` and block sizes as the launcher picked them.

Per hot loop (an innermost loop of the SASS, found by its back-edge branch):
instructions per element (per thread and iteration, over the elements a thread handles per
iteration), 128-bit and narrow global loads and stores, barriers, shuffles, MUFU
(exp/log) instructions. Per kernel: registers, spill instructions, shared memory.

The time is a model, not a measurement, stated here in full:

* issue roof: ``SMS * 4`` warp instructions per clock at ``CLOCK_HZ``: the loop body once
  per block of the row (the masked first and last blocks cost an iteration each), the rest
  of the straight-line code once per row (``scalar_code``); the MUFU pipe ``SMS * 16``
  lanes per clock;
* memory roof: bytes moved at ``BANDWIDTH`` (sustained), or less where too few bytes are
  in flight (Little's law: rows in flight x one block each / ``LATENCY_S``), where the
  gradient pass's second read of a row hits L2 with the fraction ``l2_hit`` below;
* a pass takes the larger of the issue, MUFU and memory times; the passes of a call add;
* ``floor_ms``: the bytes no implementation can avoid (read the logits once, write the
  gradient once) at the peak bandwidth ``PEAK_BANDWIDTH``.

``l2_hit``: the fused loss reads its row again, last block first. Pass 1 loads are marked
evict-last and the gradient pass's loads and stores evict-first, so only the rows being
read compete for L2: with ``R`` rows in flight of ``row_bytes`` each, a fraction
``min(1, L2_BYTES / (R * row_bytes))`` of the re-read is modelled as an L2 hit. ``R`` is
the grid's rows in flight: the persistent grid's programs, or SMs times the CTAs that
fit on an SM (registers, warps, shared memory).

``.ci/run`` runs it (``make kernel-report``); it exits non-zero when a loss or log-prob
loop is over ``BUDGET_INSTR_PER_ELEM``, spills, or reads its logits narrower than 128 bits.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

# ---------------------------------------------------------------------------- the model
SMS = 132                       # H200 SXM (and H100 SXM)
CLOCK_HZ = 1.98e9               # boost clock
ISSUE_PER_SM_CLOCK = 4          # warp instructions per SM per clock (4 schedulers)
MUFU_PER_SM_CLOCK = 16          # exp2 / log2 lanes per SM per clock
BANDWIDTH = 4.3e12              # sustained HBM3e bytes per second (about 90% of peak)
PEAK_BANDWIDTH = 4.8e12         # HBM3e peak: the floor
L2_BYTES = 50e6
LATENCY_S = 1e-6                # loaded DRAM latency, for Little's law
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
SHARED_PER_SM = 228 * 1024
MAX_CTAS_PER_SM = 32

BUDGET_INSTR_PER_ELEM = 12.0
ROWS = 16384                    # tokens of the production configuration
VOCABS = {"qwen2.5 (151936)": 151936, "llama2 (32000)": 32000,
          "padded to 8, not 16 (151944)": 151944, "odd (32001)": 32001,
          "tp=8 shard of 151936 (18992)": 18992, "tp=3 shard of 151936 (50646)": 50646}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------- capture
@dataclasses.dataclass
class Launch:
    """A kernel call as a launcher made it: the JIT function, its arguments and grid."""
    fn: Any
    args: tuple
    kwargs: dict
    grid: tuple


def jit_function(kernel: Any) -> Any:
    """The ``JITFunction`` under ``triton.heuristics`` / ``autotune`` wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def capture(*kernels: Any) -> Iterator[List[Launch]]:
    """Inside the block, calls of ``kernels`` are recorded instead of run (heuristics have
    already filled in their constexprs)."""
    launches: List[Launch] = []
    fns = [jit_function(k) for k in kernels]

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(fn, args, dict(kwargs), grid))
        return run

    for fn in fns:
        fn.run = recorder(fn)
    try:
        yield launches
    finally:
        for fn in fns:
            del fn.run


# ---------------------------------------------------------------------------- compile
@dataclasses.dataclass
class Compiled:
    name: str
    num_warps: int
    shared: int
    regs: int
    local_bytes: int
    sass: List[Tuple[int, str]]
    constexprs: dict


def tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(launch: Launch) -> Compiled:
    """Compile a captured launch for sm_90 exactly as Triton's JIT would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    names = {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    return Compiled(fn.__name__, kernel.metadata.num_warps, kernel.metadata.shared, regs, local,
                    parse_sass(sass), names)


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> List[Tuple[int, str]]:
    """``(address, instruction)`` pairs of a ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(2)) for m in SASS_LINE.finditer(text)]


def opcode(instr: str) -> str:
    """``@!P0 LDG.E.128 R4, ...`` -> ``LDG.E.128``."""
    parts = instr.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


# ---------------------------------------------------------------------------- loops
@dataclasses.dataclass
class Loop:
    start: int
    end: int
    instrs: int
    ldg128: int
    ldg_narrow: int
    stg128: int
    stg_narrow: int
    bars: int
    shfl: int
    mufu: int
    spill: int
    load_bytes: int
    store_bytes: int


def access_bytes(op: str) -> int:
    """Bytes per thread of a global load or store opcode (``LDG.E.128``: 16)."""
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1),
                        (".S8", 1)):
        if width in op:
            return size
    return 4


def loops_of(sass: List[Tuple[int, str]]) -> List[Loop]:
    """The innermost loops: address ranges closed by a backward branch with no other
    backward branch inside them."""
    edges = []
    for addr, instr in sass:
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", instr)
        if m and int(m.group(1), 16) < addr:
            edges.append((int(m.group(1), 16), addr))
    innermost = [(a, b) for a, b in edges
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in edges)]
    result = []
    for a, b in sorted(innermost):
        body = [opcode(i) for addr, i in sass if a <= addr <= b]
        body = [op for op in body if op != "NOP"]
        ldg = [op for op in body if op.startswith("LDG")]
        stg = [op for op in body if op.startswith("STG")]
        result.append(Loop(
            start=a, end=b, instrs=len(body),
            ldg128=sum(".128" in op for op in ldg), ldg_narrow=sum(".128" not in op for op in ldg),
            stg128=sum(".128" in op for op in stg), stg_narrow=sum(".128" not in op for op in stg),
            bars=sum(op.startswith("BAR") for op in body),
            shfl=sum(op.startswith("SHFL") for op in body),
            mufu=sum(op.startswith("MUFU") for op in body),
            spill=sum(op.startswith(("LDL", "STL")) for op in body),
            load_bytes=sum(access_bytes(op) for op in ldg),
            store_bytes=sum(access_bytes(op) for op in stg)))
    return result


# ---------------------------------------------------------------------------- kernels
def loss_inputs_for(logits: torch.Tensor, options: Any, old: Optional[bool] = None,
                    ref: Optional[bool] = None, rollout_is: bool = False) -> Any:
    """Validated ``LossInputs`` of zeros for ``[B, T, V]`` logits (``old_logp`` and
    ``ref_logp`` given when asked, by default when ``beta > 0``; rollout importance
    weights when asked)."""
    from hapo_kernels.inputs import loss_inputs
    B, T = logits.shape[:2]
    old = options.beta > 0 if old is None else old
    ref = options.beta > 0 if ref is None else ref
    return loss_inputs(logits, torch.zeros(B, T, dtype=torch.long), torch.zeros(B), options,
                       source_name="logits", ignore_index=-100, mask=None,
                       old_logp=torch.zeros(B, T) if old else None,
                       ref_logp=torch.zeros(B, T) if ref else None, teacher_mask=None,
                       rollout_is_weights=torch.ones(B, T) if rollout_is else None)


CAPTURE_ROWS = 64


def ours(variant: str, V: int, dtype: torch.dtype) -> List[Launch]:
    """The launches of one call of ours on logits ``[2, CAPTURE_ROWS / 2, V]`` (the rows do
    not change what is compiled), as on a GPU."""
    from hapo_kernels.options import LossOptions
    from hapo_kernels.outputs import TokenResults
    from hapo_kernels.triton import logprobs, loss, rows

    logits = torch.zeros(2, CAPTURE_ROWS // 2, V, dtype=dtype)
    targets = torch.zeros(2, CAPTURE_ROWS // 2, dtype=torch.long)
    # As on a GPU of one SM: a persistent grid's size is then its programs per SM.
    with rows.modelled_gpu(1), capture(loss.hapo_loss_kernel, logprobs.row_stats_kernel,
                                          logprobs.grad_logits_kernel) as launches:
        if variant.startswith("fused loss"):
            opts = (LossOptions(beta=0.04, entropy_coef=0.01, dual_clip=3.0)
                    if variant.endswith("all terms") else LossOptions())
            inputs = loss_inputs_for(logits, opts)
            out = TokenResults.allocate(inputs.rows, opts.beta > 0, logits.device)
            loss.token_loss(logits, inputs, opts, out, torch.empty_like(logits))
        elif variant == "log-probs":
            logprobs.row_stats(logits, targets)
        elif variant.startswith("log-prob grad"):
            rows = targets.numel()
            g = torch.zeros(rows)
            logprobs.grad_logits(logits, targets, g, g, g,
                                 g if variant.endswith("entropy") else None)
        else:
            raise ValueError(variant)
    return launches


def liger(variant: str, V: int, dtype: torch.dtype) -> List[Launch]:
    """Liger-Kernel's GRPO loss launches (forward, backward) as ``triton_grpo_loss`` makes
    them: its own block sizes and warps, ``N`` (the vocabulary) a constexpr."""
    from liger_kernel.ops import grpo_loss as lg
    B, L = 2, 3
    logits = torch.zeros(B, L + 1, V, dtype=dtype)
    ids = torch.zeros(B, L, dtype=torch.long)
    f32 = torch.zeros(B, L)
    common = dict(TEMPERATURE=1.0, BETA=0.0, EPS_LOW=0.2, EPS_HIGH=0.2, LOSS_TYPE=0,
                  SAPO_TEMP_POS=1.0, SAPO_TEMP_NEG=1.05, DELTA=0.0, USE_BIAS_CORRECTION_KL=False,
                  L=L, N=V)
    with capture(lg._grpo_loss_fwd_kernel, lg._grpo_loss_bwd_kernel) as launches:
        if variant == "forward":
            lg._grpo_loss_fwd_kernel[(B, L)](
                logits, None, None, ids, None, torch.zeros(B), None, 0, None, f32, f32, f32,
                f32, **common, BLOCK_N=2048, num_stages=2, num_warps=1)
        else:
            lg._grpo_loss_bwd_kernel[(B, L)](
                f32, torch.empty_like(logits), logits, None, None, ids, torch.zeros(B), None,
                f32, None, 0, None, *[v for k, v in common.items() if k not in ("L", "N")],
                *f32.stride(), L, V, BLOCK_N=4096, num_stages=1, num_warps=16)
    return launches


# What one call of each op runs over N rows of V: its passes over the logits in order,
# (variant, role) with role "read" (statistics), "rw" (read again and write the gradient)
# or "rw-cold" (a separate launch: the re-read comes from memory).
OPS: Dict[str, Tuple[Callable, List[Tuple[str, str]]]] = {
    "fused loss (GRPO)": (ours, [("fused loss", "read"), ("fused loss", "rw")]),
    "fused loss (all terms)": (ours, [("fused loss all terms", "read"),
                                      ("fused loss all terms", "rw")]),
    "log-probs (no grad)": (ours, [("log-probs", "read")]),
    "log-probs fwd+bwd": (ours, [("log-probs", "read"), ("log-prob grad", "rw-cold")]),
    "log-probs+entropy fwd+bwd": (ours, [("log-probs", "read"),
                                         ("log-prob grad+entropy", "rw-cold")]),
    "Liger grpo_loss": (liger, [("forward", "read"), ("backward", "rw-cold")]),
}


@dataclasses.dataclass
class PassReport:
    kernel: str
    config: str
    regs: int
    spills: int
    shared: int
    ctas_per_sm: int
    instr_per_elem: float
    mufu_per_elem: float
    ldg128: int
    ldg_narrow: int
    stg128: int
    stg_narrow: int
    bars: int
    shfl: int
    loop_ms: float


def occupancy(c: Compiled) -> int:
    """CTAs of this kernel that fit on one SM."""
    threads = 32 * c.num_warps
    by_regs = REGISTERS_PER_SM // max(1, c.regs * threads)
    by_threads = THREADS_PER_SM // threads
    by_shared = SHARED_PER_SM // c.shared if c.shared else MAX_CTAS_PER_SM
    return max(1, min(by_regs, by_threads, by_shared, MAX_CTAS_PER_SM))


def hot_loop(c: Compiled, role: str) -> Loop:
    """The loop that streams the row for this pass: it loads (and, for "rw", stores) the
    most bytes."""
    loops = [lp for lp in loops_of(c.sass) if lp.load_bytes > 0 or lp.store_bytes > 0]
    if role == "read":
        loops = [lp for lp in loops if lp.store_bytes == 0] or loops
    else:
        loops = [lp for lp in loops if lp.store_bytes > 0 and lp.load_bytes > 0] or loops
    return max(loops, key=lambda lp: (lp.load_bytes + lp.store_bytes, lp.instrs))


def scalar_code(c: Compiled, loops: List[Loop]) -> int:
    """Per-thread instructions a row costs outside its loops: the straight-line code less
    the copies of a loop body it holds (the masked first and last blocks, modelled as one
    loop iteration each), counted by their global memory accesses."""
    outside = [opcode(i) for addr, i in c.sass if opcode(i) != "NOP"
               and not any(lp.start <= addr <= lp.end for lp in loops)]
    block_bytes = max(lp.load_bytes + lp.store_bytes for lp in loops)
    copies = round(sum(access_bytes(op) for op in outside
                       if op.startswith(("LDG", "STG"))) / block_bytes)
    return max(0, len(outside) - copies * max(lp.instrs for lp in loops))


def model_pass(c: Compiled, loop: Loop, role: str, V: int, elem: int, rows: int,
               rows_in_flight: int, scalar: int) -> Tuple[float, float, float, float]:
    """``(instr_per_elem, mufu_per_elem, seconds, bytes)`` of one pass over ``rows x V``:
    every block of the row (masked ones too) costs a loop iteration, and ``scalar``
    instructions per thread run once per row."""
    elems = max(loop.load_bytes, loop.store_bytes) / elem    # per thread per iteration
    instr = loop.instrs / elems
    mufu = loop.mufu / elems
    threads = 32 * c.num_warps
    block = elems * threads
    vec = 16 // elem
    padded = math.ceil((V + vec - 1) / block) * block
    total_instr = instr * padded / V + scalar * threads / V
    n = rows * V
    issue = n * total_instr / (SMS * ISSUE_PER_SM_CLOCK * 32 * CLOCK_HZ)
    mufu_t = rows * padded * mufu / (SMS * MUFU_PER_SM_CLOCK * CLOCK_HZ)
    moved = n * elem
    if role == "rw":
        hit = l2_hit(rows_in_flight, V * elem)
        moved += n * elem * (1.0 - hit)
    elif role == "rw-cold":
        moved += n * elem
    in_flight = rows_in_flight * loop.load_bytes * threads
    bandwidth = min(BANDWIDTH, in_flight / LATENCY_S)
    return instr, mufu, max(issue, mufu_t, moved / bandwidth), moved


def l2_hit(rows_in_flight: int, row_bytes: int) -> float:
    return min(1.0, L2_BYTES / (rows_in_flight * row_bytes))


def report(rows: int = ROWS, vocabs: Optional[Dict[str, int]] = None,
           dtypes: Optional[Dict[str, torch.dtype]] = None) -> Tuple[List[dict], List[str]]:
    """JSON rows (one per op and configuration, and one per pass) and budget violations."""
    vocabs = vocabs or VOCABS
    dtypes = dtypes or DTYPES
    out: List[dict] = []
    problems: List[str] = []
    cache: Dict[Tuple[str, str, int, str], Tuple[Compiled, Launch]] = {}
    for dname, dtype in dtypes.items():
        elem = torch.tensor([], dtype=dtype).element_size()
        for V in vocabs.values():
            config = f"{dname}, V={V}, {rows} rows"
            for op, (maker, passes) in OPS.items():
                total = 0.0
                moved = 0.0
                per_pass = []
                for variant, role in passes:
                    key = (maker.__name__, variant, V, dname)
                    if key not in cache:
                        launch = maker(variant, V, dtype)[0]
                        cache[key] = (compile_sm90(launch), launch)
                    c, launch = cache[key]
                    # Rows in flight: the CTAs that fit, or fewer on a persistent grid
                    # (captured as on one SM: its size is the programs per SM).
                    grid_rows = SMS * occupancy(c)
                    if maker is ours and launch.grid[0] < CAPTURE_ROWS:
                        grid_rows = min(grid_rows, SMS * launch.grid[0])
                    loop = hot_loop(c, role)
                    # A kernel's per-row scalar code is charged to its first pass.
                    first = all(p.kernel != f"{op}: {c.name}" for p in per_pass)
                    scalar = scalar_code(c, loops_of(c.sass)) if first else 0
                    instr, mufu, seconds, b = model_pass(c, loop, role, V, elem, rows,
                                                         grid_rows, scalar)
                    total += seconds
                    moved += b
                    spills = loop.spill + (1 if c.local_bytes else 0)
                    pr = PassReport(f"{op}: {c.name}", config, c.regs, spills, c.shared,
                                    occupancy(c), round(instr, 2), round(mufu, 2), loop.ldg128,
                                    loop.ldg_narrow, loop.stg128, loop.stg_narrow, loop.bars,
                                    loop.shfl, round(seconds * 1e3, 3))
                    per_pass.append(pr)
                    if maker is ours:
                        if instr > BUDGET_INSTR_PER_ELEM:
                            problems.append(f"{pr.kernel} [{config}]: {instr:.2f} instructions "
                                            f"per element > {BUDGET_INSTR_PER_ELEM}")
                        if spills:
                            problems.append(f"{pr.kernel} [{config}]: spills")
                        if loop.ldg_narrow or loop.stg_narrow:
                            problems.append(f"{pr.kernel} [{config}]: narrow loads/stores in "
                                            f"the hot loop ({loop.ldg_narrow} LDG, "
                                            f"{loop.stg_narrow} STG)")
                writes = any(role != "read" for _, role in passes)
                floor = rows * V * elem * (2 if writes else 1) / PEAK_BANDWIDTH
                worst = max(per_pass, key=lambda p: p.instr_per_elem)
                out.append({
                    "kernel": op, "config": config, "regs": max(p.regs for p in per_pass),
                    "spills": sum(p.spills for p in per_pass),
                    "instr_per_elem": [p.instr_per_elem for p in per_pass],
                    "ldg128": sum(p.ldg128 for p in per_pass),
                    "ldg_narrow": sum(p.ldg_narrow for p in per_pass),
                    "stg128": sum(p.stg128 for p in per_pass),
                    "stg_narrow": sum(p.stg_narrow for p in per_pass),
                    "modelled_ms": round(total * 1e3, 3), "floor_ms": round(floor * 1e3, 3),
                    "gb_moved": round(moved / 1e9, 2), "worst_pass": worst.kernel,
                    "passes": [dataclasses.asdict(p) for p in per_pass]})
    return out, problems


BF16_FLOPS = 989e12             # H200 dense bf16 tensor-core peak


def lm_head_model(N: int = ROWS, V: int = 151936, H: int = 4096,
                  fp32_accumulate: bool = True) -> dict:
    """The fused LM head's forward + backward on a GPU (``head.fused_pass``), modelled:
    the three matmuls per token chunk at the bf16 peak, the traffic of the matmuls'
    operands (the weight read twice, the chunk's logits written, read and rewritten by the
    loss kernel and read by the two gradient matmuls), and the traffic of the weight
    gradient's accumulator (read and written by every chunk's matmul after the first)."""
    from hapo_kernels import head
    chunks = head.plan_chunks(N, V, torch.device("cuda"), torch.bfloat16)
    n_chunks = math.ceil(N / chunks.rows)
    acc_bytes = 4 if fp32_accumulate else 2
    accumulator = (2 * n_chunks - 1) * V * H * acc_bytes
    operands = n_chunks * 2 * (2 * V * H) + 5 * 2 * N * V + 3 * 2 * N * H
    flops = 3 * 2 * N * V * H
    return {"kernel": "fused LM head (weight-gradient accumulator)",
            "config": f"bf16, N={N}, V={V}, H={H}, {'fp32' if fp32_accumulate else 'bf16'} "
                      f"accumulator",
            "rows_per_chunk": chunks.rows, "chunks": n_chunks,
            "accumulator_gb": round(accumulator / 1e9, 1),
            "matmul_operand_gb": round(operands / 1e9, 1),
            "accumulator_ms": round(accumulator / BANDWIDTH * 1e3, 2),
            "matmul_ms": round(flops / BF16_FLOPS * 1e3, 2)}


def table(rows: List[dict], dtype: str = "bf16") -> str:
    """A Markdown table of the modelled ops at one dtype."""
    lines = ["| op | config | instr/elem per pass | regs | spills | LDG.128 / narrow | "
             "STG.128 / narrow | modelled ms | floor ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["config"].startswith(dtype):
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | "
                     f"{' / '.join(f'{x:.1f}' for x in r['instr_per_elem'])} | {r['regs']} | "
                     f"{r['spills']} | {r['ldg128']} / {r['ldg_narrow']} | "
                     f"{r['stg128']} / {r['stg_narrow']} | {r['modelled_ms']:.2f} | "
                     f"{r['floor_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--quick", action="store_true",
                        help="bf16 at V = 151936 and 151944 only")
    args = parser.parse_args(argv)
    vocabs = dtypes = None
    if args.quick:
        vocabs = {k: v for k, v in VOCABS.items() if v in (151936, 151944)}
        dtypes = {"bf16": torch.bfloat16}
    rows, problems = report(args.rows, vocabs, dtypes)
    print("Modelled, not measured: H200 sm_90 SASS compiled on this machine; issue roof "
          f"{SMS} SMs x {ISSUE_PER_SM_CLOCK} warp-instr/clk at {CLOCK_HZ / 1e9:.2f} GHz, "
          f"memory {BANDWIDTH / 1e12:.1f} TB/s sustained (floor at {PEAK_BANDWIDTH / 1e12:.1f}"
          f" TB/s), L2 {L2_BYTES / 1e6:.0f} MB.\n")
    for dtype in (dtypes or DTYPES):
        print(table(rows, dtype))
        print()
    by = {(r["kernel"], r["config"]): r for r in rows}
    for r in rows:
        if r["kernel"] == "fused loss (GRPO)":
            lg = by.get(("Liger grpo_loss", r["config"]))
            if lg:
                print(f"{r['config']}: fused loss {r['modelled_ms']:.2f} ms, Liger "
                      f"{lg['modelled_ms']:.2f} ms: {lg['modelled_ms'] / r['modelled_ms']:.2f}x")
    print()
    for fp32 in (True, False):
        m = lm_head_model(args.rows, fp32_accumulate=fp32)
        print(f"{m['kernel']}, {m['config']}: {m['chunks']} chunks of {m['rows_per_chunk']} "
              f"rows; accumulator {m['accumulator_gb']} GB ({m['accumulator_ms']} ms at "
              f"{BANDWIDTH / 1e12:.1f} TB/s) beside the matmuls' operands "
              f"{m['matmul_operand_gb']} GB and {m['matmul_ms']} ms of matmuls at the bf16 peak")
        rows.append(m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if problems:
        print("\nOver budget:", *problems, sep="\n  ")
        return 1
    print(f"\nEvery loss and log-prob loop within {BUDGET_INSTR_PER_ELEM} instructions per "
          "element, no spills, 128-bit loads and stores.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
