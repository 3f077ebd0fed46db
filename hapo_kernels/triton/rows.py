"""Row addressing and the launch grid shared by the Triton kernels, in int64 (no size limits).

Every kernel runs a 1-D grid (a grid's first dimension may hold 2^31 - 1 programs; the
others only 65,535). ``row_offset`` turns a row index into its element offset in a
``[B, T, V]`` layout (``layout.row_layout``) in int64, whatever the integer type of the row
index or the strides, so tensors over 2^31 elements are addressed correctly.
tests/test_size_limits.py checks it under the interpreter with huge values.

``row_grid``: one program per row by default. The fused loss kernel can also run a
persistent grid (``persistent_rows(k)`` or ``HAPO_PROGRAMS_PER_SM=k``): ``k`` programs per
SM, each looping over rows ``pid, pid + grid, ...``, as in Triton's fused-softmax tutorial.
Fewer rows in flight means the second read of a row (its gradient pass) is more likely
to find the row still in L2; bench/gpu_check.sh measures both grids side by side.
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


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 under the interpreter (CPU tensors),
    so that tests exercise a grid of k programs looping over many rows."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def row_grid(rows: int, device: torch.device) -> tuple:
    """The 1-D launch grid for a kernel that loops ``for row in range(pid, rows, grid)``."""
    k = programs_per_sm()
    if k is None:
        return (rows,)
    return (max(1, min(rows, k * sm_count(device))),)


MAX_BLOCK_V = 4096


def block_v(V: int) -> int:
    """Vocabulary columns a program reads per block: the row rounded up to a power of two,
    between 16 and ``MAX_BLOCK_V``."""
    return min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4
