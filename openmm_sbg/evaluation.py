"""Evaluation of weighted samples against reference MD: ESS, E-W2, T-W2, chirality, backbone states, folded fraction, plots.

The library side of ``openmm-sbg evaluate``, used by the demo and :mod:`openmm_sbg.pipeline`.
"""

from __future__ import annotations

import os

import numpy as np


def evaluate(samples, reference_path: str, plots: str | None = None, all_frames: bool = False,
             max_samples: int = 5000, seed: int = 0, target=None) -> dict:
    """Metrics of an :class:`~openmm_sbg.smc.SMCResult` against a reference trajectory; the JSON summary.

    Reference energies come from the file's ``energies_kT`` (``openmm-sbg md`` writes them)
    or, failing that, from ``target`` (default: the built-in system named in the samples file).
    """
    from openmm_sbg import data, metrics, systems

    traj = samples.to_mdtraj()
    meta = data.read_metadata(reference_path)
    split = "test" if "split" in meta and not all_frames else None
    reference = data.load_trajectory(reference_path, top=traj.topology, split=split)
    if [a.name for a in reference.topology.atoms] != [a.name for a in traj.topology.atoms]:
        raise ValueError(
            f"{reference_path} has {reference.n_atoms} atoms that differ from the samples' {traj.n_atoms}; "
            "compare samples with MD of the same molecule"
        )
    if reference.n_frames == 0:
        raise ValueError(f"{reference_path} has no {split or ''} frames; pass --all-frames or a longer reference")
    frames = np.flatnonzero(meta["split"] == data.SPLIT_CODES["test"]) if split else slice(None)
    if "energies_kT" in meta:
        reference_energies = np.asarray(meta["energies_kT"])[frames]
    else:
        if target is None:
            name = samples.info.get("system")
            if name not in systems.names():
                raise ValueError(
                    f"{reference_path} stores no energies and the samples' system {name!r} is not built in; "
                    "name the system (SYSTEM or --pdb ... --forcefield ...) to compute them"
                )
            target = systems.get(name)
        reference_energies = target.energy(reference.xyz.astype(np.float64), allow_nonfinite=True).numpy()

    weights = samples.weights
    summary = {
        "samples": samples.info.get("system"),
        "n_samples": len(weights),
        "reference_frames": int(reference.n_frames),
        "reference_split": split or "all",
        "log_z": samples.log_z,
        "ess": samples.ess,
        "ess_of_saved_weights": metrics.effective_sample_size(samples.log_weights),
        "energy_w2_kT": metrics.energy_w2(samples.energies, reference_energies, weights=weights),
        "torus_w2": metrics.torus_w2(
            metrics.backbone_dihedrals(traj), metrics.backbone_dihedrals(reference), weights=weights,
            max_samples=max_samples, seed=seed,
        ),
        "wrong_chirality_fraction": metrics.wrong_chirality_fraction(traj, weights),
        "reference_wrong_chirality_fraction": metrics.wrong_chirality_fraction(reference),
    }
    independent = independent_samples(samples)
    summary["states"] = state_summary(traj, reference, samples.log_weights, independent=independent)
    folded = folded_summary(traj, reference, samples.log_weights, samples.info.get("system"), independent=independent)
    if folded is not None:
        summary["folded"] = folded
    on_reference = reference_states_comparison(traj, reference, samples.energies, reference_energies, weights, max_samples, seed)
    if on_reference is not None:
        summary["on_reference_states"] = on_reference
    if plots is not None:
        summary["plots"] = [
            metrics.ramachandran_plot(traj, reference, os.path.join(plots, "ramachandran.png"), weights=weights),
            metrics.energy_histogram_plot(samples.energies, reference_energies, os.path.join(plots, "energy.png"), weights=weights),
        ]
    return summary


def reference_states_comparison(traj, reference, energies, reference_energies, weights, max_samples: int = 5000,
                                seed: int = 0) -> dict | None:
    """E-W2 and T-W2 of the samples in the backbone states the reference visits, or None if it visits them all.

    A reference MD run that never visits a state (ad2's alphaL/C7ax at 300 K) cannot judge the
    samples there: a sampler that gives that state its Boltzmann mass would look worse than
    one that misses it. These metrics drop the samples in unvisited states (and renormalise the
    weights) and report the weight they held, which another reference (umbrella sampling,
    replica exchange) has to judge.
    """
    from openmm_sbg import metrics, populations

    try:
        labeller = populations.backbone_state_labeller(traj.topology)
    except ValueError:
        return None
    labels, visited = labeller(traj.xyz), np.unique(labeller(reference.xyz))
    inside = np.isin(labels, visited)
    if inside.all() or not inside.any():
        return None
    kept = np.flatnonzero(inside)
    return {
        "states": [populations.BACKBONE_STATES[s] for s in visited],
        "weight_outside": float(weights[~inside].sum() / weights.sum()),
        "energy_w2_kT": metrics.energy_w2(energies[kept], reference_energies, weights=weights[kept]),
        "torus_w2": metrics.torus_w2(
            metrics.backbone_dihedrals(traj[kept]), metrics.backbone_dihedrals(reference), weights=weights[kept],
            max_samples=max_samples, seed=seed,
        ),
    }


