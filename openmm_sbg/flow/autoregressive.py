"""One TarFlow block: elementwise maps of each token, parameterised by a causal transformer.

A block maps a token sequence ``x [B, T, C]`` to ``z`` token by token,

    z_0 = x_0,        z_i = f_i(x_i)        with f_i = g_K(.; p_K(x_<i)) o ... o g_1(.; p_1(x_<i)),

where ``g_1 .. g_K`` are elementwise transforms (:mod:`openmm_sbg.flow.elementwise`: the
paper's affine map, optionally followed by a spline) and a causal transformer reads tokens
``0..i-1`` and predicts their parameters ``p_k`` for token ``i``. The forward direction is one
parallel transformer pass; the inverse recovers tokens one at a time, feeding each into the
transformer with a key/value cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from openmm_sbg.flow.elementwise import ElementwiseTransform, RationalQuadraticSpline
from openmm_sbg.flow.transformer import KVCache, TransformerLayer


class AutoregressiveBlock(nn.Module):
    """One TarFlow block over ``tokens`` tokens of ``channels`` channels.

    Parameters
    ----------
    tokens, channels
        Sequence length and channels per token.
    width, layers, heads, mlp_ratio
        Size of the causal transformer.
    reverse
        Process tokens in reversed order (alternate blocks do, so each token is conditioned
        on all others somewhere in the stack).
    transforms
        The elementwise transforms each token goes through, in order (see
        :func:`openmm_sbg.flow.elementwise.token_transforms`).
    """

    def __init__(
        self,
        tokens: int,
        channels: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: int,
        reverse: bool,
        transforms: Sequence[ElementwiseTransform],
    ):
        super().__init__()
        self.reverse = reverse
        self.heads = heads
        self.channels = channels
        self.transforms = list(transforms)
        self.proj_in = nn.Linear(channels, width)
        # The last token conditions nothing, so the transformer only ever sees tokens-1 positions.
        self.position = nn.Parameter(torch.randn(tokens - 1, width) * 0.02)
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, sum(transform.parameters for transform in self.transforms) * channels)
        # Zero-initialised output: every block starts as the identity (every elementwise
        # transform is one at zero parameters), so training starts from the prior fitted to
        # normalised data and the first updates are well behaved.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    @property
    def spline_bins(self) -> int:
        """Bins of this block's spline; 0 for an affine block."""
        return sum(transform.bins for transform in self.transforms if isinstance(transform, RationalQuadraticSpline))

    def _transform_parameters(self, x: torch.Tensor, caches: list[KVCache] | None = None, position: int = 0) -> list[torch.Tensor]:
        """Raw parameters ``[B, T, C, parameters]`` of each elementwise transform for the tokens after
        inputs ``x`` at ``position..``."""
        h = self.proj_in(x) + self.position[position : position + x.shape[1]]
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            h = layer(h, cache)
        out = self.proj_out(self.norm(h))
        if len(self.transforms) == 1:
            # One transform (an affine block) keeps the output layout of checkpoints from before
            # blocks had several: every channel's first parameter, then every channel's second.
            parameters = out.view(*out.shape[:-1], -1, self.channels).transpose(-1, -2)
        else:
            parameters = out.view(*out.shape[:-1], self.channels, -1)
        ends = list(itertools.accumulate(transform.parameters for transform in self.transforms))
        return [parameters[..., end - transform.parameters : end] for transform, end in zip(self.transforms, ends)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, T, C]`` -> ``(z, log|det dz/dx|)``."""
        if self.reverse:
            x = x.flip(1)
        moved = x[:, 1:]
        log_det = x.new_zeros(x.shape[0])
        for transform, raw in zip(self.transforms, self._transform_parameters(x[:, :-1])):
            moved, transform_log_det = transform.forward(moved, raw)
            log_det = log_det + transform_log_det
        z = torch.cat([x[:, :1], moved], dim=1)
        if self.reverse:
            z = z.flip(1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` ``[B, T, C]`` -> ``(x, log|det dx/dz|)``, one token at a time with a KV cache."""
        if self.reverse:
            z = z.flip(1)
        batch, tokens, _ = z.shape
        caches = [KVCache(tokens - 1) for _ in self.layers]
        x = [z[:, :1]]
        log_det = z.new_zeros(batch)
        for i in range(1, tokens):
            token = z[:, i : i + 1]
            parameters = self._transform_parameters(x[-1], caches, position=i - 1)
            for transform, raw in reversed(list(zip(self.transforms, parameters))):
                token, transform_log_det = transform.inverse(token, raw)
                log_det = log_det + transform_log_det
            x.append(token)
        x = torch.cat(x, dim=1)
        if self.reverse:
            x = x.flip(1)
        return x, log_det
