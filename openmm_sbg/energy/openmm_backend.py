"""Energies from OpenMM itself: one Context, one configuration per call.

This is how the paper's public code evaluates the force field. It supports every System
OpenMM does, on every platform, and is the reference the batched backends are tested against.
"""

from __future__ import annotations

import numpy as np
import openmm
import torch
from openmm import unit

from openmm_sbg.energy.base import EnergyBackend

_KJ_PER_MOL = unit.kilojoule_per_mole
_KJ_PER_MOL_NM = unit.kilojoule_per_mole / unit.nanometer


def platform_by_name(name: str | None) -> openmm.Platform | None:
    """The OpenMM platform called ``name`` (``None`` stays ``None``: OpenMM picks the fastest)."""
    if name is None:
        return None
    try:
        return openmm.Platform.getPlatformByName(name)
    except Exception as err:  # OpenMMException has no stable subclass to catch
        available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise ValueError(f"OpenMM platform {name!r} is not available here; choose one of {available}") from err


def make_context(
    system: openmm.System, platform: str | None = None, properties: dict[str, str] | None = None
) -> openmm.Context:
    """A Context for energy evaluation only (the integrator never steps).

    ``platform`` is an OpenMM platform name; ``None`` lets OpenMM pick the fastest one,
    as ``openmm.Context`` does. ``properties`` are platform properties, e.g. ``{"Threads": "1"}``.
    """
    integrator = openmm.VerletIntegrator(1.0 * unit.femtosecond)
    plat = platform_by_name(platform)
    if plat is None:
        return openmm.Context(system, integrator)
    return openmm.Context(system, integrator, plat, properties or {})


class OpenMMBackend(EnergyBackend):
    """Evaluate a System with one OpenMM Context, looping over the batch in Python.

    Parameters
    ----------
    system
        The System to evaluate (not modified).
    platform
        OpenMM platform name (``"Reference"``, ``"CPU"``, ``"CUDA"``, ``"OpenCL"``) or ``None``
        for OpenMM's default choice.
    groups
        Optional set of force groups to evaluate, as in ``Context.getState(groups=...)``.
    properties
        Optional platform properties, e.g. ``{"Threads": "1"}`` for the CPU platform.
    """

    def __init__(
        self,
        system: openmm.System,
        platform: str | None = None,
        groups: set[int] | None = None,
        properties: dict[str, str] | None = None,
    ):
        self.context = make_context(system, platform, properties)
        self.platform = self.context.getPlatform().getName()
        self.name = f"openmm-{self.platform}"
        self._groups = -1 if groups is None else sum(1 << g for g in groups)
        self.n_atoms = system.getNumParticles()

    def evaluate_numpy(self, xs: np.ndarray, forces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies ``[B]`` (kJ/mol) and, if ``forces``, forces ``[B, N, 3]`` for float64 positions in nm."""
        energies = np.empty(xs.shape[0])
        force_out = np.empty_like(xs) if forces else None
        for i, xi in enumerate(xs):
            self.context.setPositions(xi)
            state = self.context.getState(energy=True, forces=forces, groups=self._groups)
            energies[i] = state.getPotentialEnergy().value_in_unit(_KJ_PER_MOL)
            if forces:
                force_out[i] = state.getForces(asNumpy=True).value_in_unit(_KJ_PER_MOL_NM)
        return energies, force_out

    def _evaluate(self, x: torch.Tensor, forces: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        energies, force_out = self.evaluate_numpy(x.detach().to("cpu", torch.float64).numpy(), forces)
        energy_t = torch.from_numpy(energies).to(device=x.device, dtype=x.dtype)
        force_t = None if force_out is None else torch.from_numpy(force_out).to(device=x.device, dtype=x.dtype)
        return energy_t, force_t

    def _energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._evaluate(x, forces=True)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, forces=False)[0]
