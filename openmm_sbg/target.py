"""BoltzmannTarget: an OpenMM System at a temperature, with energies in units of kT."""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import openmm
import torch
from openmm import app, unit

from openmm_sbg.energy.base import EnergyBackend


class NonFiniteEnergyError(FloatingPointError):
    """The force field returned NaN or infinite energies."""


def _is_quantity(value) -> bool:
    return isinstance(value, unit.Quantity)


def as_temperature(temperature) -> unit.Quantity:
    """Accept ``300*unit.kelvin`` (or a bare number, read as kelvin, as OpenMM does)."""
    if _is_quantity(temperature):
        if not temperature.unit.is_compatible(unit.kelvin):
            raise ValueError(f"temperature has units of {temperature.unit}; pass e.g. 300*unit.kelvin")
        temperature = temperature.value_in_unit(unit.kelvin)
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number of kelvin, got {temperature}")
    return temperature * unit.kelvin


def as_positions_nm(x, n_atoms: int) -> torch.Tensor:
    """Convert positions to a torch tensor ``[B, N, 3]`` in nm, checking shape and units.

    Accepts a torch tensor or numpy array in nm, an ``openmm.unit`` Quantity in any length
    unit, or a single configuration ``[N, 3]`` (returned as a batch of one).
    """
    if _is_quantity(x):
        if not x.unit.is_compatible(unit.nanometer):
            raise ValueError(f"positions have units of {x.unit}; they must be a length (e.g. unit.nanometer)")
        x = np.asarray(x.value_in_unit(unit.nanometer), dtype=np.float64)
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[1:] != (n_atoms, 3):
        raise ValueError(
            f"positions must have shape [batch, {n_atoms}, 3] (or [{n_atoms}, 3]) in nm; got {tuple(x.shape)}"
        )
    return x


