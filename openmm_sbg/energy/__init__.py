"""Batched force-field energies and forces.

A backend maps positions ``x`` (torch ``[B, N, 3]``, nm) to energies (kJ/mol, ``[B]``)
and forces (kJ/mol/nm, ``[B, N, 3]``) in OpenMM's own units; :class:`~openmm_sbg.target.BoltzmannTarget`
divides by kT. Every backend reproduces OpenMM's numbers for the System it was built from.

- :class:`TorchForceField`: the System's force field compiled to batched torch code (any
  device and dtype, autograd); used whenever it supports every force. Its parts: the
  per-term kernels (:mod:`.terms`), the System-to-terms translation (:mod:`.system_terms`,
  with the CustomGBForce recogniser in :mod:`.custom_gb`) and the backend (:mod:`.torch_forcefield`).
- :class:`OpenMMBackend`: one OpenMM Context, looping over the batch (any System, any platform).
- :class:`ProcessPoolBackend`: OpenMM Contexts in worker processes, splitting the batch (CPU).
"""

from openmm_sbg.energy.base import EnergyBackend, UnsupportedForceError
from openmm_sbg.energy.openmm_backend import OpenMMBackend
from openmm_sbg.energy.process_pool import ProcessPoolBackend
from openmm_sbg.energy.torch_forcefield import TorchForceField

__all__ = [
    "EnergyBackend",
    "OpenMMBackend",
    "ProcessPoolBackend",
    "TorchForceField",
    "UnsupportedForceError",
]
