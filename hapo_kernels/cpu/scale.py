"""Scaling a saved gradient by ``grad_output`` on CPU tensors (a host read costs nothing
there): in place, and skipped when the scale is exactly 1."""
from __future__ import annotations

import torch


def scale_gradient_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad *= grad_output`` in place (nothing when ``grad_output == 1``)."""
    if float(grad_output) != 1.0:
        grad.mul_(grad_output.to(grad.dtype))
    return grad
