"""``openmm-sbg train``: fit a TarFlow proposal to MD data, or refine a trained one with the energy (resumable)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = (
    "train a TarFlow proposal on MD frames, or (--refine FLOW) refine a trained flow with the force field's energy; "
    "rerun the same command to resume an interrupted run"
)

#: Integer options that override a field of the preset's FlowConfig: (flag, field, what it sets).
_SIZES = (
    ("--width", "width", "transformer width"),
    ("--blocks", "n_blocks", "TarFlow blocks"),
    ("--marginals", "marginals", "internal coordinates: Gaussianize each feature through a Gaussian mixture of this "
     "many components fitted to the training data, before the TarFlow blocks; 0: none"),
    ("--spline-bins", "spline_bins", "follow each block's affine map with a conditional rational-quadratic spline of "
     "this many bins, so one block can model a multimodal conditional; 0: affine blocks"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_sbg.flow import TrainOptions, preset_names
    from openmm_sbg.flow.presets import REPRESENTATIONS
    from openmm_sbg.flow.refine import OBJECTIVES, RefineOptions

    defaults, refine_defaults = TrainOptions(), RefineOptions()
    add_system_arguments(parser)
    parser.add_argument(
        "--data", nargs="+", default=None,
        help="MD trajectories: `openmm-sbg md` files, or any files mdtraj reads (several are concatenated); "
        "required, except for --refine with --data-weight 0 (the energy alone)",
    )
    parser.add_argument(
        "--data-max-temperature", type=float, default=None, metavar="K",
        help="train on the frames sampled at or below K only: the lower rungs of a pooled replica-exchange file "
        "(`md --replica-exchange --all-replicas` writes ...-all-replicas.h5); default: every frame",
    )
    parser.add_argument("--out", required=True, help="flow checkpoint to write (.pt); updated after every epoch")
    parser.add_argument(
        "--preset", default=None, choices=preset_names(),
        help="flow architecture (default ad2-small). The -small presets are sized for a CPU and use internal "
        "coordinates; the paper's presets (ad2, al3, ...) are Cartesian and sized for a GPU",
    )
    parser.add_argument(
        "--start-from", metavar="FLOW", default=None,
        help="trained flow checkpoint (or shipped model name) whose weights the fit starts from, with a new "
        "learning-rate schedule over --data: a longer fit, or more data. Its architecture is kept (no --preset or "
        "sizes)",
    )
    parser.add_argument("--representation", choices=REPRESENTATIONS, default=None,
                        help="what the flow models: internal (Z-matrix bonds, angles, dihedrals) or cartesian (the paper's); "
                        "default: the preset's")
    for flag, _, what in _SIZES:
        parser.add_argument(flag, type=int, default=None, help=f"{what} (default: the preset's)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=defaults.epochs, help=f"passes over the data (default {defaults.epochs})")
    _add_mode_default(length, "--steps", int, "optimiser steps, instead of --epochs", "from --epochs", refine_defaults.steps)
    _add_mode_default(parser, "--batch-size", int, "configurations per step", defaults.batch_size, refine_defaults.batch_size)
    _add_mode_default(parser, "--lr", float, "learning rate: the one-cycle schedule's peak, constant with --refine",
                      defaults.lr, refine_defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="fraction of steps warming up the lr")
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    _add_mode_default(parser, "--ema-decay", float, "decay of the EMA of the weights", defaults.ema_decay,
                      refine_defaults.ema_decay)
    parser.add_argument("--val-frames", type=int, default=defaults.val_frames, help="held-out frames scored per epoch")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--keep-last", action="store_true",
        help="save the last EMA weights instead of those of the epoch with the lowest validation NLL "
             "(--refine: of the evaluation with the highest ESS)",
    )
    refine = parser.add_argument_group(
        "refinement with the energy (--refine): continue from a trained flow towards the force field's Boltzmann "
        "distribution; --data then feeds the data term"
    )
    refine.add_argument("--refine", metavar="FLOW", default=None,
                        help="trained flow checkpoint (or shipped model name) to refine; writes the refined flow to --out")
    refine.add_argument("--objective", choices=OBJECTIVES, default=refine_defaults.objective,
                        help="weighted-ml: importance-weighted likelihood with a replay buffer (mass-covering, default); "
                        "alpha-2: the same with squared weights, FAB's alpha-2 divergence, which maximises the ESS itself; "
                        "reverse-kl: KL(q||p) through the flow's inverse (mode-seeking)")
    refine.add_argument("--data-weight", type=float, default=refine_defaults.data_weight,
                        help=f"weight of the data's NLL in the loss (default {refine_defaults.data_weight})")
    refine.add_argument("--add-blocks", type=int, default=0,
                        help="append this many TarFlow blocks, each starting as the identity (the density is unchanged), "
                        "for the refinement to fit what the trained flow's size could not (default 0)")
    refine.add_argument("--temper-ess", type=float, default=refine_defaults.temper_ess,
                        help="weighted-ml, alpha-2: temper each refresh's weights (p/q)^beta to keep this ESS fraction, for a "
                        "flow whose ESS is a few percent (default 0: untempered)")
    refine.add_argument("--ess-floor", type=float, default=refine_defaults.ess_floor,
                        help="stop when the ESS falls below this fraction of its start (default "
                        f"{refine_defaults.ess_floor}; lower it, or raise --eval-proposals, for a flow whose ESS is a few percent)")
    refine.add_argument("--drift-errors", type=float, default=refine_defaults.drift_errors,
                        help="the population guard stops a run only when a state's weighted share, less this many "
                        f"standard errors, exceeds twice its share of the proposals (default {refine_defaults.drift_errors:g})")
    refine.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the refinement")
    refine.add_argument("--eval-every", type=int, default=refine_defaults.eval_every,
                        help="steps between ESS / population checks (and checkpoints)")
    refine.add_argument("--eval-proposals", type=int, default=refine_defaults.eval_proposals,
                        help="proposals scored at each check")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training loss with torch.compile: the same fit in faster steps (a minute to compile)")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop when this many epochs in a row have not lowered the validation NLL (--refine: evaluations "
                             "that have not raised the ESS); default: every step")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> dict:
    import torch

    from openmm_sbg import distributed
    from openmm_sbg.flow import TarFlow, TrainOptions, get_preset, train

    train_function = train
    if distributed.is_launched():
        # Under torchrun: every process backpropagates its slice of each batch; same checkpoint, written by rank 0.
        from openmm_sbg.distributed.ddp_train import train_distributed as train_function

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.refine is not None:
        if args.start_from is not None:
            raise ValueError("--refine FLOW already starts from FLOW's weights: leave out --start-from")
        return _refine(args)
    if args.data is None:
        raise ValueError("train needs --data: the MD trajectories to fit (`openmm-sbg md` files or any files mdtraj reads)")
    target = target_from_args(args)
    from openmm_sbg.data import training_frames

    # Each architecture flag given: (flag, the FlowConfig field it overrides or None, its value).
    flags = [("--preset", None), ("--representation", "representation"), *((flag, field) for flag, field, _ in _SIZES)]
    given = [(flag, field, value) for flag, field in flags
             if (value := getattr(args, flag[2:].replace("-", "_"))) is not None]
    overrides = {field: value for _, field, value in given if field is not None}
    initial, preset = None, args.preset or "ad2-small"
    if args.start_from is not None:
        if given:
            raise ValueError(f"--start-from keeps the architecture of {args.start_from!r}: leave out "
                             f"{', '.join(flag for flag, _, _ in given)}")
        initial = TarFlow.load(args.start_from, target=target, map_location=args.device)
        config, preset = initial.config, initial.metadata.get("preset", "")
    else:
        config = dataclasses.replace(get_preset(preset), **overrides)
    train_positions, val_positions, held_out = training_frames(args.data, target, args.data_max_temperature)
    options = TrainOptions(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=_given(args.batch_size, TrainOptions.batch_size),
        lr=_given(args.lr, TrainOptions.lr),
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=_given(args.ema_decay, TrainOptions.ema_decay),
        seed=args.seed,
        val_frames=args.val_frames,
        select_best=not args.keep_last,
        patience=args.patience,
    )
    flow = train_function(
        train_positions,
        val_positions,
        target=target,
        config=config,
        initial=initial,
        options=options,
        checkpoint_path=args.out,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
        metadata={"data": [os.fspath(path) for path in args.data], "validation": held_out, "preset": preset},
        compile=args.compile,
    )
    record = flow.metadata
    return {
        "out": os.fspath(args.out),
        "system": target.name,
        "n_atoms": flow.n_atoms,
        "preset": preset,
        **({"started_from": os.fspath(args.start_from)} if initial is not None else {}),
        "representation": config.representation,
        "width": config.width,
        "blocks": config.n_blocks,
        "marginals": config.marginals,
        "spline_bins": config.spline_bins,
        "parameters": sum(p.numel() for p in flow.parameters()),
        "n_train": record["n_train"],
        "n_val": record["n_val"],
        "validation": held_out,
        "steps": record["steps"],
        "epochs": record["epochs"],
        "train_seconds": round(record["train_seconds"], 1),
        "initial_val_nll_per_dim": record["history"][0]["val_nll_per_dim"],
        "val_nll_per_dim": record["val_nll_per_dim"],
        "selected_step": record["selected_step"],
        "std_nm": flow.std,
        "com_std_nm": flow.com_std,
    }


def _add_mode_default(parser, flag: str, kind: type, what: str, train_default, refine_default) -> None:
    """An option whose default differs between training and --refine: it defaults to None, the mode's (:func:`_given`)."""
    parser.add_argument(flag, type=kind, default=None, help=f"{what} (default {train_default}; --refine: {refine_default})")


