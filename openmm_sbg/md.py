"""Molecular dynamics with OpenMM: training and reference data for SBG.

Runs Langevin dynamics (``LangevinMiddleIntegrator``, 1 fs: the systems are unconstrained)
and writes an mdtraj-readable trajectory with per-frame reduced energies and a
train / validation / test split by contiguous time blocks.

A run keeps its progress in ``<out>.work/``: frames in chunks, an OpenMM checkpoint and a
small JSON progress file, each written atomically in that order, so a run killed at any
moment resumes from its last checkpoint and ends with exactly the frames an uninterrupted
run would have. The output file appears only when the run is complete. Resuming with a
larger frame count extends the run; with a smaller one it finishes at once with the first
frames already made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import h5py
import mdtraj
import numpy as np
import openmm
from openmm import unit
from tqdm.auto import tqdm

from openmm_sbg.energy.openmm_backend import platform_by_name
from openmm_sbg.io import atomic_path, atomic_write_text
from openmm_sbg.resume import RunClock, check_resume_settings
from openmm_sbg.target import BoltzmannTarget

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
HDF5_EXTENSIONS = (".h5", ".hdf5")


@dataclasses.dataclass
class MDConfig:
    """Settings of one MD run (stored with its progress to refuse a mismatched resume)."""

    n_frames: int
    steps_per_frame: int = 500
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    equilibration_steps: int = 10_000
    frames_per_checkpoint: int = 200
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self):
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        if self.n_frames < 1 or self.steps_per_frame < 1 or self.frames_per_checkpoint < 1:
            raise ValueError("n_frames, steps_per_frame and frames_per_checkpoint must be positive")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or abs(sum(self.split_fractions) - 1) > 1e-9:
            raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {self.split_fractions}")


@dataclasses.dataclass
class RunResult:
    """What one call of a resumable run did: complete, or interrupted with its progress folder.

    :meth:`to_dict` is the command's JSON summary, ``from_dict`` reads it back.
    """

    #: Fields a complete run leaves out of :meth:`to_dict` when they are ``None``.
    optional_fields = ()

    status: str
    """``"complete"``, or ``"interrupted"`` (``stop_after_frames``)."""
    out: str | None
    """The trajectory written (complete runs)."""
    frames: int
    """Frames in ``out`` (complete), or recorded so far (interrupted)."""
    work_dir: str | None = dataclasses.field(default=None, kw_only=True)
    """The progress folder an interrupted run resumes from."""
    wall_s: float | None = dataclasses.field(default=None, kw_only=True)
    """Wall-clock of this call."""
    run_wall_s: float | None = dataclasses.field(default=None, kw_only=True)
    """Wall-clock of the whole run (:class:`~openmm_sbg.resume.RunClock`): each earlier call's to its last commit,
    and this call's; None for a run begun before this was recorded."""

    def to_dict(self) -> dict:
        """The fields a run with this status reports (an interrupted one: status, frames and work_dir)."""
        if self.status == "interrupted":
            return {"status": self.status, "frames": self.frames, "work_dir": self.work_dir}
        return {
            name: value
            for name, value in dataclasses.asdict(self).items()
            if name != "work_dir" and not (value is None and name in self.optional_fields)
        }

    @classmethod
    def from_dict(cls, values: dict):
        """The result whose :meth:`to_dict` gave ``values``."""
        return cls(**{"out": None, **values})


@dataclasses.dataclass
class MDRunResult(RunResult):
    """What one call of :func:`run_md` did."""

    simulated_ns: float | None = None
    platform: str | None = None
    ns_per_day: float | None = None
    """Simulated ns per day of this call; ``None`` if it ran no steps."""


def split_labels(n_frames: int, fractions=(0.8, 0.1, 0.1)) -> np.ndarray:
    """Split codes (0 train, 1 val, 2 test) for contiguous time blocks of a trajectory."""
    bounds = np.round(np.cumsum(fractions) * n_frames).astype(int)
    labels = np.full(n_frames, SPLIT_CODES["test"], dtype=np.int8)
    labels[: bounds[1]] = SPLIT_CODES["val"]
    labels[: bounds[0]] = SPLIT_CODES["train"]
    return labels


