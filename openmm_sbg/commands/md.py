"""``openmm-sbg md``: OpenMM Langevin dynamics to make training and reference data."""

from __future__ import annotations

import argparse

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "run OpenMM MD (resumable) and write frames, energies and train/val/test splits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_system_arguments(parser)
    parser.add_argument("--ns", type=float, required=True, help="simulated time to record, in ns")
    parser.add_argument("--out", required=True, help="output trajectory (.h5, .dcd or .xtc)")
    parser.add_argument("--frame-interval-ps", type=float, default=0.5, help="time between saved frames (ps)")
    parser.add_argument("--timestep-fs", type=float, default=1.0, help="integration timestep (fs); unconstrained: keep 1")
    parser.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    parser.add_argument("--equilibration-ps", type=float, default=10.0, help="unrecorded equilibration (ps)")
    parser.add_argument("--checkpoint-frames", type=int, default=200, help="frames between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="fractions of contiguous time blocks (default 0.8 0.1 0.1)")
    parser.add_argument("--start", metavar="TRAJ",
                        help="start from a frame of this trajectory (any file mdtraj reads, same atoms) instead of "
                             "the system's structure: e.g. to sample a basin that a replica-exchange run found")
    parser.add_argument("--start-frame", type=int, default=0, help="frame of --start to begin from (negative counts from the end)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    exchange = parser.add_argument_group(
        "temperature replica exchange (openmmtools), for data that covers basins plain MD does not reach"
    )
    exchange.add_argument("--replica-exchange", action="store_true",
                          help="run replicas on a geometric temperature ladder; OUT holds the lowest (target) temperature's frames")
    exchange.add_argument("--t-max", type=float, default=600.0, help="highest temperature of the ladder, K (default 600)")
    exchange.add_argument("--n-replicas", type=int, default=8, help="temperatures in the ladder (default 8)")
    exchange.add_argument("--all-replicas", action="store_true", help="also write every replica's frames with their temperatures (OUT stem + -all-replicas, same format; `train` takes it)")


def run(args: argparse.Namespace) -> dict:
    from openmm_sbg.md import MDConfig, run_md

    target = target_from_args(args)
    if args.start is not None:
        target.positions = _start_positions(args.start, args.start_frame, target)
    steps_per_frame = round(args.frame_interval_ps * 1000 / args.timestep_fs)
    n_frames = round(args.ns * 1000 / args.frame_interval_ps)
    if steps_per_frame < 1 or n_frames < 1:
        raise ValueError("--ns and --frame-interval-ps give no frames; raise --ns or lower --frame-interval-ps")
    config = MDConfig(
        n_frames=n_frames,
        steps_per_frame=steps_per_frame,
        timestep_fs=args.timestep_fs,
        friction_per_ps=args.friction,
        equilibration_steps=round(args.equilibration_ps * 1000 / args.timestep_fs),
        frames_per_checkpoint=args.checkpoint_frames,
        seed=args.seed,
        split_fractions=tuple(args.split),
    )
    if args.replica_exchange:
        return _run_replica_exchange(args, target, config)
    return run_md(target, args.out, config, platform=args.platform, progress=not args.no_progress)


def _start_positions(path: str, frame: int, target):
    """Positions (nm) of one frame of ``path``, checked against the target's atoms."""
    import os

    import mdtraj

    if not os.path.exists(path):
        raise FileNotFoundError(f"--start {path}: no such file")
    # Files without their own topology (DCD, XTC) take the system's.
    own_topology = path.endswith((".h5", ".pdb"))
    traj = mdtraj.load(path) if own_topology else mdtraj.load(path, top=mdtraj.Topology.from_openmm(target.topology))
    if not -len(traj) <= frame < len(traj):
        raise ValueError(f"--start-frame {frame} is outside {path}'s {len(traj)} frames")
    traj = traj[frame]
    if traj.n_atoms != target.n_atoms:
        raise ValueError(f"--start {path} has {traj.n_atoms} atoms; the system has {target.n_atoms}: give a frame of this molecule")
    return traj.xyz[0].astype(float)


def _run_replica_exchange(args: argparse.Namespace, target, config) -> dict:
    from openmm import unit

    from openmm_sbg.replica_exchange import ReplicaExchangeConfig, geometric_ladder, run_replica_exchange

    ladder = geometric_ladder(target.temperature.value_in_unit(unit.kelvin), args.t_max, args.n_replicas)
    exchange = ReplicaExchangeConfig(md=config, temperatures_K=ladder)
    return run_replica_exchange(
        target, args.out, exchange, platform=args.platform or "Reference", all_replicas=args.all_replicas,
        progress=not args.no_progress,
    )


def progress_path(args: argparse.Namespace) -> str:
    """Where an interrupted run keeps its frames and OpenMM checkpoint."""
    return f"{args.out}.work/"
