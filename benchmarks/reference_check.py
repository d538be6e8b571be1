"""Do two replica-exchange runs of a peptide agree? Per-residue backbone-state populations and torsion W2.

Each file is the target-temperature output of ``openmm-sbg md SYSTEM --walkers C --replica-exchange``
(frames stored copy by copy). Per file: every residue's C7eq/beta, alphaR and alphaL/C7ax
populations after ``--burn-in-ps`` of each copy, with the standard error over copies, and the
torsion W2 of its first half of frames (copies) against its second, next to the same distance between
two random halves of its frames: the floor that finite samples alone give, which a converged run's
halves reach; for two files, the torsion W2 between them (and between random halves of the two
pooled, its floor) and each population's difference in combined standard errors (z). T-W2 is
computed on at most 10,000 frames per set (``--max-samples``), the paper's count.

Run: ``nice python benchmarks/reference_check.py --copies 8 --burn-in-ps 100 a.h5 b.h5``; writes
``results/reference_check-<name of the first file>.json``.
"""

from __future__ import annotations

import argparse
import json
import os

import mdtraj
import numpy as np
from _common import save_json

from openmm_sbg import metrics, populations


def one_run(path: str, copies: int, burn_in_ps: float, max_samples: int = 10_000) -> tuple[dict, np.ndarray]:
    traj = mdtraj.load(path)
    if traj.n_frames % copies:
        raise SystemExit(f"{path}: {traj.n_frames} frames do not split into {copies} copies")
    names, labeller = populations.residue_state_labeller(traj.topology)
    per_copy = traj.n_frames // copies
    burn_in_frames = int(round(burn_in_ps / frame_interval_ps(traj, path)))
    if burn_in_frames >= per_copy:
        raise SystemExit(f"{path}: a burn-in of {burn_in_ps:g} ps drops all {per_copy} frames of each copy; "
                         "give a smaller --burn-in-ps")
    keep = np.concatenate([np.arange(c * per_copy + burn_in_frames, (c + 1) * per_copy) for c in range(copies)])
    labels = labeller(traj.xyz[keep]).reshape(copies, -1, len(names))
    shares = (labels[..., None] == np.arange(len(populations.BACKBONE_STATES))).mean(axis=1)  # [copy, residue, state]
    angles = metrics.backbone_dihedrals(traj[keep])
    half = len(angles) // 2
    return {
        "file": path, "residues": names, "states": list(populations.BACKBONE_STATES), "burn_in_ps": burn_in_ps,
        "burn_in_frames": burn_in_frames, "frames_used": int(len(keep)),
        "populations": shares.mean(0).tolist(), "standard_errors": (shares.std(0, ddof=1) / np.sqrt(copies)).tolist(),
        "torus_w2_half_vs_half": metrics.torus_w2(angles[:half], angles[half:], max_samples=max_samples),
        "torus_w2_random_halves": random_halves_w2(angles, max_samples),
    }, angles


def frame_interval_ps(traj: mdtraj.Trajectory, path: str) -> float:
    """Picoseconds between stored frames, from the file's frame times (``openmm-sbg md`` writes them)."""
    interval = float(traj.timestep) if traj.n_frames > 1 else 0.0  # mdtraj refuses one frame
    if not interval > 0:
        raise SystemExit(f"{path} stores no increasing frame times, so a burn-in in ps cannot be converted to frames; "
                         "write the run with `openmm-sbg md`, which stores them")
    return interval


def random_halves_w2(angles: np.ndarray, max_samples: int, seed: int = 0) -> float:
    """Torsion W2 between two random halves of ``angles``: what sampling noise alone gives at this size."""
    order = np.random.default_rng(seed).permutation(len(angles))
    half = len(angles) // 2
    return metrics.torus_w2(angles[order[:half]], angles[order[half:]], max_samples=max_samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--copies", type=int, default=8, help="ladder copies (--walkers) of each run")
    parser.add_argument("--burn-in-ps", type=float, default=100,
                        help="simulated time dropped at the start of each copy (converted to frames by the file's "
                             "frame times)")
    parser.add_argument("--max-samples", type=int, default=10_000,
                        help="frames per set in T-W2 (larger sets are subsampled); default 10,000, the paper's")
    parser.add_argument("--name", default=None,
                        help="results/reference_check-NAME.json (default: the first file's name); a run drawn again "
                             "under the same file name then keeps the first draw's report")
    args = parser.parse_args()
    runs, angles = zip(*(one_run(path, args.copies, args.burn_in_ps, args.max_samples) for path in args.files))
    report = {"runs": list(runs), "torus_w2_max_samples": args.max_samples}
    if len(runs) == 2:
        p = [np.array(run["populations"]) for run in runs]
        e = [np.array(run["standard_errors"]) for run in runs]
        report["z_first_minus_second"] = ((p[0] - p[1]) / np.sqrt(e[0] ** 2 + e[1] ** 2 + 1e-300)).tolist()
        report["torus_w2_run_vs_run"] = metrics.torus_w2(angles[0], angles[1], max_samples=args.max_samples)
        report["torus_w2_run_vs_run_floor"] = random_halves_w2(np.concatenate(angles), args.max_samples)
    name = args.name or os.path.splitext(os.path.basename(args.files[0]))[0]
    save_json(f"reference_check-{name}.json", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
