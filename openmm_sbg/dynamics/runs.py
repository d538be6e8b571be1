"""Resumable batched MD and replica-exchange runs, written in ``openmm-sbg md``'s file format.

:func:`run_batched_md` integrates ``n_walkers`` copies of the System at the target's
temperature; :func:`run_batched_replica_exchange` integrates ``n_copies`` copies of a
temperature ladder with in-batch exchanges (:class:`~openmm_sbg.dynamics.LadderExchange`).
Frames are recorded from every walker every ``steps_per_frame`` steps after
``equilibration_steps``. The output lists them copy by copy (plain MD: walker by walker), each
copy's trajectory contiguous in time, with per-frame ``energies_kT`` (at the target's
temperature), ``walker`` and ``split``: train/val/test in contiguous blocks over that order, so
the validation and test frames come from the last walkers, independent of the training ones
(with one walker, exactly :func:`openmm_sbg.md.run_md`'s split); ``openmm-sbg train --data``
reads it unchanged. Replica exchange writes the frames at the target temperature to ``out``
and, with ``all_replicas``, every walker's to ``<out stem>-all-replicas<ext>`` with
``frame_temperature_K`` (per copy, frame by frame, lowest temperature first), as
:func:`openmm_sbg.replica_exchange.run_replica_exchange` does.

A run keeps its progress in ``<out>.work/`` (frame chunks, the engine's state, a progress
file, written in that order), so rerunning the same call resumes bit for bit; other settings
are refused with the differences named. The folder stays when the run completes, so the same
call with a larger frame count extends it (bit for bit as if it had asked for that many at
first); delete the folder once the run is final.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import openmm
import torch
from openmm import unit
from tqdm.auto import tqdm

from openmm_sbg.dynamics.exchange import LadderExchange
from openmm_sbg.dynamics.langevin import (
    BatchedLangevin,
    batched_force_field,
    resolve_device,
    resolve_precision,
    system_masses,
)
from openmm_sbg.io import atomic_path, atomic_write_text, read_json
from openmm_sbg.md import MDConfig, RunResult, split_labels, write_trajectory
from openmm_sbg.resume import RunClock, check_resume_settings
from openmm_sbg.target import BoltzmannTarget

#: Largest frame chunk kept in memory between checkpoints (bytes of float32 positions).
CHUNK_BYTES = 2**28


@dataclasses.dataclass
class EngineOptions:
    """Where and how the batched engine integrates (``precision`` and the device type must match on resume)."""

    device: str = "cpu"
    precision: str = "float32"
    compile: bool = False
    """``torch.compile`` the force field: tens of seconds once, then several times faster on CPU."""
    threads: int | None = None
    """Torch CPU threads while integrating; None: one on a CPU, where these batches run 2-3x faster on one
    thread than on two (16-256 walkers of ad2, compiled, idle 2-core Xeon: benchmarks/RESULTS.md), and
    torch's setting on a GPU. The caller's setting is restored afterwards."""


@dataclasses.dataclass
class BatchedRunResult(RunResult):
    """What a batched run did; :meth:`to_dict` is the command's JSON summary.

    ``frames`` counts recorded frames per walker while a run is interrupted, and ``work_dir`` is
    kept for a complete run too: the same call with a larger frame count extends it from there.
    """

    walkers: int
    temperatures_K: list[float]
    simulated_ns_per_walker: float
    simulated_ns_total: float
    steps_per_s: float | None
    """Aggregate walker-steps per second in this call."""
    ns_per_day: float | None
    """Aggregate simulated ns per day in this call (all walkers)."""
    kinetic_temperature_ratio: float | None
    """Mean kinetic temperature over recorded frames divided by each walker's bath temperature."""
    device: str
    precision: str
    engine: str = "torch-batched"
    exchange_acceptance: list[float] | None = None
    all_replicas: str | None = None

    def to_dict(self) -> dict:
        """Every field, whatever the status (an interrupted run's rate and progress folder included)."""
        return dataclasses.asdict(self)


