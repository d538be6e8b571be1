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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from openmm_sbg.flow.marginals import GaussianMixtureMarginals
from openmm_sbg.flow.symmetry import augment, random_rotations_from_normal, remove_com
from openmm_sbg.flow.zmatrix import LOG_SO3_VOLUME, ZMatrix

REPRESENTATIONS = ("cartesian", "internal")
BOND, ANGLE, DIHEDRAL = 0, 1, 2
# Bins of the histogram that places each dihedral's cut at its emptiest angle.
_CUT_BINS = 72


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

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, N, 3]`` -> ``(h [B, N, 3], log_det [B])``, both in the dtype of ``x``."""
        return x / self.std, self._log_det(x)

    def positions(self, h: torch.Tensor, rigid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`features`: ``(x, log_det)`` with the same ``log_det``."""
        return h * self.std, self._log_det(h)

    def _log_det(self, like: torch.Tensor) -> torch.Tensor:
        return like.new_full((like.shape[0],), -3 * self.n_atoms * math.log(self.std))

    def fit(self, positions: torch.Tensor) -> None:
        """Nothing to fit: ``std`` is given at construction (the flow's own, from the data)."""

    def training_features(self, positions: torch.Tensor) -> torch.Tensor:
        """Centred, scaled frames; :meth:`augment` rotates them and adds CoM noise per step."""
        return remove_com(positions) / self.std

    def augment(self, h: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return augment(h, generator)


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
        # Data-derived normalisation, set by fit(): cut (dihedrals only), mean and std of the mapped values.
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

    # ------------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit(self, positions: torch.Tensor) -> None:
        """Set the dihedral cuts and the normalisation from training frames ``[T, N, 3]`` (nm)."""
        q, _ = self.zmatrix.to_internal(positions.to(torch.float64))
        dihedrals = q[..., self.kinds == DIHEDRAL]
        counts = torch.stack([torch.histc(column, _CUT_BINS, -math.pi, math.pi) for column in dihedrals.T])
        # Smooth over neighbouring bins (circularly) so that one empty bin in a busy region does not win.
        smoothed = counts + counts.roll(1, dims=1) + counts.roll(-1, dims=1)
        centres = -math.pi + (torch.arange(_CUT_BINS, dtype=torch.float64) + 0.5) * (2 * math.pi / _CUT_BINS)
        cut = torch.zeros(self.feature_shape, dtype=torch.float64)
        cut[self.kinds == DIHEDRAL] = centres[smoothed.argmin(dim=1)]
        self.cut.copy_(cut)
        t, _ = self._to_unbounded(q)
        self.loc.copy_(t.mean(dim=0))
        self.scale.copy_(t.std(dim=0).clamp_min(1e-6))
        if self.gaussianize is not None:
            self.gaussianize.fit((t - self.loc) / self.scale)

    # ------------------------------------------------------------------- elementwise maps
    def _to_unbounded(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _from_unbounded(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`_to_unbounded`, with the same ``sum log |dt/dq|``."""
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
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, N, 3]`` -> ``(h [B, N - 2, 3], log_det [B])``, computed in float64."""
        q, centre = self.zmatrix.to_internal(x.to(torch.float64))
        t, log_map = self._to_unbounded(q)
        h = (t - self.loc) / self.scale
        if self.gaussianize is not None:
            h, log_gaussianize = self.gaussianize(h)
            log_map = log_map + log_gaussianize
        return h.to(x.dtype), self._log_det(q, centre, log_map).to(x.dtype)

    def positions(self, h: torch.Tensor, rigid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, N - 2, 3]`` and rigid-body noise ``[B, 7]`` -> ``(x, log_det)`` as :meth:`features`."""
        if rigid is None or rigid.shape != (h.shape[0], self.n_rigid):
            raise ValueError(
                f"an internal-coordinate flow places each sample with {self.n_rigid} normal numbers "
                f"(rigid [{h.shape[0]}, {self.n_rigid}]); use TarFlow.sample, or draw_latents and from_latents"
            )
        u = h.to(torch.float64)
        log_gaussianize = 0.0
        if self.gaussianize is not None:
            u, log_gaussianize = self.gaussianize.inverse(u)
        q, log_map = self._from_unbounded(u * self.scale + self.loc)
        log_map = log_map + log_gaussianize
        rigid = rigid.to(torch.float64)
        rotation = random_rotations_from_normal(rigid[:, :4])
        centre = rigid[:, 4:] * self.com_std
        x = self.zmatrix.to_cartesian(q, centre, rotation)
        return x.to(h.dtype), self._log_det(q, centre, log_map).to(h.dtype)

    def training_features(self, positions: torch.Tensor) -> torch.Tensor:
        """Features of training frames; they need no augmentation (rigid motions are not modelled)."""
        return self.features(positions.to(torch.float64))[0]

    def augment(self, h: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return h


def make_representation(
    kind: str, n_atoms: int, std: float, zmatrix: ZMatrix | None = None, marginals: int = 0
) -> nn.Module:
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
