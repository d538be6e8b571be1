"""The causal transformer inside each TarFlow block: pre-LayerNorm layers of masked self-attention.

Run in parallel over a whole token sequence (the density direction), or one position at a time
with a :class:`KVCache` per layer (sampling, which recovers tokens in order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of one transformer layer for the positions filled so far: written in place
    into ``length`` positions, or, when they need gradients (reverse-KL refinement backpropagates
    through sampling), grown by concatenation, as in-place writes would break the backward pass."""

    def __init__(self, length: int):
        self.length, self.filled = length, 0
        self.keys = self.values = None  # tensors [B, H, positions, D] once the first token is in

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values ``[B, H, T, D]``; return all of them."""
        start, self.filled = self.filled, self.filled + keys.shape[2]
        if keys.requires_grad:
            pairs = ((self.keys, keys), (self.values, values))
            self.keys, self.values = (new if old is None else torch.cat([old, new], dim=2) for old, new in pairs)
            return self.keys, self.values
        if self.keys is None:
            self.keys, self.values = (t.new_empty(*t.shape[:2], self.length, t.shape[3]) for t in (keys, values))
        self.keys[:, :, start : self.filled], self.values[:, :, start : self.filled] = keys, values
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention that can also extend a :class:`KVCache` one step."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Attend over ``h`` ``[B, T, W]``; with ``cache``, ``h`` holds the positions after the cached ones."""
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = cache.extend(k, v)
            # One new query sees every cached position, so no mask is needed.
            y = F.scaled_dot_product_attention(q, keys, values)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm transformer layer: causal attention, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.attention(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))
