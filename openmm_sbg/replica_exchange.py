"""Temperature replica exchange (openmmtools): training data that covers basins plain MD misses.

Replicas run Langevin dynamics (1 fs, as :mod:`openmm_sbg.md`) at the temperatures of a
geometric ladder and swap configurations between temperatures after every iteration
(openmmtools' ``ReplicaExchangeSampler``, all-pairs Gibbs swaps). The frames of the lowest
temperature, the target's, form an ``openmm-sbg md``-style trajectory (energies in kT at the
target temperature, train/val/test split), so ``openmm-sbg train`` takes it unchanged; with
``all_replicas`` a second file in the same format, ``<out stem>-all-replicas<ext>``, holds every
replica's frames (energies in kT at the target temperature) with the temperature of each
(``frame_temperature_K``).

The run lives in ``<out>.work/``: openmmtools' NetCDF storage (positions of every replica at
every iteration) and the settings. Rerunning resumes from the storage's last iteration; a
larger frame count extends the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
from openmm import unit
from tqdm.auto import tqdm

from openmm_sbg.energy.openmm_backend import platform_by_name
from openmm_sbg.io import atomic_write_text, read_json
from openmm_sbg.md import MDConfig, RunResult, split_labels, write_trajectory
from openmm_sbg.resume import RunClock, check_resume_settings
from openmm_sbg.target import BoltzmannTarget


@dataclasses.dataclass
class ReplicaExchangeConfig:
    """Settings of one replica-exchange run.

    Parameters
    ----------
    md
        The dynamics and recording of every replica, as for plain MD: ``n_frames`` recorded
        iterations, ``steps_per_frame`` Langevin steps between exchange attempts (and frames),
        ``equilibration_steps`` rounded to whole iterations (at least one), ``seed`` for
        numpy's global generator, from which openmmtools draws the exchanges, and the split.
    temperatures_K
        The ladder, lowest first; the lowest is the target's temperature.
    """

    md: MDConfig
    temperatures_K: tuple[float, ...]

    def __post_init__(self):
        self.temperatures_K = tuple(float(t) for t in self.temperatures_K)
        if len(self.temperatures_K) < 2 or list(self.temperatures_K) != sorted(self.temperatures_K):
            raise ValueError(f"the ladder needs two or more increasing temperatures, got {self.temperatures_K}")

    @property
    def equilibration_iterations(self) -> int:
        return max(1, round(self.md.equilibration_steps / self.md.steps_per_frame))


@dataclasses.dataclass
class ReplicaExchangeResult(RunResult):
    """What one call of :func:`run_replica_exchange` did; ``out`` holds the lowest temperature's frames."""

    optional_fields = ("all_replicas",)

    temperatures_K: list[float] | None = None
    exchange_acceptance: list[float] | None = None
    """Fraction of accepted swaps between each pair of neighbouring temperatures, over the whole run."""
    simulated_ns_per_replica: float | None = None
    iterations_this_call: int | None = None
    all_replicas: str | None = None
    """Every replica's frames (with ``all_replicas``)."""


def geometric_ladder(t_min: float, t_max: float, n: int) -> tuple[float, ...]:
    """``n`` temperatures from ``t_min`` to ``t_max`` (kelvin) with a constant ratio between neighbours."""
    if n < 2 or not 0 < t_min < t_max:
        raise ValueError(f"a ladder needs n >= 2 and 0 < t_min < t_max, got n={n}, {t_min}..{t_max}")
    return tuple(float(t) for t in t_min * (t_max / t_min) ** (np.arange(n) / (n - 1)))


def run_replica_exchange(
    target: BoltzmannTarget,
    out: str,
    config: ReplicaExchangeConfig,
    platform: str | None = "Reference",
    all_replicas: bool = False,
    progress: bool = True,
    stop_after_frames: int | None = None,
) -> ReplicaExchangeResult:
    """Run (or resume) temperature replica exchange of ``target`` and write ``out`` (.h5).

    The result holds the exchange acceptance of each neighbouring pair of temperatures.
    ``stop_after_frames`` stops early as an interruption would (for tests).
    """
    # openmmtools prints its citations to stdout, where the command's JSON summary goes.
    with contextlib.redirect_stdout(sys.stderr):
        return _run(target, out, config, platform, all_replicas, progress, stop_after_frames)


