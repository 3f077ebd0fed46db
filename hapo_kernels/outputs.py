"""What the loss writes and returns: per-token buffers every backend fills, and ``LossOutput``.

``new_buffer`` is the one allocator of every buffer a kernel or chunk loop writes row by row
(the tests replace it with a NaN-filled one, so a row left unwritten shows).
``first_order_backward`` refuses second-order gradients through a Function's backward
(docs/design.md section 9).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from .objective import TokenTerms


def new_buffer(shape: Sequence[int] | int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """An uninitialised buffer that the caller fills completely."""
    return torch.empty(shape, dtype=dtype, device=device)


def first_order_backward(name: str) -> Callable:
    """Decorate an autograd Function's ``backward``: run it once (``once_differentiable``),
    and refuse a backward with ``create_graph=True`` with a clear error.

    The gradient is computed in the forward pass: to autograd it is a constant, so its own
    derivative (a gradient penalty, a Hessian-vector product) would be silently zero.
    ``once_differentiable`` alone only catches that when the upstream gradient itself
    requires grad, and a gradient graph cannot be tied back to the inputs without keeping
    them (the ``[N, V]`` logits) alive, so the refusal comes at the first backward.
    """
    def wrap(backward: Callable) -> Callable:
        once = once_differentiable(backward)

        @functools.wraps(backward)
        def run(ctx: Any, *grad_outputs: Any) -> Any:
            if torch.is_grad_enabled():          # create_graph=True
                raise RuntimeError(
                    f"{name}: second-order gradients are not supported (backward with "
                    "create_graph=True): the gradient is computed in the forward pass and "
                    "its own derivative would be silently zero. Differentiate twice a loss "
                    "that does not go through it, or drop create_graph=True")
            return once(ctx, *grad_outputs)
        return run
    return wrap


@dataclass
class TokenResults:
    """The flat ``[rows]`` per-token results a loss pass writes (float32; flags int8)."""
    loss: torch.Tensor           # w * l: the token's share of the aggregated loss
    logp: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor
    clip_low: torch.Tensor       # int8
    clip_high: torch.Tensor      # int8
    kl: Optional[torch.Tensor]   # None without ref_logp

    @classmethod
    def allocate(cls, rows: int, has_ref: bool, device: torch.device) -> TokenResults:
        """Unfilled buffers for ``rows`` tokens (``kl`` only with a reference)."""
        def f32():
            return new_buffer(rows, torch.float32, device)
        return cls(loss=f32(), logp=f32(), entropy=f32(), ratio=f32(),
                   clip_low=new_buffer(rows, torch.int8, device),
                   clip_high=new_buffer(rows, torch.int8, device),
                   kl=f32() if has_ref else None)

    def slice_rows(self, r0: int, r1: int) -> TokenResults:
        """Views of rows ``r0..r1`` (writes go to this object's buffers)."""
        return TokenResults(**{f.name: None if getattr(self, f.name) is None
                               else getattr(self, f.name)[r0:r1]
                               for f in dataclasses.fields(self)})

    def write(self, sl: slice, valid: torch.Tensor, logp: torch.Tensor,
              entropy: torch.Tensor, terms: TokenTerms) -> None:
        """Store ``objective.token_terms``' results for rows ``sl`` (0 on invalid rows)."""
        zero = torch.zeros((), dtype=torch.float32, device=logp.device)
        obj = terms.objective
        self.loss[sl] = terms.weighted_loss.reshape(-1)
        self.logp[sl] = torch.where(valid, logp, zero).reshape(-1)
        self.entropy[sl] = torch.where(valid, entropy, zero).reshape(-1)
        self.ratio[sl] = obj.ratio.reshape(-1)
        self.clip_low[sl] = obj.clip_low.reshape(-1)
        self.clip_high[sl] = obj.clip_high.reshape(-1)
        if self.kl is not None:
            self.kl[sl] = obj.kl.reshape(-1)

    def as_tuple(self, device: torch.device) -> tuple:
        """``(loss, logp, entropy, ratio, clip_low, clip_high, kl)``, ``kl`` empty when
        absent: what an autograd Function returns (it cannot return None among tensors)."""
        kl = self.kl if self.kl is not None else torch.empty(0, device=device)
        return (self.loss, self.logp, self.entropy, self.ratio, self.clip_low,
                self.clip_high, kl)


@dataclass
class LossOutput:
    """What ``fused_hapo_loss`` returns.

    ``loss`` is a differentiable scalar. Everything else is detached: ``per_token_*`` have
    the shape of ``target_ids`` (0 where masked; clip flags bool); the rest are masked means
    over the valid tokens (0 when there is none).
    """
    loss: torch.Tensor
    per_token_logp: torch.Tensor
    per_token_entropy: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    kl: Optional[torch.Tensor]          # None when ref_logp was not given
    clip_low: torch.Tensor              # fraction of valid tokens clipped below (A < 0)
    clip_high: torch.Tensor             # fraction of valid tokens clipped above (A > 0)
    ratio: torch.Tensor                 # mean importance ratio
    teacher_fraction: torch.Tensor      # fraction of valid tokens that are teacher tokens
    advantages: Optional[torch.Tensor] = None   # the advantages used (set when computed)
    replaced: Optional[torch.Tensor] = None     # SSI replaced index per group, or None
    per_token_ratio: Optional[torch.Tensor] = None
    per_token_kl: Optional[torch.Tensor] = None        # None without ref_logp
    per_token_clip_low: Optional[torch.Tensor] = None  # bool: clipped below (A < 0)
    per_token_clip_high: Optional[torch.Tensor] = None  # bool: clipped above (A > 0)

    def metrics(self) -> dict:
        """Plain floats for logging."""
        out = {"logp": self.logp, "entropy": self.entropy, "clip_low": self.clip_low,
               "clip_high": self.clip_high, "ratio": self.ratio,
               "teacher_fraction": self.teacher_fraction}
        if self.kl is not None:
            out["kl"] = self.kl
        return {k: float(v) for k, v in out.items()}
