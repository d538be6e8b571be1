"""Weighted equilibrium samples of alanine dipeptide from the shipped flow, in a few lines.

    python examples/quickstart.py

Writes ``quickstart/samples.h5`` (mdtraj-readable, with log-weights and energies) and a
Ramachandran plot against the shipped reference MD, and prints log Z and the ESS.
"""

import os

from openmm_sbg import SMCSampler, TarFlow, data, metrics, shipped, systems

os.makedirs("quickstart", exist_ok=True)
target = systems.get("ad2")  # Ace-Ala-Nme, amber99sbildn + OBC implicit solvent, 300 K
flow = TarFlow.load(shipped.model_path("ad2"), target=target)

result = SMCSampler(target, flow, n_particles=1000, n_steps=50, kernel="mala").run(seed=0)
result.save("quickstart/samples.h5")
# result.ess: the run's quality, the smallest normalised ESS the weights reached before a resampling.
print(f"log Z = {result.log_z:.2f}, ESS = {result.ess:.3f}")

samples = result.to_mdtraj()  # an ordinary mdtraj.Trajectory; weights in result.weights
reference = data.load_trajectory(shipped.reference_path("ad2"))
metrics.ramachandran_plot(samples, reference, "quickstart/ramachandran.png", weights=result.weights)
print("wrote quickstart/samples.h5 and quickstart/ramachandran.png")