def _run(target, out, config, platform, all_replicas, progress, stop_after_frames) -> ReplicaExchangeResult:
    from openmmtools import cache, mcmc, multistate, states

    target_kelvin = target.temperature.value_in_unit(unit.kelvin)
    if not math.isclose(config.temperatures_K[0], target_kelvin, rel_tol=1e-9):
        raise ValueError(
            f"the ladder starts at {config.temperatures_K[0]} K but the target is at {target_kelvin} K; "
            "its lowest temperature must be the target's"
        )
    if target.positions is None:
        raise ValueError("the target has no starting positions; build it with positions=... or from a PDB")
    work = out + ".work"
    storage = os.path.join(work, "replicas.nc")
    settings_file = os.path.join(work, "settings.json")
    # openmmtools' storage is its own, so the run's wall-clock so far is kept beside it.
    clock_file = os.path.join(work, "wall_clock.json")
    settings = {"config": dataclasses.asdict(config), "n_atoms": target.n_atoms, "name": target.name}
    settings["config"]["md"]["n_frames"] = None  # a run may be extended
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    total = config.equilibration_iterations + config.md.n_frames

    if os.path.exists(settings_file) and os.path.exists(storage):
        check_resume_settings(work, read_json(settings_file), settings)
        reporter = multistate.MultiStateReporter(storage, open_mode="a")
        sampler = multistate.ReplicaExchangeSampler.from_storage(reporter)
    else:
        if os.path.exists(work):
            shutil.rmtree(work)  # a run that died before its storage was complete
        os.makedirs(work)
        np.random.seed(config.md.seed)
        thermodynamic_states = [states.ThermodynamicState(target.system, t * unit.kelvin) for t in config.temperatures_K]
        move = mcmc.LangevinDynamicsMove(
            timestep=config.md.timestep_fs * unit.femtosecond,
            collision_rate=config.md.friction_per_ps / unit.picosecond,
            n_steps=config.md.steps_per_frame,
            reassign_velocities=False,
        )
        sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=total)
        reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
        sampler.create(thermodynamic_states, states.SamplerState(target.positions * unit.nanometer), reporter)
    # Every replica runs on the chosen platform (openmmtools' global cache would pick its own).
    context_cache = cache.ContextCache(capacity=None, time_to_live=None, platform=platform_by_name(platform))
    sampler.energy_context_cache = sampler.sampler_context_cache = context_cache
    if not os.path.exists(settings_file):
        sampler.minimize()
        atomic_write_text(settings_file, json.dumps(settings))

    if os.path.exists(clock_file):
        earlier_wall = read_json(clock_file)["wall_s"]
    else:  # a new run, or one begun before its wall-clock was kept
        earlier_wall = 0.0 if sampler.iteration == 0 else None
    clock = RunClock(earlier_wall)
    iterations_run = 0
    bar = tqdm(total=total, initial=sampler.iteration, unit="iteration", desc="replica exchange", disable=not progress)
    while sampler.iteration < total:
        sampler.extend(1)
        iterations_run += 1
        atomic_write_text(clock_file, json.dumps({"wall_s": clock.whole_run()}))
        bar.update(1)
        recorded = sampler.iteration - config.equilibration_iterations
        if stop_after_frames is not None and recorded >= stop_after_frames and sampler.iteration < total:
            bar.close()
            reporter.close()
            return ReplicaExchangeResult(status="interrupted", out=None, frames=recorded, work_dir=work)
    bar.close()
    wall = clock.this_call()

    frames, energies, replica_states = _read_frames(reporter, config, total)
    acceptance = _neighbour_acceptance(reporter)
    reporter.close()
    lowest = replica_states == 0  # [iteration, replica]: the replica at the target temperature
    low_xyz = frames[lowest.nonzero()]  # one replica per iteration, in iteration order
    low_energies = energies[lowest.nonzero()][:, 0]
    write_trajectory(out, target, low_xyz, low_energies, split_labels(len(low_xyz), config.md.split_fractions), config.md)
    result = ReplicaExchangeResult(
        status="complete",
        out=out,
        frames=int(len(low_xyz)),
        temperatures_K=list(config.temperatures_K),
        exchange_acceptance=acceptance,
        simulated_ns_per_replica=config.md.n_frames * config.md.steps_per_frame * config.md.timestep_fs * 1e-6,
        wall_s=wall,
        run_wall_s=clock.whole_run(wall),
        iterations_this_call=iterations_run,
    )
    if all_replicas:
        # Iteration-major, so the time-block split of the lowest replica's file holds here too.
        stem, extension = os.path.splitext(out)
        all_out = f"{stem}-all-replicas{extension}"
        n_iterations, n_replicas = replica_states.shape
        write_trajectory(
            all_out, target, frames.reshape(-1, target.n_atoms, 3), energies[:, :, 0].reshape(-1),
            np.repeat(split_labels(n_iterations, config.md.split_fractions), n_replicas), config.md,
            frame_temperature_K=np.asarray(config.temperatures_K)[replica_states].reshape(-1),
        )
        result.all_replicas = all_out
    return result


def _read_frames(reporter, config: ReplicaExchangeConfig, total: int):
    """Positions ``[T, R, N, 3]`` (nm), reduced energies ``[T, R, S]`` and state indices ``[T, R]`` of the recorded iterations."""
    recorded = range(config.equilibration_iterations + 1, total + 1)  # iteration 0 is the starting structure
    frames = np.stack(
        [
            np.stack([s.positions.value_in_unit(unit.nanometer) for s in reporter.read_sampler_states(i)])
            for i in recorded
        ]
    ).astype(np.float32)
    energies, _, _ = reporter.read_energies()
    replica_states = reporter.read_replica_thermodynamic_states()
    first = config.equilibration_iterations + 1
    return frames, np.asarray(energies)[first : total + 1], np.asarray(replica_states)[first : total + 1]


def _neighbour_acceptance(reporter) -> list[float]:
    """Fraction of accepted swaps between each pair of neighbouring temperatures, over the whole run."""
    n_accepted, n_proposed = reporter.read_mixing_statistics()
    accepted = np.asarray(n_accepted).sum(axis=0)
    proposed = np.asarray(n_proposed).sum(axis=0)
    n = accepted.shape[0]
    return [
        float((accepted[i, i + 1] + accepted[i + 1, i]) / max(proposed[i, i + 1] + proposed[i + 1, i], 1))
        for i in range(n - 1)
    ]
