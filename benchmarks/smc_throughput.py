"""Throughput of one SMC step (particles per second) on ad2: batched force field vs the paper's loop.

One SMC move (``ula_step``) evaluates, for every particle, the flow's energy and gradient
(``-log q`` by autograd, one batched torch call) and the force field's energy and forces.
This script times that move for the same flow, particles and run with two force-field paths:

- ``batched``: :class:`~openmm_sbg.energy.TorchForceField`, the whole batch in one call (ours);
- ``openmm-loop``: :class:`~openmm_sbg.energy.OpenMMBackend`, one OpenMM Context called once
  per particle in a Python loop (the paper's approach), on the Reference platform (for 22
  atoms faster here than the CPU platform, whose force-field speed is timed too).

It also times the flow alone and each force field alone, which explains the ratio: the
whole-step speed-up is bounded by the flow's share of the step. Flows: the paper-sized
``ad2`` preset (width 256, 4 blocks x 4 layers, one token per coordinate) and ``ad2-small``,
with untrained weights (cost does not depend on the weights). Particles are MD frames.

Run: ``nice python benchmarks/smc_throughput.py`` (~7 minutes on 2 shared cores); it writes
``benchmarks/results/smc_throughput.json`` and the "SMC throughput" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, command_line, header, machine, publish  # noqa: E402

HEADING = "### SMC throughput"


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(preset: str, x: torch.Tensor, repeats: int, step_size: float) -> dict:
    """Median seconds of each timed call; the calls are interleaved round by round so that
    every column sees the same share of a shared machine's load."""
    from openmm_sbg import SMCSampler, TarFlow, systems
    from openmm_sbg.flow.symmetry import centred_std
    from openmm_sbg.smc.proposal import source_energy

    targets = {
        "batched": systems.get("ad2", backend="torch"),
        "openmm-loop Reference": systems.get("ad2", backend="openmm", platform="Reference"),
        "openmm-loop CPU": systems.get("ad2", backend="openmm", platform="CPU"),
    }
    torch.manual_seed(0)
    flow = TarFlow(preset, target=targets["batched"], std=centred_std(x.numpy()))
    n = len(x)
    noise = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    uniform = torch.rand(n, dtype=torch.float64)
    calls = {"flow": lambda: source_energy(flow, x, True)}
    for name, target in targets.items():
        calls[f"ff {name}"] = lambda target=target: target.energy_and_forces(x)
    for name in ("batched", "openmm-loop Reference"):
        sampler = SMCSampler(targets[name], flow, n_particles=n, n_steps=10, batch_size=n, progress=False)
        state = sampler.potential(x)
        calls[f"step {name}"] = lambda sampler=sampler, state=state: sampler.kernel(state, 0.5, sampler.potential, step_size, noise, uniform)
    times = {key: [] for key in calls}
    for round_ in range(repeats + 1):  # round 0 warms up
        for key, call in calls.items():
            elapsed = seconds(call)
            if round_:
                times[key].append(elapsed)
    median = {key: float(np.median(values)) for key, values in times.items()}
    row = {"preset": preset, "particles": n, "flow_parameters": sum(p.numel() for p in flow.parameters()), "seconds": times}
    row.update({f"{key} s": value for key, value in median.items()})
    row["step_batched"] = n / median["step batched"]
    row["step_loop"] = n / median["step openmm-loop Reference"]
    row["ratio"] = row["step_batched"] / row["step_loop"]
    row["flow_share_batched"] = median["flow"] / median["step batched"]
    print({k: v for k, v in row.items() if k != "seconds"}, flush=True)
    return row


def report(results: dict) -> str:
    lines = header(
        results,
        f"One SMC move (`ula_step`: flow energy + gradient and force-field "
        f"energy + forces for every particle, plus the Langevin update) on {results['particles']} ad2 MD frames, batch = all "
        f"particles, median of {results['repeats']} rounds after a warm-up round, the calls of each round interleaved; flows with untrained weights, float32; torch with "
        f"{results['threads']} thread(s). `openmm-loop` is one OpenMM Context called per particle (the paper's approach) "
        "on the Reference platform, the faster one for this 22-atom system here (the CPU platform's force-field-only speed is shown too). "
        "Same flow, particles and process for both columns.",
    ) + [
        "",
        "| flow preset | parameters | SMC step, batched (particles/s) | SMC step, openmm-loop Reference (particles/s) | ratio | "
        "flow alone (particles/s) | force field alone: batched / loop Reference / loop CPU (particles/s) | flow share of batched step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        n = row["particles"]
        lines.append(
            f"| {row['preset']} | {row['flow_parameters'] / 1e6:.2f} M | {row['step_batched']:,.0f} | "
            f"{row['step_loop']:,.0f} | {row['ratio']:.2f}x | {n / row['flow s']:,.0f} | "
            f"{n / row['ff batched s']:,.0f} / {n / row['ff openmm-loop Reference s']:,.0f} / "
            f"{n / row['ff openmm-loop CPU s']:,.0f} | {100 * row['flow_share_batched']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["ad2-small", "ad2"])
    parser.add_argument("--data", default=None, help="MD file to take particles from (default: the shipped ad2 reference)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from openmm_sbg import data, shipped
    from openmm_sbg.smc import DEFAULT_STEP_SIZE

    path = args.data or shipped.reference_path("ad2")
    frames = data.load_positions(path)
    index = np.linspace(0, len(frames) - 1, args.particles).astype(int)
    x = torch.as_tensor(frames[index].astype(np.float64))
    results = {
        "machine": machine(),
        "command": command_line("smc_throughput.py", argv),
        "particles": args.particles,
        "repeats": args.repeats,
        "threads": args.threads,
        "data": os.path.relpath(path, ROOT),
        "rows": [measure(preset, x, args.repeats, DEFAULT_STEP_SIZE) for preset in args.presets],
    }
    publish(results, "smc_throughput.json", HEADING, report(results), write=not args.no_results)


if __name__ == "__main__":
    main()
