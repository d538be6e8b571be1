"""The interface every energy backend implements."""

from __future__ import annotations

import abc

import torch


class UnsupportedForceError(ValueError):
    """The System holds a force (or a force setting) a backend does not implement."""


class EnergyBackend(abc.ABC):
    """Energies and forces of one ``openmm.System`` for a batch of configurations.

    Units are OpenMM's: positions in nm, energies in kJ/mol, forces in kJ/mol/nm.
    Results come back on the device and in the dtype of the input.

    The public methods check the positions once for every backend, then call the hooks
    :meth:`_energy_and_forces` (every backend) and :meth:`_energy` (backends that can skip
    the forces).
    """

    #: Short name shown to users ("torch", "openmm-Reference", ...).
    name: str = "backend"
    #: Atoms of the System; positions must be ``[B, n_atoms, 3]``.
    n_atoms: int

    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(energy [B], forces [B, N, 3])`` for positions ``x [B, N, 3]`` in nm."""
        self._check(x)
        return self._energy_and_forces(x)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Return energies ``[B]`` in kJ/mol for positions ``x [B, N, 3]`` in nm."""
        self._check(x)
        return self._energy(x)

    @abc.abstractmethod
    def _energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`energy_and_forces` of positions already checked."""

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`energy` of positions already checked."""
        return self._energy_and_forces(x)[0]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape [batch, {self.n_atoms}, 3] in nm; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"positions must be a floating-point tensor, got {x.dtype}")
