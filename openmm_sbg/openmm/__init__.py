"""OpenMM-native SBG: the flow as a force, the annealing path as a System, openmmtools moves.

- :func:`create_flow_force` / :func:`create_torch_force`: ``-kT log q(x)`` as an OpenMM force.
- :func:`create_annealed_system`, :class:`AnnealingState`, :func:`create_annealed_state`:
  ``(1 - lambda) E_flow + lambda E_ff`` as one System driven by openmmtools.
- :class:`FlowIndependenceMove`: flow proposals with exact Metropolis-Hastings, for
  ``MCMCSampler`` and replica exchange.
- :class:`OpenMMMoveKernel`: an SMC kernel running any openmmtools move per particle.
"""

from openmm_sbg.openmm.annealed import (
    LAMBDA,
    AnnealingState,
    com_restraint_force,
    create_annealed_state,
    create_annealed_system,
)
from openmm_sbg.openmm.flow_force import (
    FlowEnergy,
    FlowEnergyModule,
    create_flow_force,
    create_torch_force,
    flow_energy_module,
    resolve_flow,
)
from openmm_sbg.openmm.kernel import OpenMMMoveKernel, default_move
from openmm_sbg.openmm.moves import FlowIndependenceMove, sample_com

__all__ = [
    "LAMBDA",
    "AnnealingState",
    "FlowEnergy",
    "FlowEnergyModule",
    "FlowIndependenceMove",
    "OpenMMMoveKernel",
    "com_restraint_force",
    "create_annealed_state",
    "create_annealed_system",
    "create_flow_force",
    "create_torch_force",
    "default_move",
    "flow_energy_module",
    "resolve_flow",
    "sample_com",
]
