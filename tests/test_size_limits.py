"""No size limits: 1-D grids over rows, int64 row offsets, Python-side layout math.

A tensor over 2^31 elements does not fit this machine's test budget, so the index arithmetic
is tested directly: the kernels' shared ``triton.rows.row_offset`` under the interpreter
with row indices and strides whose products overflow int32, the launch grids of every
kernel (one dimension: 2^31 - 1 programs, not 65,535; or ``rows.row_grid``), and
``layout`` on meta tensors of any size. ``bench/big_tensor_check.py`` runs a real case
past 2^31 elements on a GPU.
"""
import ast
import pathlib

import pytest
import torch
import triton
import triton.language as tl

from hapo_kernels.cpu.logprobs import row_ranges, row_view
from hapo_kernels.layout import row_layout, rows_2d
from hapo_kernels.triton.rows import row_offset

TRITON_DIR = pathlib.Path(__file__).resolve().parent.parent / "hapo_kernels" / "triton"
INT32_MAX = 2 ** 31 - 1


def _kernel_launches():
    """``(file, kernel name, grid tuple node)`` for every ``kernel[grid](...)`` launch."""
    for path in sorted(TRITON_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                name = ast.unparse(node.func.value)
                yield path.name, name, node.func.slice


def test_every_launch_is_a_1d_grid():
    launches = list(_kernel_launches())
    assert len(launches) >= 4, launches      # logprobs (2), loss, advantages
    for file, name, grid in launches:
        if isinstance(grid, ast.Call):        # row_grid(...): a 1-tuple, tested in test_loss
            assert ast.unparse(grid.func) == "row_grid", f"{file}: {name}[{ast.unparse(grid)}]"
            continue
        assert isinstance(grid, ast.Tuple) and len(grid.elts) == 1, \
            f"{file}: {name}[{ast.unparse(grid)}] is not a 1-D grid (dims 2, 3 stop at 65,535)"


def test_every_kernel_widens_its_program_id_to_int64():
    """Row indices are int64 before any multiplication by a stride."""
    for path in sorted(TRITON_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            src = ast.get_source_segment(path.read_text(), fn)
            if "tl.program_id" in src:
                # One row per program, or a persistent loop over rows whose index is widened.
                assert ("tl.program_id(0).to(tl.int64)" in src
                        or ("in range(tl.program_id(0), n_rows, tl.num_programs(0))" in src
                            and "tl.cast(r, tl.int64)" in src)), f"{path.name}:{fn.name}"


@pytest.mark.parametrize("shape, strides", [
    ((2, 70_000, 32_768), (70_000 * 32_768, 32_768, 1)),        # 4.6e9 elements, contiguous
    ((3, 40_000, 151_936), (40_001 * 151_936, 151_936, 1)),     # logits[:, :-1] of [3, 40001, V]
    ((100_000, 65_536), (65_536, 1)),                           # packed [N, V], N > 65,535
])
def test_layout_math_past_int32(shape, strides):
    """Rows addressed with Python ints (unbounded) on meta tensors of any size."""
    x = torch.empty(0, device="meta").as_strided(shape, strides)
    L = row_layout(x)
    last = L.rows - 1
    if x.dim() == 3:
        b, t = divmod(last, L.T)
        assert (b, t) == (shape[0] - 1, shape[1] - 1)
        assert (L.stride_b, L.stride_t) == strides[:2]
        offset = b * L.stride_b + t * L.stride_t
        assert offset == (shape[0] - 1) * strides[0] + (shape[1] - 1) * strides[1]
    else:
        assert (L.B, L.T, L.stride_b, L.stride_t) == (1, shape[0], 0, strides[0])
        offset = last * L.stride_t
    assert offset + L.V > INT32_MAX
    # The CPU path's chunks cover every row exactly once, each a view of V columns.
    chunks = row_ranges(x, 4096)
    assert chunks[0][0] == 0 and sum(r1 - r0 for r0, r1 in chunks) == L.rows
    for r0, r1 in (chunks[0], chunks[-1]):
        view = row_view(x, r0, r1)          # [rows, V], or [b, T, V] for whole sequences
        assert view.shape[-1] == L.V and view.numel() == (r1 - r0) * L.V
    flat = rows_2d(x)
    assert flat is None or flat.shape == (L.rows, L.V)


# ------------------------------------------------------------------ the kernels' helper
@triton.jit
def _probe_row_offset(rows_ptr, out_ptr, T, stride_b, stride_t):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)                      # int32, like tl.program_id(0)
    tl.store(out_ptr + i, row_offset(row, T, stride_b, stride_t))


@pytest.mark.kernel
def test_row_offset_is_int64_for_huge_rows_and_strides():
    """``row_offset`` from int32 row indices (as ``tl.program_id`` gives) and large strides.

    A kernel that multiplied in int32 would wrap; the expected values are Python ints.
    """
    rows = [0, 1, 65_535, 65_536, 70_001, INT32_MAX]
    cases = [(70_000, 70_000 * 32_768, 32_768),      # contiguous [B, T, V]
             (40_000, 40_001 * 151_936, 151_936),   # a [:, :-1] view
             (INT32_MAX, 0, 65_536),                 # packed [N, V]: B = 1, stride_b = 0
             (7, 3 * 2 ** 33, 2 ** 31 + 5)]          # strides that are int64 themselves
    r = torch.tensor(rows, dtype=torch.int32)
    for T, stride_b, stride_t in cases:
        out = torch.full((len(rows),), -1, dtype=torch.int64)
        _probe_row_offset[(len(rows),)](r, out, T, stride_b, stride_t)
        want = [(x // T) * stride_b + (x % T) * stride_t for x in rows]
        assert out.tolist() == want, (T, stride_b, stride_t)
    assert max(want) > INT32_MAX
