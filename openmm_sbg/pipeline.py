"""The whole SBG workflow for one molecule in one resumable call: data, training, sampling, evaluation.

What replaces ``simulation.step(n)`` for someone without a trained flow. Every stage writes
into one folder and is skipped when its output exists; an interrupted stage resumes from its
own checkpoint, so rerunning the same call (or ``openmm-sbg run`` command) continues.

==========  ==============================================  ======================================
stage       output (in the folder)                          an interrupted stage resumes from
==========  ==============================================  ======================================
data        ``data.h5`` (MD, or the lowest replica of        ``data.h5.work/``
            replica exchange) + ``data-all-replicas.h5``
seed        replica exchange: ``seeded-<state>.h5``          ``seeded-<state>.h5.work/``
            (``seeded-<residue>-<state>.h5`` for a longer
            peptide), MD from a frame of each backbone
            state rare in a residue
train       ``flow.pt`` (marked complete)                    ``flow.pt`` (written every epoch)
refine      with ``refine_minutes``: ``refined.pt``          ``refined.pt`` (written every evaluation)
sample      ``samples-<T>K.h5`` per temperature              ``samples-<T>K.h5.ckpt``
evaluate    ``summary.json``, ``plots/``                     (redone: seconds)
==========  ==============================================  ======================================

The flow trains on every replica's frames when the data come from replica exchange, so it
proposes the basins only the hot replicas reach, and on MD at the target temperature seeded
in each backbone state rare there (:mod:`openmm_sbg.seeding`), so that it proposes such a
state with its shape at that temperature; the importance weights of the sampler give each
temperature's exact populations. The first temperature sampled is the target's; the
evaluation compares it with the held-out (test) split of ``data.h5``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from openmm import unit

from openmm_sbg.flow.training import TrainOptions
from openmm_sbg.io import atomic_write_text, read_json
from openmm_sbg.pipeline_results import (
    DataResult,
    PipelineSummary,
    RefinementRecord,
    SamplingRecord,
    SeededRun,
    SeedingResult,
    StageRecord,
    TrainingRecord,
    data_result_from_dict,
)
from openmm_sbg.resume import check_resume_settings, without_later_settings
from openmm_sbg.smc.options import INDEPENDENT_PROPOSALS
from openmm_sbg.target import BoltzmannTarget, notice

DATA_SOURCES = ("md", "replica-exchange")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of :func:`run_pipeline`, stored in the folder: a rerun must use the same."""

    data: str = "md"
    """``"md"`` (Langevin MD at the target temperature) or ``"replica-exchange"`` (a geometric ladder)."""
    ns: float = 20.0
    """Simulated time to record, in ns (per replica for replica exchange)."""
    frame_interval_ps: float = 1.0
    """Time between frames (and between exchange attempts)."""
    t_max_K: float = 600.0
    """Replica exchange: the ladder's highest temperature."""
    n_replicas: int = 8
    """Replica exchange: temperatures in the ladder."""
    seeded_ns: float = 2.0
    """Replica exchange: ns of MD at the target temperature from a frame of each backbone state
    at most ``seed_below`` of the frames at it (:func:`openmm_sbg.seeding.rare_state_seeds`); 0 for none."""
    seed_below: float = 0.05
    """Replica exchange: a state with at most this fraction of the target-temperature frames is seeded."""
    preset: str = "ad2-small"
    """Flow architecture (:func:`openmm_sbg.flow.preset_names`)."""
    spline_bins: int = 0
    """Rational-quadratic spline bins after each block's affine map (:class:`~openmm_sbg.flow.FlowConfig`); 0 keeps
    the preset's blocks."""
    train_max_temperature_K: float | None = None
    """Replica exchange: train on the replicas at or below this temperature (and the seeded runs); ``None`` trains
    on every replica, so the flow proposes what only the hot replicas reach, broader than the target needs."""
    training: TrainOptions = dataclasses.field(
        default_factory=lambda: TrainOptions(steps=3000, batch_size=256, lr=1e-3, patience=3))
    """:class:`~openmm_sbg.flow.TrainOptions` of the maximum-likelihood fit (its seed is ``seed``); by default it stops
    when three epochs in a row have not lowered the validation NLL. The loss is compiled where ``torch.compile`` can
    build kernels (the same fit, faster)."""
    n_particles: int = 2000
    """Sampler particles (proposals for importance sampling)."""
    n_steps: int = 50
    """Annealing steps; 0 is importance sampling."""
    kernel: str = "mala"
    """Langevin move of the sampler (:class:`~openmm_sbg.smc.SMCOptions`)."""
    sample_temperatures_K: tuple[float, ...] = ()
    """Temperatures to sample besides the target's, from the same flow."""
    refine_minutes: float = 0.0
    """Wall-clock budget of a refinement with the energy after training (tempered alpha-2, the energy
    alone, the shipped ad2's recipe), which also ends when three evaluations in a row have not raised
    its ESS; the samplers then use the refined flow. 0 skips it."""
    seed: int = 0
    """Seed of the data, the training and the sampling."""

    def __post_init__(self):
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        if self.ns <= 0 or self.frame_interval_ps <= 0:
            raise ValueError("ns and frame_interval_ps must be positive")
        if self.spline_bins < 0 or self.spline_bins == 1:
            raise ValueError(f"spline_bins must be 0 (the preset's blocks) or at least 2, got {self.spline_bins}")
        if self.seeded_ns < 0 or not 0 <= self.seed_below <= 1:
            raise ValueError("seeded_ns must be >= 0 and seed_below a fraction in [0, 1]")
        if self.train_max_temperature_K is not None and (self.data != "replica-exchange" or self.train_max_temperature_K <= 0):
            raise ValueError("train_max_temperature_K selects replica-exchange rungs: it needs data='replica-exchange' and a "
                             f"temperature in K, got {self.train_max_temperature_K!r} with data={self.data!r}")
        if self.refine_minutes < 0:
            raise ValueError(f"refine_minutes must be >= 0 (0 skips the refinement), got {self.refine_minutes}")
        object.__setattr__(self, "sample_temperatures_K", tuple(float(t) for t in self.sample_temperatures_K))

    def to_dict(self) -> dict:
        """JSON form, as ``pipeline.json`` stores it; settings added later are left out at their old behaviour's
        value, so folders written before them continue."""
        values = {**dataclasses.asdict(self), "training": self.training.to_dict()}
        later = {"refine_minutes": 0.0, "spline_bins": 0, "train_max_temperature_K": None}
        return json.loads(json.dumps(without_later_settings(values, later)))


