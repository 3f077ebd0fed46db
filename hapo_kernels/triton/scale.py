"""Scaling a saved gradient by ``grad_output`` without reading it on the host.

A loss's backward gets ``grad_output`` as a device tensor; ``float(grad_output)`` would stop
the host until the GPU has caught up (no CUDA graphs, no CPU/GPU overlap). The kernel reads
the scale on the device instead: when it is exactly 1 (the common case: a gradient-
accumulation divisor is folded into the forward through ``loss_scale``) every program
returns after one scalar load, so the 5 GB gradient is neither read nor written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import row_layout
from .rows import row_offset

BLOCK = 1024


@triton.jit
def scale_rows_kernel(x_ptr, g_ptr, n_rows, T, V, stride_b, stride_t, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        cols = tl.arange(0, BLOCK)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row_offset(row, T, stride_b, stride_t)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(x_row + idx, mask=idx < V, other=0.0).to(tl.float32)
            tl.store(x_row + idx, (x * g).to(x_ptr.dtype.element_ty), mask=idx < V)


def scale_gradient_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_output`` in place, ``grad_output`` read on the device (no host sync).

    ``grad`` is ``[B, T, V]``, ``[N, V]`` or ``[V]`` with its last dimension contiguous.
    """
    x = grad.reshape(1, -1) if grad.dim() == 1 else grad
    L = row_layout(x)
    if L.rows and L.V:
        g = grad_output.reshape(1).to(device=grad.device, dtype=torch.float32)
        scale_rows_kernel[(L.rows,)](x, g, L.rows, L.T, L.V, L.stride_b, L.stride_t,
                                     BLOCK=BLOCK, num_warps=4)
    return grad
