"""``openmm-sbg evaluate``: metrics and plots of a samples file against reference MD."""

from __future__ import annotations

import argparse
import os

import numpy as np

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "compare a samples file with reference MD: ESS, E-W2, T-W2, chirality, Ramachandran and energy plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_system_arguments(parser)
    parser.add_argument("--samples", required=True, help="samples file from `openmm-sbg sample`")
    parser.add_argument("--reference", required=True, help="reference trajectory, e.g. from `openmm-sbg md` (any mdtraj format)")
    parser.add_argument("--plots", default=None, metavar="DIR", help="write ramachandran.png and energy.png here")
    parser.add_argument("--all-frames", action="store_true", help="use every reference frame, not only its test split")
    parser.add_argument("--max-samples", type=int, default=5000, help="subsample each set to this for T-W2 (cost matrix memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the T-W2 subsampling")


def run(args: argparse.Namespace) -> dict:
    from openmm_sbg.smc import SMCResult

    samples = SMCResult.load(args.samples)
    target = None
    if args.system is not None or args.pdb is not None:
        target = target_from_args(args)
    return evaluate(samples, args.reference, plots=args.plots, all_frames=args.all_frames,
                    max_samples=args.max_samples, seed=args.seed, target=target)


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
        "n_samples": int(len(weights)),
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
    if plots is not None:
        summary["plots"] = [
            metrics.ramachandran_plot(traj, reference, os.path.join(plots, "ramachandran.png"), weights=weights),
            metrics.energy_histogram_plot(samples.energies, reference_energies, os.path.join(plots, "energy.png"), weights=weights),
        ]
    return summary