def run_batched_md(
    target: BoltzmannTarget,
    out: str,
    config: MDConfig,
    n_walkers: int,
    start=None,
    options: EngineOptions | None = None,
    progress: bool = True,
    stop_after_frames: int | None = None,
) -> BatchedRunResult:
    """``n_walkers`` Langevin trajectories of ``target`` at its temperature, in one batch; writes ``out``.

    ``config`` is per walker, as for :func:`openmm_sbg.md.run_md`. ``start`` (positions
    ``[S, N, 3]`` in nm, e.g. trajectory frames or flow samples) gives walker ``w`` the
    configuration ``start[w % S]``; default: the target's structure, minimised with OpenMM.
    Raises :class:`~openmm_sbg.dynamics.BatchedEngineUnavailable` for a System the torch force
    field cannot evaluate.
    """
    kelvin = float(target.temperature.value_in_unit(unit.kelvin))
    return _Run(target, out, config, n_walkers, (kelvin,), n_walkers, options or EngineOptions(), None).run(
        start, False, progress, stop_after_frames
    )


def run_batched_replica_exchange(
    target: BoltzmannTarget,
    out: str,
    config,
    n_copies: int = 1,
    exchange_interval_steps: int | None = None,
    start=None,
    options: EngineOptions | None = None,
    all_replicas: bool = False,
    progress: bool = True,
    stop_after_frames: int | None = None,
) -> BatchedRunResult:
    """Temperature replica exchange of ``n_copies`` copies of ``config.temperatures_K`` in one batch.

    ``config`` is a :class:`~openmm_sbg.replica_exchange.ReplicaExchangeConfig` (its ladder
    starts at the target's temperature). Exchanges are attempted every
    ``exchange_interval_steps`` (default: every frame); ``start`` as for :func:`run_batched_md`.
    """
    ladder = tuple(config.temperatures_K)
    kelvin = float(target.temperature.value_in_unit(unit.kelvin))
    if not math.isclose(ladder[0], kelvin, rel_tol=1e-9):
        raise ValueError(f"the ladder starts at {ladder[0]} K but the target is at {kelvin} K; its lowest temperature must be the target's")
    interval = exchange_interval_steps or config.md.steps_per_frame
    if interval < 1:
        raise ValueError(f"the exchange interval must be at least one step, got {interval}")
    run = _Run(target, out, config.md, n_copies * len(ladder), ladder, n_copies, options or EngineOptions(), interval)
    return run.run(start, all_replicas, progress, stop_after_frames)


