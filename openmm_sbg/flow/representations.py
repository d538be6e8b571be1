"""Representations: the exact bijection between Cartesian positions and a TarFlow's features.

A representation maps positions ``x [B, N, 3]`` (nm) to unbounded, normalised *features* that
the transformer blocks model with a standard normal prior, together with a log-density
correction ``log_det`` such that the flow's density over positions is

    log q(x) = log p_blocks(h(x)) + log_det(x).

``cartesian`` (the paper's): ``h = x / std``; the flow models all 3N coordinates, learning
rotation invariance from randomly rotated training data with centre-of-mass noise.

``internal``: ``h`` are the 3N - 6 Z-matrix coordinates of :mod:`openmm_sbg.flow.zmatrix`,
each mapped to the real line (bonds by ``log``, angles by ``logit(a / pi)``, dihedrals by
``logit`` of the angle measured from a cut at their least populated value in the training
data) and standardised with the training data's mean and std; with ``marginals > 0`` each is
then Gaussianized through a Gaussian mixture fitted to it (:mod:`openmm_sbg.flow.marginals`).
The six rigid-body degrees of freedom are not learned: the centre ``c`` is
``N(0, com_std^2 I)`` (the Gaussian the CoM adjustment assumes) and the orientation uniform
on SO(3), so ``log_det`` holds ``log N(c) - log(8 pi^2)``, the Jacobians of the maps and minus
the Z-matrix volume element.
Sampling draws 7 extra normal numbers per configuration for them (a quaternion and the CoM).

Both follow :class:`Representation`: the bijection and its log-determinant only. What is
fitted to training data, and how training frames are prepared and augmented, lives in
:mod:`openmm_sbg.flow.features`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from openmm_sbg.flow.marginals import GaussianMixtureMarginals
from openmm_sbg.flow.presets import REPRESENTATIONS
from openmm_sbg.flow.symmetry import random_rotations_from_normal
from openmm_sbg.flow.zmatrix import LOG_SO3_VOLUME, ZMatrix

BOND, ANGLE, DIHEDRAL = 0, 1, 2


class Representation(Protocol):
    """Positions ``x [B, N, 3]`` (nm) <-> features ``h [B, *feature_shape]``, exactly.

    ``forward`` gives ``log_det`` with ``log q(x) = log p(h) + log_det`` for any density ``p`` of
    the features; ``inverse`` gives minus that ``log_det``, so a chain of bijections sums it
    like any other log-determinant. A representation that does not model the rigid-body motion
    (``n_rigid > 0``) holds its density in ``log_det`` and places each sample with ``rigid``
    ``[B, n_rigid]`` standard normal numbers.
    """

    kind: str  # the FlowConfig.representation that builds it
    n_atoms: int
    n_rigid: int
    feature_shape: tuple[int, int]

    def token_shape(self, layout: str) -> tuple[int, int]:
        """``(tokens, channels)`` of the features in FlowConfig.tokens ``layout``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, h: torch.Tensor, rigid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


