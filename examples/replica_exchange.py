"""Replica exchange with a flow move: openmmtools' ReplicaExchangeSampler plus FlowIndependenceMove.

    python examples/replica_exchange.py [--iterations 50] [--platform CPU]

Each replica alternates Langevin dynamics with independence proposals from the shipped flow,
accepted with the exact Metropolis-Hastings ratio at the replica's temperature, so the
300 K replica jumps between the alanine dipeptide basins without waiting for the hot ones.
Everything else is standard openmmtools: the NetCDF file can be analysed with
``openmmtools.multistate.MultiStateSamplerAnalyzer`` or resumed with
``ReplicaExchangeSampler.from_storage``.
"""

import argparse
import os

import numpy as np
import openmm
from openmm import unit
from openmmtools import cache, mcmc, multistate, states

from openmm_sbg import shipped, systems
from openmm_sbg.openmm import FlowIndependenceMove

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iterations", type=int, default=50)
parser.add_argument("--platform", default="CPU", help="OpenMM platform: CUDA, CPU or Reference")
parser.add_argument("--flow", default=None, help="flow checkpoint (default: the shipped ad2 model)")
parser.add_argument("--out", default="replica_exchange.nc", help="NetCDF storage file")
args = parser.parse_args()

target = systems.get("ad2")
temperatures = [300, 330, 365] * unit.kelvin
thermodynamic_states = [states.ThermodynamicState(target.system, t) for t in temperatures]
flow_move = FlowIndependenceMove(args.flow or shipped.model_path("ad2"), n_attempts=10)
move = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=100), flow_move])

if os.path.exists(args.out):
    os.remove(args.out)
reporter = multistate.MultiStateReporter(args.out, checkpoint_interval=10)
sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=args.iterations)
sampler.energy_context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName(args.platform))
sampler.sampler_context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName(args.platform))
sampler.create(thermodynamic_states, states.SamplerState(target.positions * unit.nanometer), reporter)
sampler.run()
reporter.close()

# Read the run back as any openmmtools user would.
reporter = multistate.MultiStateReporter(args.out, open_mode="r")
energies, _, _ = reporter.read_energies()
for state, stored in enumerate(reporter.read_mcmc_moves()):  # one move per thermodynamic state
    flow_stats = stored.move_list[1].statistics
    print(f"state {state}: flow move accepted {flow_stats['n_accepted']}/{flow_stats['n_proposed']}")
print(f"{energies.shape[0] - 1} iterations stored in {args.out}; mean reduced energy per state {np.round(energies.mean((0, 1)), 1)}")
reporter.close()
