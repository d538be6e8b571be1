"""Monotone rational-quadratic splines: the elementwise bijection of a spline TarFlow block.

A spline with ``K`` bins maps ``[-bound, bound]`` onto itself through ``K`` rational-quadratic
pieces whose knots (bin widths and heights) and knot derivatives are free parameters
(Durkan et al. 2019, "Neural Spline Flows"; Gregory & Delbourgo 1982 for the monotone
rational-quadratic interpolant). Outside the interval it is the identity, and the outermost
knot derivatives are 1, so the map is continuously differentiable everywhere. Unlike an affine
map it can be multimodal: a conditional spline turns a standard normal into a density with
several wells, such as a backbone torsion given its neighbour. Both directions are closed
form (the inverse solves a quadratic), so sampling stays one pass per token and exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Floors on a bin's share of the interval (both axes) and on a knot derivative: a spline
# cannot pinch a bin to nothing or flatten to a zero slope, which keeps the map and its
# inverse well conditioned in float32.
MIN_BIN_FRACTION = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(raw + _DERIVATIVE_OFFSET) + MIN_DERIVATIVE is 1 at raw = 0, so zero parameters
# (a zero-initialised output layer) give uniform bins with unit slopes: the identity.
_DERIVATIVE_OFFSET = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def parameters_per_channel(bins: int) -> int:
    """Raw numbers one channel's spline takes: ``bins`` widths, ``bins`` heights, ``bins - 1`` derivatives."""
    return 3 * int(bins) - 1


def _knot_positions(raw: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw bin sizes ``[..., K]`` -> knot positions ``[..., K + 1]`` from ``-bound`` to ``bound`` and bin sizes ``[..., K]``."""
    bins = raw.shape[-1]
    fractions = MIN_BIN_FRACTION + (1.0 - MIN_BIN_FRACTION * bins) * torch.softmax(raw, dim=-1)
    inner = 2.0 * bound * torch.cumsum(fractions, dim=-1)[..., :-1] - bound
    ends = inner.new_full((*inner.shape[:-1], 1), bound)
    knots = torch.cat([-ends, inner, ends], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _bin_of(knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index ``[..., 1]`` of the bin holding each of ``values`` ``[...]`` (clamped to the outer bins)."""
    inner = knots[..., 1:-1].contiguous()
    return torch.searchsorted(inner, values.unsqueeze(-1).contiguous(), right=True)


def rational_quadratic(
    inputs: torch.Tensor, raw: torch.Tensor, bound: float, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the spline with parameters ``raw`` elementwise.

    Parameters
    ----------
    inputs
        ``[...]`` values to map.
    raw
        ``[..., 3K - 1]`` unconstrained parameters per value: ``K`` bin widths, ``K`` bin heights
        and ``K - 1`` interior knot derivatives (see :func:`parameters_per_channel`).
    bound
        The spline acts on ``[-bound, bound]`` and is the identity outside.
    inverse
        Apply the inverse map instead.

    Returns
    -------
    outputs, log_abs_det
        ``[...]`` mapped values and the log of the map's derivative at each input (for the
        inverse, of the inverse map's derivative).
    """
    bins = (raw.shape[-1] + 1) // 3
    if parameters_per_channel(bins) != raw.shape[-1] or bins < 2:
        raise ValueError(f"a rational-quadratic spline needs 3K - 1 parameters with K >= 2 bins, got {raw.shape[-1]}")
    raw_widths, raw_heights, raw_derivatives = raw[..., :bins], raw[..., bins : 2 * bins], raw[..., 2 * bins :]
    x_knots, widths = _knot_positions(raw_widths, bound)
    y_knots, heights = _knot_positions(raw_heights, bound)
    ones = raw_derivatives.new_ones((*raw_derivatives.shape[:-1], 1))
    derivatives = torch.cat([ones, MIN_DERIVATIVE + F.softplus(raw_derivatives + _DERIVATIVE_OFFSET), ones], dim=-1)

    inside = (inputs >= -bound) & (inputs <= bound)
    # Outside values are clamped before the spline arithmetic so that the branch torch.where
    # discards stays finite and passes no NaN into the gradient.
    clamped = inputs.clamp(-bound, bound)
    index = _bin_of(y_knots if inverse else x_knots, clamped)

    def pick(tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return tensor.gather(-1, index + offset).squeeze(-1)

    x_low, width, y_low, height = pick(x_knots), pick(widths), pick(y_knots), pick(heights)
    d_low, d_high = pick(derivatives), pick(derivatives, 1)
    slope = height / width
    curvature = d_high + d_low - 2.0 * slope
    if inverse:
        rise = clamped - y_low
        a = height * (slope - d_low) + rise * curvature
        b = height * d_low - rise * curvature
        c = -slope * rise
        discriminant = (b.square() - 4.0 * a * c).clamp_min(0.0)
        # The root form 2c / (-b - sqrt(disc)) stays accurate when a is near zero (a linear bin).
        xi = (2.0 * c) / (-b - torch.sqrt(discriminant))
        mapped = x_low + xi * width
    else:
        xi = (clamped - x_low) / width
    between = xi * (1.0 - xi)
    denominator = slope + curvature * between
    log_derivative = (
        2.0 * torch.log(slope)
        + torch.log(d_high * xi.square() + 2.0 * slope * between + d_low * (1.0 - xi).square())
        - 2.0 * torch.log(denominator)
    )
    if inverse:
        return torch.where(inside, mapped, inputs), torch.where(inside, -log_derivative, torch.zeros_like(inputs))
    mapped = y_low + height * (slope * xi.square() + d_low * between) / denominator
    return torch.where(inside, mapped, inputs), torch.where(inside, log_derivative, torch.zeros_like(inputs))
