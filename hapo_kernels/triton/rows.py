"""Row addressing and the launch grid shared by the Triton kernels, in int64 (no size limits).

Every kernel runs a 1-D grid (a grid's first dimension may hold 2^31 - 1 programs; the
others only 65,535). ``row_offset`` turns a row index into its element offset in a
``[B, T, V]`` layout (``layout.row_layout``) in int64, whatever the integer type of the row
index or the strides, so tensors over 2^31 elements are addressed correctly.
tests/test_size_limits.py checks it under the interpreter with huge values.

``row_grid``: the fused loss kernel runs a persistent grid on a GPU: ``k`` programs per SM,
each looping over rows ``pid, pid + grid, ...`` (as in Triton's fused-softmax tutorial),
``k`` from ``default_programs_per_sm`` (``persistent_rows(k)`` or ``HAPO_PROGRAMS_PER_SM=k``
override it). Few rows in flight let the second read of a row (its gradient pass) find the
row still in L2; enough blocks in flight per SM keep memory busy. That trade is modelled
(bench/kernel_report.py), not yet measured; bench/gpu_check.sh measures the grids side by
side. Other kernels, and the interpreter, run one program per row.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import scoped

_programs_per_sm: contextvars.ContextVar = contextvars.ContextVar("hapo_programs_per_sm",
                                                                  default=None)


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """Element offset of row ``row`` of the flattened ``[B*T]`` axis, as int64."""
    r = row.to(tl.int64)
    return (r // T) * stride_b + (r % T) * stride_t


def programs_per_sm() -> Optional[int]:
    """The persistent-grid setting in force: ``persistent_rows``, else the environment
    variable ``HAPO_PROGRAMS_PER_SM``, else None (one program per row)."""
    k = _programs_per_sm.get()
    if k is None:
        env = os.environ.get("HAPO_PROGRAMS_PER_SM", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"HAPO_PROGRAMS_PER_SM={env!r}: expected a whole number >= 1")
            k = int(env)
    return k


def persistent_rows(k: Optional[int]) -> contextlib.AbstractContextManager:
    """Run the fused loss kernel on ``k`` programs per SM (None: one program per row)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"persistent_rows(k): k must be a whole number >= 1 or None; got {k!r}")
    return scoped(_programs_per_sm, k)


_modelled_sms: contextvars.ContextVar = contextvars.ContextVar("hapo_modelled_sms",
                                                               default=None)


def modelled_gpu(sms: int) -> contextlib.AbstractContextManager:
    """Inside the block the launchers pick grids and register caps as for a GPU with
    ``sms`` SMs, whatever the tensors' device: bench/kernel_report.py captures launches on
    CPU tensors and compiles what a GPU would run."""
    return scoped(_modelled_sms, sms)


