"""TRL's log-prob helpers on hapo-kernels: ``trl.trainer.utils``' signatures, our kernels.

    from hapo_kernels.compat.trl import selective_log_softmax, entropy_from_logits

replaces ``from trl.trainer.utils import selective_log_softmax, entropy_from_logits``
(TRL 1.16) with no other change. The values are TRL's formulas, computed in float32 in one
pass over the logits (docs/design.md section 3), differentiable like TRL's.

Output dtype: float32 by default (TRL's fused kernel does the same on CUDA). TRL's eager
path (CPU, or no Triton) returns the logits' dtype instead; ``trl_dtype=True`` follows TRL's
choice for the tensor at hand, so that a bf16 pipeline sees the dtypes it saw before.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..logprobs import selective_log_softmax as _fused_logprobs
from ..options import IGNORE_INDEX, check_bool, check_temperature, positive_int

__all__ = ["selective_log_softmax", "entropy_from_logits",
           "selective_log_softmax_and_entropy", "trl_output_dtype"]


def trl_output_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype TRL 1.16 returns for ``logits``: float32 where its fused Triton kernel runs
    (CUDA / XPU tensors of fp32, bf16 or fp16), else the logits' own dtype."""
    fused = (logits.device.type in ("cuda", "xpu")
             and logits.dtype in (torch.float16, torch.bfloat16, torch.float32))
    return torch.float32 if fused else logits.dtype


def _rows(logits: torch.Tensor, index: Optional[torch.Tensor],
          row_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` logits and ``[N]`` targets (``ignore_index`` where ``row_mask`` is 0)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor of shape (..., num_classes)")
    lead = logits.shape[:-1]
    if index is None:
        index = torch.zeros(lead, dtype=torch.long, device=logits.device)
    if not isinstance(index, torch.Tensor) or tuple(index.shape) != tuple(lead):
        raise ValueError(f"index must have shape {tuple(lead)} (logits' leading dimensions), "
                         f"got {getattr(index, 'shape', type(index).__name__)}")
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor) or tuple(row_mask.shape) != tuple(lead):
            raise ValueError(f"row_mask must have shape {tuple(lead)} like index, got "
                             f"{getattr(row_mask, 'shape', type(row_mask).__name__)}")
        index = torch.where(row_mask == 0, torch.full_like(index, IGNORE_INDEX), index)
    return logits.reshape(-1, logits.shape[-1]), index.reshape(-1)


def _finish(x: torch.Tensor, logits: torch.Tensor, trl_dtype: bool) -> torch.Tensor:
    x = x.reshape(logits.shape[:-1])
    return x.to(trl_output_dtype(logits)) if check_bool("trl_dtype", trl_dtype) else x


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, temperature: float = 1.0,
                          row_mask: Optional[torch.Tensor] = None, *,
                          trl_dtype: bool = False) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature)`` gathered at
    ``index``.

    ``logits`` ``(..., V)``; ``index`` ``(...)`` (one id per row) or ``(..., K)`` (K ids per
    row, e.g. top-K; each of the K is one pass over the logits). Rows where ``row_mask`` is
    0 give 0. float32 (``trl_dtype=True``: TRL's dtype, see the module docstring).
    """
    temperature = check_temperature(temperature)
    if isinstance(index, torch.Tensor) and isinstance(logits, torch.Tensor) \
            and index.dim() == logits.dim() and index.dim() > 0:
        if row_mask is not None and tuple(row_mask.shape) != tuple(index.shape):
            raise ValueError(f"row_mask must have index's shape {tuple(index.shape)}, got "
                             f"{tuple(row_mask.shape)}")
        return torch.stack([selective_log_softmax(
            logits, index[..., k], temperature,
            None if row_mask is None else row_mask[..., k], trl_dtype=trl_dtype)
            for k in range(index.shape[-1])], dim=-1)
    flat, targets = _rows(logits, index, row_mask)
    return _finish(_fused_logprobs(flat, targets, temperature), logits, trl_dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128, *,
                        trl_dtype: bool = False) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: the Shannon entropy (nats) of ``softmax(logits)`` per
    row, shape ``logits.shape[:-1]``, differentiable. ``chunk_size`` is accepted for TRL's
    signature (checked, unused: the kernels size their own chunks)."""
    positive_int("chunk_size", chunk_size)
    flat, targets = _rows(logits, None, None)
    _, entropy = _fused_logprobs(flat, targets, 1.0, return_entropy=True)
    return _finish(entropy, logits, trl_dtype)


def selective_log_softmax_and_entropy(logits: torch.Tensor, index: torch.Tensor,
                                      entropy_requires_grad: bool = True,
                                      temperature: float = 1.0,
                                      row_mask: Optional[torch.Tensor] = None, *,
                                      trl_dtype: bool = False
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy``: ``(logp, entropy)`` of
    ``logits / temperature`` in one pass; both 0 where ``row_mask`` is 0; the entropy
    detached unless ``entropy_requires_grad``."""
    check_bool("entropy_requires_grad", entropy_requires_grad)
    temperature = check_temperature(temperature)
    flat, targets = _rows(logits, index, row_mask)
    logp, entropy = _fused_logprobs(flat, targets, temperature, return_entropy=True)
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return _finish(logp, logits, trl_dtype), _finish(entropy, logits, trl_dtype)
