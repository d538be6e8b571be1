"""``openmm-sbg run``: data, training, sampling and evaluation for one molecule, in one resumable command."""

from __future__ import annotations

import argparse

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "the whole workflow for one molecule: MD or replica exchange -> train -> sample -> evaluate; rerun to continue"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_sbg.flow import preset_names
    from openmm_sbg.pipeline import DATA_SOURCES, PipelineConfig

    defaults = PipelineConfig()
    add_system_arguments(parser)
    parser.add_argument("--folder", required=True, help="where every stage writes; rerunning with the same folder continues")
    parser.add_argument("--data", choices=DATA_SOURCES, default=defaults.data,
                        help="plain MD at the target temperature, or temperature replica exchange (for basins MD does not reach)")
    parser.add_argument("--ns", type=float, default=defaults.ns, help=f"simulated ns (per replica) (default {defaults.ns:g})")
    parser.add_argument("--frame-interval-ps", type=float, default=defaults.frame_interval_ps)
    parser.add_argument("--t-max", type=float, default=defaults.t_max_K, help="replica exchange: highest temperature, K")
    parser.add_argument("--n-replicas", type=int, default=defaults.n_replicas, help="replica exchange: temperatures in the ladder")
    parser.add_argument("--seeded-ns", type=float, default=defaults.seeded_ns,
                        help="replica exchange: ns of MD at the target temperature from a frame of each backbone state rare "
                             f"there, so the flow learns its shape at that temperature; 0 for none (default {defaults.seeded_ns:g})")
    parser.add_argument("--seed-below", type=float, default=defaults.seed_below,
                        help=f"replica exchange: a state with at most this fraction of the target temperature's frames is seeded; "
                             f"1 seeds every visited state (default {defaults.seed_below:g})")
    parser.add_argument("--preset", choices=preset_names(), default=None,
                        help=f"flow architecture (default: the system's CPU preset, <system>-small, where there is one, else "
                             f"{defaults.preset})")
    parser.add_argument("--spline-bins", type=int, default=defaults.spline_bins,
                        help="follow each block's affine map with a rational-quadratic spline of this many bins (the shipped "
                             "models use 8); 0: the preset's affine blocks (default)")
    parser.add_argument("--train-max-temperature", type=float, default=None, metavar="K",
                        help="replica exchange: train on the rungs at or below K (and the seeded runs); default: every rung")
    parser.add_argument("--train-steps", type=int, default=defaults.training.steps, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=defaults.training.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.training.lr)
    parser.add_argument("--refine-minutes", type=float, default=defaults.refine_minutes,
                        help="budget of a refinement with the energy after training (tempered alpha-2), which also ends "
                             "when its ESS stops rising; 0 skips it (default)")
    parser.add_argument("--n-particles", type=int, default=defaults.n_particles)
    parser.add_argument("--n-steps", type=int, default=defaults.n_steps, help="SMC annealing steps; 0 = importance sampling")
    parser.add_argument("--kernel", choices=["mala", "ula"], default=defaults.kernel)
    parser.add_argument("--sample-temperatures", type=float, nargs="*", default=[], metavar="K",
                        help="also sample these temperatures from the same flow")
    parser.add_argument("--patience", type=int, default=defaults.training.patience,
                        help="stop training when this many epochs in a row have not lowered the validation NLL; 0 trains "
                             f"every step (default {defaults.training.patience})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu", help="torch device of the flow")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every stage (default: torch's choice; on a shared CPU use 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict:
    import dataclasses

    from openmm_sbg.pipeline import PipelineConfig, run_pipeline

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    defaults = PipelineConfig()
    config = PipelineConfig(
        data=args.data, ns=args.ns, frame_interval_ps=args.frame_interval_ps, t_max_K=args.t_max,
        n_replicas=args.n_replicas, seeded_ns=args.seeded_ns, seed_below=args.seed_below, preset=_preset(args, defaults),
        spline_bins=args.spline_bins, train_max_temperature_K=args.train_max_temperature,
        training=dataclasses.replace(defaults.training, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
                                     patience=args.patience or None),
        refine_minutes=args.refine_minutes, n_particles=args.n_particles, n_steps=args.n_steps, kernel=args.kernel,
        sample_temperatures_K=tuple(args.sample_temperatures), seed=args.seed,
    )
    return run_pipeline(target_from_args(args), args.folder, config, platform=args.platform, device=args.device,
                        progress=not args.no_progress).to_dict()


def _preset(args: argparse.Namespace, defaults) -> str:
    """The chosen preset, else the built-in system's own small one (``al4-small`` for al4), else the default."""
    from openmm_sbg.flow import preset_names

    if args.preset is not None:
        return args.preset
    own = f"{args.system}-small" if args.system else None
    return own if own in preset_names() else defaults.preset


def progress_path(args: argparse.Namespace) -> str:
    """Every stage keeps its progress in the folder."""
    return args.folder
