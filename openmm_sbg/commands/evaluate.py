"""``openmm-sbg evaluate``: metrics and plots of a samples file against reference MD."""

from __future__ import annotations

import argparse

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
    from openmm_sbg.evaluation import evaluate
    from openmm_sbg.smc import SMCResult

    samples = SMCResult.load(args.samples)
    target = None
    if args.system is not None or args.pdb is not None:
        target = target_from_args(args)
    return evaluate(samples, args.reference, plots=args.plots, all_frames=args.all_frames,
                    max_samples=args.max_samples, seed=args.seed, target=target)
