"""Chignolin's folded structure and folded fraction: a weighted toy whose folded fraction is known exactly."""

import h5py
import mdtraj
import numpy as np
import pytest

from openmm_sbg import metrics, systems
from openmm_sbg.evaluation import evaluate, folded_summary
from openmm_sbg.smc import SMCResult


@pytest.fixture(scope="module")
def structures():
    return mdtraj.load(systems.structure_path("chignolin")), mdtraj.load(systems.folded_structure_path("chignolin"))


def test_the_folded_structure_is_chignolin_in_its_atom_order_at_a_finite_energy(structures):
    extended, folded = structures
    assert [(a.residue.name, a.name) for a in folded.topology.atoms] == [(a.residue.name, a.name) for a in extended.topology.atoms]
    energy = systems.get("chignolin").energy(folded.xyz.astype(np.float64)).numpy()
    assert np.isfinite(energy).all()
    assert metrics.folded_ca_rmsd(folded, folded)[0] == pytest.approx(0.0, abs=1e-3)  # mdtraj works in float32
    assert metrics.folded_ca_rmsd(extended, folded)[0] > 3 * metrics.FOLDED_CA_RMSD_NM


def test_systems_without_a_folded_state_have_no_folded_structure():
    assert systems.folded_structure_path("al4") is None
    with pytest.raises(KeyError, match="built-in systems"):
        systems.folded_structure_path("villin")


def test_a_structure_of_another_molecule_is_refused(structures):
    _, folded = structures
    al4 = mdtraj.load(systems.structure_path("al4"))
    with pytest.raises(ValueError, match="not a structure of this molecule"):
        metrics.folded_ca_rmsd(al4, folded)


def test_a_structure_with_its_atoms_in_another_order_is_refused(structures):
    """Two atoms of one residue listed the other way round: the residue names still match atom by atom, the
    atom names do not."""
    _, folded = structures
    table, bonds = folded.topology.to_dataframe()
    table.iloc[[0, 1]] = table.iloc[[1, 0]].to_numpy()
    reordered = mdtraj.Trajectory(folded.xyz[:, [1, 0, *range(2, folded.n_atoms)]],
                                  mdtraj.Topology.from_dataframe(table, bonds))
    with pytest.raises(ValueError, match="same atoms in the same order"):
        metrics.folded_ca_rmsd(reordered, folded)


def _toy(structures):
    """Three folded frames (the structure moved rigidly and jiggled by 0.005 nm) and two extended, and their weights."""
    extended, folded = structures
    rng = np.random.default_rng(0)
    turn = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    frames = [folded.xyz[0] @ turn.T + 1.0 + rng.normal(0, 0.005, folded.xyz[0].shape) for _ in range(3)]
    frames += [extended.xyz[0], extended.xyz[0] + rng.normal(0, 0.005, extended.xyz[0].shape)]
    traj = mdtraj.Trajectory(np.asarray(frames, dtype=np.float32), folded.topology)
    log_weights = np.log([0.1, 0.2, 0.1, 0.4, 0.2])  # folded weight 0.4
    return traj, log_weights


def test_the_folded_fraction_of_a_weighted_toy(structures):
    traj, log_weights = _toy(structures)
    rmsd = metrics.folded_ca_rmsd(traj, structures[1])
    assert (rmsd[:3] < 0.05).all() and (rmsd[3:] > 0.5).all()
    reference = traj[[0, 1, 3, 4]]  # half folded
    summary = folded_summary(traj, reference, log_weights, "chignolin", independent=True)
    assert summary["samples"] == pytest.approx(0.4)
    assert summary["reference"] == pytest.approx(0.5)
    assert 0 < summary["samples_bootstrap_error"] < 0.5
    correlated = folded_summary(traj, None, log_weights, "chignolin", independent=False)
    assert correlated["samples"] == pytest.approx(0.4) and correlated["samples_bootstrap_error"] is None
    assert "reference" not in correlated
    assert folded_summary(traj, reference, log_weights, "al4", independent=True) is None
    assert folded_summary(traj, reference, log_weights, None, independent=True) is None


def test_evaluate_reports_the_folded_fraction_of_chignolin_samples(structures, tmp_path):
    traj, log_weights = _toy(structures)
    path = tmp_path / "md.h5"
    traj[[0, 1, 3, 4]].save_hdf5(str(path))
    with h5py.File(path, "a") as handle:
        handle["energies_kT"] = np.zeros(4)
    samples = SMCResult(traj.xyz.astype(np.float64), log_weights, np.zeros(5), 0.0, 1.0,
                        topology=traj.topology.to_openmm(), info={"system": "chignolin", "n_steps": 0,
                                                                  "resample_at_end": False, "resample_threshold": 0})
    summary = evaluate(samples, str(path), all_frames=True)
    assert summary["folded"]["samples"] == pytest.approx(0.4)
    assert summary["folded"]["reference"] == pytest.approx(0.5)
    assert summary["folded"]["rule"] == f"C-alpha RMSD to chignolin-folded.pdb <= {metrics.FOLDED_CA_RMSD_NM} nm"