def gpu_sms(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors the launch runs on; None under the interpreter."""
    if _modelled_sms.get() is not None:
        return _modelled_sms.get()
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def sm_count(device: torch.device) -> int:
    """``gpu_sms``, or 1 under the interpreter (CPU tensors), so that tests exercise a grid
    of k programs looping over many rows."""
    return gpu_sms(device) or 1


# Bytes a streaming kernel keeps in flight per SM to cover memory latency (Little's law:
# 132 SMs x 32 KB per ~1 us is about the H200's sustained bandwidth).
BYTES_IN_FLIGHT_PER_SM = 32 * 1024
REGISTERS_PER_SM = 65536


def default_programs_per_sm(block: int, element_size: int) -> int:
    """Programs per SM of the fused loss's persistent grid on a GPU: enough blocks of
    ``block`` columns in flight to cover memory latency, and no more, so that the rows in
    flight (SMs x programs) fit in L2 and the gradient pass's re-read of a row hits there
    (bench/kernel_report.py models both)."""
    return max(1, BYTES_IN_FLIGHT_PER_SM // (block * element_size))


def grid_programs_per_sm(device: torch.device, default_per_sm: Optional[int]) -> Optional[int]:
    """Programs per SM of a persistent grid: ``programs_per_sm()`` when set, else
    ``default_per_sm`` on a GPU; None: one program per row."""
    k = programs_per_sm()
    if k is None and gpu_sms(device) is not None:
        k = default_per_sm
    return k


def row_grid(rows: int, device: torch.device, default_per_sm: Optional[int] = None) -> tuple:
    """The 1-D launch grid for a kernel that loops ``for row in range(pid, rows, grid)``
    (``grid_programs_per_sm`` programs per SM, or one per row)."""
    k = grid_programs_per_sm(device, default_per_sm)
    if k is None:
        return (rows,)
    return (max(1, min(rows, k * sm_count(device))),)


def register_cap(programs_per_sm: Optional[int], warps: int) -> Optional[int]:
    """``maxnreg`` for a persistent grid: the registers that let ``programs_per_sm``
    programs of ``warps`` warps share an SM (ptxas otherwise spends registers freely on the
    masked first and last blocks, and fewer programs fit than the grid has). The
    interpreter ignores it."""
    if programs_per_sm is None:
        return None
    return max(32, min(255, REGISTERS_PER_SM // (programs_per_sm * warps * 32)) // 8 * 8)


VECTOR_BYTES = 16          # one 128-bit load or store per thread and vector
VECTORS_PER_THREAD = 4     # vectors a thread loads per block: 64 bytes in flight per thread
MAX_WARPS = 16


def vector_width(tensor: torch.Tensor) -> int:
    """Elements of ``tensor`` in one 128-bit vector (8 for bf16 and fp16, 4 for fp32)."""
    return VECTOR_BYTES // tensor.element_size()


def block_v(V: int, vec: int) -> int:
    """Vocabulary columns a program reads per block: ``VECTORS_PER_THREAD`` vectors per
    thread at up to ``MAX_WARPS`` warps (32 KB a block); for a shorter row, about an eighth
    of it (the masked tail block stays a small part of the row), at least a vector per lane
    of a warp."""
    return min(vec * 32 * MAX_WARPS * VECTORS_PER_THREAD,
               max(vec * 32, triton.next_power_of_2(V) // 8))


def num_warps(block: int, vec: int) -> int:
    """Warps for a block of ``block`` columns: ``VECTORS_PER_THREAD`` vectors per thread."""
    return max(1, min(MAX_WARPS, block // (vec * 32 * VECTORS_PER_THREAD)))


def rows_aligned(tensor: Optional[torch.Tensor], V: int, stride_b: int, stride_t: int) -> bool:
    """Every row of ``tensor`` starts on a 16-byte boundary and holds whole vectors."""
    if tensor is None:
        return True
    vec = vector_width(tensor)
    return (tensor.data_ptr() % VECTOR_BYTES == 0 and V % vec == 0 and stride_b % vec == 0
            and stride_t % vec == 0)


def same_frame(args: dict) -> bool:
    """Gradient rows at the same offset modulo a vector as the logits rows (``row_frame``
    relies on it for its address arithmetic, so this is exact, not a hint)."""
    dx = args.get("dx_ptr")
    if dx is None:
        return True
    vec = vector_width(args["x_ptr"])
    return (dx.element_size() == args["x_ptr"].element_size()
            and (args["stride_b"] - args["dstride_b"]) % vec == 0
            and (args["stride_t"] - args["dstride_t"]) % vec == 0)


def row_frame_heuristics(with_grad: bool) -> dict:
    """``triton.heuristics`` for the constexprs of ``logprobs.row_frame`` (``VEC``,
    ``ALIGNED``, and ``SAME_FRAME`` for kernels that write a gradient), from the arguments:
    the launchers pass tensors and strides, nothing else."""
    def aligned(args):
        ok = rows_aligned(args["x_ptr"], args["V"], args["stride_b"], args["stride_t"])
        if with_grad:
            ok = ok and rows_aligned(args["dx_ptr"], args["V"], args["dstride_b"],
                                     args["dstride_t"])
        return ok

    values = {"VEC": lambda args: vector_width(args["x_ptr"]), "ALIGNED": aligned}
    if with_grad:
        values["SAME_FRAME"] = same_frame
    return values
