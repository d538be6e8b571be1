"""Batched dynamics: many Langevin walkers of one System integrated together on the torch force field.

- :class:`BatchedLangevin`: OpenMM's ``LangevinMiddleIntegrator`` scheme for a batch of walkers,
  each with its own temperature and counter-based random stream (:mod:`.noise`), CPU or CUDA,
  float32 or float64 (:mod:`.langevin`);
- :class:`LadderExchange`: temperature replica exchange between walkers of the same batch
  (:mod:`.exchange`);
- :func:`run_batched_md`, :func:`run_batched_replica_exchange`: resumable runs that write
  ``openmm-sbg md``'s file format (:mod:`.runs`); ``openmm-sbg md --walkers N`` runs them.

OpenMM stays the reference (and the engine for a single trajectory or a System the torch force
field cannot evaluate: :class:`BatchedEngineUnavailable` says why).
"""

from openmm_sbg.dynamics.exchange import LadderExchange
from openmm_sbg.dynamics.langevin import (
    BatchedEngineUnavailable,
    BatchedLangevin,
    batched_force_field,
    compile_available,
    ladder_copies,
    system_masses,
)
from openmm_sbg.dynamics.runs import (
    BatchedRunResult,
    EngineOptions,
    minimised_structure,
    run_batched_md,
    run_batched_replica_exchange,
)

__all__ = [
    "BatchedEngineUnavailable",
    "BatchedLangevin",
    "BatchedRunResult",
    "EngineOptions",
    "LadderExchange",
    "batched_force_field",
    "compile_available",
    "ladder_copies",
    "minimised_structure",
    "run_batched_md",
    "run_batched_replica_exchange",
    "system_masses",
]
