"""What :func:`openmm_sbg.pipeline.run_pipeline` and its stages return, as dataclasses.

Each stage's result is kept in the folder as JSON (``stages/<name>.json``, written with
:meth:`to_dict`) and read back into its dataclass when a later call skips the stage
(``from_dict``), so files written by earlier versions resume unchanged.
:meth:`PipelineSummary.to_dict` is ``summary.json``.
"""

from __future__ import annotations

import dataclasses

from openmm_sbg.dynamics.runs import BatchedRunResult
from openmm_sbg.md import MDRunResult
from openmm_sbg.replica_exchange import ReplicaExchangeResult

#: The data stage's result: OpenMM MD, openmmtools replica exchange or the batched engine's replica exchange.
DataResult = MDRunResult | ReplicaExchangeResult | BatchedRunResult


def data_result_from_dict(values: dict) -> DataResult:
    """The data stage's result from its JSON form (each kind has its own keys)."""
    if "engine" in values:
        return BatchedRunResult.from_dict(values)
    if "exchange_acceptance" in values:
        return ReplicaExchangeResult.from_dict(values)
    return MDRunResult.from_dict(values)


_SEED_KEYS = ("state", "fraction_at_target", "from_K", "frame", "state_name")


@dataclasses.dataclass
class SeededRun:
    """MD at the target temperature from a frame of one backbone state rare there (:func:`openmm_sbg.seeding.rare_state_seeds`)."""

    state: int
    fraction_at_target: float
    from_K: float
    frame: int
    state_name: str
    out: str
    md: MDRunResult | BatchedRunResult | None = None
    """The run's result (OpenMM's or the batched engine's); ``None`` for a run an earlier call of the stage
    finished (only its file is known)."""
    residue: str | None = None
    """The residue whose state is rare (``"ALA3"``); ``None`` for a peptide with one such residue."""

    @property
    def status(self) -> str:
        return "complete" if self.md is None else self.md.status

    def to_dict(self) -> dict:
        seed = {name: getattr(self, name) for name in _SEED_KEYS}
        if self.residue is not None:
            seed["residue"] = self.residue
        return {**seed, **({"out": self.out, "status": "complete"} if self.md is None else self.md.to_dict())}

    @classmethod
    def from_dict(cls, values: dict) -> SeededRun:
        run = {key: value for key, value in values.items() if key not in (*_SEED_KEYS, "residue")}
        md = None if set(run) == {"out", "status"} else data_result_from_dict(run)
        return cls(**{key: values[key] for key in _SEED_KEYS}, out=run["out"], md=md, residue=values.get("residue"))


@dataclasses.dataclass
class SeedingResult:
    """The seed stage's result: its runs, or why there were none."""

    runs: list[SeededRun]
    below: float | None = None
    """The rarity threshold the runs were chosen with."""
    skipped: str | None = None
    """Why no state was seeded (the molecule has no backbone states to label)."""

    def to_dict(self) -> dict:
        runs = [run.to_dict() for run in self.runs]
        return {"runs": runs, "skipped": self.skipped} if self.skipped is not None else {"runs": runs, "below": self.below}

    @classmethod
    def from_dict(cls, values: dict) -> SeedingResult:
        return cls(**{**values, "runs": [SeededRun.from_dict(run) for run in values["runs"]]})


class FlatRecord:
    """A dataclass of plain fields, stored as them in JSON and read back from them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        return cls(**values)


@dataclasses.dataclass
class TrainingRecord(FlatRecord):
    """The train stage's result: the flow's file and the record of its fit."""

    flow: str
    n_train: int
    steps: int
    selected_step: int
    val_nll_per_dim: float
    train_seconds: float


@dataclasses.dataclass
class RefinementRecord(FlatRecord):
    """The refine stage's result: the refined flow's file and what the refinement did."""

    flow: str
    steps: int
    seconds: float
    ess: float
    """The importance-sampling ESS of the weights kept (the best evaluation's)."""
    start_ess: float
    """The trained flow's ESS, before refinement."""
    selected_step: int
    stopped: str | None
    """Why it ended before its budget (the ESS stopped rising, a guard), or None."""


@dataclasses.dataclass
class SamplingRecord:
    """A sample stage's result: :func:`openmm_sbg.sampling.sample`'s JSON summary of the run at one temperature."""

    summary: dict

    @property
    def out(self) -> str:
        """The samples file."""
        return self.summary["out"]

    def to_dict(self) -> dict:
        return dict(self.summary)

    @classmethod
    def from_dict(cls, values: dict) -> SamplingRecord:
        return cls(dict(values))


@dataclasses.dataclass
class StageRecord:
    """A stage's result, its wall-clock and whether this call ran it (``False``: read from its record)."""

    result: object
    seconds: float
    ran_now: bool


@dataclasses.dataclass
class PipelineSummary:
    """What :func:`~openmm_sbg.pipeline.run_pipeline` returns; :meth:`to_dict` is ``summary.json``."""

    system: str | None
    folder: str
    config: dict
    wall_clock_s: dict[str, float]
    """Per stage, its wall-clock in the call that ran it."""
    ran_now: list[str]
    """The stages this call ran."""
    data: DataResult
    seeded: SeedingResult | None
    """``None`` without a seed stage."""
    training: TrainingRecord
    refinement: RefinementRecord | None
    """``None`` without a refine stage."""
    temperatures: dict[str, dict]
    """Per temperature (kelvin, as ``f"{K:g}"``): the evaluation's metrics and ``samples_file``."""

    def to_dict(self) -> dict:
        return {
            "system": self.system,
            "folder": self.folder,
            "config": self.config,
            "wall_clock_s": self.wall_clock_s,
            "ran_now": self.ran_now,
            "data": self.data.to_dict(),
            "seeded": None if self.seeded is None else self.seeded.to_dict(),
            "training": self.training.to_dict(),
            "refinement": None if self.refinement is None else self.refinement.to_dict(),
            "temperatures": self.temperatures,
        }
