"""Row addressing shared by the Triton kernels, in int64 (no size limits).

Every kernel runs a 1-D grid with one program per row (a grid's first dimension may hold
2^31 - 1 programs; the others only 65,535). ``row_offset`` turns a row index into its
element offset in a ``[B, T, V]`` layout (``layout.row_layout``) in int64, whatever the
integer type of the row index or the strides, so tensors over 2^31 elements are addressed
correctly. tests/test_size_limits.py checks it under the interpreter with huge values.
"""
import triton
import triton.language as tl


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """Element offset of row ``row`` of the flattened ``[B*T]`` axis, as int64."""
    r = row.to(tl.int64)
    return (r // T) * stride_b + (r % T) * stride_t
