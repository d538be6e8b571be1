"""Per-feature Gaussianization: a fixed, exact, elementwise bijection fitted to the training data.

An affine TarFlow block moves and scales a token given the tokens before it, so a feature
whose marginal is multimodal (a methyl rotor's three wells, a backbone torsion's basins) or
heavy-tailed must be shaped by the interplay of several blocks, and the first token of each
block not at all. :class:`GaussianMixtureMarginals` takes that burden off the blocks: each
feature ``u`` is mapped through the CDF ``F`` of a one-dimensional Gaussian mixture fitted to
it (EM on the training features) and then through the standard normal quantile,

    y = Phi^-1(F(u)),        log|dy/du| = log f(u) - log phi(y),

so that ``y`` is close to standard normal feature by feature and the blocks only model the
dependencies. The map is monotone and smooth; its inverse is bracketed on a grid and found
by Newton steps, the last one differentiable; its parameters are buffers fixed after
fitting, so every checkpoint stays an exact density.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# EM settings: enough iterations for a 1-D mixture of a few components to settle, on a
# histogram of this many bins per feature.
_EM_ITERATIONS = 300
_EM_BINS = 2048
# Floors on a component's std (features are standardised, so in units of the feature's std)
# and weight: a component may not collapse onto a few repeated values.
_MIN_SCALE = 0.02
_MIN_WEIGHT = 1e-4
# The quantile ndtri(exp(log p)) underflows below this log p (|y| > ~37); Newton steps on
# log Phi(y) = log p from the asymptotic guess take over there.
_LOG_P_UNDERFLOW = -700.0
# Inversion: grid points per component (within +-_GRID_HALF_WIDTH of its scale) bracket u;
# Newton steps inside the bracket then reach float64 precision.
_GRID_POINTS = 64
_GRID_HALF_WIDTH = 8.0
_NEWTON_STEPS = 3


def _log_normal_quantile(log_p: torch.Tensor) -> torch.Tensor:
    """``Phi^-1(exp(log_p))`` for ``log_p <= log 0.5``, accurate down to any ``log_p``.

    Larger ``log_p`` (rounding at the median) are treated as ``log 0.5``.
    """
    log_p = log_p.clamp_max(-math.log(2.0))
    direct = torch.special.ndtri(log_p.clamp_min(_LOG_P_UNDERFLOW).exp())
    # Asymptotic guess from log Phi(y) ~ -y^2/2 - log(-y) - log(2 pi)/2, refined by Newton.
    twice = -2.0 * log_p.clamp_max(_LOG_P_UNDERFLOW)
    y = -torch.sqrt(twice - torch.log(twice) - math.log(2 * math.pi))
    for _ in range(3):
        log_phi = -0.5 * y.square() - 0.5 * math.log(2 * math.pi)
        y = y - (torch.special.log_ndtr(y) - log_p) / torch.exp(log_phi - torch.special.log_ndtr(y))
    return torch.where(log_p > _LOG_P_UNDERFLOW, direct, y)


class GaussianMixtureMarginals(nn.Module):
    """``y = Phi^-1(F(u))`` feature by feature, ``F`` the CDF of a fitted Gaussian mixture.

    Parameters
    ----------
    feature_shape
        Shape of one sample's features (the mixture is per feature).
    components
        Gaussian components per feature.
    """

    def __init__(self, feature_shape: tuple[int, ...], components: int):
        super().__init__()
        if int(components) < 1:
            raise ValueError(f"a Gaussian-mixture marginal needs at least one component, got {components!r}")
        shape = (*feature_shape, int(components))
        # Identity-like until fitted: equal weights, one shared standard normal.
        self.register_buffer("log_weight", torch.full(shape, -math.log(components), dtype=torch.float64))
        self.register_buffer("loc", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("log_scale", torch.zeros(shape, dtype=torch.float64))

    # ----------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, u: torch.Tensor) -> None:
        """EM on training features ``u [T, *feature_shape]``, deterministic (quantile start).

        The frames are binned per feature first (``_EM_BINS`` bins between its extremes), so
        the cost does not grow with the data; a bin is far narrower than a component.
        """
        flat = u.to(torch.float64).reshape(len(u), -1).T  # [F, T]
        components = self.loc.shape[-1]
        levels = (torch.arange(components, dtype=torch.float64, device=flat.device) + 0.5) / components
        loc = torch.quantile(flat, levels, dim=1).T.contiguous()  # [F, K]
        scale = flat.std(dim=1, keepdim=True).expand_as(loc) / components
        log_weight = torch.full_like(loc, -math.log(components))
        low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
        width = ((high - low) / _EM_BINS).clamp_min(1e-12)
        index = ((flat - low) / width).floor().long().clamp(0, _EM_BINS - 1)
        counts = torch.zeros(len(flat), _EM_BINS, dtype=torch.float64, device=flat.device)
        counts.scatter_add_(1, index, torch.ones_like(flat))
        centres = torch.arange(_EM_BINS, dtype=torch.float64, device=flat.device) + 0.5
        x = (low + centres * width).unsqueeze(-1)  # [F, bins, 1]
        counts = counts.unsqueeze(-1)
        for _ in range(_EM_ITERATIONS):
            scale = scale.clamp_min(_MIN_SCALE)
            log_joint = log_weight.unsqueeze(1) + _log_normal(x, loc.unsqueeze(1), scale.unsqueeze(1))  # [F, bins, K]
            responsibility = counts * torch.softmax(log_joint, dim=-1)
            mass = responsibility.sum(dim=1).clamp_min(1e-12)  # [F, K]
            loc = (responsibility * x).sum(dim=1) / mass
            scale = ((responsibility * (x - loc.unsqueeze(1)).square()).sum(dim=1) / mass).sqrt()
            weight = (mass / flat.shape[1]).clamp_min(_MIN_WEIGHT)
            log_weight = (weight / weight.sum(dim=-1, keepdim=True)).log()
        shape = self.loc.shape
        self.log_weight.copy_(log_weight.reshape(shape))
        self.loc.copy_(loc.reshape(shape))
        self.log_scale.copy_(scale.clamp_min(_MIN_SCALE).log().reshape(shape))

    # ----------------------------------------------------------------- the map
    def _standardised(self, u: torch.Tensor) -> torch.Tensor:
        return (u.unsqueeze(-1) - self.loc) * torch.exp(-self.log_scale)

    def _gaussianize(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log dy/du)`` elementwise, in the dtype of the buffers (float64)."""
        s = self._standardised(u)
        # Both tails in log space, so that the quantile is accurate far from the bulk on either side.
        log_lower = torch.logsumexp(self.log_weight + torch.special.log_ndtr(s), dim=-1)
        log_upper = torch.logsumexp(self.log_weight + torch.special.log_ndtr(-s), dim=-1)
        lower_tail = log_lower < log_upper
        y = _log_normal_quantile(torch.where(lower_tail, log_lower, log_upper))
        y = torch.where(lower_tail, y, -y)
        log_density = torch.logsumexp(self.log_weight - self.log_scale - 0.5 * s.square(), dim=-1)
        log_derivative = log_density + 0.5 * y.square()  # log f(u) - log phi(y); the 2 pi terms cancel
        return y, log_derivative

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``u [B, *feature_shape]`` -> ``(y, sum log|dy/du| [B])``."""
        y, log_derivative = self._gaussianize(u.to(torch.float64))
        return y.to(u.dtype), log_derivative.flatten(1).sum(1).to(u.dtype)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y`` -> ``(u, sum log|dy/du| [B])``: the same log-derivative as :meth:`forward`.

        A grid of the map per feature (points spread over every component) brackets ``u``, and
        Newton steps kept inside the bracket reach float64 precision.
        The last Newton step carries the gradient, ``du/dy = 1 / (dy/du)``, so sampling stays
        differentiable.
        """
        target = y.to(torch.float64)
        batch = target.shape[0]
        with torch.no_grad():
            flat_target = target.reshape(batch, -1).T  # [F, B]
            offsets = torch.linspace(-_GRID_HALF_WIDTH, _GRID_HALF_WIDTH, _GRID_POINTS, dtype=torch.float64, device=target.device)
            loc, scale = self.loc.reshape(len(flat_target), -1), self.log_scale.exp().reshape(len(flat_target), -1)
            grid = (loc.unsqueeze(-1) + scale.unsqueeze(-1) * offsets).flatten(1).sort(dim=1).values  # [F, P]
            grid_value = self._flat_gaussianize(grid).contiguous()
            above = torch.searchsorted(grid_value, flat_target.contiguous()).clamp(1, grid.shape[1] - 1)
            low, high = grid.gather(1, above - 1), grid.gather(1, above)
            # Beyond the grid (|y| past ~8) the map is still monotone: widen until the bracket holds y.
            outside_low, outside_high = flat_target < grid_value[:, :1], flat_target > grid_value[:, -1:]
            while outside_low.any() or outside_high.any():
                span = high - low
                low, high = low - outside_low * 2 * span, high + outside_high * 2 * span
                outside_low = self._flat_gaussianize(low) > flat_target
                outside_high = self._flat_gaussianize(high) < flat_target
            # The bracket is at most a quarter of a component's scale wide: Newton from its middle
            # converges quadratically; clamping keeps each step inside it.
            u = 0.5 * (low + high)
            for _ in range(_NEWTON_STEPS):
                value, log_derivative = self._flat_gaussianize(u, with_derivative=True)
                u = (u - (value - flat_target) * torch.exp(-log_derivative)).clamp(low, high)
            u = u.T.reshape(target.shape)
            value, log_derivative = self._gaussianize(u)
        u = u - (value - target) * torch.exp(-log_derivative)
        _, log_derivative = self._gaussianize(u)
        return u.to(y.dtype), log_derivative.flatten(1).sum(1).to(y.dtype)

    def _flat_gaussianize(self, u: torch.Tensor, with_derivative: bool = False):
        """:meth:`_gaussianize` of ``u [F, M]``: ``M`` values of each feature, features first."""
        y, log_derivative = self._gaussianize(u.T.reshape(u.shape[1], *self.loc.shape[:-1]))
        y = y.reshape(u.shape[1], -1).T
        return (y, log_derivative.reshape(u.shape[1], -1).T) if with_derivative else y


def _log_normal(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - loc) / scale).square() - scale.log() - 0.5 * math.log(2 * math.pi)