def folded_summary(samples, reference, log_weights, system: str | None, independent: bool) -> dict | None:
    """The folded fraction of the samples and of ``reference`` (mdtraj trajectories), for a built-in system that
    has a folded structure (:func:`openmm_sbg.systems.folded_structure_path`); None for any other.

    Folded: C-alpha RMSD to that structure at most :data:`openmm_sbg.metrics.FOLDED_CA_RMSD_NM`. The error is a
    bootstrap error for independent samples and None otherwise, as in :func:`state_summary`.
    """
    import mdtraj

    from openmm_sbg import metrics, systems

    if system not in systems.FOLDED_STRUCTURES:
        return None
    path = systems.folded_structure_path(system)
    structure = mdtraj.load(path)

    def is_folded(traj) -> np.ndarray:
        return metrics.folded_ca_rmsd(traj, structure) <= metrics.FOLDED_CA_RMSD_NM

    fractions, errors = _populations_with_errors(is_folded(samples).astype(int), 2, log_weights, independent)
    summary = {"rule": f"C-alpha RMSD to {os.path.basename(path)} <= {metrics.FOLDED_CA_RMSD_NM} nm",
               "samples": fractions[1], "samples_bootstrap_error": None if errors is None else errors[1]}
    if reference is not None:
        summary["reference"] = float(np.mean(is_folded(reference)))
    return summary


def _populations_with_errors(labels, n_states: int, log_weights, independent: bool, seed: int = 0):
    """Weighted populations of integer ``labels`` as a list, with bootstrap errors for independent samples and
    None for correlated ones (SMC particles, resampled proposals), whose errors need repeated seeds."""
    from openmm_sbg import populations

    if not independent:
        return populations.state_populations(labels, n_states, log_weights).tolist(), None
    pops, errors = populations.bootstrap_populations(labels, n_states, log_weights, seed=seed)
    return pops.tolist(), errors.tolist()


def independent_samples(samples) -> bool:
    """Whether a result holds independent weighted proposals: importance sampling that kept its weights.

    (Importance sampling resamples only when asked to, ``resample_at_end``; files written
    before that rule resampled below ``resample_threshold`` too, so those count only with a
    threshold of 0.)
    """
    info = samples.info
    if info.get("n_steps") != 0 or info.get("resample_at_end") is not False:
        return False
    return samples.ess_since_last_resampling is not None or info.get("resample_threshold", 1) <= 0


def state_summary(samples, reference, log_weights, independent: bool) -> dict | None:
    """Backbone-state populations (:mod:`openmm_sbg.populations`) of every residue with phi and psi.

    ``samples`` and ``reference`` (or ``None``) are mdtraj trajectories. Error bars are bootstrap
    errors when the samples are independent (importance sampling that keeps its weights); SMC
    particles and resampled proposals are correlated, so their error bars need repeated seeds
    (:func:`openmm_sbg.populations.combine_repeats`) and none is given here. ``"residues"`` holds
    one entry per residue; the top-level populations are the first residue's (a dipeptide's only one).
    """
    from openmm_sbg import populations

    try:
        names, labeller = populations.residue_state_labeller(samples.topology)
    except ValueError:
        return None  # not a peptide with a backbone residue
    labels, n = labeller(samples.xyz), len(populations.BACKBONE_STATES)
    reference_labels = None if reference is None else labeller(reference.xyz)
    residues = []
    for r, name in enumerate(names):
        pops, errors = _populations_with_errors(labels[:, r], n, log_weights, independent, seed=r)
        residue = {"residue": name, "samples": pops, "samples_bootstrap_error": errors}
        if reference_labels is not None:
            residue["reference"] = populations.state_populations(reference_labels[:, r], n).tolist()
        residues.append(residue)
    # The first residue's populations at the top level, as for a dipeptide; every residue's in "residues".
    return {"names": list(populations.BACKBONE_STATES), "rule": populations.BACKBONE_STATE_RULE,
            **{key: value for key, value in residues[0].items() if key != "residue"}, "residues": residues}
