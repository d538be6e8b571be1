"""Batched MD on the torch force field against one OpenMM Context: throughput per core, and does it sample the same?

Two parts, one thread each (``torch.set_num_threads(1)``, OpenMM CPU platform ``Threads=1``):

1. **Throughput**: aggregate Langevin steps per second (and ns/day at 1 fs) of the batched
   engine (:class:`~openmm_sbg.dynamics.BatchedLangevin`, float32, eager and ``torch.compile``)
   by batch size, against one OpenMM Context with ``LangevinMiddleIntegrator`` on the Reference
   and CPU platforms, for ad2, al4 and al6.
2. **Sampling on ad2**: batched walkers (from the minimised structure, a long unrecorded
   equilibration, then recorded) against OpenMM MD (the shipped 10 ns reference,
   ``openmm_sbg/reference/ad2-ref.h5``, same force field and integrator settings): E-W2 and
   T-W2 between them next to each side's own half-against-half noise floor (two halves of the
   walkers; the two 5 ns halves of the OpenMM run), and the backbone-state populations with
   standard errors (walker groups; 1 ns blocks of the OpenMM run).

Writes ``benchmarks/results/batched_md.json``. About 6 minutes on one loaded core:
``nice python benchmarks/batched_md.py`` (``--quick`` checks the script in a minute).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import h5py
import numpy as np
import openmm
import torch
from openmm import unit

from openmm_sbg import data, metrics, populations, systems
from openmm_sbg.dynamics import BatchedLangevin, batched_force_field, minimised_structure, system_masses
from openmm_sbg.md import MDConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import WORK, command_line, load_json, machine, save_json  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openmm_sbg", "reference", "ad2-ref.h5")


def openmm_steps_per_s(target, positions, platform: str, min_seconds: float) -> float:
    """Langevin steps per second of one OpenMM Context (1 fs, friction 1/ps, the target's temperature)."""
    integrator = openmm.LangevinMiddleIntegrator(target.temperature, 1 / unit.picosecond, 1 * unit.femtosecond)
    properties = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(target.system, integrator, openmm.Platform.getPlatformByName(platform), properties)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(target.temperature, 1)
    integrator.step(100)
    steps, block, start = 0, 100, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        integrator.step(block)
        steps += block
        block = min(block * 2, 5000)
    return steps / (time.perf_counter() - start)


def batched_steps_per_s(target, positions, batch: int, compile: bool, min_seconds: float) -> tuple[float, float]:
    """Aggregate walker-steps per second of the batched engine (float32), and its first-call (compile) seconds."""
    started = time.perf_counter()
    engine = BatchedLangevin(batched_force_field(target.system, batch, compile=compile), system_masses(target.system),
                             np.repeat(positions[None], batch, 0), target.temperature, seed=0, compile=compile)
    engine.step(2)
    first_call = time.perf_counter() - started
    steps, block, start = 0, 2, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        engine.step(block)
        steps += block
        block = min(block * 2, 50)
    return steps * batch / (time.perf_counter() - start), first_call


def throughput(names, batches, compiled_batches, min_seconds: float) -> list[dict]:
    rows = []
    for name in names:
        target = systems.get(name, platform="Reference")
        x0 = minimised_structure(target)
        openmm_rates = {p: openmm_steps_per_s(target, x0, p, min_seconds) for p in ("Reference", "CPU")}
        best = max(openmm_rates.values())
        print(f"{name}: OpenMM Reference {openmm_rates['Reference']:,.0f}, CPU {openmm_rates['CPU']:,.0f} steps/s", flush=True)
        for batch in batches:
            for compile in (False, True):
                if compile and batch not in compiled_batches.get(name, ()):
                    continue
                rate, first = batched_steps_per_s(target, x0, batch, compile, min_seconds)
                row = {"system": name, "atoms": target.n_atoms, "batch": batch, "engine": "compiled" if compile else "eager",
                       "steps_per_s": rate, "ns_per_day": rate * 1e-6 * 86400, "first_call_s": first,
                       "openmm_reference_steps_per_s": openmm_rates["Reference"], "openmm_cpu_steps_per_s": openmm_rates["CPU"],
                       "ratio_to_best_openmm": rate / best}
                rows.append(row)
                print(f"  batch {batch:5d} {row['engine']:8s} {rate:>10,.0f} steps/s  {rate / best:5.1f}x best OpenMM"
                      f"  (first call {first:.0f} s)", flush=True)
    return rows


def _block_populations(labels: np.ndarray, n_blocks: int) -> tuple[list, list]:
    blocks = [populations.state_populations(part, 3) for part in np.array_split(labels, n_blocks)]
    mean, error = populations.combine_repeats(blocks)
    return mean.tolist(), error.tolist()


def sampling(walkers: int, equilibration_ps: float, recorded_ps: float, frame_ps: float, compile: bool) -> dict:
    """Batched walkers against the shipped OpenMM reference on ad2."""
    from openmm_sbg.dynamics import EngineOptions, run_batched_md

    target = systems.get("ad2", platform="Reference")
    config = MDConfig(n_frames=round(recorded_ps / frame_ps), steps_per_frame=round(frame_ps * 1000),
                      equilibration_steps=round(equilibration_ps * 1000), frames_per_checkpoint=10_000, seed=11)
    out = str(WORK / "batched_md-ad2.h5")
    if os.path.exists(out):
        os.remove(out)
    started = time.perf_counter()
    summary = run_batched_md(target, out, config, walkers, options=EngineOptions(compile=compile), progress=False)
    wall = time.perf_counter() - started
    labeller = populations.backbone_state_labeller(target.topology)

    batched_traj = data.load_trajectory(out)
    batched_angles = metrics.backbone_dihedrals(batched_traj)
    batched_energy = data.read_metadata(out)["energies_kT"]
    with h5py.File(out, "r") as handle:
        batched_walker = handle["walker"][()]
    batched_labels = labeller(batched_traj.xyz)
    reference_traj = data.load_trajectory(REFERENCE)
    reference_angles = metrics.backbone_dihedrals(reference_traj)
    reference_energy = data.read_metadata(REFERENCE)["energies_kT"]
    reference_labels = labeller(reference_traj.xyz)

    first, second = batched_walker < walkers // 2, batched_walker >= walkers // 2
    half = len(reference_energy) // 2
    t_w2 = lambda a, b: metrics.torus_w2(a, b, max_samples=2000, draws=3)  # noqa: E731
    result = {
        "walkers": walkers, "equilibration_ps": equilibration_ps, "recorded_ps_per_walker": recorded_ps,
        "frame_interval_ps": frame_ps, "batched_frames": int(len(batched_energy)),
        "batched_simulated_ns": summary.simulated_ns_total * (1 + equilibration_ps / recorded_ps),
        "batched_wall_s": wall, "kinetic_temperature_ratio": summary.kinetic_temperature_ratio,
        "reference": "openmm_sbg/reference/ad2-ref.h5 (OpenMM Reference, 10 ns, frames every 2 ps)",
        "reference_frames": int(len(reference_energy)),
        "e_w2": metrics.energy_w2(batched_energy, reference_energy),
        "e_w2_floor_batched_halves": metrics.energy_w2(batched_energy[first], batched_energy[second]),
        "e_w2_floor_openmm_halves": metrics.energy_w2(reference_energy[:half], reference_energy[half:]),
        "t_w2": t_w2(batched_angles, reference_angles),
        "t_w2_floor_batched_halves": t_w2(batched_angles[first], batched_angles[second]),
        "t_w2_floor_openmm_halves": t_w2(reference_angles[:half], reference_angles[half:]),
        "mean_energy_kT": {"batched": float(batched_energy.mean()), "openmm": float(reference_energy.mean())},
        "states": list(populations.BACKBONE_STATES),
    }
    # Errors: walkers are independent (16 groups of walkers); the OpenMM run in 10 blocks of 1 ns.
    groups = [populations.state_populations(batched_labels[np.isin(batched_walker, g)], 3)
              for g in np.array_split(np.arange(walkers), 16)]
    mean, error = populations.combine_repeats(groups)
    result["populations_batched"], result["populations_batched_error"] = mean.tolist(), error.tolist()
    result["populations_openmm"], result["populations_openmm_error"] = _block_populations(reference_labels, 10)
    difference = np.array(result["populations_batched"]) - np.array(result["populations_openmm"])
    combined = np.hypot(result["populations_batched_error"], result["populations_openmm_error"])
    result["population_difference_in_errors"] = np.divide(difference, combined, out=np.zeros(3), where=combined > 0).tolist()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["ad2", "al4", "al6"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timing per row")
    parser.add_argument("--walkers", type=int, default=128, help="walkers of the sampling check")
    parser.add_argument("--equilibration-ps", type=float, default=40.0)
    parser.add_argument("--recorded-ps", type=float, default=30.0, help="recorded per walker")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only (no torch.compile)")
    parser.add_argument("--sampling-only", action="store_true",
                        help="rerun the sampling check only, keeping the throughput rows of results/batched_md.json")
    parser.add_argument("--quick", action="store_true", help="a one-minute check of the script (numbers not saved)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.systems, args.batches, args.min_seconds = ["ad2"], [64], 0.5
        args.walkers, args.equilibration_ps, args.recorded_ps, args.no_compile = 32, 1.0, 2.0, True
    print(machine(), flush=True)
    compiled = {} if args.no_compile else {"ad2": set(args.batches), "al4": {max(args.batches)}, "al6": {max(args.batches)}}
    if args.sampling_only:
        previous = load_json("batched_md.json")
        rows, throughput_machine = previous["throughput"], previous.get("throughput_machine", previous["machine"])
    else:
        rows, throughput_machine = throughput(args.systems, args.batches, compiled, args.min_seconds), machine()
    check = sampling(args.walkers, args.equilibration_ps, args.recorded_ps, 0.5, compile=not args.no_compile)
    for key, value in check.items():
        print(f"  {key}: {value}", flush=True)
    results = {"machine": machine(), "command": command_line("batched_md.py", argv), "threads": 1,
               "throughput_machine": throughput_machine, "throughput": rows, "sampling_ad2": check}
    if not args.quick:
        print("wrote", save_json("batched_md.json", results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
