"""``openmm-sbg demo``: the whole SBG story on the shipped alanine-dipeptide model, in minutes on a CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from openmm_sbg.io import atomic_write_text

HELP = "sample alanine dipeptide with the shipped flow (IS and SMC) and compare both with shipped reference MD"

EPILOG = """\
The table compares each run with the shipped 10 ns reference MD (5,000 frames): ESS (IS: the
normalised Kish ESS of the proposals' exact weights; SMC: the smallest ESS the weights reached
before a resampling), E-W2 (kT) and T-W2 (backbone phi/psi on the torus), and the weighted
populations of C7eq/beta, alphaR and alphaL/C7ax. Its last row is MD's own noise floor: the
reference's first half against its second half. A run at that row's values is as close to the
reference as another MD run of that length would be. The reference MD never visits alphaL/C7ax
(phi > 0), so E-W2 and T-W2 are measured on the states it visits (the weight the samples put
outside them is printed), and the alphaL/C7ax population is compared with umbrella sampling's.
"""

#: P(alphaL/C7ax) of ad2 at 300 K from umbrella sampling on a (phi, psi) grid with MBAR, and its
#: standard error (benchmarks/RESULTS.md, "Rare basins"; benchmarks/umbrella_sampling.py).
UMBRELLA_ALPHA_L = (0.0224, 0.0006)

#: Default sizes: enough importance-sampling proposals, and SMC particles, that E-W2 and T-W2
#: sit at the reference's own noise floor, in about two minutes on two CPU cores.
DEFAULT_PROPOSALS = 10_000
DEFAULT_SMC_PARTICLES = 4_000
DEFAULT_SMC_STEPS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="sbg-demo", help="folder for samples, plots and the summary (default sbg-demo)")
    parser.add_argument("--n-particles", type=int, default=DEFAULT_PROPOSALS,
                        help=f"importance-sampling proposals (default {DEFAULT_PROPOSALS:,})")
    parser.add_argument("--smc-particles", type=int, default=None,
                        help=f"SMC particles (default: --n-particles, at most {DEFAULT_SMC_PARTICLES:,})")
    parser.add_argument("--n-steps", type=int, default=DEFAULT_SMC_STEPS,
                        help=f"SMC annealing steps (default {DEFAULT_SMC_STEPS})")
    parser.add_argument("--n-mcmc-steps", type=int, default=1, help="MALA moves per annealing step (default 1)")
    parser.add_argument("--flow", default="ad2",
                        help="an alanine-dipeptide flow: shipped name or checkpoint (default ad2, the shipped model; "
                             "ad2-cartesian is the paper's Cartesian representation, sampled with its chi3 protocol)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a small or shared CPU more threads slow the flow down)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict:
    from openmm_sbg import shipped
    from openmm_sbg.evaluation import evaluate
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.sampling import sample
    from openmm_sbg.smc import SMCResult

    import torch

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.n_particles < 1 or args.n_steps < 1:
        raise ValueError("--n-particles and --n-steps must be at least 1")
    os.makedirs(args.out_dir, exist_ok=True)
    flow = TarFlow.load(shipped.flow_path(args.flow))
    molecule = (flow.target_identity or {}).get("name")
    if molecule != "ad2":
        raise ValueError(f"--flow {args.flow} models {molecule!r}; the demo compares with the shipped ad2 reference MD, "
                         "so give a flow of the built-in ad2 system")
    target = flow.target()
    reference = shipped.reference_path("ad2")
    smc_particles = args.smc_particles or min(args.n_particles, DEFAULT_SMC_PARTICLES)
    common = {"seed": args.seed, "progress": not args.no_progress, "restart": True}
    runs = {
        # Plain importance sampling: the Boltzmann-generator baseline (SMC with zero steps). The
        # proposals keep their weights (no resampling): independent samples, exact weights.
        "importance_sampling": {"n_particles": args.n_particles, "n_steps": 0, "resample_at_end": False},
        # The paper's SMC path and linear schedule to t = 1, with Metropolis-adjusted Langevin
        # moves: the shipped flow over internal coordinates is as stiff as the force field, and
        # the paper's unadjusted moves at the default step are then unstable (benchmarks/RESULTS.md).
        "smc": {"n_particles": smc_particles, "n_steps": args.n_steps, "kernel": "mala", "n_mcmc_steps": args.n_mcmc_steps},
    }
    summary = {"system": target.name, "model": os.path.basename(shipped.flow_path(args.flow)), "reference": reference,
               "runs": {}}
    for name, options in runs.items():
        out = os.path.join(args.out_dir, f"{name}.h5")
        sampled = sample(target, flow, out, **common, **options)
        metrics = evaluate(SMCResult.load(out), reference, plots=os.path.join(args.out_dir, name), all_frames=True)
        summary["runs"][name] = {**sampled, **{k: v for k, v in metrics.items() if k not in sampled}}
    summary["noise_floor"] = noise_floor(reference)
    summary["seconds"] = time.perf_counter() - started
    _print_table(summary)
    atomic_write_text(os.path.join(args.out_dir, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def noise_floor(reference_path: str, max_samples: int = 5000) -> dict:
    """MD's own noise: the reference's first half against its second half, with the metrics the runs get."""
    import numpy as np

    from openmm_sbg import data, metrics, populations

    meta = data.read_metadata(reference_path)
    trajectory = data.load_trajectory(reference_path)
    energies, angles = np.asarray(meta["energies_kT"]), metrics.backbone_dihedrals(trajectory)
    half = len(energies) // 2
    labels = populations.backbone_state_labeller(trajectory.topology)(trajectory.xyz)
    n_states = len(populations.BACKBONE_STATES)
    return {
        "what": "reference MD, first half against second half",
        "frames_per_half": half,
        "energy_w2_kT": metrics.energy_w2(energies[:half], energies[half:]),
        "torus_w2": metrics.torus_w2(angles[:half], angles[half:], max_samples=max_samples),
        "states": {
            "names": list(populations.BACKBONE_STATES),
            "first_half": populations.state_populations(labels[:half], n_states).tolist(),
            "second_half": populations.state_populations(labels[half:], n_states).tolist(),
        },
    }


def _print_table(summary: dict) -> None:
    def populations(values) -> str:
        return "/".join(f"{p:.3f}" for p in values)

    floor = summary["noise_floor"]
    rows = [("", "particles", "ESS", "E-W2 (kT)", "T-W2", "C7eq/aR/aL", "seconds")]
    reference_populations, outside = None, {}
    for name, r in summary["runs"].items():
        states = r.get("states") or {}
        reference_populations = states.get("reference", reference_populations)
        measured = r.get("on_reference_states") or r
        if "on_reference_states" in r:
            outside[name] = r["on_reference_states"]["weight_outside"]
        rows.append((name.replace("_", " "), f"{r['n_particles']:,}", f"{r['ess']:.3f}", f"{measured['energy_w2_kT']:.3f}",
                     f"{measured['torus_w2']:.3f}", populations(states.get("samples", [])), f"{r['seconds']:.1f}"))
    rows.append(("MD half vs half (floor)", f"{floor['frames_per_half']:,}", "-", f"{floor['energy_w2_kT']:.3f}",
                 f"{floor['torus_w2']:.3f}", populations(floor["states"]["first_half"]), "-"))
    if reference_populations is not None:
        rows.append(("reference MD", f"{2 * floor['frames_per_half']:,}", "-", "0", "0", populations(reference_populations), "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(row[0].ljust(widths[0]) + "".join(cell.rjust(width + 2) for cell, width in zip(row[1:], widths[1:])),
              file=sys.stderr)
    if outside:
        p, error = UMBRELLA_ALPHA_L
        print("E-W2 and T-W2 on the states the reference MD visits; the samples' weight outside them (alphaL/C7ax): "
              + ", ".join(f"{name.replace('_', ' ')} {w:.4f}" for name, w in outside.items())
              + f". Umbrella sampling: {p} +- {error}.", file=sys.stderr)
    print(f"model {summary['model']}; {summary['seconds']:.0f} s in all. E-W2 and T-W2 at the floor row's values "
          "mean the samples are as close to the reference as MD's own halves are to each other.", file=sys.stderr)
