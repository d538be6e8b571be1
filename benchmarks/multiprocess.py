"""Throughput of 1 vs 2 processes (torchrun, gloo on CPU): DDP training and sharded SMC.

``python benchmarks/multiprocess.py`` launches this file under ``torchrun`` with 1 and then 2
processes (one CPU thread each, so the comparison is of processes, not threads) and rewrites
the "Multi-process" section of ``benchmarks/RESULTS.md``, leaving the other sections alone.
Training: a small TarFlow on ad2 frames (global batch fixed, so 2 processes split each batch).
SMC: the same flow annealed to the ad2 force field, particle-steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, write_section  # noqa: E402

HEADING = "### Multi-process"
TRAIN_STEPS, BATCH, PARTICLES, SMC_STEPS = 22, 128, 256, 4


def worker(out: Path) -> None:
    """Runs in every process under torchrun: time training and sampling, rank 0 writes JSON."""
    from openmm_sbg import distributed, systems
    from openmm_sbg.distributed.ddp_train import train_distributed
    from openmm_sbg.distributed.sharded_smc import ShardedSMCSampler
    from openmm_sbg.flow import FlowConfig, TrainOptions

    context = distributed.init("cpu")
    torch.set_num_threads(1)
    target = systems.get("ad2", platform="Reference")
    rng = np.random.default_rng(0)
    frames = target.positions[None] + rng.normal(scale=0.01, size=(1200, target.n_atoms, 3))
    config = FlowConfig(width=64, n_blocks=4, layers_per_block=2, heads=1)
    stamps = {}

    def clock(step: int, loss: float) -> None:
        stamps[step] = time.perf_counter()

    # Timed from the end of step 2 to the last step: optimiser steps only, no start-up or validation.
    flow = train_distributed(frames[:1000], frames[1000:], target=target, config=config, callback=clock,
                             options=TrainOptions(steps=TRAIN_STEPS, batch_size=BATCH, lr=1e-3, val_frames=64), progress=False)
    train_seconds = (stamps[TRAIN_STEPS] - stamps[2]) / (TRAIN_STEPS - 2)
    sampler = ShardedSMCSampler(target, flow, n_particles=PARTICLES, n_steps=SMC_STEPS, batch_size=64, progress=False)
    started = time.perf_counter()
    sampler.run(seed=0)
    smc_seconds = time.perf_counter() - started
    if context.is_writer:
        out.write_text(json.dumps({"processes": context.world_size, "train_steps_per_s": 1 / train_seconds,
                                   "smc_particle_steps_per_s": PARTICLES * SMC_STEPS / smc_seconds}))
    distributed.shutdown()


def launch(processes: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                    __file__, "--worker", str(out)], env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = [launch(n, Path(tmp) / f"{n}.json") for n in (1, 2)]
    one, two = runs
    lines = [
        f"`python benchmarks/multiprocess.py` on {machine()}; gloo, one thread per process. Training: TarFlow width 64, 4x2 layers, ad2, "
        f"global batch {BATCH}, optimiser steps 3-{TRAIN_STEPS} (no start-up; with the per-epoch validation of 64 frames, which every process repeats). SMC: the same flow, "
        f"{PARTICLES} particles, {SMC_STEPS} ULA steps on the ad2 torch force field (whole run, including proposal "
        "draws). A shared machine: expect noise.",
        "",
        "| processes | training steps/s | SMC particle-steps/s |",
        "|---:|---:|---:|",
        *[f"| {run['processes']} | {run['train_steps_per_s']:.2f} | {run['smc_particle_steps_per_s']:.1f} |" for run in runs],
        f"| speed-up | {two['train_steps_per_s'] / one['train_steps_per_s']:.2f}x | "
        f"{two['smc_particle_steps_per_s'] / one['smc_particle_steps_per_s']:.2f}x |",
        "",
    ]
    body = "\n".join(lines)
    write_section(HEADING, body)
    print(body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path, metavar="OUT", help=argparse.SUPPRESS)  # set by launch()
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
    else:
        main()