class CartesianCoordinates(nn.Module):
    """``h = x / std``: every coordinate is a feature; ``std`` is one scalar in nm."""

    kind = "cartesian"
    n_rigid = 0

    def __init__(self, n_atoms: int, std: float):
        super().__init__()
        self.n_atoms, self.std = int(n_atoms), float(std)
        self.feature_shape = (self.n_atoms, 3)

    def token_shape(self, layout: str) -> tuple[int, int]:
        return (self.n_atoms, 3) if layout == "atom" else (3 * self.n_atoms, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, N, 3]`` -> ``(h [B, N, 3], log_det [B])``, both in the dtype of ``x``."""
        return x / self.std, self._log_det(x)

    def inverse(self, h: torch.Tensor, rigid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`forward`: ``(x, -log_det)``; ``rigid`` is unused (nothing to place)."""
        return h * self.std, -self._log_det(h)

    def _log_det(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_full((like.shape[0],), -3 * self.n_atoms * math.log(self.std))


class InternalCoordinates(nn.Module):
    """Z-matrix features of one molecule, normalised with its training data.

    Parameters
    ----------
    zmatrix
        The molecule's :class:`ZMatrix`.
    com_std
        Std (nm) per coordinate of the centre of mass of the samples.
    marginals
        Gaussian-mixture components of the per-feature Gaussianization applied after the
        standardisation (:mod:`openmm_sbg.flow.marginals`); 0 for none.
    """

    kind = "internal"
    n_rigid = 7  # a normal 4-vector (uniform quaternion) and the CoM

    def __init__(self, zmatrix: ZMatrix, com_std: float, marginals: int = 0):
        super().__init__()
        self.zmatrix = zmatrix
        self.n_atoms, self.com_std = zmatrix.n_atoms, float(com_std)
        self.feature_shape = (self.n_atoms - 2, 3)
        # The Z-matrix travels in the state dict, so a checkpoint is complete without the topology.
        self.register_buffer("root", torch.as_tensor(zmatrix.root, dtype=torch.long))
        self.register_buffer("placed", torch.as_tensor(zmatrix.placed, dtype=torch.long))
        # Data-derived normalisation, set by openmm_sbg.flow.features.fit_representation: cut
        # (dihedrals only), mean and std of the mapped values.
        self.register_buffer("cut", torch.zeros(self.feature_shape, dtype=torch.float64))
        self.register_buffer("loc", torch.zeros(self.feature_shape, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(self.feature_shape, dtype=torch.float64))
        kinds = torch.full(self.feature_shape, BOND)
        kinds[0, 2] = ANGLE
        kinds[1:, 1], kinds[1:, 2] = ANGLE, DIHEDRAL
        self.kinds = kinds
        self.gaussianize = GaussianMixtureMarginals(self.feature_shape, marginals) if marginals else None

    def token_shape(self, layout: str) -> tuple[int, int]:
        return (self.n_atoms - 2, 3) if layout == "atom" else (3 * (self.n_atoms - 2), 1)

    # ------------------------------------------------------------------- elementwise maps
    def to_unbounded(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bonds, angles, dihedrals -> real numbers, and ``sum log |dt/dq|``."""
        kinds = self.kinds.to(q.device)
        period = torch.where(kinds == ANGLE, math.pi, 2 * math.pi).to(q)
        unit = torch.remainder(q - self.cut.to(q), 2 * math.pi) / period
        # The ends of the interval have measure zero; the clamp only keeps logit finite there.
        unit = unit.clamp(1e-15, 1 - 1e-15)
        log_unit, log_rest = unit.log(), torch.log1p(-unit)
        is_bond = kinds == BOND
        bond_log = q.clamp_min(1e-300).log()
        t = torch.where(is_bond, bond_log, log_unit - log_rest)
        log_jacobian = torch.where(is_bond, -bond_log, -period.log() - log_unit - log_rest)
        return t, log_jacobian.flatten(1).sum(1)

    def from_unbounded(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`to_unbounded`, with the same ``sum log |dt/dq|``."""
        kinds = self.kinds.to(t.device)
        period = torch.where(kinds == ANGLE, math.pi, 2 * math.pi).to(t)
        is_bond = kinds == BOND
        log_unit, log_rest = nn.functional.logsigmoid(t), nn.functional.logsigmoid(-t)
        q = torch.where(is_bond, t.exp(), period * torch.sigmoid(t) + self.cut.to(t))
        log_jacobian = torch.where(is_bond, -t, -period.log() - log_unit - log_rest)
        return q, log_jacobian.flatten(1).sum(1)

    def _log_det(self, q: torch.Tensor, centre: torch.Tensor, log_map: torch.Tensor) -> torch.Tensor:
        log_com = -1.5 * math.log(2 * math.pi * self.com_std**2) - centre.square().sum(-1) / (2 * self.com_std**2)
        return log_map - self.scale.log().sum() - self.zmatrix.log_volume(q) + log_com - LOG_SO3_VOLUME

    # ------------------------------------------------------------------- the bijection
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, N, 3]`` -> ``(h [B, N - 2, 3], log_det [B])``, computed in float64."""
        q, centre = self.zmatrix.to_internal(x.to(torch.float64))
        t, log_map = self.to_unbounded(q)
        h = (t - self.loc) / self.scale
        if self.gaussianize is not None:
            h, log_gaussianize = self.gaussianize(h)
            log_map = log_map + log_gaussianize
        return h.to(x.dtype), self._log_det(q, centre, log_map).to(x.dtype)

    def inverse(self, h: torch.Tensor, rigid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, N - 2, 3]`` and rigid-body noise ``[B, 7]`` -> ``(x, -log_det)``, ``log_det`` as :meth:`forward`."""
        if rigid is None or rigid.shape != (h.shape[0], self.n_rigid):
            raise ValueError(
                f"an internal-coordinate flow places each sample with {self.n_rigid} normal numbers "
                f"(rigid [{h.shape[0]}, {self.n_rigid}]); use TarFlow.sample, or draw_latents and from_latents"
            )
        u = h.to(torch.float64)
        log_gaussianize = 0.0
        if self.gaussianize is not None:
            u, log_gaussianize = self.gaussianize.inverse(u)
        q, log_map = self.from_unbounded(u * self.scale + self.loc)
        log_map = log_map + log_gaussianize
        rigid = rigid.to(torch.float64)
        rotation = random_rotations_from_normal(rigid[:, :4])
        centre = rigid[:, 4:] * self.com_std
        x = self.zmatrix.to_cartesian(q, centre, rotation)
        return x.to(h.dtype), -self._log_det(q, centre, log_map).to(h.dtype)


def make_representation(
    kind: str, n_atoms: int, std: float, zmatrix: ZMatrix | None = None, marginals: int = 0
) -> Representation:
    """The representation ``kind`` of a flow over ``n_atoms`` atoms (``internal`` needs the ``zmatrix``;
    ``marginals`` Gaussian-mixture components per feature, internal only; FlowConfig checks that)."""
    if kind == "cartesian":
        return CartesianCoordinates(n_atoms, std)
    if kind == "internal":
        if zmatrix is None:
            raise ValueError(
                "an internal-coordinate flow builds its Z-matrix from the molecule's bonds; pass target= (or topology=)"
            )
        if zmatrix.n_atoms != n_atoms:
            raise ValueError(f"the Z-matrix has {zmatrix.n_atoms} atoms but the flow {n_atoms}")
        return InternalCoordinates(zmatrix, std / math.sqrt(n_atoms), marginals)
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {kind!r}")
