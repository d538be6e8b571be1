"""Toy molecules with known answers: carbon chains with stiff harmonic bonds and angles."""

import openmm
from openmm import app

BOND_NM, BOND_K = 0.15, 200_000.0  # kJ/mol/nm^2
ANGLE_RAD, ANGLE_K = 1.9, 300.0  # kJ/mol/rad^2


def carbon_chain(n_atoms: int, name: str):
    """Topology and System of ``n_atoms`` carbons in a chain with harmonic bonds and angles only."""
    topology = app.Topology()
    residue = topology.addResidue(name, topology.addChain())
    atoms = [topology.addAtom(f"C{i}", app.element.carbon, residue) for i in range(n_atoms)]
    system = openmm.System()
    bonds, angles = openmm.HarmonicBondForce(), openmm.HarmonicAngleForce()
    for i in range(n_atoms):
        system.addParticle(12.0)
    for i in range(n_atoms - 1):
        topology.addBond(atoms[i], atoms[i + 1])
        bonds.addBond(i, i + 1, BOND_NM, BOND_K)
    for i in range(n_atoms - 2):
        angles.addAngle(i, i + 1, i + 2, ANGLE_RAD, ANGLE_K)
    system.addForce(bonds)
    system.addForce(angles)
    return topology, system


def save_perturbed(flow, scale: float, folder) -> str:
    """Add ``scale``-sized noise to every weight of ``flow`` (non-identity blocks) and save it in ``folder``."""
    import torch

    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    path = folder / "flow.pt"
    flow.save(path)
    return str(path)
