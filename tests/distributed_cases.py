"""Runs shared by tests/test_distributed.py (one process) and tests/distributed_worker.py (two)."""

import dataclasses

import numpy as np
import torch
from openmm import app

from openmm_sbg.flow import FlowConfig, TarFlow, TrainOptions
from openmm_sbg.smc import GaussianProposal
from openmm_sbg.smc.testing import DoubleWellTarget, GaussianTarget

DDP_CONFIG = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=1)
SMC_SEED = 3

#: name -> what it exercises: uneven slices, clipping, resampling and a checkpoint; MALA with
#: step-size adaptation, the adaptive schedule and multinomial resampling; importance
#: sampling; a TarFlow proposal drawn in several batches that straddle the slices, over
#: Cartesian and over internal coordinates (whose samples also draw their rigid-body noise).
SMC_SCENARIOS = ("ula", "mala_adaptive", "importance", "tarflow", "internal_tarflow")


def ddp_options() -> TrainOptions:
    return TrainOptions(steps=6, batch_size=32, lr=1e-3, seed=0)  # 3 steps per epoch on 100 frames


def ddp_frames(target, n: int = 120) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (target.positions[None] + rng.normal(scale=0.01, size=(n, target.n_atoms, 3))).astype(np.float32)


def smc_scenario(name: str):
    """``(target, proposal, SMCSampler keyword arguments)`` of a scenario."""
    if name == "ula":
        kwargs = dict(n_particles=101, n_steps=7, step_size=1e-2, clip_fraction=0.02, checkpoint_every=3)
        return DoubleWellTarget(dims=2), GaussianProposal(torch.zeros(1, 3), 1.3), kwargs
    if name == "mala_adaptive":
        kwargs = dict(n_particles=64, n_steps=50, kernel="mala", step_size=0.05, schedule="adaptive",
                      target_cess=0.9, resampling="multinomial", n_mcmc_steps=2, batch_size=8)
        return DoubleWellTarget(dims=1), GaussianProposal(torch.zeros(1, 3), 1.3), kwargs
    if name == "importance":
        return DoubleWellTarget(dims=2), GaussianProposal(torch.zeros(1, 3), 1.3), dict(n_particles=50, n_steps=0)
    if name in ("tarflow", "internal_tarflow"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if name == "tarflow":
                flow = TarFlow(DDP_CONFIG, n_atoms=2, std=0.5)
            else:
                flow = TarFlow(dataclasses.replace(DDP_CONFIG, representation="internal"), topology=_chain(4), std=0.5)
            flow = flow.double()
            for parameter in flow.parameters():  # leave the identity initialisation
                parameter.data.add_(0.05 * torch.randn_like(parameter))
        kwargs = dict(n_particles=30, n_steps=4, step_size=1e-3, batch_size=8, com_adjustment="none")
        return GaussianTarget(torch.zeros(flow.n_atoms, 3), 0.4), flow, kwargs
    raise ValueError(name)


def _chain(n_atoms: int) -> app.Topology:
    """A topology of ``n_atoms`` carbons bonded in a chain."""
    topology = app.Topology()
    residue = topology.addResidue("CHN", topology.addChain())
    atoms = [topology.addAtom(f"C{i}", app.element.carbon, residue) for i in range(n_atoms)]
    for a, b in zip(atoms, atoms[1:]):
        topology.addBond(a, b)
    return topology


#: Refinement of the DDP-trained flow, both objectives: a few steps with a refresh and an evaluation.
REFINE_OBJECTIVES = ("weighted-ml", "reverse-kl")


def refine_options(objective: str):
    from openmm_sbg.flow.refine import RefineOptions

    return RefineOptions(objective=objective, steps=4, batch_size=10, lr=1e-3, eval_every=2, eval_proposals=12,
                         proposals_per_refresh=12, refresh_every=2)
