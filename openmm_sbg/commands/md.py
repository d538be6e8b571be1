"""``openmm-sbg md``: Langevin dynamics to make training and reference data.

OpenMM runs one trajectory (and openmmtools the replica exchange); ``--walkers N`` runs N walkers
together on the torch force field (:mod:`openmm_sbg.dynamics`), with the same output.
"""

from __future__ import annotations

import argparse

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "run MD (OpenMM, or --walkers N batched on the torch force field; resumable) and write frames, energies and train/val/test splits"


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
    batched = parser.add_argument_group(
        "batched engine: many walkers integrated together on the torch force field (the same LangevinMiddle "
        "scheme as OpenMM; several times the MD per core)"
    )
    batched.add_argument("--walkers", type=int, default=None, metavar="N",
                         help="run N walkers in one batch (--ns is per walker; with --replica-exchange, N copies of the "
                              "ladder). Without it, OpenMM runs one trajectory")
    batched.add_argument("--device", default="cpu", help="torch device of the batched engine: cpu or cuda (default cpu)")
    batched.add_argument("--precision", choices=["float32", "float64"], default="float32",
                         help="float type of the batched engine (default float32)")
    batched.add_argument("--compile", action="store_true",
                         help="torch.compile the batched engine: tens of seconds once, then ~3x faster on a CPU")
    batched.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads of the batched engine (default: 1 on a CPU, where its batches run 2-3x "
                              "faster on one thread than on two; torch's choice on a GPU)")
    batched.add_argument("--start-spread", action="store_true",
                         help="with --start: start the walkers from frames spread over the whole file (e.g. earlier MD, "
                              "replica exchange or flow samples) instead of all from --start-frame")
    exchange = parser.add_argument_group(
        "temperature replica exchange (openmmtools; in the batch with --walkers), for data that covers basins plain MD does not reach"
    )
    exchange.add_argument("--replica-exchange", action="store_true",
                          help="run replicas on a geometric temperature ladder; OUT holds the lowest (target) temperature's frames")
    exchange.add_argument("--t-max", type=float, default=600.0, help="highest temperature of the ladder, K (default 600)")
    exchange.add_argument("--n-replicas", type=int, default=8, help="temperatures in the ladder (default 8)")
    exchange.add_argument("--all-replicas", action="store_true", help="also write every replica's frames with their temperatures (OUT stem + -all-replicas, same format; `train` takes it)")
    exchange.add_argument("--exchange-interval-ps", type=float, default=None,
                          help="with --walkers: time between exchange attempts (default: --frame-interval-ps)")


def run(args: argparse.Namespace) -> dict:
    from openmm_sbg.md import MDConfig, run_md

    target = target_from_args(args)
    if args.start_spread and (args.start is None or args.walkers is None):
        raise ValueError("--start-spread needs --start TRAJ and --walkers N")
    if args.start is not None and not args.start_spread:
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
    if args.walkers is not None:
        return _run_batched(args, target, config)
    if args.exchange_interval_ps is not None:
        raise ValueError("--exchange-interval-ps needs --walkers (the openmmtools replica exchange swaps once per frame)")
    if args.replica_exchange:
        return _run_replica_exchange(args, target, config)
    return run_md(target, args.out, config, platform=args.platform, progress=not args.no_progress).to_dict()


def _run_batched(args: argparse.Namespace, target, config) -> dict:
    """``--walkers N``: the batched engine (plain MD or in-batch replica exchange)."""
    from openmm_sbg.dynamics import EngineOptions, run_batched_md, run_batched_replica_exchange

    if args.walkers < 1:
        raise ValueError(f"--walkers must be at least 1, got {args.walkers}")
    options = EngineOptions(device=args.device, precision=args.precision, compile=args.compile, threads=args.threads)
    start = _spread_frames(args.start, target, args.walkers) if args.start_spread else None
    progress = not args.no_progress
    if not args.replica_exchange:
        return run_batched_md(target, args.out, config, args.walkers, start=start, options=options, progress=progress).to_dict()
    interval = None
    if args.exchange_interval_ps is not None:
        interval = round(args.exchange_interval_ps * 1000 / args.timestep_fs)
        if interval < 1:
            raise ValueError("--exchange-interval-ps is shorter than one timestep")
    return run_batched_replica_exchange(
        target, args.out, _ladder_config(args, target, config), n_copies=args.walkers, exchange_interval_steps=interval,
        start=start, options=options, all_replicas=args.all_replicas, progress=progress,
    ).to_dict()


def _spread_frames(path: str, target, n: int):
    """``n`` frames of ``path`` evenly spread over it (repeating if it has fewer), nm."""
    import numpy as np

    frames = _load_start(path, target).xyz
    return frames[np.linspace(0, len(frames) - 1, n).round().astype(int)].astype(float)


def _load_start(path: str, target):
    """The trajectory ``path`` (any file mdtraj reads), checked against the target's atoms."""
    import os

    import mdtraj

    if not os.path.exists(path):
        raise FileNotFoundError(f"--start {path}: no such file")
    # Files without their own topology (DCD, XTC) take the system's.
    own_topology = path.endswith((".h5", ".pdb"))
    traj = mdtraj.load(path) if own_topology else mdtraj.load(path, top=mdtraj.Topology.from_openmm(target.topology))
    if traj.n_atoms != target.n_atoms:
        raise ValueError(f"--start {path} has {traj.n_atoms} atoms; the system has {target.n_atoms}: give a frame of this molecule")
    return traj


def _start_positions(path: str, frame: int, target):
    """Positions (nm) of one frame of ``path``, checked against the target's atoms."""
    traj = _load_start(path, target)
    if not -len(traj) <= frame < len(traj):
        raise ValueError(f"--start-frame {frame} is outside {path}'s {len(traj)} frames")
    return traj.xyz[frame].astype(float)


def _run_replica_exchange(args: argparse.Namespace, target, config) -> dict:
    from openmm_sbg.replica_exchange import run_replica_exchange

    return run_replica_exchange(
        target, args.out, _ladder_config(args, target, config), platform=args.platform or "Reference",
        all_replicas=args.all_replicas, progress=not args.no_progress,
    ).to_dict()


def _ladder_config(args: argparse.Namespace, target, config):
    """The geometric ladder from the target's temperature to --t-max, with the run's MD settings."""
    from openmm import unit

    from openmm_sbg.replica_exchange import ReplicaExchangeConfig, geometric_ladder

    ladder = geometric_ladder(target.temperature.value_in_unit(unit.kelvin), args.t_max, args.n_replicas)
    return ReplicaExchangeConfig(md=config, temperatures_K=ladder)


def progress_path(args: argparse.Namespace) -> str:
    """Where an interrupted run keeps its frames and OpenMM checkpoint."""
    return f"{args.out}.work/"
