"""An ordinary OpenMM script in which MD sampling is replaced by SBG in a few lines.

    python examples/drop_in_replacement.py [--platform CPU] [--openmm-moves]

The inputs are what an OpenMM user already has: a PDB file, an ``app.ForceField``, a
System, a temperature and a platform. Instead of ``simulation.step(n)`` until the
Ramachandran plot converges, the shipped flow proposes configurations and SMC anneals and
weights them. The output is a DCD trajectory (VMD, mdtraj) plus one weight per frame:
average any observable ``A`` as ``sum(weights * A(frame))``.

``--openmm-moves`` runs the annealing moves as openmmtools ``LangevinDynamicsMove`` on the
chosen platform (through the lambda-annealed System) instead of the batched torch kernel.
"""

import argparse
import os
from importlib import resources

import numpy as np
from openmm import app, unit

from openmm_sbg import BoltzmannTarget, SMCSampler, TarFlow, shipped
from openmm_sbg.openmm import OpenMMMoveKernel

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--platform", default="CPU", help="OpenMM platform: CUDA, CPU or Reference")
parser.add_argument("--flow", default=None, help="flow checkpoint (default: the shipped ad2 model)")
parser.add_argument("--n-particles", type=int, default=500)
parser.add_argument("--n-steps", type=int, default=50)
parser.add_argument("--openmm-moves", action="store_true", help="move particles with openmmtools Langevin dynamics")
parser.add_argument("--out", default="sbg_output", help="output folder")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

# ---- the usual OpenMM set-up (SBG needs no constraints and no periodic box) ----
pdb = app.PDBFile(str(resources.files("openmm_sbg") / "structures" / "ad2.pdb"))
forcefield = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
temperature = 300 * unit.kelvin

# ---- was: Simulation(pdb.topology, system, integrator, platform).step(n_steps) ----
target = BoltzmannTarget(system, pdb.topology, temperature, positions=pdb.positions, platform=args.platform)
flow_path = args.flow or shipped.model_path("ad2")
flow = TarFlow.load(flow_path, target=target)
kernel = OpenMMMoveKernel(target, flow_path, platform=args.platform) if args.openmm_moves else "mala"
sampler = SMCSampler(target, flow, n_particles=args.n_particles, n_steps=args.n_steps, kernel=kernel, energy_cutoff=200.0)
result = sampler.run(seed=0)

# ---- outputs an OpenMM user expects: a DCD trajectory, plus the weights of its frames ----
with open(os.path.join(args.out, "samples.dcd"), "wb") as handle:
    dcd = app.DCDFile(handle, pdb.topology, 1.0 * unit.femtosecond)
    for positions in result.positions:
        dcd.writeModel(positions * unit.nanometer)
np.savetxt(os.path.join(args.out, "weights.txt"), result.weights, header="normalised weight of each DCD frame")
np.savetxt(os.path.join(args.out, "energies_kT.txt"), result.energies, header="force-field energy of each frame / kT")
print(f"log Z = {result.log_z:.3f}, normalised ESS = {result.ess:.3f}, {len(result.weights)} frames in {args.out}/samples.dcd")
