"""The chunked torch backend for CPU tensors (``backends.Backend``), a file per op."""
from .advantages import group_advantages
from .logprobs import grad_logits, row_stats
from .loss import token_loss
from .scale import scale_gradient_

__all__ = ["row_stats", "grad_logits", "token_loss", "group_advantages", "scale_gradient_"]