def run_pipeline(
    target: BoltzmannTarget,
    folder: str | os.PathLike,
    config: PipelineConfig | None = None,
    platform: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> PipelineSummary:
    """Run (or continue) data -> train -> sample -> evaluate for ``target`` in ``folder``.

    Returns the summary also written to ``folder/summary.json``: each stage's wall-clock (and
    whether it ran in this call), the training record, and per temperature the ESS, log Z and
    backbone-state populations, with E-W2 / T-W2 against the held-out MD at the target's.
    """
    config = config or PipelineConfig()
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _check_settings(folder, target, config)
    stages = {}
    stages["data"] = _stage(folder, "data", lambda: _make_data(target, folder, config, platform, progress, device),
                            data_result_from_dict)
    data_file = os.path.join(folder, "data-all-replicas.h5" if config.data == "replica-exchange" else "data.h5")
    seeded = []
    if config.data == "replica-exchange" and config.seeded_ns > 0:
        stages["seed"] = _stage(folder, "seed", lambda: _seed(target, folder, config, platform, progress, device),
                                SeedingResult.from_dict)
        seeded = [run.out for run in stages["seed"].result.runs]
    stages["train"] = _stage(folder, "train", lambda: _train(target, folder, data_file, seeded, config, device, progress),
                             TrainingRecord.from_dict)
    flow_path = os.path.join(folder, "flow.pt")
    if config.refine_minutes > 0:
        stages["refine"] = _stage(folder, "refine", lambda: _refine(target, folder, config, device, progress),
                                  RefinementRecord.from_dict)
        flow_path = stages["refine"].result.flow
    samples = {}
    for kelvin in _temperatures(target, config):
        name = f"sample-{kelvin:g}K"
        stages[name] = _stage(folder, name, lambda k=kelvin: _sample(target, flow_path, folder, k, config, device, progress),
                              SamplingRecord.from_dict)
        samples[kelvin] = stages[name].result.out
    start = time.perf_counter()
    evaluation = _evaluate(target, folder, samples)
    stages["evaluate"] = StageRecord(result=evaluation, seconds=time.perf_counter() - start, ran_now=True)
    summary = PipelineSummary(
        system=target.name,
        folder=os.path.abspath(folder),
        config=config.to_dict(),
        wall_clock_s={name: stage.seconds for name, stage in stages.items()},
        ran_now=[name for name, stage in stages.items() if stage.ran_now],
        data=stages["data"].result,
        seeded=stages["seed"].result if "seed" in stages else None,
        training=stages["train"].result,
        refinement=stages["refine"].result if "refine" in stages else None,
        temperatures=evaluation,
    )
    atomic_write_text(os.path.join(folder, "summary.json"), json.dumps(summary.to_dict(), indent=2, default=float) + "\n")
    return summary


# ----------------------------------------------------------------------------- stages
def _stage(folder: str, name: str, work, read) -> StageRecord:
    """Run ``work`` unless its record ``folder/stages/<name>.json`` exists; the record holds its result and wall-clock.

    ``work()`` returns the stage's result (with ``to_dict``); ``read`` makes it again from the record's JSON.
    """
    record = os.path.join(folder, "stages", f"{name}.json")
    if os.path.exists(record):
        done = read_json(record)
        return StageRecord(result=read(done["result"]), seconds=done["seconds"], ran_now=False)
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(record), exist_ok=True)
    atomic_write_text(record, json.dumps({"result": result.to_dict(), "seconds": seconds}, indent=1, default=float))
    return StageRecord(result=result, seconds=seconds, ran_now=True)


