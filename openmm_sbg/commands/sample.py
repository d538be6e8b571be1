"""``openmm-sbg sample``: SMC (or importance) sampling from a trained flow; writes a samples file."""

from __future__ import annotations

import argparse

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "draw weighted equilibrium samples with a trained flow and SMC; rerun the same command to resume"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_sbg.smc import DEFAULT_STEP_SIZE

    add_system_arguments(parser)
    parser.add_argument("--flow", required=True, help="flow checkpoint (.pt) from `openmm-sbg train`, or a shipped model's name (ad2)")
    parser.add_argument("--out", required=True, help="samples file to write (.h5: mdtraj trajectory + log_weights, energies_kT)")
    parser.add_argument("--n-particles", type=int, default=1000, help="proposals drawn / particles kept (default 1000)")
    parser.add_argument("--n-steps", type=int, default=100, help="annealing steps (the most, for --schedule adaptive); 0 = importance sampling (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kernel", choices=["ula", "mala"], default="mala",
        help="Langevin move: Metropolis-adjusted with step-size adaptation (default; exact for any step) or "
        "unadjusted (the paper's, biased when the flow is as stiff as the force field, as internal-coordinate flows are)",
    )
    parser.add_argument("--step-size", type=float, default=DEFAULT_STEP_SIZE, help=f"Langevin step size in nm^2 (default {DEFAULT_STEP_SIZE:g})")
    parser.add_argument("--n-mcmc-steps", type=int, default=1, help="Langevin moves per annealing step")
    parser.add_argument("--schedule", choices=["linear", "adaptive"], default="linear")
    parser.add_argument("--target-cess", type=float, default=0.99, help="conditional ESS per step for --schedule adaptive")
    parser.add_argument("--resampling", choices=["systematic", "multinomial"], default="systematic")
    parser.add_argument("--resample-threshold", type=float, default=0.5, help="resample when the normalised ESS drops below this")
    parser.add_argument("--no-final-resample", action="store_true", help="keep weighted particles at t = 1")
    parser.add_argument("--energy-cutoff", type=float, default=None, help="drop proposals above this energy in kT")
    parser.add_argument("--clip-fraction", type=float, default=0.002, help="drop this fraction of the largest log-weights")
    parser.add_argument("--com-adjustment", choices=["chi3", "gaussian", "none"], default="chi3")
    parser.add_argument("--batch-size", type=int, default=256, help="particles per flow / force-field evaluation")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (OUT.ckpt)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing OUT.ckpt and start afresh")
    parser.add_argument("--device", default="cpu", help="torch device of the flow (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> dict:
    import torch

    from openmm_sbg import distributed
    from openmm_sbg.flow import TarFlow

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if distributed.is_launched():
        # Under torchrun each process samples a slice of the particles on its own device.
        args.device = str(distributed.init(args.device).device)
    if args.system is None and args.pdb is None:
        # The checkpoint knows its molecule.
        flow = TarFlow.load(args.flow, map_location=args.device)
        target = flow.target(platform=args.platform)
    else:
        target = target_from_args(args)
        flow = TarFlow.load(args.flow, target=target, map_location=args.device)
    from openmm_sbg.sampling import sample

    return sample(
        target,
        flow,
        args.out,
        seed=args.seed,
        restart=args.restart,
        n_particles=args.n_particles,
        n_steps=args.n_steps,
        kernel=args.kernel,
        step_size=args.step_size,
        n_mcmc_steps=args.n_mcmc_steps,
        schedule=args.schedule,
        target_cess=args.target_cess,
        resampling=args.resampling,
        resample_threshold=args.resample_threshold,
        resample_at_end=not args.no_final_resample,
        energy_cutoff=args.energy_cutoff,
        clip_fraction=args.clip_fraction,
        com_adjustment=args.com_adjustment,
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )


def progress_path(args: argparse.Namespace) -> str:
    """The checkpoint an interrupted run resumes from."""
    return args.out + ".ckpt"
