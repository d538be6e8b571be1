"""GPU fast paths: do they give the CPU float64 answers, and how fast are they? (run by gpu_check.sh)

For ad2 and al6 (flows of the paper's sizes, randomly initialised and perturbed away from the
identity; configurations are the built-in structure with 0.01 nm noise) it compares against
CPU float64:

- flow energy+grad ``-log q`` and its gradient: fp32 eager, bf16 autocast, torch.compile,
  torch.compile with CUDA graphs (:class:`~openmm_sbg.distributed.fast_paths.FastFlow`);
- force field energy+forces: the torch force field on the GPU in float64 and float32
  (:class:`~openmm_sbg.distributed.fast_paths.DeviceBackend`), OpenMM's CUDA platform;
- one SMC step (ULA move: flow and force field energies and gradients of every particle) with
  the same noise, in the combinations above;

- batched MD (:class:`~openmm_sbg.dynamics.BatchedLangevin`, walker-steps per second by batch):
  float32 and float64 (and float32 compiled) on the GPU, positions after a few steps against the
  same walkers integrated on the CPU in float64 (the counter-based noise is the same on every
  device), next to one OpenMM Context on the CUDA platform (``--md-only`` runs these rows alone);

and prints a table of throughputs with the largest errors. Exit status 1 if a check fails.
Without a GPU it runs the CPU rows only (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

from openmm_sbg import systems
from openmm_sbg.distributed.fast_paths import DeviceBackend, FastFlow
from openmm_sbg.dynamics import BatchedLangevin, batched_force_field, minimised_structure, system_masses
from openmm_sbg.energy import OpenMMBackend
from openmm_sbg.flow import TarFlow
from openmm_sbg.smc import SMCSampler, ula_step
from openmm_sbg.smc.proposal import source_energy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

#: Largest error allowed, relative to (1 + the largest reference magnitude): fp32 paths must
#: agree to round-off; bf16 keeps ~3 significant digits in the matrix products.
TOLERANCE = {"fp32": 1e-4, "f64": 1e-9, "bf16": 3e-2}
STEP_SIZE = 1e-6


def timed(fn, min_seconds: float, sync: bool) -> float:
    """Best wall time of ``fn()`` over repeats lasting ``min_seconds`` (after one warm-up call)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / (1 + reference.abs().max()))


def make_flow(target, preset: str) -> TarFlow:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = TarFlow(preset, target=target, std=0.15)
        for parameter in flow.parameters():  # away from the identity initialisation
            parameter.data.add_(0.02 * torch.randn_like(parameter))
    return flow.eval()


