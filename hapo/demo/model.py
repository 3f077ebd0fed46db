"""A tiny causal transformer, trained from scratch on CPU by the demo."""
from __future__ import annotations

import torch
from torch import nn


class TinyCausalLM(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]``; pre-norm, learned positions, no dropout."""

    def __init__(self, vocab_size: int, max_len: int = 32, d_model: int = 64,
                 n_layers: int = 2, n_heads: int = 4, d_ff: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.max_len = max_len

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids`` ``[B, T]`` (T at most ``max_len``)."""
        T = input_ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={self.max_len}")
        pos = torch.arange(T, device=input_ids.device)
        h = self.tok(input_ids) + self.pos(pos)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        h = self.blocks(h, mask=causal, is_causal=True)
        return self.head(self.norm(h))
