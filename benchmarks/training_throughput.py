"""Training throughput: optimiser steps per second of one model on one data set, eager against compiled, 1 and 2 threads.

The model is the shipped ``ad2``'s architecture (internal coordinates, spline blocks) trained from
scratch on frames the shipped flow draws (so the benchmark needs no MD), batch 256, the
``openmm-sbg run`` learning rate. Each variant trains the same steps from the same seed; the rate
counts the steps after ``--warmup`` (which holds the compilation), validation included as in a
real run. The validation NLL each variant ends with shows the result is the same model.

Run: ``nice python benchmarks/training_throughput.py`` on an otherwise idle machine; writes
``results/training_throughput.json`` and the "Training throughput" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, header, machine, publish  # noqa: E402

HEADING = "### Training throughput"
VARIANTS = (("eager", 1), ("eager", 2), ("compiled", 1), ("compiled", 2))


def frames(n: int, seed: int):
    from openmm_sbg.flow import TarFlow

    flow = TarFlow.load("ad2")
    x, _ = flow.sample(n, generator=torch.Generator().manual_seed(seed))
    return flow.target(), flow.config, x.double().numpy()


def one_variant(target, config, positions, mode: str, threads: int, steps: int, warmup: int, batch_size: int) -> dict:
    from openmm_sbg.flow import TrainOptions, train

    torch.set_num_threads(threads)
    stamps: dict[int, float] = {}
    options = TrainOptions(steps=steps, batch_size=batch_size, lr=1e-3, seed=0, val_frames=1024)
    n_val = len(positions) // 8
    flow = train(positions[n_val:], positions[:n_val], target=target, config=config, options=options, progress=False,
                 compile=mode == "compiled", callback=lambda step, loss: stamps.__setitem__(step, time.perf_counter()))
    rate = (steps - warmup) / (stamps[steps] - stamps[warmup])
    return {"mode": mode, "threads": threads, "steps_per_s": rate, "seconds_per_step": 1 / rate,
            "first_steps_seconds": stamps[warmup] - min(stamps.values()),
            "val_nll_per_dim": flow.metadata["history"][-1]["val_nll_per_dim"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20, help="steps not timed (compilation happens in the first)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    target, config, positions = frames(args.frames, seed=0)
    results = {"machine": machine(), "command": command_line("training_throughput.py", argv), "config": config.to_dict(),
               "frames": args.frames, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "variants": []}
    for mode, threads in VARIANTS:
        results["variants"].append(one_variant(target, config, positions, mode, threads, args.steps, args.warmup, args.batch_size))
        print(results["variants"][-1], flush=True)
    baseline = results["variants"][0]["steps_per_s"]
    for row in results["variants"]:
        row["speedup"] = row["steps_per_s"] / baseline
    publish(results, "training_throughput.json", HEADING, report(results), write=not args.no_write)


def report(results: dict) -> str:
    lines = header(results, f"The shipped ad2's architecture from scratch on {results['frames']} frames of the shipped flow, "
                   f"batch {results['batch_size']}, {results['steps']} steps of which the first {results['warmup']} are not "
                   "timed; the same seed in every row.",
                   ["loss", "torch threads", "steps/s", "speed-up", "validation NLL / dim after the run"])
    for row in results["variants"]:
        lines.append(f"| {row['mode']} | {row['threads']} | {row['steps_per_s']:.2f} | {row['speedup']:.2f}x | "
                     f"{row['val_nll_per_dim']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
