"""How the kernels address rows of ``[B, T, V]`` views and packed ``[N, V]`` logits.

A row ``r`` of the flattened ``[B*T]`` token axis lives at
``(r // T) * stride_b + (r % T) * stride_t`` elements from the data pointer, so strided
views such as ``logits[:, :-1]`` are read in place, without a copy. Packed ``[N, V]``
logits are one sequence: ``B = 1``, ``T = N``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """How the rows of ``[B, T, V]`` (or ``[N, V]``) logits sit in memory: sizes and element
    strides."""
    B: int
    T: int
    V: int
    stride_b: int
    stride_t: int

    @property
    def rows(self) -> int:
        """The number of rows, ``B * T``."""
        return self.B * self.T


def row_layout(logits: torch.Tensor) -> RowLayout:
    """Row addressing of validated logits (vocabulary stride 1)."""
    if logits.dim() == 3:
        B, T, V = logits.shape
        return RowLayout(B, T, V, logits.stride(0), logits.stride(1))
    N, V = logits.shape
    return RowLayout(1, N, V, 0, logits.stride(0))


def rows_2d(logits: torch.Tensor) -> torch.Tensor:
    """A ``[rows, V]`` view where one exists without a copy, else ``None``."""
    L = row_layout(logits)
    if L.B == 1 or L.stride_b == L.T * L.stride_t:
        return logits.as_strided((L.rows, L.V), (L.stride_t, 1))
    return None


def overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (an ``expand``, an ``as_strided``).

    Stride analysis: with the dimensions of size > 1 sorted by stride, each stride must
    exceed the span of the smaller ones. A layout that fails it counts as overlapping
    (a few exotic interleaved layouts that do not overlap fail it too; ``.contiguous()``
    passes).
    """
    if tensor.numel() == 0:
        return False
    span = 0                      # the largest offset reached by the dimensions so far
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape)
                               if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False
