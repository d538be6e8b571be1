"""``openmm-sbg train``: fit a TarFlow proposal to MD data (resumable, checkpoint every epoch)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "train a TarFlow proposal on MD frames; rerun the same command to resume an interrupted run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from openmm_sbg.flow import TrainOptions, preset_names
    from openmm_sbg.flow.presets import REPRESENTATIONS

    defaults = TrainOptions()
    add_system_arguments(parser)
    parser.add_argument(
        "--data", required=True, nargs="+",
        help="MD trajectories: `openmm-sbg md` files, or any files mdtraj reads (several are concatenated)",
    )
    parser.add_argument("--out", required=True, help="flow checkpoint to write (.pt); updated after every epoch")
    parser.add_argument(
        "--preset", default="ad2-small", choices=preset_names(),
        help="flow architecture (default ad2-small). The -small presets are sized for a CPU and use internal "
        "coordinates; the paper's presets (ad2, al3, ...) are Cartesian and sized for a GPU",
    )
    parser.add_argument(
        "--representation", choices=REPRESENTATIONS, default=None,
        help="what the flow models: internal (Z-matrix bonds, angles, dihedrals) or cartesian (the paper's); "
        "default: the preset's",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=defaults.epochs, help=f"passes over the data (default {defaults.epochs})")
    length.add_argument("--steps", type=int, default=None, help="optimiser steps (instead of --epochs)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="fraction of steps warming up the lr")
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--val-frames", type=int, default=defaults.val_frames, help="held-out frames scored per epoch")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--keep-last", action="store_true",
        help="save the last EMA weights instead of those of the epoch with the lowest validation NLL",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> dict:
    import torch

    from openmm_sbg import distributed
    from openmm_sbg.flow import TrainOptions, get_preset, train

    train_function = train
    if distributed.is_launched():
        # Under torchrun: DistributedDataParallel, same checkpoint, written by rank 0.
        from openmm_sbg.distributed.ddp_train import train_distributed as train_function

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    target = target_from_args(args)
    from openmm_sbg.data import training_frames

    train_positions, val_positions, held_out = training_frames(args.data, target)
    config = get_preset(args.preset)
    if args.representation is not None:
        config = dataclasses.replace(config, representation=args.representation)
    options = TrainOptions(
        epochs=args.epochs,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        seed=args.seed,
        val_frames=args.val_frames,
        select_best=not args.keep_last,
    )
    flow = train_function(
        train_positions,
        val_positions,
        target=target,
        config=config,
        options=options,
        checkpoint_path=args.out,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
        metadata={"data": [os.fspath(path) for path in args.data], "validation": held_out, "preset": args.preset},
    )
    record = flow.metadata
    return {
        "out": os.fspath(args.out),
        "system": target.name,
        "n_atoms": flow.n_atoms,
        "preset": args.preset,
        "representation": config.representation,
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


def progress_path(args: argparse.Namespace) -> str:
    """The checkpoint an interrupted run resumes from (written after every epoch)."""
    return args.out
