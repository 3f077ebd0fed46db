"""A policy's last hidden state and LM head, for the fused-linear loss path.

With ``HAPOConfig(fused_linear=True)`` the trainer never asks the policy for logits during
the loss: it takes the hidden states before the head and the head's weight, and
``hapo_kernels.fused_linear_hapo_loss`` makes the logits one chunk at a time.

How the two are found:

* the head: ``policy.get_output_embeddings()`` (Hugging Face models have it; a plain module
  defines it and returns its ``nn.Linear`` head, or any object with ``.weight [V, H]`` and
  ``.bias`` [V] or None);
* the hidden states ``[B, T, H]`` (after the final norm, i.e. exactly the head's input):
  ``policy.hapo_hidden_states(input_ids)`` when the policy defines that hook (plain
  modules: ``forward`` without the head); else, for Hugging Face models,
  ``policy.get_decoder()(input_ids=input_ids).last_hidden_state``, the decoder stack alone,
  so the model's own ``lm_head`` never runs.

Models that change the logits after the head (final-logit soft-capping, a logit scale) are
not a plain linear head; use the logits path for them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["output_head", "last_hidden_states"]


def output_head(policy: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of the policy's LM head."""
    get = getattr(policy, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("fused_linear=True needs the policy's LM head: define "
                         "get_output_embeddings() returning the nn.Linear head (Hugging Face "
                         f"models have it); got {type(head).__name__} from "
                         f"{type(policy).__name__}")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def last_hidden_states(policy: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]``: the input of the LM head at every position."""
    hook = getattr(policy, "hapo_hidden_states", None)
    if callable(hook):
        hidden = hook(input_ids)
    else:
        get_decoder = getattr(policy, "get_decoder", None)
        if not callable(get_decoder):
            raise ValueError("fused_linear=True needs the policy's last hidden states: define "
                             "hapo_hidden_states(input_ids) -> [B, T, H] (the forward without "
                             "the head), or use a Hugging Face model (get_decoder())")
        out = get_decoder()(input_ids=input_ids)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None and isinstance(out, (tuple, list)):
            hidden = out[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"the policy's hidden states must be [B, T, H], got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    return hidden
