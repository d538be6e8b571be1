"""Elementwise bijections of one token's channels, with parameters an autoregressive block predicts.

An :class:`~openmm_sbg.flow.autoregressive.AutoregressiveBlock` maps token ``i`` through a list
of these, each taking its own raw parameters from the block's transformer (read from tokens
before ``i``): the paper's affine map alone, or the affine map followed by a monotone
rational-quadratic spline (:mod:`openmm_sbg.flow.splines`), which can make a token's
conditional density multimodal. Every map is the identity at zero parameters, so a block with a
zero-initialised output layer starts as the identity.
"""

from __future__ import annotations

from typing import Protocol

import torch

from openmm_sbg.flow.splines import parameters_per_channel, rational_quadratic

#: The spline acts on ``[-SPLINE_BOUND, SPLINE_BOUND]`` of the affine-transformed token and is
#: the identity outside; features are standardised, so this holds all but rare tails.
SPLINE_BOUND = 5.0


class ElementwiseTransform(Protocol):
    """A bijection applied to each value of tokens ``[B, T, C]``, with parameters ``[B, T, C, parameters]``.

    Both directions return ``(outputs, log_det [B])``: the log-derivatives of the map applied,
    summed over tokens and channels.
    """

    parameters: int  # raw parameters per channel

    def forward(self, x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, z: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Affine:
    """``z = (x - b) * exp(-a)`` with raw parameters ``(a, b)``: log-scale, then shift."""

    parameters = 2

    def forward(self, x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = raw[..., 0], raw[..., 1]
        return (x - shift) * torch.exp(-log_scale), -log_scale.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = raw[..., 0], raw[..., 1]
        return z * torch.exp(log_scale) + shift, log_scale.sum(dim=(1, 2))


class RationalQuadraticSpline:
    """Monotone rational-quadratic spline of ``bins`` bins on ``[-bound, bound]``, the identity outside."""

    def __init__(self, bins: int, bound: float = SPLINE_BOUND):
        self.bins, self.bound = int(bins), float(bound)
        self.parameters = parameters_per_channel(self.bins)

    def forward(self, x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_derivative = rational_quadratic(x, raw, self.bound)
        return z, log_derivative.sum(dim=(1, 2))

    def inverse(self, z: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_derivative = rational_quadratic(z, raw, self.bound, inverse=True)
        return x, log_derivative.sum(dim=(1, 2))


def token_transforms(spline_bins: int = 0) -> list[ElementwiseTransform]:
    """The maps of a TarFlow block: affine, then a spline of ``spline_bins`` bins unless that is 0."""
    return [Affine(), RationalQuadraticSpline(spline_bins)] if spline_bins else [Affine()]
