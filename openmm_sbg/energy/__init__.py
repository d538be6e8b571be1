"""Batched force-field energies and forces.

A backend maps positions ``x`` (torch ``[B, N, 3]``, nm) to energies (kJ/mol, ``[B]``)
and forces (kJ/mol/nm, ``[B, N, 3]``) in OpenMM's own units; :class:`~openmm_sbg.target.BoltzmannTarget`
divides by kT. Every backend reproduces OpenMM's numbers for the System it was built from.
"""

from openmm_sbg.energy.base import EnergyBackend
from openmm_sbg.energy.openmm_backend import OpenMMBackend

__all__ = ["EnergyBackend", "OpenMMBackend"]