class BoltzmannTarget:
    """The Boltzmann distribution exp(-U(x)/kT) of an unconstrained, non-periodic System.

    Parameters
    ----------
    system
        An ``openmm.System`` without constraints, virtual sites or periodic boundaries
        (vacuum or implicit solvent). It is copied; a ``CMMotionRemover`` is dropped because
        it is an integrator aid, not part of the energy.
    topology
        The matching ``openmm.app.Topology``.
    temperature
        ``openmm.unit`` temperature (a bare number is read as kelvin).
    positions
        Optional starting structure (Quantity, or array in nm) of shape [N, 3].
    name
        Optional identifier (built-in systems use their name, e.g. ``"ad2"``).
    backend
        ``"auto"`` (default: the batched torch force field if it supports every force, else
        OpenMM with a notice), ``"torch"``, ``"torch-compiled"`` (``torch.compile``: slow first
        call, fastest afterwards), ``"openmm"``,
        or an :class:`~openmm_sbg.energy.EnergyBackend` instance.
    platform
        OpenMM platform for the OpenMM backend (``None``: OpenMM's choice).

    Attributes
    ----------
    kT_kj_per_mol
        ``R T`` in kJ/mol: the energy unit of :meth:`energy` expressed in OpenMM's units.
    """

    def __init__(
        self,
        system: openmm.System,
        topology: app.Topology,
        temperature,
        positions=None,
        name: str | None = None,
        backend: str | EnergyBackend = "auto",
        platform: str | None = None,
    ):
        self.system = _validated_copy(system)
        if topology.getNumAtoms() != self.system.getNumParticles():
            raise ValueError(
                f"topology has {topology.getNumAtoms()} atoms but the System has "
                f"{self.system.getNumParticles()} particles; build both from the same PDB"
            )
        self.topology = topology
        self.temperature = as_temperature(temperature)
        self.kT_kj_per_mol = (unit.MOLAR_GAS_CONSTANT_R * self.temperature).value_in_unit(unit.kilojoule_per_mole)
        self.name = name
        self.platform = platform
        self.n_atoms = self.system.getNumParticles()
        self.masses = np.array(
            [self.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(self.n_atoms)]
        )
        self.positions = None if positions is None else as_positions_nm(positions, self.n_atoms)[0].numpy()
        self._bonds = torch.tensor([[a.index, b.index] for a, b in topology.bonds()], dtype=torch.long).reshape(-1, 2)
        self.backend = self._make_backend(backend, platform)

    def _make_backend(self, backend, platform) -> EnergyBackend:
        if isinstance(backend, EnergyBackend):
            return backend
        from openmm_sbg.energy import OpenMMBackend, TorchForceField, UnsupportedForceError

        if backend in ("torch", "torch-compiled"):
            return TorchForceField(self.system, compile=backend == "torch-compiled")
        if backend == "auto":
            try:
                return TorchForceField(self.system)
            except UnsupportedForceError as err:
                fallback = OpenMMBackend(self.system, platform)
                notice(f"{err}; using {fallback.name} (one configuration at a time, slower)")
                return fallback
        if backend == "openmm":
            return OpenMMBackend(self.system, platform)
        raise ValueError(
            f"backend must be 'auto', 'torch', 'torch-compiled', 'openmm' or an EnergyBackend instance, got {backend!r}"
        )

    @property
    def kT(self) -> float:
        """Deprecated name of :attr:`kT_kj_per_mol` (it holds kJ/mol, not an energy in kT)."""
        warnings.warn("BoltzmannTarget.kT is deprecated; use kT_kj_per_mol", DeprecationWarning, stacklevel=2)
        return self.kT_kj_per_mol

    # ------------------------------------------------------------------ energies
    def energy_and_forces(self, x, allow_nonfinite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies U/kT ``[B]`` and forces -grad(U/kT) ``[B, N, 3]`` in 1/nm.

        ``x`` is ``[B, N, 3]`` in nm (torch, numpy or a length Quantity). Non-finite energies
        raise :class:`NonFiniteEnergyError` unless ``allow_nonfinite`` (samplers set it and
        give such configurations zero weight).
        """
        x = as_positions_nm(x, self.n_atoms)
        if not allow_nonfinite:
            self._check_units(x)
        energy, forces = self.backend.energy_and_forces(x)
        energy = energy / self.kT_kj_per_mol
        self._check_finite(energy, allow_nonfinite)
        return energy, forces / self.kT_kj_per_mol

    def energy(self, x, allow_nonfinite: bool = False) -> torch.Tensor:
        """Reduced energies U/kT ``[B]`` for positions ``[B, N, 3]`` in nm."""
        x = as_positions_nm(x, self.n_atoms)
        if not allow_nonfinite:
            self._check_units(x)
        energy = self.backend.energy(x) / self.kT_kj_per_mol
        self._check_finite(energy, allow_nonfinite)
        return energy

    def _check_units(self, x: torch.Tensor) -> None:
        """Catch positions in Angstrom: bonded atoms sit 0.1-0.2 nm apart, never 1-2."""
        if len(self._bonds) == 0:
            return
        first = x[0].detach()
        lengths = (first[self._bonds[:, 0]] - first[self._bonds[:, 1]]).norm(dim=-1)
        median = float(lengths.median())
        if median > 0.5:
            raise ValueError(
                f"the median bond length is {median:.2f}, far above 0.1-0.2 nm: positions look like Angstrom. "
                "Pass positions in nm (divide by 10) or as an openmm.unit Quantity."
            )

    @staticmethod
    def _check_finite(energy: torch.Tensor, allow_nonfinite: bool) -> None:
        if allow_nonfinite:
            return
        bad = ~torch.isfinite(energy)
        if bad.any():
            idx = torch.nonzero(bad).flatten()[:10].tolist()
            raise NonFiniteEnergyError(
                f"{int(bad.sum())} configuration(s) have NaN or infinite energy (first indices {idx}); "
                "atoms overlap or positions are not in nm. Minimise the structure, check units, or pass "
                "allow_nonfinite=True to receive them as inf/nan."
            )

    def __repr__(self) -> str:
        return (
            f"BoltzmannTarget(name={self.name!r}, n_atoms={self.n_atoms}, "
            f"temperature={self.temperature}, backend={self.backend.name!r})"
        )

    def __getstate__(self):
        # The backend holds an OpenMM Context, which cannot be pickled; rebuild it on load.
        state = self.__dict__.copy()
        state["system"] = openmm.XmlSerializer.serialize(self.system)
        state["backend"] = None
        return state

    def __setstate__(self, state):
        state["system"] = openmm.XmlSerializer.deserialize(state["system"])
        self.__dict__.update(state)
        self.backend = self._make_backend("auto", self.platform)


def _validated_copy(system: openmm.System) -> openmm.System:
    """Copy ``system``, drop CMMotionRemover, and reject what a Cartesian flow cannot sample."""
    if not isinstance(system, openmm.System):
        raise TypeError(f"expected an openmm.System, got {type(system).__name__}")
    if system.getNumConstraints() > 0:
        raise ValueError(
            f"the System has {system.getNumConstraints()} constraints; a Cartesian flow cannot sample "
            "constrained coordinates. Rebuild it with forcefield.createSystem(..., constraints=None, rigidWater=False)."
        )
    vsites = [i for i in range(system.getNumParticles()) if system.isVirtualSite(i)]
    if vsites:
        raise ValueError(
            f"the System has {len(vsites)} virtual sites (e.g. particle {vsites[0]}); use a force field "
            "without virtual sites (no TIP4P/TIP5P water, no lone pairs)."
        )
    if system.usesPeriodicBoundaryConditions():
        raise ValueError(
            "the System uses periodic boundary conditions; SBG samples vacuum or implicit-solvent systems. "
            "Rebuild it with nonbondedMethod=app.NoCutoff or app.CutoffNonPeriodic and an implicit-solvent "
            "force field (e.g. 'implicit/obc1.xml')."
        )
    system = copy.deepcopy(system)
    for i in reversed(range(system.getNumForces())):
        if isinstance(system.getForce(i), openmm.CMMotionRemover):
            system.removeForce(i)
    return system


def notice(message: str) -> None:
    """One-line notice to the user (stderr), e.g. which backend a target uses."""
    print(f"openmm-sbg: {message}", file=sys.stderr)
