"""Force-field throughput: batched torch backend vs OpenMM, in configurations per second.

Compares, in one run and on one machine:

- ``torch-f32`` / ``torch-f64``: :class:`~openmm_sbg.energy.TorchForceField` on CPU (and on
  CUDA when available), energies and forces for the whole batch in one call;
- ``openmm-loop``: one OpenMM Context on the CPU platform, a Python loop over the batch
  (the paper's approach);
- ``openmm-pool``: :class:`~openmm_sbg.energy.ProcessPoolBackend`, one single-threaded CPU
  Context per core.

Run ``python benchmarks/energy.py`` (a few minutes); it rewrites the "Energy backends"
section of ``benchmarks/RESULTS.md`` and leaves the other sections alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from openmm_sbg import systems
from openmm_sbg.energy import (
    EnergyBackend,
    OpenMMBackend,
    ProcessPoolBackend,
    TorchForceField,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, write_section  # noqa: E402

HEADING = "### Energy backends"
#: The one-Context loop costs the same per configuration at every batch size, so it is timed
#: on at most this many configurations (keeps the run to minutes).
LOOP_SAMPLE = 256


def throughput(backend: EnergyBackend, x: torch.Tensor, min_seconds: float) -> float:
    """Configurations per second of ``backend.energy_and_forces(x)``, averaged over calls.

    The mean (not the best call) so that short and long calls see the same share of a
    shared machine's load.
    """
    start = time.perf_counter()
    backend.energy_and_forces(x)  # warm-up: parameter copies, allocator, thread pools, compilation
    warm_up = time.perf_counter() - start
    if warm_up > 5:
        print(f"  first call of {backend.name} ({x.dtype}, {x.device}): {warm_up:.0f} s", flush=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        backend.energy_and_forces(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        calls += 1
    return calls * x.shape[0] / (time.perf_counter() - start)


def run(names: list[str], batch_sizes: list[int], min_seconds: float) -> str:
    rows = []
    for name in names:
        target = systems.get(name, backend="openmm")
        system = target.system
        rng = np.random.default_rng(0)
        x_all = torch.from_numpy(target.positions[None] + 0.02 * rng.normal(size=(max(batch_sizes), target.n_atoms, 3)))
        torch_backends = {"": TorchForceField(system), "-compiled": TorchForceField(system, compile=True)}
        loop = OpenMMBackend(system, "CPU")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        with ProcessPoolBackend(system, platform="CPU") as pool:
            pool.energy_and_forces(x_all[: pool.n_workers])  # start the workers outside the timings
            for batch in batch_sizes:
                x = x_all[:batch]
                # Timed next to the others in every row: the load of a shared machine drifts.
                row = {"system": name, "batch": batch, "openmm-loop": throughput(loop, x[:LOOP_SAMPLE], min_seconds)}
                for device in devices:
                    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
                        for variant, backend in torch_backends.items():
                            suffix = variant + ("" if device == "cpu" else "-cuda")
                            row[f"torch-{tag}{suffix}"] = throughput(backend, x.to(device, dtype), min_seconds)
                row["openmm-pool"] = throughput(pool, x, min_seconds)
                rows.append(row)
                print(", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return summary(rows) + "\n\n" + table(rows)


def summary(rows: list[dict], batch: int = 1024, target: float = 30.0) -> str:
    """One line per system: speed-ups over the one-Context loop at ``batch``, against the target."""
    lines = []
    for row in (r for r in rows if r["batch"] == batch):
        ratios = {c: row[c] / row["openmm-loop"] for c in row if c.startswith(("torch", "openmm-pool"))}
        best = max(ratios, key=ratios.get)
        verdict = "meets" if ratios[best] >= target else "misses"
        listed = ", ".join(f"{c} {v:.1f}x" for c, v in ratios.items())
        lines.append(f"- {row['system']}, batch {batch}: {listed}; best ({best}) {verdict} the {target:g}x target.")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if c not in ("system", "batch")]
    torch_columns = [c for c in columns if c.startswith("torch")]
    head = ["system", "batch", *columns, *[f"{c} / loop" for c in torch_columns], "pool / loop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["system"], str(row["batch"]), *[f"{row[c]:,.0f}" for c in columns]]
        cells += [f"{row[c] / row['openmm-loop']:.1f}x" for c in torch_columns]
        cells.append(f"{row['openmm-pool'] / row['openmm-loop']:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", default=["ad2", "al6"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time spent per measurement")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    info = machine()
    print(info, flush=True)
    results = run(args.systems, args.batch_sizes, args.min_seconds)
    body = f"""Configurations per second for energies + forces (`python benchmarks/energy.py`), measured in
one run. Machine: {info}.

Each number is the mean over repeated calls for at least {args.min_seconds:g} s. `openmm-loop`
is one OpenMM Context on the CPU platform called once per configuration (the paper's
approach; timed in every row on at most {LOOP_SAMPLE} configurations, as its cost per
configuration does not depend on the batch). `openmm-pool` is `ProcessPoolBackend` with one single-threaded CPU
Context per core. `torch-f32`/`torch-f64` are `TorchForceField` in float32/float64; `-compiled` adds `compile=True` (`torch.compile`; its one-off compilation
is excluded, and batches smaller than one chunk are padded to it). The machine is shared,
so absolute numbers vary from run to run; the ratios are measured side by side.

{results}
"""
    print(results)
    if not args.no_write:
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
