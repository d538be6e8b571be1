"""SMCRun: the whole state of an SMC run between two steps, and its checkpoint form."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from openmm_sbg.smc.kernels import PathState
from openmm_sbg.smc.weights import log_mean_weight, normalised_ess


class StepRecord(NamedTuple):
    """What one annealing step reports; its fields are the keys of ``SMCResult.diagnostics``."""

    t: float
    ess: float  # before any resampling
    acceptance: float
    resampled: bool
    step_size: float  # the one the step's moves used
    n_alive: int
    log_z: float  # running estimate


@dataclasses.dataclass(frozen=True)
class ProposalCounts:
    """How many proposals were drawn and how many each filter kept (reported in ``SMCResult.info``)."""

    n_proposals: int
    n_finite: int
    n_after_energy_cutoff: int
    n_kept: int
    ess_proposals: float
    #: Pareto k of the kept proposals' importance weights (:func:`~openmm_sbg.smc.weights.pareto_k`);
    #: None in checkpoints written before it was recorded.
    pareto_k_proposals: float | None = None


@dataclasses.dataclass
class SMCRun:
    """The state of a run: particles, weights, the log Z bookkeeping, random state and records.

    ``state`` is a :class:`~openmm_sbg.smc.PathState` (or anything that stands in for one,
    as the sharded sampler's state does); everything else is plain numbers and tensors, so
    :meth:`to_dict` is what a checkpoint stores and ``torch.load(weights_only=True)`` reads.
    A step makes a new run (:class:`~openmm_sbg.smc.step.SMCStep`); none is changed in place.
    """

    seed: int
    state: PathState
    log_w: torch.Tensor
    #: Denominator of the current resampling epoch's mean weight.
    n_norm: int
    step_size: float
    #: State of the CPU generator behind the noise, resampling and acceptance tests.
    generator: torch.Tensor
    counts: ProposalCounts
    step: int = 0
    t: float = 0.0
    #: log Z accumulated over completed resampling epochs.
    log_z_offset: float = 0.0
    diagnostics: dict[str, list] = dataclasses.field(default_factory=lambda: {key: [] for key in StepRecord._fields})
    #: ESS and log Z of the weights at t = 1, before the final resampling.
    final_ess: float | None = None
    final_log_z: float | None = None
    #: Wall-clock seconds of the calls before this one, up to the last checkpoint each saved: a
    #: resumed run's ``info["seconds"]`` counts the whole run, not its last call alone.
    earlier_seconds: float = 0.0

    def recorded(self, step: StepRecord) -> SMCRun:
        """This run with ``step`` appended to its diagnostics (new lists; this run is unchanged)."""
        values = step._asdict()
        return dataclasses.replace(self, diagnostics={key: [*past, values[key]] for key, past in self.diagnostics.items()})

    def with_final_weights(self) -> SMCRun:
        """This run with :attr:`final_ess` and :attr:`final_log_z` taken from its weights, which are at t = 1.

        They are kept apart because a later move that lands a particle on a non-finite energy
        zeroes its weight but must not change these.
        """
        return dataclasses.replace(
            self,
            final_ess=normalised_ess(self.log_w),
            final_log_z=self.log_z_offset + log_mean_weight(self.log_w, self.n_norm),
        )

    def to_dict(self) -> dict:
        """Plain dicts, lists, numbers and tensors (``state`` must be a PathState)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**values, "state": dataclasses.asdict(self.state), "counts": dataclasses.asdict(self.counts)}

    @classmethod
    def from_dict(cls, values: dict) -> SMCRun:
        return cls(**{**values, "state": PathState(**values["state"]), "counts": ProposalCounts(**values["counts"])})