class Checker:
    def __init__(self, min_seconds: float, budget_s: float):
        self.rows: list[tuple] = []
        self.failed = False
        self.min_seconds = min_seconds
        self.deadline = time.perf_counter() + budget_s
        self.md_batches: list[int] = []

    def out_of_time(self, label: str) -> bool:
        if time.perf_counter() > self.deadline:
            self.rows.append((label, "skipped: time budget spent", "", "", ""))
            return True
        return False

    def add(self, label: str, rate: float, error: float | None, tolerance: float | None) -> None:
        ok = "" if error is None else ("ok" if error <= tolerance else "FAIL")
        self.failed |= ok == "FAIL"
        error_text = "" if error is None else f"{error:.1e}"
        tolerance_text = "" if tolerance is None else f"{tolerance:.0e}"
        self.rows.append((label, f"{rate:,.0f}", error_text, tolerance_text, ok))
        print(f"  {label:58s} {rate:>12,.0f} /s  err {error_text:>8s} {ok}", flush=True)

    def table(self) -> str:
        lines = ["| what | configurations/s | max rel. error vs CPU f64 | tolerance | check |", "|---|---:|---:|---:|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def check_system(name: str, batch: int, checker: Checker, cuda: bool) -> None:
    target = systems.get(name, platform="Reference")
    preset = "ad2" if name == "ad2" else "al6"
    generator = np.random.default_rng(0)
    x = torch.as_tensor(target.positions[None] + generator.normal(scale=0.01, size=(batch, target.n_atoms, 3)))
    sync = cuda
    flow = make_flow(target, preset)
    reference_flow = copy.deepcopy(flow).double()
    print(f"{name}: {target.n_atoms} atoms, flow preset {preset}, batch {batch}", flush=True)

    # ---------------------------------------------------------------- flow energy + grad
    e_ref, g_ref = source_energy(reference_flow, x)
    flows = {"cpu fp32": flow}
    if cuda:
        gpu_flow = copy.deepcopy(flow).cuda()
        flows.update(
            {
                "cuda fp32": gpu_flow,
                "cuda bf16 autocast": FastFlow(gpu_flow, autocast=torch.bfloat16),
                "cuda fp32 compile": FastFlow(gpu_flow, compile=True, batch_size=batch),
                "cuda bf16 compile + CUDA graphs": FastFlow(gpu_flow, autocast=torch.bfloat16, compile=True, cuda_graphs=True, batch_size=batch),
            }
        )
    else:
        flows["cpu bf16 autocast"] = FastFlow(flow, autocast=torch.bfloat16)
        flows["cpu fp32 compile"] = FastFlow(flow, compile=True, batch_size=batch)
    for label, variant in flows.items():
        if checker.out_of_time(f"{name} flow {label}"):
            continue
        started = time.perf_counter()
        e, g = source_energy(variant, x)  # first call: compiles where asked
        if time.perf_counter() - started > 5:
            print(f"  (first call of {label}: {time.perf_counter() - started:.0f} s)", flush=True)
        error = max(relative_error(e, e_ref), relative_error(g, g_ref))
        seconds = timed(lambda: source_energy(variant, x), checker.min_seconds, sync)
        checker.add(f"{name} flow energy+grad, {label}", batch / seconds, error, TOLERANCE["bf16" if "bf16" in label else "fp32"])

    # ---------------------------------------------------------------- force field
    u_ref, f_ref = target.energy_and_forces(x, allow_nonfinite=True)
    backends = {"cpu torch f64": target.backend}
    if cuda:
        backends["cuda torch f64"] = DeviceBackend(target.backend, "cuda", torch.float64)
        backends["cuda torch f32"] = DeviceBackend(target.backend, "cuda", torch.float32)
    for label, backend in backends.items():
        u, f = backend.energy_and_forces(x)
        error = max(relative_error(u / target.kT_kj_per_mol, u_ref), relative_error(f / target.kT_kj_per_mol, f_ref))
        seconds = timed(lambda: backend.energy_and_forces(x), checker.min_seconds, sync)
        checker.add(f"{name} force field, {label}", batch / seconds, error, TOLERANCE["f64" if "f64" in label else "fp32"])
    if cuda and "CUDA" in [openmm_platform_name(i) for i in range(openmm_platform_count())]:
        backend = OpenMMBackend(target.system, "CUDA")
        few = x[:64]
        u, f = backend.energy_and_forces(few)
        error = max(relative_error(u / target.kT_kj_per_mol, u_ref[:64]), relative_error(f / target.kT_kj_per_mol, f_ref[:64]))
        seconds = timed(lambda: backend.energy_and_forces(few), checker.min_seconds, False)
        checker.add(f"{name} force field, OpenMM CUDA (one Context, loop)", len(few) / seconds, error, TOLERANCE["fp32"])

    # ---------------------------------------------------------------- one SMC step
    noise = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    uniform = torch.rand(batch, dtype=torch.float64)

    def smc_step(proposal, on_gpu_ff: bool):
        step_target = copy.copy(target)
        if on_gpu_ff:
            step_target.backend = DeviceBackend(target.backend, "cuda", torch.float64)
        sampler = SMCSampler(step_target, proposal, n_particles=batch, n_steps=1, batch_size=batch, progress=False)
        state = sampler.potential(x)
        return lambda: ula_step(state, 0.5, sampler.potential, STEP_SIZE, noise, uniform)[0]

    x_ref = smc_step(reference_flow, False)().x
    steps = {"cpu fp32 flow, cpu f64 force field": (flow, False)}
    if cuda:
        steps["cuda fp32 flow, cpu f64 force field"] = (flows["cuda fp32"], False)
        steps["cuda fp32 flow, cuda f64 force field"] = (flows["cuda fp32"], True)
        steps["cuda bf16+compile+graphs flow, cuda f64 force field"] = (flows["cuda bf16 compile + CUDA graphs"], True)
    for label, (proposal, on_gpu_ff) in steps.items():
        if checker.out_of_time(f"{name} SMC step {label}"):
            continue
        step = smc_step(proposal, on_gpu_ff)
        error = relative_error(step().x, x_ref)
        seconds = timed(step, checker.min_seconds, sync)
        checker.add(f"{name} SMC step (particle-steps), {label}", batch / seconds, error, TOLERANCE["fp32"])


def check_batched_md(name: str, batch: int, checker: Checker, device: str, steps: int = 10) -> None:
    """Batched Langevin walkers on ``device``: walker-steps/s, and positions after ``steps`` steps against CPU float64."""
    target = systems.get(name, platform="Reference")
    positions = np.repeat(minimised_structure(target)[None], batch, 0)
    sync = device.startswith("cuda")

    def engine(on: str, precision: str, compile: bool = False, n: int = batch) -> BatchedLangevin:
        return BatchedLangevin(
            batched_force_field(target.system, n, on, compile), system_masses(target.system), positions[:n],
            target.temperature, seed=0, device=on, precision=precision, compile=compile,
        )

    # The first walkers alone on the CPU: a walker's noise depends on its id, not on the batch or device.
    checked = min(batch, 64)
    reference = engine("cpu", "float64", n=checked)
    reference.step(steps)
    variants = {f"{device} f32": (False, "float32"), f"{device} f64": (False, "float64")}
    if sync:
        variants[f"{device} f32 compiled"] = (True, "float32")
    for label, (compile, precision) in variants.items():
        row = f"{name} batched MD (walker-steps), {label}, batch {batch}"
        if checker.out_of_time(row):
            continue
        walkers = engine(device, precision, compile)
        walkers.step(steps)
        error = relative_error(walkers.x[:checked].double().cpu(), reference.x)
        seconds = timed(lambda: walkers.step(steps), checker.min_seconds, sync)
        checker.add(row, batch * steps / seconds, error, TOLERANCE["f64" if precision == "float64" else "fp32"])
    if sync and "CUDA" in [openmm_platform_name(i) for i in range(openmm_platform_count())] and batch == max(checker.md_batches):
        import openmm
        from openmm import unit

        integrator = openmm.LangevinMiddleIntegrator(target.temperature, 1 / unit.picosecond, 1 * unit.femtosecond)
        context = openmm.Context(target.system, integrator, openmm.Platform.getPlatformByName("CUDA"))
        context.setPositions(positions[0])
        seconds = timed(lambda: (integrator.step(200), context.getState(energy=True)), checker.min_seconds, False)
        checker.add(f"{name} OpenMM CUDA, one Context (steps)", 200 / seconds, None, None)


def openmm_platform_count() -> int:
    import openmm

    return openmm.Platform.getNumPlatforms()


def openmm_platform_name(index: int) -> str:
    import openmm

    return openmm.Platform.getPlatform(index).getName()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=["ad2", "al6"])
    parser.add_argument("--batch", type=int, default=512, help="configurations per evaluation")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing per row")
    parser.add_argument("--budget-s", type=float, default=400, help="skip remaining rows after this long")
    parser.add_argument("--md-batches", type=int, nargs="*", default=[], help="walkers per batch of the batched-MD rows (none by default)")
    parser.add_argument("--md-only", action="store_true", help="only the batched-MD rows")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "no GPU: CPU rows only"
    print(machine(), flush=True)
    checker = Checker(args.min_seconds, args.budget_s)
    checker.md_batches = args.md_batches
    for name in args.systems:
        if not args.md_only:
            check_system(name, args.batch, checker, cuda)
        for batch in args.md_batches:
            check_batched_md(name, batch, checker, "cuda" if cuda else "cpu")
    batches = f"MD walkers {', '.join(map(str, args.md_batches))}" if args.md_only else f"batch {args.batch}"
    print(f"\n### GPU check ({device}; {batches})\n")
    print(checker.table())
    if checker.failed:
        print("\nFAILED: a fast path differs from CPU float64 beyond its tolerance", file=sys.stderr)
    return 1 if checker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
