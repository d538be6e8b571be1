"""The training side of a representation: fitting it to data, training features, augmentation.

A :class:`~openmm_sbg.flow.representations.Representation` is only the bijection; these
functions prepare maximum-likelihood training for each kind of representation:

``cartesian``
    nothing to fit (its ``std`` is given at construction, the flow's own, from the data); the
    training features are centred, scaled frames, and every step rotates them at random and
    adds CoM noise (:func:`openmm_sbg.flow.symmetry.augment`), so that the flow learns rotation
    invariance and its N(0, I) prior fits the CoM.
``internal``
    fitting sets each dihedral's cut at its least populated angle and the standardisation (and
    any per-feature Gaussianization) from the training frames; the training features are the
    representation's own and need no augmentation (rigid motions are not modelled).
"""

from __future__ import annotations

import math

import torch

from openmm_sbg.flow import symmetry
from openmm_sbg.flow.representations import DIHEDRAL, CartesianCoordinates, InternalCoordinates, Representation

# Bins of the histogram that places each dihedral's cut at its emptiest angle.
CUT_BINS = 72


@torch.no_grad()
def fit_representation(representation: Representation, positions: torch.Tensor) -> None:
    """Set the data-derived parts of ``representation`` from training frames ``[T, N, 3]`` (nm)."""
    if isinstance(representation, InternalCoordinates):
        _fit_internal(representation, positions)


def _fit_internal(representation: InternalCoordinates, positions: torch.Tensor) -> None:
    """The dihedral cuts, then the mean and std of the mapped values, then the Gaussianization."""
    q, _ = representation.zmatrix.to_internal(positions.to(torch.float64))
    is_dihedral = representation.kinds == DIHEDRAL
    counts = torch.stack([torch.histc(column, CUT_BINS, -math.pi, math.pi) for column in q[..., is_dihedral].T])
    # Smooth over neighbouring bins (circularly) so that one empty bin in a busy region does not win.
    smoothed = counts + counts.roll(1, dims=1) + counts.roll(-1, dims=1)
    centres = -math.pi + (torch.arange(CUT_BINS, dtype=torch.float64) + 0.5) * (2 * math.pi / CUT_BINS)
    cut = torch.zeros(representation.feature_shape, dtype=torch.float64)
    cut[is_dihedral] = centres[smoothed.argmin(dim=1)]
    representation.cut.copy_(cut)
    t, _ = representation.to_unbounded(q)
    representation.loc.copy_(t.mean(dim=0))
    representation.scale.copy_(t.std(dim=0).clamp_min(1e-6))
    if representation.gaussianize is not None:
        representation.gaussianize.fit((t - representation.loc) / representation.scale)


def training_features(representation: Representation, positions: torch.Tensor) -> torch.Tensor:
    """Features of training frames ``[T, N, 3]`` (nm), before any per-step augmentation."""
    if isinstance(representation, CartesianCoordinates):
        return symmetry.remove_com(positions) / representation.std
    return representation.forward(positions.to(torch.float64))[0]


def augment_features(representation: Representation, h: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One training step's view of features ``h``: randomly rotated with CoM noise for Cartesian ones."""
    if isinstance(representation, CartesianCoordinates):
        return symmetry.augment(h, generator)
    return h
