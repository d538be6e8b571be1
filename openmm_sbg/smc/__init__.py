"""Sequential Monte Carlo: flow proposals annealed to the target (the "S" in SBG).

The driver :class:`SMCSampler`, whose settings are one frozen :class:`SMCOptions`
(:mod:`.options`), runs the loop around one pure annealing step, :class:`SMCStep`
(:mod:`.step`: run in, run and record out), which composes small functions a user can swap:

- proposals and the CoM adjustment (:mod:`.proposal`),
- filters and Jarzynski weights (:mod:`.weights`),
- annealing schedules (:mod:`.schedules`),
- Langevin kernels (:mod:`.kernels`),
- resampling schemes, and the :class:`ResamplingPolicy` that decides when (:mod:`.resampling`).

Example
-------
>>> from openmm_sbg import SMCSampler, systems, TarFlow
>>> sampler = SMCSampler(systems.get("ad2"), TarFlow.load("flow.pt"), n_particles=1000, n_steps=100)
>>> result = sampler.run(seed=0)          # doctest: +SKIP
>>> result.save("samples.h5")             # doctest: +SKIP
"""

from openmm_sbg.smc.driver import SMCSampler
from openmm_sbg.smc.kernels import KernelInfo, PathState, adapt_step_size, mala_step, ula_step
from openmm_sbg.smc.options import DEFAULT_STEP_SIZE, SMCOptions
from openmm_sbg.smc.proposal import GaussianProposal, com_energy, com_log_density, source_energy
from openmm_sbg.smc.resampling import ResamplingPolicy, multinomial, systematic
from openmm_sbg.smc.result import SMCResult
from openmm_sbg.smc.schedules import AdaptiveSchedule, FixedSchedule, linear_schedule
from openmm_sbg.smc.step import SMCStep
from openmm_sbg.smc.weights import (
    conditional_ess,
    energy_cutoff_filter,
    jarzynski_increment,
    normalised_ess,
    pareto_k,
    top_fraction_filter,
)

__all__ = [
    "DEFAULT_STEP_SIZE",
    "SMCSampler",
    "SMCOptions",
    "SMCResult",
    "SMCStep",
    "ResamplingPolicy",
    "GaussianProposal",
    "PathState",
    "KernelInfo",
    "ula_step",
    "mala_step",
    "adapt_step_size",
    "com_energy",
    "com_log_density",
    "source_energy",
    "multinomial",
    "systematic",
    "FixedSchedule",
    "AdaptiveSchedule",
    "linear_schedule",
    "conditional_ess",
    "energy_cutoff_filter",
    "jarzynski_increment",
    "normalised_ess",
    "pareto_k",
    "top_fraction_filter",
]
