"""Packed, variable-length batches: ``[N, V]`` logits with ``cu_seqlens`` (FlashAttention's).

``cu_seqlens`` ``[S + 1]`` holds cumulative sequence starts: sequence ``i`` is tokens
``cu_seqlens[i] .. cu_seqlens[i+1] - 1``. Nothing about a token's own log-probability
depends on its sequence, so the kernels never see ``cu_seqlens``: they run over the ``N``
rows as one packed batch. Only ``[tokens]``-sized vectors do: per-sequence advantages and
teacher flags are broadcast to their tokens, aggregation weights use per-sequence token
counts, and sequence-level importance sampling (GSPO) averages the log-ratio per sequence.
``Segments`` does those three things with ``index_add`` / gathers, for both backends.
A packed batch with ``cu_seqlens`` gives the same loss, gradients and metrics as the
right-padded ``[S, max_len]`` batch holding the same sequences (tests/test_packed.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Segments:
    """The sequences of a packed batch, as per-token segment ids."""
    cu_seqlens: torch.Tensor     # int64 [S + 1]
    ids: torch.Tensor            # int64 [N]: the sequence of each token
    count: int                   # S
    max_len: int                 # the longest sequence (the width of the padded batch)

    @property
    def tokens(self) -> int:
        """The number of packed tokens N."""
        return self.ids.numel()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums ``[S]`` of a per-token vector (any shape with N elements)."""
        flat = x.reshape(-1)
        return torch.zeros(self.count, dtype=flat.dtype, device=flat.device).index_add(
            0, self.ids, flat)

    def broadcast(self, per_seq: torch.Tensor) -> torch.Tensor:
        """``[S]`` -> ``[N]``: each token gets its sequence's value."""
        return per_seq[self.ids]

    def mean(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Each token gets its sequence's masked mean ``sum m*x / max(sum m, 1)`` (x's shape).

        Differentiable w.r.t. ``x``: GSPO's gradient flows to every token of the sequence.
        """
        mean = self.sum(m * x) / self.sum(m).clamp(min=1.0)
        return self.broadcast(mean).reshape(x.shape)


def check_cu_seqlens(cu_seqlens: Any, n_tokens: int, device: torch.device) -> Segments:
    """Validate ``cu_seqlens`` for ``n_tokens`` packed tokens; ValueError naming it."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be 1-D [S + 1] (cumulative sequence starts), got "
                         f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logits on {device}")
    cu = cu_seqlens.to(torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != n_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of packed tokens "
                         f"({n_tokens}); got {first} .. {last}")
    lengths = cu.diff()
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    S = lengths.numel()
    ids = torch.repeat_interleave(torch.arange(S, device=device), lengths,
                                  output_size=n_tokens)
    max_len = int(lengths.max()) if S else 0
    return Segments(cu, ids, S, max_len)


def packed_segments(logits: torch.Tensor, target_ids: torch.Tensor,
                    cu_seqlens: Any) -> Optional[Segments]:
    """``Segments`` for packed ``[N, V]`` logits and ``cu_seqlens`` (None when not given)."""
    if cu_seqlens is None:
        return None
    if not isinstance(target_ids, torch.Tensor) or target_ids.dim() != 1 \
            or getattr(logits, "dim", lambda: 0)() != 2:
        raise ValueError("cu_seqlens goes with packed input: logits [N, V] and target_ids "
                         f"[N]; got target_ids of shape {tuple(getattr(target_ids, 'shape', ()))}")
    return check_cu_seqlens(cu_seqlens, target_ids.numel(), logits.device)


def per_token(name: str, tensor: Any, segments: Optional[Segments],
              per_sequence: Optional[bool] = None) -> Any:
    """A per-sequence ``[S]`` input broadcast to its ``[N]`` tokens; ``[N]`` passes through.

    ``per_sequence`` says which the caller meant (``True``: ``[S]``, ``False``: ``[N]``).
    Left ``None``, the shape decides, and where it cannot (``S == N`` with some sequence
    not of length 1, e.g. lengths 2 and 0) it is a ``ValueError``: read per token, a
    per-sequence value would land on the wrong tokens. Anything else is left for
    ``inputs.loss_inputs`` to reject with its message.
    """
    if segments is None or not isinstance(tensor, torch.Tensor):
        return tensor
    shape, S, N = tuple(tensor.shape), segments.count, segments.tokens
    if per_sequence is None and shape == (N,) == (S,) and N and \
            not bool((segments.cu_seqlens.diff() == 1).all()):
        raise ValueError(f"{name} has shape ({N},): with {S} sequences of {N} packed tokens "
                         f"that is one per sequence or one per token; say which with "
                         f"per_sequence=True or per_sequence=False")
    if shape == (N,) and per_sequence is not True:
        return tensor
    if shape == (S,) and per_sequence is not False:
        if tensor.device != segments.ids.device:
            raise ValueError(f"{name} is on {tensor.device} but logits on "
                             f"{segments.ids.device}")
        return segments.broadcast(tensor)
    want = {True: f"({S},) (one per sequence of cu_seqlens, per_sequence=True)",
            False: f"({N},) (one per token, per_sequence=False)",
            None: f"({S},) (one per sequence of cu_seqlens) or ({N},) (one per token)"}
    raise ValueError(f"{name} must have shape {want[per_sequence]}, got {shape}")