def _make_context(target: BoltzmannTarget, config: MDConfig, platform: str | None) -> openmm.Context:
    integrator = openmm.LangevinMiddleIntegrator(
        target.temperature, config.friction_per_ps / unit.picosecond, config.timestep_fs * unit.femtosecond
    )
    # OpenMM reads seed 0 as "pick a random seed"; shift so every user seed is reproducible.
    integrator.setRandomNumberSeed(config.seed + 1)
    plat = platform_by_name(platform)
    return openmm.Context(target.system, integrator) if plat is None else openmm.Context(target.system, integrator, plat)


class _WorkDir:
    """The resumable state of a run: frame chunks, an OpenMM checkpoint, a progress file."""

    def __init__(self, out: str):
        self.path = out + ".work"
        self.progress_file = os.path.join(self.path, "progress.json")
        self.checkpoint_file = os.path.join(self.path, "state.chk")

    def chunk_file(self, index: int) -> str:
        return os.path.join(self.path, f"frames_{index:06d}.npz")

    def read_progress(self) -> dict | None:
        if not os.path.exists(self.progress_file):
            return None
        with open(self.progress_file, encoding="utf-8") as handle:
            return json.load(handle)

    def commit(self, index: int, xyz: np.ndarray, energies: np.ndarray, context: openmm.Context, progress: dict):
        with atomic_path(self.chunk_file(index)) as tmp:
            np.savez(tmp, xyz=xyz, energies=energies)
        with atomic_path(self.checkpoint_file) as tmp, open(tmp, "wb") as handle:
            handle.write(context.createCheckpoint())
        # The progress file is the commit point: anything written after the last one is redone.
        atomic_write_text(self.progress_file, json.dumps(progress))

    def load_frames(self, n_chunks: int) -> tuple[np.ndarray, np.ndarray]:
        chunks = [np.load(self.chunk_file(i)) for i in range(n_chunks)]
        return np.concatenate([c["xyz"] for c in chunks]), np.concatenate([c["energies"] for c in chunks])


