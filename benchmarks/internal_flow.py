"""Proposal quality on ad2: internal-coordinate flows against the Cartesian one, from IS and SMC.

For each flow (a checkpoint path or a shipped model's name), on the built-in ``ad2`` target:

- importance sampling with ``--n-proposals`` proposals per seed and the paper's 0.2% weight
  clip: ESS, log Z, E-W2 and T-W2 against held-out MD, basin populations, the weighted
  fraction of D-alanine (mirror-image) samples, wall-clock;
- SMC on top (linear schedule, Metropolis-adjusted Langevin with step-size adaptation) with
  ``--smc-particles`` particles: a flow over internal coordinates is as stiff as the force
  field, and the paper's unadjusted Langevin at the default step is then visibly biased;
- FlowIndependenceMove inside openmmtools' MCMCSampler at 300 K: acceptance.

The reference is the shipped ``ad2-ref.h5`` (10 ns, seed 2, independent of every training
run); its first half against its second half gives the noise floor of each metric.

Run: ``nice python benchmarks/internal_flow.py --flows ad2 ad2-cartesian`` writes
``benchmarks/results/internal_flow.json`` and the "Internal-coordinate flows" section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BASINS,
    Timer,
    basin_labels,
    command_line,
    dihedrals_and_energies,
    header,
    machine,
    populations,
    publish,
)

HEADING = "### Internal-coordinate flows"
PAPER_PROTOCOL = {"com_adjustment": "chi3", "clip_fraction": 0.002}


def score(result, reference_angles, reference_energies) -> dict:
    from openmm_sbg import metrics

    traj = result.to_mdtraj()
    angles = metrics.backbone_dihedrals(traj)
    weights = result.weights
    return {
        "ess": result.ess,
        "ess_proposals": result.info["ess_proposals"],
        "log_z": result.log_z,
        "energy_w2": metrics.energy_w2(result.energies, reference_energies, weights),
        "torus_w2": metrics.torus_w2(angles, reference_angles, weights, max_samples=2000),
        "populations": populations(basin_labels(angles), weights).tolist(),
        "wrong_chirality": metrics.wrong_chirality_fraction(traj, weights),
    }


def independence_acceptance(flow_path: str, target, start, n_iterations: int) -> float:
    """Fraction of FlowIndependenceMove proposals accepted in openmmtools' MCMCSampler at the target's temperature."""
    from openmm import unit
    from openmmtools import mcmc, states

    from openmm_sbg.openmm import FlowIndependenceMove

    # The Gaussian CoM density accepts most often (the package default for an internal flow); RESULTS.md's numbers use it.
    move = FlowIndependenceMove(flow_path, n_attempts=10, com_adjustment="gaussian")
    thermodynamic_state = states.ThermodynamicState(target.system, target.temperature)
    sampler_state = states.SamplerState(start * unit.nanometer)
    mcmc.MCMCSampler(thermodynamic_state, sampler_state, move).run(n_iterations)
    return move.fraction_accepted


def evaluate(name: str, args, target, reference) -> dict:
    from openmm_sbg import SMCSampler, TarFlow, data, shipped

    path = shipped.flow_path(name)
    flow = TarFlow.load(path, target=target)
    record = flow.metadata
    row = {
        "flow": name,
        "representation": flow.config.representation,
        "parameters": sum(p.numel() for p in flow.parameters()),
        "file_mb": os.path.getsize(path) / 1e6,
        "train_seconds": record.get("train_seconds"),
        "train_steps": record.get("steps"),
        "n_train": record.get("n_train"),
        "is": [],
        "smc": [],
    }
    for seed in range(args.seeds):
        # The paper's protocol (chi3 CoM, 0.2% clipped) for every flow, so that the rows compare like with like.
        sampler = SMCSampler(target, flow, n_particles=args.n_proposals, n_steps=0, progress=False, **PAPER_PROTOCOL)
        with Timer() as timer:
            result = sampler.run(seed=seed)
        row["is"].append({"seed": seed, "seconds": timer.seconds, **score(result, *reference)})
        print(f"  {name} IS seed {seed}: {row['is'][-1]}", flush=True)
    for seed in range(args.seeds):
        sampler = SMCSampler(
            target, flow, n_particles=args.smc_particles, n_steps=args.smc_steps, kernel="mala", progress=False,
            **PAPER_PROTOCOL,
        )
        with Timer() as timer:
            result = sampler.run(seed=seed)
        row["smc"].append({"seed": seed, "seconds": timer.seconds, **score(result, *reference)})
        print(f"  {name} SMC seed {seed}: {row['smc'][-1]}", flush=True)
    if args.mh_iterations:
        np.random.seed(0)  # FlowIndependenceMove draws its acceptances from numpy's global generator
        start = data.load_positions(shipped.reference_path("ad2"))[0].astype(np.float64)
        row["independence_acceptance"] = independence_acceptance(path, target, start, args.mh_iterations)
        print(f"  {name} FlowIndependenceMove acceptance {row['independence_acceptance']:.3f}", flush=True)
    return row


def noise_floor(reference_angles, reference_energies) -> dict:
    from openmm_sbg import metrics

    half = len(reference_energies) // 2
    return {
        "energy_w2": metrics.energy_w2(reference_energies[:half], reference_energies[half:]),
        "torus_w2": metrics.torus_w2(reference_angles[:half], reference_angles[half:], max_samples=2000),
        "populations": populations(basin_labels(reference_angles)).tolist(),
    }


def mean_sd(rows: list[dict], key: str, digits: int) -> str:
    values = np.array([row[key] for row in rows], dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def report(results: dict) -> str:
    floor = results["noise_floor"]
    what = f"Target `ad2` at 300 K; reference: the shipped `ad2-ref.h5` (10 ns, independent of all training data). Mean ± sd over {results['seeds']} seeds. IS: {results['n_proposals']:,} proposals, top 0.2% of log-weights clipped (as the paper). SMC: {results['smc_particles']:,} particles, {results['smc_steps']} linear steps, one adaptive MALA move per step. Populations: {' / '.join(BASINS)}."
    lines = header(results, what, ['flow', 'repr.', 'params', 'training', 'method', 'ESS', 'E-W2 (kT)', 'T-W2', 'populations', 'D-Ala', 'log Z', 'wall (s)'])
    for row in results["flows"]:
        training = f"{row['train_seconds'] / 60:.0f} min, {row['train_steps']} steps" if row["train_seconds"] else "?"
        for method in ("is", "smc"):
            runs = row[method]
            pops = np.mean([r["populations"] for r in runs], axis=0)
            lines.append(
                f"| {row['flow']} | {row['representation']} | {row['parameters'] / 1e3:.0f}k | {training} | {method.upper()} | "
                f"{mean_sd(runs, 'ess', 3)} | {mean_sd(runs, 'energy_w2', 2)} | {mean_sd(runs, 'torus_w2', 2)} | "
                f"{' / '.join(f'{p:.2f}' for p in pops)} | {mean_sd(runs, 'wrong_chirality', 4)} | "
                f"{mean_sd(runs, 'log_z', 2)} | {mean_sd(runs, 'seconds', 0)} |"
            )
    lines += [
        f"| reference MD, half vs half | | | | | | {floor['energy_w2']:.2f} | {floor['torus_w2']:.2f} | "
        f"{' / '.join(f'{p:.2f}' for p in floor['populations'])} | 0 | | |",
        "",
    ]
    accepted = [f"{row['flow']} {row['independence_acceptance']:.3f}" for row in results["flows"] if "independence_acceptance" in row]
    if accepted:
        lines.append(
            f"FlowIndependenceMove (10 proposals per move, {results['mh_iterations']} moves from the first reference "
            f"MD frame in openmmtools' MCMCSampler, 300 K) acceptance: {', '.join(accepted)}."
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", nargs="+", default=["ad2", "ad2-cartesian"], help="checkpoints or shipped model names")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-proposals", type=int, default=10_000)
    parser.add_argument("--smc-particles", type=int, default=2000)
    parser.add_argument("--smc-steps", type=int, default=100)
    parser.add_argument("--mh-iterations", type=int, default=100, help="FlowIndependenceMove moves (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-results", action="store_true", help="print only; do not touch RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from openmm_sbg import shipped, systems

    target = systems.get("ad2", platform="Reference")
    reference = dihedrals_and_energies(shipped.reference_path("ad2"))
    results = {
        "machine": machine(),
        "command": command_line("internal_flow.py", argv),
        "seeds": args.seeds,
        "n_proposals": args.n_proposals,
        "smc_particles": args.smc_particles,
        "smc_steps": args.smc_steps,
        "mh_iterations": args.mh_iterations,
        "noise_floor": noise_floor(*reference),
        "flows": [evaluate(name, args, target, reference) for name in args.flows],
    }
    publish(results, "internal_flow.json", HEADING, report(results), write=not args.no_results)


if __name__ == "__main__":
    main()
