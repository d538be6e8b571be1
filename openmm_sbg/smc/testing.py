"""Analytic targets with known normalisers, for testing samplers end to end.

They implement the target interface :class:`~openmm_sbg.smc.SMCSampler` uses
(``energy``, ``energy_and_forces``, ``n_atoms``) on positions ``[B, N, 3]``, and expose the
exact ``log_z = log integral exp(-E(x)) dx`` and coordinate moments, so a sampler's
estimates can be checked against the truth.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class _AnalyticTarget:
    """Energies from a differentiable torch function ``_energy(x) -> [B]`` (kT)."""

    n_atoms: int
    name = "analytic"
    topology = None
    kT_kj_per_mol = 1.0

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def energy(self, x, allow_nonfinite: bool = True) -> torch.Tensor:
        return self._energy(torch.as_tensor(x, dtype=torch.float64))

    def energy_and_forces(self, x, allow_nonfinite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = torch.as_tensor(x, dtype=torch.float64).detach().requires_grad_(True)
            energy = self._energy(x)
            (grad,) = torch.autograd.grad(energy.sum(), x)
        return energy.detach(), -grad


class GaussianTarget(_AnalyticTarget):
    """``E(x) = sum ((x - mean) / std)^2 / 2`` over ``[N, 3]`` coordinates (unnormalised).

    ``log_z = sum log(std) + (3N / 2) log(2 pi)``; mean ``mean``, variance ``std^2``.
    """

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64).expand_as(self.mean).clone()
        self.n_atoms = self.mean.shape[0]
        self.log_z = float(self.std.log().sum()) + 0.5 * self.mean.numel() * math.log(2 * math.pi)
        self.coordinate_mean = self.mean.numpy()
        self.coordinate_var = self.std.square().numpy()

    def _energy(self, x):
        return (0.5 * ((x - self.mean) / self.std).square()).flatten(1).sum(1)


class DoubleWellTarget(_AnalyticTarget):
    """One particle in a double well: ``x`` (1-D) or ``(x, y)`` (2-D, coupled) wells, the rest harmonic.

    1-D: ``E = barrier (x^2 - 1)^2 + tilt x + (y^2 + z^2) / 2``.
    2-D: ``E = barrier ((x^2 - 1)^2 + (y^2 - 1)^2) + tilt x + coupling x y + z^2 / 2``,
    four wells of unequal depth. ``log_z`` and the moments come from quadrature on a fine
    grid (error far below any Monte Carlo error).
    """

    n_atoms = 1

    def __init__(self, dims: int = 1, barrier: float = 2.0, tilt: float = 0.5, coupling: float = 0.3):
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        self.dims, self.barrier, self.tilt, self.coupling = dims, barrier, tilt, coupling
        self._quadrature()

    def _wells(self, x, y):
        energy = self.barrier * (x**2 - 1) ** 2 + self.tilt * x
        if self.dims == 2:
            energy = energy + self.barrier * (y**2 - 1) ** 2 + self.coupling * x * y
        else:
            energy = energy + 0.5 * y**2
        return energy

    def _energy(self, x):
        x = x[:, 0]
        return self._wells(x[:, 0], x[:, 1]) + 0.5 * x[:, 2] ** 2

    def _quadrature(self) -> None:
        grid = np.linspace(-5.0, 5.0, 2001)
        dx = grid[1] - grid[0]
        xx, yy = np.meshgrid(grid, grid, indexing="ij")
        energy = self._wells(xx, yy)
        density = np.exp(-(energy - energy.min()))
        mass = density.sum() * dx * dx
        # z is a standard Gaussian: its factor sqrt(2 pi), its mean 0 and variance 1.
        self.log_z = float(np.log(mass) - energy.min() + 0.5 * np.log(2 * np.pi))
        p = density / density.sum()
        mean = [float((p * xx).sum()), float((p * yy).sum()), 0.0]
        second = [float((p * xx**2).sum()), float((p * yy**2).sum()), 1.0]
        self.coordinate_mean = np.array([mean])
        self.coordinate_var = np.array([second]) - self.coordinate_mean**2
