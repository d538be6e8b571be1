"""Sample-quality metrics and plots: ESS, E-W2, T-W2, chirality, Ramachandran and energy plots.

The metrics of the SBG paper (Tan et al. 2025), computed against a reference (held-out MD):

- :func:`effective_sample_size`: normalised Kish ESS of importance weights;
- :func:`energy_w2`: E-W2, the 1-D Wasserstein-2 distance between energy distributions (kT);
- :func:`torus_w2`: T-W2, the Wasserstein-2 distance on the torus of all backbone phi/psi
  angles (exact optimal transport through POT);
- :func:`wrong_chirality_fraction`: the fraction of samples with a D residue (a Cartesian
  flow can produce mirror images, which have the same energy).

Every metric accepts per-sample weights, so weighted SMC/IS output needs no resampling.
"""

from __future__ import annotations

import os

import mdtraj
import numpy as np
import ot
import torch

from openmm_sbg.smc.weights import normalised_ess


def effective_sample_size(log_weights) -> float:
    """Normalised Kish ESS ``(sum w)^2 / (K sum w^2)`` of log-weights ``[K]``, in [0, 1]."""
    return normalised_ess(torch.as_tensor(np.asarray(log_weights, dtype=np.float64)))


def _normalised(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,) or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
    return weights / weights.sum()


def energy_w2(energies, reference, weights=None, reference_weights=None) -> float:
    """E-W2: Wasserstein-2 distance between two 1-D energy distributions, in the energies' units (kT).

    Non-finite energies are dropped (with their weights). Exact, through the sorted
    quantile functions (``ot.emd2_1d``).
    """
    values, w = _finite(energies, weights)
    ref_values, ref_w = _finite(reference, reference_weights)
    return float(np.sqrt(max(ot.emd2_1d(values, ref_values, w, ref_w, metric="sqeuclidean"), 0.0)))


def _finite(values, weights) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    weights = _normalised(weights, len(values))
    finite = np.isfinite(values) & (weights > 0)
    if not finite.any():
        raise ValueError("no finite energy with non-zero weight to compare")
    return values[finite], weights[finite] / weights[finite].sum()


def backbone_dihedrals(traj: mdtraj.Trajectory) -> np.ndarray:
    """All backbone phi then psi angles ``[n_frames, n_phi + n_psi]`` in radians (mdtraj)."""
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    if phi.shape[1] + psi.shape[1] == 0:
        raise ValueError("the topology has no backbone phi/psi dihedrals (is it a peptide with standard atom names?)")
    return np.concatenate([phi, psi], axis=1).astype(np.float64)