def run_md(
    target: BoltzmannTarget,
    out: str,
    config: MDConfig,
    platform: str | None = None,
    progress: bool = True,
    stop_after_frames: int | None = None,
) -> MDRunResult:
    """Run MD of ``target`` and write ``out`` (.h5, .dcd or .xtc), resuming if a run was interrupted.

    Parameters
    ----------
    target
        The system; its ``positions`` are the starting structure (minimised first).
    out
        Output trajectory. HDF5 files hold the datasets ``energies_kT`` and ``split`` next to
        the mdtraj trajectory; for DCD/XTC they go to ``<out>.meta.npz``.
    config
        Run settings (:class:`MDConfig`).
    platform
        OpenMM platform name, or ``None`` for the fastest available (as OpenMM chooses).
    stop_after_frames
        Stop (as an interruption would) once this many frames are committed; for tests.

    Returns
    -------
    MDRunResult
        Frames, simulated ns, wall time, ns/day, platform, output path.
    """
    if target.positions is None:
        raise ValueError("the target has no starting positions; build it with positions=... or from a PDB")
    work = _WorkDir(out)
    settings = {"config": dataclasses.asdict(config), "n_atoms": target.n_atoms, "name": target.name}
    state = work.read_progress()
    context = _make_context(target, config, platform)
    if state is None:
        if os.path.exists(work.path):
            shutil.rmtree(work.path)  # a run that died before its first commit
        os.makedirs(work.path)
        context.setPositions(target.positions)
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 1000)
        context.setVelocitiesToTemperature(target.temperature, config.seed + 1)
        context.getIntegrator().step(config.equilibration_steps)
        frames_done, chunks_done, earlier_wall = 0, 0, 0.0
    else:
        saved = {k: state[k] for k in settings}
        # n_frames may change between calls: a run can be extended, or finished early with
        # the frames it has. Everything that shapes the dynamics must match.
        saved["config"]["n_frames"] = config.n_frames
        check_resume_settings(work.path, saved, settings)
        with open(work.checkpoint_file, "rb") as handle:
            try:
                context.loadCheckpoint(handle.read())
            except Exception as err:
                raise RuntimeError(
                    f"cannot load the checkpoint in {work.path} on platform {context.getPlatform().getName()}: "
                    f"resume on the platform it was written with (--platform), or delete the folder. ({err})"
                ) from err
        frames_done, chunks_done = state["frames_done"], state["chunks_done"]
        earlier_wall = state.get("wall_s")  # of the calls before this one, to their last commit

    integrator = context.getIntegrator()
    clock = RunClock(earlier_wall)
    steps_run = 0
    bar = tqdm(total=config.n_frames, initial=frames_done, unit="frame", desc="md", disable=not progress)
    while frames_done < config.n_frames:
        n_chunk = min(config.frames_per_checkpoint, config.n_frames - frames_done)
        xyz = np.empty((n_chunk, target.n_atoms, 3), dtype=np.float32)
        energies = np.empty(n_chunk)
        for i in range(n_chunk):
            integrator.step(config.steps_per_frame)
            steps_run += config.steps_per_frame
            snapshot = context.getState(positions=True, energy=True)
            xyz[i] = snapshot.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            energies[i] = snapshot.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / target.kT_kj_per_mol
            bar.update(1)
        if not np.all(np.isfinite(energies)):
            raise RuntimeError("MD blew up (non-finite energy); check the structure and force field, or lower the timestep")
        frames_done += n_chunk
        work.commit(chunks_done, xyz, energies, context,
                    {**settings, "frames_done": frames_done, "chunks_done": chunks_done + 1, "wall_s": clock.whole_run()})
        chunks_done += 1
        if stop_after_frames is not None and frames_done >= stop_after_frames and frames_done < config.n_frames:
            bar.close()
            return MDRunResult(status="interrupted", out=None, frames=frames_done, work_dir=work.path)
    bar.close()
    wall = clock.this_call()

    xyz, energies = (a[: config.n_frames] for a in work.load_frames(chunks_done))
    write_trajectory(out, target, xyz, energies, split_labels(len(xyz), config.split_fractions), config)
    shutil.rmtree(work.path)
    ns_per_frame = config.steps_per_frame * config.timestep_fs * 1e-6
    ns_this_run = steps_run * config.timestep_fs * 1e-6
    return MDRunResult(
        status="complete",
        out=out,
        frames=int(len(xyz)),
        simulated_ns=len(xyz) * ns_per_frame,
        platform=context.getPlatform().getName(),
        wall_s=wall,
        ns_per_day=ns_this_run / wall * 86400 if wall > 0 and steps_run else None,
        run_wall_s=clock.whole_run(wall),
    )


def write_trajectory(
    out, target, xyz, energies, split, config: MDConfig, frame_temperature_K=None, time_ps=None, extra=None
) -> None:
    """Write frames plus their energies (kT at the target's temperature) and split codes, atomically.

    ``frame_temperature_K`` (optional, one per frame) records the temperature each frame was
    sampled at, for data pooled from several temperatures (replica exchange). ``time_ps``
    (default: one frame interval apart) is each frame's simulated time; ``extra`` maps names to
    more per-frame arrays (e.g. ``walker``: which trajectory of a batched run a frame belongs to).
    """
    if time_ps is None:
        time_ps = np.arange(1, len(xyz) + 1) * config.steps_per_frame * config.timestep_fs * 1e-3
    traj = mdtraj.Trajectory(xyz, mdtraj.Topology.from_openmm(target.topology), time=time_ps)
    extension = os.path.splitext(out)[1].lower()
    attrs = {"temperature_K": target.temperature.value_in_unit(unit.kelvin), "system": target.name or ""}
    per_frame = {"energies_kT": energies, "split": split}
    if frame_temperature_K is not None:
        per_frame["frame_temperature_K"] = np.asarray(frame_temperature_K, dtype=np.float64)
    per_frame.update(extra or {})
    with atomic_path(out) as tmp:
        traj.save(tmp)
        if extension in HDF5_EXTENSIONS:
            with h5py.File(tmp, "a") as handle:
                for key, values in per_frame.items():
                    handle.create_dataset(key, data=values)
                handle.attrs.update(attrs)
    if extension not in HDF5_EXTENSIONS:
        with atomic_path(out + ".meta.npz") as tmp:
            np.savez(tmp, **per_frame, **attrs)
