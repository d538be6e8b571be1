"""Backbone states of every residue: a weighted toy whose per-residue populations are known exactly."""

import mdtraj
import numpy as np
import pytest

from openmm_sbg import populations, systems
from openmm_sbg.evaluation import state_summary


@pytest.fixture(scope="module")
def al4():
    return systems.get("al4")


def test_every_residue_gets_its_own_phi_and_psi(al4):
    names, labeller = populations.residue_state_labeller(al4.topology)
    assert names == ["ALA2", "ALA3", "ALA4"]
    traj = mdtraj.Trajectory(np.asarray(al4.positions, dtype=np.float32)[None], mdtraj.Topology.from_openmm(al4.topology))
    (phi_atoms, phi), (psi_atoms, psi) = mdtraj.compute_phi(traj), mdtraj.compute_psi(traj)
    # mdtraj lists phi from the second residue and psi from the first with a psi: pair them by residue.
    by_residue = {traj.topology.atom(int(q[2])).residue.index: angle for q, angle in zip(phi_atoms, phi[0])}
    expected = [populations.backbone_states(np.array([[by_residue[traj.topology.atom(int(q[1])).residue.index], angle]]))[0]
                for q, angle in zip(psi_atoms, psi[0]) if traj.topology.atom(int(q[1])).residue.index in by_residue]
    assert labeller(traj.xyz).tolist() == [expected]


def set_dihedral(xyz: np.ndarray, top: mdtraj.Topology, quartet, degrees: float) -> np.ndarray:
    """``xyz`` with the dihedral ``quartet`` set to ``degrees``: the atoms on the far side of its central bond turn."""
    b, c = int(quartet[1]), int(quartet[2])
    neighbours = {atom.index: set() for atom in top.atoms}
    for one, two in top.bonds:
        if {one.index, two.index} != {b, c}:
            neighbours[one.index].add(two.index)
            neighbours[two.index].add(one.index)
    moving, frontier = {c}, [c]
    while frontier:
        for atom in neighbours[frontier.pop()] - moving:
            moving.add(atom)
            frontier.append(atom)
    assert b not in moving  # a chain: the bond splits the molecule
    current = mdtraj.compute_dihedrals(mdtraj.Trajectory(xyz[None], top), [quartet])[0, 0]
    axis = (xyz[c] - xyz[b]) / np.linalg.norm(xyz[c] - xyz[b])
    angle = np.radians(degrees) - current
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    out = xyz.copy()
    index = sorted(moving)
    out[index] = (xyz[index] - xyz[c]) @ rotation.T + xyz[c]
    return out


def test_per_residue_populations_of_a_weighted_pair(al4):
    """The built (extended) structure, weight 0.7, and a copy with ALA2 in alphaL and ALA3 in alphaR, weight 0.3."""
    top = mdtraj.Topology.from_openmm(al4.topology)
    x = np.asarray(al4.positions, dtype=np.float64)
    probe = mdtraj.Trajectory(x[None].astype(np.float32), top)
    phi, psi = mdtraj.compute_phi(probe)[0], mdtraj.compute_psi(probe)[0]
    turned = x
    for quartet, degrees in ((phi[0], 60.0), (psi[0], 30.0), (phi[1], -60.0), (psi[1], -45.0)):
        turned = set_dihedral(turned, top, quartet, degrees)
    frames = mdtraj.Trajectory(np.stack([x, turned]).astype(np.float32), top)
    names, labeller = populations.residue_state_labeller(top)
    assert labeller(frames.xyz).tolist() == [[0, 0, 0], [2, 1, 0]]
    summary = state_summary(frames, frames[:1], np.log([0.7, 0.3]), independent=False)
    assert [r["residue"] for r in summary["residues"]] == names
    expected = [[0.7, 0.0, 0.3], [0.7, 0.3, 0.0], [1.0, 0.0, 0.0]]
    for residue, populations_of_residue in zip(summary["residues"], expected):
        np.testing.assert_allclose(residue["samples"], populations_of_residue, atol=1e-12)
        assert residue["reference"] == [1.0, 0.0, 0.0]
    assert summary["samples"] == summary["residues"][0]["samples"]


def test_independent_samples_get_per_residue_error_bars(al4):
    top = mdtraj.Topology.from_openmm(al4.topology)
    x = np.asarray(al4.positions, dtype=np.float64)
    turned = set_dihedral(x, top, mdtraj.compute_phi(mdtraj.Trajectory(x[None].astype(np.float32), top))[0][2], 60.0)
    frames = mdtraj.Trajectory(np.stack([x] * 10 + [turned] * 10).astype(np.float32), top)
    summary = state_summary(frames, None, np.zeros(20), independent=True)
    assert [r["samples"][2] for r in summary["residues"]] == pytest.approx([0.0, 0.0, 0.5])
    error = summary["residues"][2]["samples_bootstrap_error"][2]
    assert 0.07 < error < 0.15  # sqrt(0.25 / 20) = 0.11