def _given(value, default):
    return default if value is None else value


def _refine(args: argparse.Namespace) -> dict:
    from openmm_sbg import distributed, populations
    from openmm_sbg.data import training_frames
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.flow.growth import with_identity_blocks
    from openmm_sbg.flow.refine import RefineOptions, refine

    if distributed.is_launched():
        # Under torchrun every process scores and backpropagates its rows of each draw and batch.
        args.device = str(distributed.init(args.device).device)
    if args.system is None and args.pdb is None:  # the checkpoint knows its molecule
        flow = TarFlow.load(args.refine, map_location=args.device)
        target = flow.target(platform=args.platform)
    else:
        target = target_from_args(args)
        flow = TarFlow.load(args.refine, target=target, map_location=args.device)
    if args.add_blocks:
        flow = with_identity_blocks(flow, args.add_blocks, seed=args.seed)
    options = RefineOptions(
        objective=args.objective,
        data_weight=args.data_weight,
        temper_ess=args.temper_ess,
        ess_floor=args.ess_floor,
        drift_errors=args.drift_errors,
        steps=_given(args.steps, RefineOptions.steps),
        batch_size=_given(args.batch_size, RefineOptions.batch_size),
        lr=_given(args.lr, RefineOptions.lr),
        grad_clip=args.grad_clip,
        ema_decay=_given(args.ema_decay, RefineOptions.ema_decay),
        eval_every=args.eval_every,
        eval_proposals=args.eval_proposals,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
        patience=args.patience,
        seed=args.seed,
        select_best=not args.keep_last,
    )
    if options.data_weight > 0 and args.data is None:
        raise ValueError(f"--data-weight {options.data_weight:g} mixes in the MD data's likelihood: give --data "
                         "(the frames the flow was trained on), or --data-weight 0 to refine with the energy alone")
    data_positions = training_frames(args.data, target, args.data_max_temperature)[0] if options.data_weight > 0 else None
    try:
        states = populations.backbone_state_labeller(target.topology)
    except ValueError:
        states = None  # not a peptide: the ESS guard only
    used_data = [os.fspath(path) for path in args.data] if data_positions is not None else []
    provenance = {"started_from": os.fspath(args.refine), "data": used_data, "added_blocks": args.add_blocks}
    refined = refine(flow, target, options, data_positions=data_positions, states=states, checkpoint_path=args.out,
                     progress=not args.no_progress, provenance=provenance)
    record = refined.metadata["refinement"]
    return {
        "out": os.fspath(args.out),
        "system": target.name,
        "started_from": os.fspath(args.refine),
        "objective": options.objective,
        "steps": record["steps"],
        "refine_seconds": round(record["seconds"], 1),
        "selected_step": record["selected_step"],
        "ess_start": record["history"][0]["ess"],
        "ess_selected": record["ess"],
        "stopped": record["stopped"],
        "ess_over_time": [{"step": h["step"], "seconds": round(h["seconds"], 1), "ess": h["ess"]} for h in record["history"]],
        "state_populations": {key: record["history"][-1].get(key) for key in ("proposal_populations", "weighted_populations", "weighted_population_errors")},
    }


def progress_path(args: argparse.Namespace) -> str:
    """The checkpoint an interrupted run resumes from (written after every epoch)."""
    return args.out