def _check_settings(folder: str, target: BoltzmannTarget, config: PipelineConfig) -> None:
    path = os.path.join(folder, "pipeline.json")
    settings = {"system": target.name, "n_atoms": target.n_atoms, "temperature_K": _kelvin(target), "config": config.to_dict()}
    if os.path.exists(path):
        check_resume_settings(folder, read_json(path), settings, remedy="rerun with the same settings to continue it, or use another folder")
        return
    atomic_write_text(path, json.dumps(settings, indent=1))


def _kelvin(target: BoltzmannTarget) -> float:
    return float(target.temperature.value_in_unit(unit.kelvin))


def _temperatures(target: BoltzmannTarget, config: PipelineConfig) -> list[float]:
    first = _kelvin(target)
    return [first, *[t for t in config.sample_temperatures_K if t != first]]


def _md_config(config: PipelineConfig, ns: float, seed: int):
    from openmm_sbg.md import MDConfig

    return MDConfig(n_frames=max(1, round(ns * 1000 / config.frame_interval_ps)), steps_per_frame=round(config.frame_interval_ps * 1000),
                    seed=seed)


def _make_data(target, folder, config: PipelineConfig, platform, progress, device="cpu") -> DataResult:
    from openmm_sbg.md import run_md

    md = _md_config(config, config.ns, config.seed)
    out = os.path.join(folder, "data.h5")
    if config.data == "md":
        return run_md(target, out, md, platform=platform, progress=progress)
    from openmm_sbg.replica_exchange import (
        ReplicaExchangeConfig,
        geometric_ladder,
        run_replica_exchange,
    )

    ladder = geometric_ladder(_kelvin(target), config.t_max_K, config.n_replicas)
    exchange = ReplicaExchangeConfig(md=md, temperatures_K=ladder)
    batched = _batched_replica_exchange(target, out, exchange, device, progress)
    if batched is not None:
        return batched
    return run_replica_exchange(target, out, exchange, platform=platform or "Reference", all_replicas=True, progress=progress)


