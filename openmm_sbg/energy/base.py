"""The interface every energy backend implements."""

from __future__ import annotations

import abc

import torch


class EnergyBackend(abc.ABC):
    """Energies and forces of one ``openmm.System`` for a batch of configurations.

    Units are OpenMM's: positions in nm, energies in kJ/mol, forces in kJ/mol/nm.
    Results come back on the device and in the dtype of the input.
    """

    #: Short name shown to users ("torch", "openmm-Reference", ...).
    name: str = "backend"

    @abc.abstractmethod
    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(energy [B], forces [B, N, 3])`` for positions ``x [B, N, 3]`` in nm."""

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Return energies ``[B]`` in kJ/mol; backends that can skip forces override this."""
        return self.energy_and_forces(x)[0]
