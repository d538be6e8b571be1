"""Soft SE(3) equivariance: centring, scaling, random rotations and centre-of-mass noise.

The flow is an ordinary (non-equivariant) transformer; it learns rotation invariance from
data rotated uniformly at random, and it models the centre of mass (CoM) as Gaussian noise
so that its prior can be a plain N(0, I) over all 3N coordinates.
"""

from __future__ import annotations

import numpy as np
import torch


def remove_com(x: torch.Tensor) -> torch.Tensor:
    """Subtract each configuration's unweighted mean atom position. ``x``: ``[B, N, 3]``."""
    return x - x.mean(dim=-2, keepdim=True)


def centred_std(positions) -> float:
    """One scalar std of all coordinates of the centred configurations ``[T, N, 3]`` (nm)."""
    x = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    if x.ndim != 3 or x.shape[-1] != 3 or x.shape[0] < 1:
        raise ValueError(f"positions must have shape [frames, atoms, 3], got {tuple(x.shape)}")
    std = float(remove_com(x).std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the centred positions have std {std}; the data must contain distinct atom positions")
    return std


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` rotation matrices ``[n, 3, 3]`` drawn uniformly (Haar measure) from SO(3).

    A normalised 4-D Gaussian is a uniform unit quaternion, and unit quaternions cover SO(3)
    twice with equal weight, so the rotations they give are uniform.
    """
    return random_rotations_from_normal(torch.randn(n, 4, generator=generator, dtype=dtype, device=device))


def random_rotations_from_normal(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[n, 3, 3]`` from standard normal 4-vectors ``[n, 4]`` (see :func:`random_rotations`)."""
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)


def augment(y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate centred, normalised configurations ``[B, N, 3]`` at random and add CoM noise.

    Each configuration gets its own uniform rotation and one 3-vector ~ N(0, I/N) added to
    every atom, so the CoM of the result is N(0, I/N): the 3 CoM degrees of freedom then
    have the same scale as the others and the flow's N(0, I) prior fits them.
    """
    batch, n_atoms, _ = y.shape
    rotations = random_rotations(batch, generator, y.dtype, y.device)
    noise = torch.randn(batch, 1, 3, generator=generator, dtype=y.dtype, device=y.device) / n_atoms**0.5
    return y @ rotations.transpose(-1, -2) + noise