def _batched_replica_exchange(target, out, exchange, device, progress):
    """Replica exchange on the batched engine, in copies of the ladder that fill a batch (the same frames per
    temperature); ``None`` where that engine cannot run the System (a notice says why) or an openmmtools run is resumed."""
    from openmm_sbg import dynamics

    if os.path.exists(os.path.join(out + ".work", "replicas.nc")):
        return None
    copies = dynamics.ladder_copies(exchange.md.n_frames, len(exchange.temperatures_K), device)
    per_copy = dataclasses.replace(exchange, md=dataclasses.replace(exchange.md, n_frames=exchange.md.n_frames // copies))
    return _on_batched_engine(
        lambda options: dynamics.run_batched_replica_exchange(target, out, per_copy, n_copies=copies, options=options,
                                                              all_replicas=True, progress=progress),
        device, "replica exchange runs on OpenMM (openmmtools) instead")


def _on_batched_engine(run, device, fallback: str):
    """``run(options)`` on the batched engine (compiled where kernels can be built); ``None``, with a notice that
    says ``fallback``, where the engine cannot represent the System."""
    from openmm_sbg import dynamics

    try:
        return run(dynamics.EngineOptions(device=device, compile=dynamics.compile_available(device)))
    except dynamics.BatchedEngineUnavailable as err:
        notice(f"{err}; {fallback}")
        return None


def _seed(target, folder, config: PipelineConfig, platform, progress, device="cpu") -> SeedingResult:
    """MD at the target temperature from a replica-exchange frame of each backbone state rare there, per residue."""
    import copy

    from openmm_sbg import populations
    from openmm_sbg.data import load_positions, read_metadata
    from openmm_sbg.seeding import rare_state_seeds

    try:
        residues, labeller = populations.residue_state_labeller(target.topology)
    except ValueError as err:
        return SeedingResult(runs=[], skipped=str(err))
    path = os.path.join(folder, "data-all-replicas.h5")
    positions = load_positions(path, target)
    labels, temperatures = labeller(positions), read_metadata(path)["frame_temperature_K"]
    runs, single = [], len(residues) == 1
    for index, residue in enumerate(residues):
        seeds = rare_state_seeds(labels[:, index], temperatures, _kelvin(target), len(populations.BACKBONE_STATES),
                                 config.seed_below)
        for seed in seeds:
            # A dipeptide keeps the file names it had before every residue was seeded.
            name = f"{seed['state']}" if single else f"{residue}-{seed['state']}"
            out = os.path.join(folder, f"seeded-{name}.h5")
            start = copy.copy(target)  # the same System, started from the chosen frame
            start.positions = positions[seed["frame"]].astype(float)
            md = _md_config(config, config.seeded_ns, config.seed + 1 + seed["state"] + index * len(populations.BACKBONE_STATES))
            # A finished run of an interrupted stage is kept: run_md would redo it.
            result = None if os.path.exists(out) else _seeded_md(start, out, md, platform, device, progress)
            runs.append(SeededRun(**seed, state_name=populations.BACKBONE_STATES[seed["state"]], out=out, md=result,
                                  residue=None if single else residue))
    return SeedingResult(runs=runs, below=config.seed_below)


def _seeded_md(start, out, md, platform, device, progress):
    """``md`` from ``start``'s positions, split over a batch of walkers on the batched engine (each with its own
    noise) where it can run the System, else one OpenMM trajectory."""
    from openmm_sbg import dynamics
    from openmm_sbg.md import run_md

    # A few walkers, each long enough to leave its start: 16 on a CPU.
    walkers = dynamics.ladder_copies(md.n_frames, 4, device)
    per_walker = dataclasses.replace(md, n_frames=md.n_frames // walkers)
    batched = _on_batched_engine(
        lambda options: dynamics.run_batched_md(start, out, per_walker, walkers, start=start.positions[None], options=options,
                                                progress=progress),
        device, "the seeded MD runs on OpenMM instead")
    return batched if batched is not None else run_md(start, out, md, platform=platform, progress=progress)


def _train(target, folder, data_file: str, seeded: list[str], config: PipelineConfig, device, progress) -> TrainingRecord:
    """Fit the flow to the data stage's frames (at or below ``train_max_temperature_K``) and the seeded runs'."""
    import numpy as np

    from openmm_sbg.data import training_frames
    from openmm_sbg.dynamics import compile_available
    from openmm_sbg.flow import TarFlow, get_preset, train

    path = os.path.join(folder, "flow.pt")
    flow = TarFlow.load(path) if os.path.exists(path) else None
    if flow is None or not flow.metadata.get("complete"):  # a finished fit is kept, an unfinished one resumed
        train_positions, val_positions, _ = training_frames(data_file, target, config.train_max_temperature_K)
        if seeded:  # MD at the target temperature: every frame counts
            seeded_train, seeded_val, _ = training_frames(seeded, target)
            train_positions, val_positions = np.concatenate([train_positions, seeded_train]), np.concatenate([val_positions, seeded_val])
        flow = train(
            train_positions, val_positions, target=target,
            config=dataclasses.replace(get_preset(config.preset), spline_bins=config.spline_bins) if config.spline_bins else config.preset,
            options=dataclasses.replace(config.training, seed=config.seed), checkpoint_path=path, device=device,
            progress=progress, metadata={"data": [data_file, *seeded], "preset": config.preset}, compile=compile_available(device),
        )
    record = flow.metadata
    return TrainingRecord(
        flow=path,
        n_train=record["n_train"],
        steps=record["steps"],
        selected_step=record["selected_step"],
        val_nll_per_dim=record["val_nll_per_dim"],
        train_seconds=record["train_seconds"],
    )


def _refine(target, folder, config: PipelineConfig, device, progress) -> RefinementRecord:
    from openmm_sbg import populations
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.flow.refine import RefineOptions, refine

    path = os.path.join(folder, "refined.pt")
    refined = TarFlow.load(path) if os.path.exists(path) else None
    if refined is None or not refined.metadata["refinement"]["complete"]:  # a finished one is kept
        options = RefineOptions(objective="alpha-2", temper_ess=0.2, data_weight=0.0, lr=1e-4, ema_decay=0.999, steps=10**6,
                                max_seconds=60 * config.refine_minutes, patience=3, seed=config.seed)
        try:
            states = populations.backbone_state_labeller(target.topology)
        except ValueError:
            states = None  # no backbone states to guard
        flow = TarFlow.load(os.path.join(folder, "flow.pt"), target=target, map_location=device)
        refined = refine(flow, target, options, states=states, checkpoint_path=path, progress=progress)
    record = refined.metadata["refinement"]
    return RefinementRecord(flow=path, steps=record["steps"], seconds=record["seconds"], ess=record["ess"],
                            start_ess=record["history"][0]["ess"], selected_step=record["selected_step"],
                            stopped=record["stopped"])


def _sample(target, flow_path, folder, kelvin, config: PipelineConfig, device, progress) -> SamplingRecord:
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.sampling import sample

    at_temperature = BoltzmannTarget(
        target.system, target.topology, kelvin * unit.kelvin, positions=target.positions, name=target.name,
        backend=target.backend,
    )
    flow = TarFlow.load(flow_path, target=at_temperature, map_location=device)
    out = os.path.join(folder, f"samples-{kelvin:g}K.h5")
    return SamplingRecord(sample(
        at_temperature, flow, out, seed=config.seed, n_particles=config.n_particles, n_steps=config.n_steps,
        kernel=config.kernel, progress=progress,
        resample_at_end=False, **(INDEPENDENT_PROPOSALS if config.n_steps == 0 else {}),
    ))


def _evaluate(target, folder, samples: dict) -> dict:
    from openmm_sbg.evaluation import evaluate, independent_samples, state_summary
    from openmm_sbg.smc import SMCResult

    reference = os.path.join(folder, "data.h5")
    results = {}
    for index, (kelvin, path) in enumerate(samples.items()):
        result = SMCResult.load(path)
        if index == 0:
            metrics = evaluate(result, reference, plots=os.path.join(folder, "plots"), target=target)
        else:  # no reference at this temperature: the estimates themselves
            metrics = {"log_z": result.log_z, "ess": result.ess,
                       "states": state_summary(result.to_mdtraj(), None, result.log_weights, independent_samples(result))}
        results[f"{kelvin:g}"] = {**metrics, "samples_file": path}
    return results