def torus_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared torus distances ``sum_i min(|d_i|, 2 pi - |d_i|)^2`` between rows of angles ``a`` and ``b``."""
    cost = np.zeros((len(a), len(b)))
    for i in range(a.shape[1]):  # one angle at a time keeps memory at one [n, m] matrix
        d = np.abs(a[:, None, i] - b[None, :, i]) % (2 * np.pi)
        cost += np.minimum(d, 2 * np.pi - d) ** 2
    return cost


def _subsample(angles: np.ndarray, weights, max_samples: int, rng: np.random.Generator):
    weights = _normalised(weights, len(angles))
    if len(angles) <= max_samples:
        return angles, weights
    # Draw by weight: an unbiased, equally weighted subsample of the weighted set.
    index = rng.choice(len(angles), size=max_samples, replace=True, p=weights)
    return angles[index], np.full(max_samples, 1.0 / max_samples)


def torus_w2(
    angles, reference, weights=None, reference_weights=None, max_samples: int = 5000, seed: int = 0, draws: int = 1
) -> float:
    """T-W2: Wasserstein-2 distance on the torus between two sets of dihedral angles (radians).

    Parameters
    ----------
    angles, reference
        ``[n, d]`` and ``[m, d]`` angles (e.g. :func:`backbone_dihedrals`).
    weights, reference_weights
        Optional non-negative weights (normalised here).
    max_samples
        Sets larger than this are subsampled (by weight) first: the exact EMD needs an
        ``n x m`` cost matrix (8 n m bytes; 200 MB at 5000 x 5000).
    seed
        Seed of the subsampling.
    draws
        Independent subsamples to average over when a set is subsampled. One draw of 2,000
        is noisy: two halves of ad2's 10 ns reference MD gave 0.11 to 0.20 over six draws.
    """
    angles, reference = np.atleast_2d(np.asarray(angles, float)), np.atleast_2d(np.asarray(reference, float))
    if angles.shape[1] != reference.shape[1]:
        raise ValueError(f"the two sets have {angles.shape[1]} and {reference.shape[1]} angles per sample")
    if draws < 1:
        raise ValueError(f"draws must be at least 1; got {draws}")
    if max(len(angles), len(reference)) <= max_samples:
        draws = 1  # nothing is subsampled: every draw would give the same exact value
    rng = np.random.default_rng(seed)
    distances = []
    for _ in range(draws):
        a, a_weights = _subsample(angles, weights, max_samples, rng)
        b, b_weights = _subsample(reference, reference_weights, max_samples, rng)
        cost = torus_distance_matrix(a, b)
        distances.append(np.sqrt(max(ot.emd2(a_weights, b_weights, cost, numItermax=10_000_000), 0.0)))
    return float(np.mean(distances))


#: Folded: C-alpha RMSD to the folded structure, after optimal superposition, at most this (nm); the
#: project's choice. Chignolin's shipped folded structure is 0.07 nm from PDB 1UAO's C-alphas (it was
#: minimised), its extended starting chain 0.86 nm.
FOLDED_CA_RMSD_NM = 0.2


def folded_ca_rmsd(traj: mdtraj.Trajectory, folded: mdtraj.Trajectory) -> np.ndarray:
    """C-alpha RMSD (nm) of every frame of ``traj`` to ``folded`` (a structure of the same molecule), after
    optimal superposition."""
    from openmm_sbg.flow.checkpoint import atom_identity  # the molecule's fingerprint, as checkpoints store it

    atoms = traj.topology.select("name CA")
    if len(atoms) < 3 or atom_identity(traj.topology.to_openmm()) != atom_identity(folded.topology.to_openmm()):
        raise ValueError(f"the folded structure ({folded.n_atoms} atoms) is not a structure of this molecule "
                         f"({traj.n_atoms} atoms, {len(atoms)} C-alpha); give one with the same atoms in the same order")
    return mdtraj.rmsd(traj, folded, atom_indices=atoms).astype(float)


def chirality_dihedrals(traj: mdtraj.Trajectory) -> np.ndarray:
    """Improper dihedrals N-CA-C-CB ``[n_frames, n_residues_with_CB]`` in radians.

    L residues have about -2.1 rad (-122 degrees), their mirror images +2.1 rad.
    """
    quads = []
    for residue in traj.topology.residues:
        names = {atom.name: atom.index for atom in residue.atoms}
        if all(name in names for name in ("N", "CA", "C", "CB")):
            quads.append([names["N"], names["CA"], names["C"], names["CB"]])
    if not quads:
        return np.zeros((traj.n_frames, 0))
    return mdtraj.compute_dihedrals(traj, np.array(quads))


def wrong_chirality_fraction(traj: mdtraj.Trajectory, weights=None) -> float:
    """Weighted fraction of frames in which any residue is D (positive N-CA-C-CB dihedral).

    Assumes L amino acids (every built-in system); glycine has no CB and is skipped.
    """
    wrong = (chirality_dihedrals(traj) > 0).any(axis=1)
    return float(np.sum(_normalised(weights, traj.n_frames) * wrong))


# ---------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _phi_psi_pairs(traj: mdtraj.Trajectory) -> np.ndarray:
    """``[n_frames * n_residues, 2]`` (phi, psi) of every residue that has both, in degrees."""
    phi_atoms, phi = mdtraj.compute_phi(traj)
    psi_atoms, psi = mdtraj.compute_psi(traj)
    # phi = C(i-1)-N-CA-C and psi = N-CA-C-N(i+1) share residue i's CA: pair them by it.
    psi_by_ca = {int(quad[1]): k for k, quad in enumerate(psi_atoms)}
    pairs = [(j, psi_by_ca[int(quad[2])]) for j, quad in enumerate(phi_atoms) if int(quad[2]) in psi_by_ca]
    if not pairs:
        raise ValueError("no residue has both phi and psi; a Ramachandran plot needs a peptide backbone")
    return np.degrees(np.stack([np.stack([phi[:, j], psi[:, k]], -1) for j, k in pairs], 1).reshape(-1, 2))


def ramachandran_plot(samples: mdtraj.Trajectory, reference: mdtraj.Trajectory, path, weights=None) -> str:
    """Side-by-side Ramachandran histograms (all residues pooled) of ``reference`` and ``samples``.

    ``weights`` are the samples' importance weights. Returns ``path``.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True, constrained_layout=True)
    n_residues = len(_phi_psi_pairs(samples[:1]))
    sample_weights = np.repeat(_normalised(weights, samples.n_frames), n_residues)
    for axis, traj, w, title in (
        (axes[0], reference, None, f"reference ({reference.n_frames} frames)"),
        (axes[1], samples, sample_weights, f"samples ({samples.n_frames})"),
    ):
        angles = _phi_psi_pairs(traj)
        axis.hist2d(angles[:, 0], angles[:, 1], bins=72, range=[[-180, 180], [-180, 180]], weights=w, cmin=1e-12, cmap="viridis", norm="log")
        axis.set(title=title, xlabel=r"$\phi$ (deg)", xlim=(-180, 180), ylim=(-180, 180), aspect="equal")
    axes[0].set_ylabel(r"$\psi$ (deg)")
    return _save(figure, path)


def energy_histogram_plot(energies, reference, path, weights=None, bins: int = 80) -> str:
    """Overlaid histograms of sample and reference energies (kT). Returns ``path``."""
    plt = _pyplot()
    values, w = _finite(energies, weights)
    ref_values, _ = _finite(reference, None)
    low, high = np.percentile(ref_values, [0.1, 99.9])
    span = high - low
    edges = np.linspace(low - 0.3 * span, high + 0.3 * span, bins + 1)
    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    axis.hist(ref_values, bins=edges, density=True, alpha=0.5, label="reference")
    axis.hist(values, bins=edges, weights=w, density=True, histtype="step", linewidth=2, label="samples")
    axis.set(xlabel="energy (kT)", ylabel="density")
    axis.legend()
    return _save(figure, path)


def _save(figure, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path