def minimised_structure(target: BoltzmannTarget, platform: str = "Reference") -> np.ndarray:
    """The target's structure after OpenMM's local energy minimisation (as ``openmm-sbg md`` starts), nm."""
    if target.positions is None:
        raise ValueError("the target has no starting positions; build it with positions=... or from a PDB, or pass start=")
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(target.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 1000)
    return context.getState(positions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch CPU threads (None: as they are), then restore the caller's number."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Run:
    """One batched run: its settings, work folder, engine and (replica exchange) ladder."""

    def __init__(self, target, out, config: MDConfig, n_walkers, ladder, n_copies, options: EngineOptions, interval):
        if n_walkers < 1:
            raise ValueError(f"the batched engine needs at least one walker, got {n_walkers}")
        self.target, self.out, self.config, self.options = target, out, config, options
        self.n_walkers, self.ladder, self.n_copies, self.interval = n_walkers, ladder, n_copies, interval
        self.device = resolve_device(options.device)
        resolve_precision(options.precision)
        self.backend = batched_force_field(target.system, n_walkers, self.device, options.compile)
        self.work = out + ".work"
        self.exchange = LadderExchange(ladder, n_copies, seed=config.seed) if interval else None  # plain MD: copies of one rung
        stored = dataclasses.asdict(config) | {"n_frames": None}  # a run may be extended
        self.settings = {
            "engine": "torch-batched", "config": stored, "n_atoms": target.n_atoms, "name": target.name,
            "walkers": n_walkers, "temperatures_K": list(ladder), "exchange_interval_steps": interval,
            "precision": options.precision, "device": self.device.type,
        }

    # ------------------------------------------------------------------ files
    def _path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def _commit(self, index: int, chunk: dict, engine: BatchedLangevin, progress: dict) -> None:
        with atomic_path(self._path(f"frames_{index:06d}.npz")) as tmp:
            np.savez(tmp, **chunk)
        state = {"engine": engine.state_dict(), "exchange": self.exchange.state_dict() if self.exchange else None}
        with atomic_path(self._path("state.pt")) as tmp:
            torch.save(state, tmp)
        # The progress file is the commit point: anything written after the last one is redone.
        atomic_write_text(self._path("progress.json"), json.dumps(progress))

    def _engine(self, positions) -> BatchedLangevin:
        temperatures = self.exchange.temperatures_K if self.exchange else self.ladder[0]
        return BatchedLangevin(
            self.backend, system_masses(self.target.system), positions, temperatures,
            timestep=self.config.timestep_fs * unit.femtosecond, friction=self.config.friction_per_ps / unit.picosecond,
            seed=self.config.seed, device=self.device, precision=self.options.precision,
        )

    def _start(self, start) -> tuple[BatchedLangevin, dict]:
        progress_file = self._path("progress.json")
        if os.path.exists(progress_file):
            progress = read_json(progress_file)
            check_resume_settings(self.work, progress["settings"], self.settings)
            state = torch.load(self._path("state.pt"), weights_only=True)
            engine = self._engine(state["engine"]["x"])
            engine.load_state_dict(state["engine"])
            if self.exchange:
                self.exchange.load_state_dict(state["exchange"])
            return engine, progress
        if os.path.exists(self.work):
            shutil.rmtree(self.work)  # a run that died before its first commit
        os.makedirs(self.work)
        if start is None:
            start = minimised_structure(self.target)[None]
        if unit.is_quantity(start):
            start = start.value_in_unit(unit.nanometer)
        start = np.asarray(start, dtype=np.float64).reshape(-1, self.target.n_atoms, 3)
        positions = start[np.arange(self.n_walkers) % len(start)]
        progress = {"settings": self.settings, "frames_done": 0, "chunks_done": 0, "kinetic_ratio_sum": 0.0, "wall_s": 0.0}
        return self._engine(positions), progress

    # ------------------------------------------------------------------ dynamics
    def _advance_to(self, engine: BatchedLangevin, step: int) -> None:
        """Integrate to ``step``, attempting exchanges on the way (none at ``step`` itself: it records first)."""
        while engine.step_count < step:
            n = step - engine.step_count
            if self.exchange:
                n = min(n, self.interval - engine.step_count % self.interval)
            engine.step(n)
            if engine.step_count < step:
                self._maybe_exchange(engine)

    def _maybe_exchange(self, engine: BatchedLangevin) -> None:
        if self.exchange and engine.step_count % self.interval == 0:
            self.exchange.attempt(engine.energy_kj)
            engine.set_temperatures(self.exchange.temperatures_K)

    def run(self, start, all_replicas: bool, show_progress: bool, stop_after_frames) -> BatchedRunResult:
        threads = self.options.threads if self.options.threads is not None else 1 if self.device.type == "cpu" else None
        with torch_threads(threads):
            return self._run(start, all_replicas, show_progress, stop_after_frames)

    def _run(self, start, all_replicas: bool, show_progress: bool, stop_after_frames) -> BatchedRunResult:
        config, target = self.config, self.target
        engine, progress = self._start(start)
        frame_bytes = self.n_walkers * target.n_atoms * 12
        per_chunk = max(1, min(config.frames_per_checkpoint, CHUNK_BYTES // frame_bytes))
        first_step = engine.step_count
        clock = RunClock(progress.get("wall_s"))  # None for a run begun before the wall-clock was kept
        bar = tqdm(total=config.n_frames, initial=min(progress["frames_done"], config.n_frames), unit="frame",
                   desc=f"md ({self.n_walkers} walkers)", disable=not show_progress)
        while progress["frames_done"] < config.n_frames:
            n_chunk = min(per_chunk, config.n_frames - progress["frames_done"])
            chunk = {"xyz": np.empty((n_chunk, self.n_walkers, target.n_atoms, 3), dtype=np.float32),
                     "energies": np.empty((n_chunk, self.n_walkers)), "ladder_index": np.zeros((n_chunk, self.n_walkers), np.int16)}
            for i in range(n_chunk):
                frame = progress["frames_done"] + i + 1
                self._advance_to(engine, config.equilibration_steps + frame * config.steps_per_frame)
                chunk["xyz"][i] = engine.x.cpu().float().numpy()
                chunk["energies"][i] = engine.energy_kj.double().cpu().numpy() / target.kT_kj_per_mol
                if self.exchange:
                    chunk["ladder_index"][i] = self.exchange.state.numpy()
                ratio = engine.kinetic_temperature() / engine.temperature_K.clamp(min=1e-300)
                progress["kinetic_ratio_sum"] += float(ratio.mean())
                self._maybe_exchange(engine)  # after recording, as openmmtools does
                bar.update(1)
            if not np.all(np.isfinite(chunk["energies"])):
                raise RuntimeError("MD blew up (non-finite energy); check the structure and force field, or lower the timestep")
            progress["frames_done"] += n_chunk
            progress["wall_s"] = clock.whole_run()
            self._commit(progress["chunks_done"], chunk, engine, {**progress, "chunks_done": progress["chunks_done"] + 1})
            progress["chunks_done"] += 1
            if stop_after_frames is not None and stop_after_frames <= progress["frames_done"] < config.n_frames:
                bar.close()
                return self._result("interrupted", None, progress["frames_done"], engine, progress, first_step, clock)
        bar.close()
        wall = clock.this_call()
        written = self._write(progress["chunks_done"], all_replicas)
        return self._result("complete", written, None, engine, progress, first_step, clock, wall)

    # ------------------------------------------------------------------ output
    def _write(self, n_chunks: int, all_replicas: bool) -> tuple[str, int, str | None]:
        """Write the frames copy by copy (each copy's trajectory contiguous), split in blocks over that order."""
        chunks = [np.load(self._path(f"frames_{i:06d}.npz")) for i in range(n_chunks)]
        n_frames, config, n_atoms = self.config.n_frames, self.config, self.target.n_atoms
        xyz = np.concatenate([c["xyz"] for c in chunks])[:n_frames]  # [F, B, N, 3]
        energies = np.concatenate([c["energies"] for c in chunks])[:n_frames]
        ladder_index = np.concatenate([c["ladder_index"] for c in chunks])[:n_frames].astype(np.int64)
        n_rungs = len(self.ladder)
        # table[c, f, i]: the walker of copy c at ladder position i when frame f was recorded.
        table = np.empty((self.n_copies, n_frames, n_rungs), dtype=np.int64)
        walker, at = np.meshgrid(np.arange(self.n_walkers), np.arange(n_frames), indexing="ij")  # [B, F]
        table[walker // n_rungs, at, ladder_index.T] = walker
        frame = np.broadcast_to(np.arange(n_frames)[None, :, None], table.shape)
        times = (config.equilibration_steps + np.arange(1, n_frames + 1) * config.steps_per_frame) * config.timestep_fs * 1e-3
        split = split_labels(self.n_copies * n_frames, config.split_fractions)
        low, low_frame = table[:, :, 0].reshape(-1), frame[:, :, 0].reshape(-1)
        write_trajectory(self.out, self.target, xyz[low_frame, low], energies[low_frame, low], split, config,
                         time_ps=times[low_frame], extra={"walker": low})
        all_out = None
        if all_replicas and self.exchange:
            stem, extension = os.path.splitext(self.out)
            all_out = f"{stem}-all-replicas{extension}"
            every, every_frame = table.reshape(-1), frame.reshape(-1)
            write_trajectory(all_out, self.target, xyz[every_frame, every].reshape(-1, n_atoms, 3), energies[every_frame, every],
                             np.repeat(split, n_rungs), config, frame_temperature_K=np.tile(self.ladder, len(split)),
                             time_ps=times[every_frame], extra={"walker": every})
        return self.out, len(low), all_out

    def _result(self, status, written, frames_done, engine, progress, first_step, clock: RunClock,
                wall=None) -> BatchedRunResult:
        wall = clock.this_call() if wall is None else wall
        steps = (engine.step_count - first_step) * self.n_walkers
        ns_per_walker = (progress["frames_done"] if frames_done is None else frames_done)
        ns_per_walker = min(ns_per_walker, self.config.n_frames) * self.config.steps_per_frame * self.config.timestep_fs * 1e-6
        out, frames, all_out = written if written else (None, frames_done, None)
        return BatchedRunResult(
            status=status, out=out, frames=frames, walkers=self.n_walkers, temperatures_K=list(self.ladder),
            simulated_ns_per_walker=ns_per_walker, simulated_ns_total=ns_per_walker * self.n_walkers, wall_s=wall,
            run_wall_s=clock.whole_run(wall),
            steps_per_s=steps / wall if steps and wall > 0 else None,
            ns_per_day=steps * self.config.timestep_fs * 1e-6 / wall * 86400 if steps and wall > 0 else None,
            kinetic_temperature_ratio=progress["kinetic_ratio_sum"] / max(1, progress["frames_done"]),
            device=str(self.device), precision=self.options.precision,
            exchange_acceptance=self.exchange.acceptance() if self.exchange else None,
            all_replicas=all_out, work_dir=self.work,
        )
