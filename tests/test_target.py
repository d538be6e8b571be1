"""BoltzmannTarget: energies equal OpenMM's, and bad input gets an error that names the fix."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_sbg import BoltzmannTarget, systems
from openmm_sbg.target import NonFiniteEnergyError


def openmm_reference(system, x_nm):
    """Energies (kJ/mol) and forces (kJ/mol/nm) from a fresh Reference-platform Context."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for xi in x_nm:
        context.setPositions(xi)
        state = context.getState(energy=True, forces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


@pytest.mark.parametrize("name", ["ad2", "ad2-vacuum", "al3"])
def test_energies_equal_openmm_for_perturbed_configurations(get_target, name):
    target = get_target(name)
    rng = np.random.default_rng(0)
    x = target.positions[None] + rng.normal(scale=0.02, size=(5, target.n_atoms, 3))
    energy_kT, forces_kT = target.energy_and_forces(torch.from_numpy(x))
    ref_energy, ref_forces = openmm_reference(target.system, x)
    np.testing.assert_allclose(energy_kT.numpy() * target.kT_kj_per_mol, ref_energy, rtol=1e-6, atol=1e-6)
    scale = np.abs(ref_forces).max()
    np.testing.assert_allclose(forces_kT.numpy() * target.kT_kj_per_mol, ref_forces, atol=1e-5 * scale)
    np.testing.assert_allclose(target.energy(torch.from_numpy(x)).numpy(), energy_kT.numpy(), rtol=1e-10)


def test_kT_and_units(ad2):
    assert ad2.kT_kj_per_mol == pytest.approx(0.0083144626 * 300, rel=1e-6)
    with pytest.warns(DeprecationWarning, match="kT_kj_per_mol"):
        assert ad2.kT == ad2.kT_kj_per_mol  # the old name, which read like an energy in kT
    assert ad2.temperature == 300 * unit.kelvin
    assert ad2.n_atoms == 22 and ad2.masses.shape == (22,)
    quantity = (ad2.positions * 10) * unit.angstrom
    np.testing.assert_allclose(ad2.energy(quantity).numpy(), ad2.energy(ad2.positions).numpy(), rtol=1e-10)


def test_cm_motion_remover_is_dropped():
    pdb = app.PDBFile(systems.structure_path("ad2"))
    system = app.ForceField("amber99sbildn.xml").createSystem(pdb.topology, constraints=None, removeCMMotion=True)
    target = BoltzmannTarget(system, pdb.topology, 300 * unit.kelvin)
    assert not any(isinstance(f, openmm.CMMotionRemover) for f in target.system.getForces())
    assert any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()), "the user's System is not modified"


def _vacuum_system(**kwargs):
    pdb = app.PDBFile(systems.structure_path("ad2"))
    return app.ForceField("amber99sbildn.xml").createSystem(pdb.topology, **kwargs), pdb


def test_constrained_system_is_refused_with_the_fix():
    system, pdb = _vacuum_system(constraints=app.HBonds)
    with pytest.raises(ValueError, match="constraints=None"):
        BoltzmannTarget(system, pdb.topology, 300)


def test_periodic_system_is_refused_with_the_fix():
    system, pdb = _vacuum_system(constraints=None)
    force = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    system.setDefaultPeriodicBoxVectors(*(np.eye(3) * 3.0))
    with pytest.raises(ValueError, match="NoCutoff"):
        BoltzmannTarget(system, pdb.topology, 300)


def test_virtual_sites_are_refused():
    system, pdb = _vacuum_system(constraints=None)
    system.setVirtualSite(0, openmm.TwoParticleAverageSite(1, 2, 0.5, 0.5))
    with pytest.raises(ValueError, match="virtual site"):
        BoltzmannTarget(system, pdb.topology, 300)


def test_mismatched_topology_is_refused():
    system, _ = _vacuum_system(constraints=None)
    other = app.PDBFile(systems.structure_path("al3"))
    with pytest.raises(ValueError, match="same PDB"):
        BoltzmannTarget(system, other.topology, 300)


def test_wrong_temperature_units(ad2):
    system, pdb = _vacuum_system(constraints=None)
    with pytest.raises(ValueError, match="kelvin"):
        BoltzmannTarget(system, pdb.topology, 300 * unit.nanometer)
    with pytest.raises(ValueError, match="positive"):
        BoltzmannTarget(system, pdb.topology, -5)


def test_positions_of_wrong_shape_or_units(ad2):
    with pytest.raises(ValueError, match=r"\[batch, 22, 3\]"):
        ad2.energy(torch.zeros(4, 21, 3))
    with pytest.raises(ValueError, match="must be a length"):
        ad2.energy(ad2.positions * unit.kelvin)
    with pytest.raises(ValueError, match="Angstrom"):
        ad2.energy(ad2.positions * 10)


def test_nonfinite_energies_raise_unless_allowed(ad2):
    x = np.repeat(ad2.positions[None], 2, axis=0)
    x[1, 1] = np.nan
    with pytest.raises(NonFiniteEnergyError, match=r"first indices \[1\]"):
        ad2.energy(x)
    energy = ad2.energy(x, allow_nonfinite=True)
    assert np.isfinite(energy[0].item()) and not np.isfinite(energy[1].item())


def test_dtype_and_single_configuration(ad2):
    energy32 = ad2.energy(torch.as_tensor(ad2.positions, dtype=torch.float32))
    assert energy32.dtype == torch.float32 and energy32.shape == (1,)
