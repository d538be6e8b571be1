"""OpenMMMoveKernel: SMC with an openmmtools move per particle, sharing the batched driver."""

import numpy as np
import pytest
import torch
from openmm import unit
from openmmtools import mcmc

from openmm_sbg import SMCSampler, TarFlow, metrics, shipped
from openmm_sbg.flow import FlowConfig
from openmm_sbg.openmm import OpenMMMoveKernel

CARTESIAN_SMALL = FlowConfig(width=64, n_blocks=4, layers_per_block=2, heads=1)


def _short_move():
    return mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=2, reassign_velocities=True)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_kernel_runs_inside_smc_sampler(ad2, tmp_path, platform):
    path = tmp_path / "flow.pt"
    torch.manual_seed(0)
    TarFlow(CARTESIAN_SMALL, n_atoms=22, std=0.3).save(path)
    flow = TarFlow.load(path)
    kernel = OpenMMMoveKernel(ad2, path, move=_short_move(), platform=platform)
    sampler = SMCSampler(ad2, flow, n_particles=4, n_steps=2, kernel=kernel, clip_fraction=0.0, progress=False)
    result = sampler.run(seed=0)
    assert result.positions.shape == (4, 22, 3)
    assert np.isfinite(result.log_z)
    assert (result.diagnostics["acceptance"] == 1.0).all()  # Langevin dynamics never rejects
    assert "0x" not in repr(kernel), "the driver keys checkpoints by the kernel's repr"


def test_kernel_refuses_a_path_other_than_the_samplers(ad2, tmp_path):
    path = tmp_path / "flow.pt"
    TarFlow(CARTESIAN_SMALL, n_atoms=22, std=0.3).save(path)
    sampler = SMCSampler(ad2, TarFlow.load(path), n_particles=2, n_steps=1, com_adjustment="chi3", progress=False)
    state = sampler.potential(torch.as_tensor(ad2.positions[None] + 0.3))  # CoM away from 0: chi3 != gaussian
    kernel = OpenMMMoveKernel(ad2, path, move=_short_move(), com_adjustment="gaussian", platform="Reference")
    noise, uniform = torch.zeros_like(state.x), torch.zeros(1)
    with pytest.raises(ValueError, match="com_adjustment"):
        kernel(state, 0.5, sampler.potential, 1e-6, noise, uniform)
    matching = OpenMMMoveKernel(ad2, path, move=_short_move(), platform="Reference")
    moved, info = matching(state, 0.5, sampler.potential, 1e-6, noise, uniform)
    assert torch.isfinite(moved.e_target).all() and info.acceptance.tolist() == [1.0]


@pytest.mark.slow
def test_openmm_kernel_agrees_with_batched_kernel_on_ad2():
    """Same seed and schedule (so the same proposals), moves by OpenMM Langevin vs batched MALA."""
    path = shipped.model_path("ad2")
    from openmm_sbg import systems

    target = systems.get("ad2")
    flow = TarFlow.load(path, target=target)
    options = dict(n_particles=256, n_steps=8, energy_cutoff=200.0, progress=False)
    # 0.25 fs: the flow is as stiff as the force field, and its stiffest modes (hydrogens) need short steps.
    move = mcmc.LangevinDynamicsMove(timestep=0.25 * unit.femtosecond, n_steps=5, reassign_velocities=True)
    kernel = OpenMMMoveKernel(target, path, move=move)
    results = {
        "batched": SMCSampler(target, flow, kernel="mala", step_size=1e-5, **options).run(seed=0),
        "openmm": SMCSampler(target, flow, kernel=kernel, adapt_step_size=False, **options).run(seed=0),
    }
    summaries = {}
    for name, result in results.items():
        w = result.weights
        n_eff = max(result.ess * len(w), 1.0) / 2  # resampled particles are correlated: halve the ESS
        phi, psi = np.degrees(metrics.backbone_dihedrals(result.to_mdtraj())).T
        energy_mean = float(np.sum(w * result.energies))
        energy_se = float(np.sqrt(np.sum(w * (result.energies - energy_mean) ** 2) / n_eff))
        p_alpha_r = float(np.sum(w * ((phi < 0) & (psi >= -120) & (psi < 50))))
        summaries[name] = (energy_mean, energy_se, p_alpha_r, np.sqrt(p_alpha_r * (1 - p_alpha_r) / n_eff) + 0.02)
    (e1, s1, p1, sp1), (e2, s2, p2, sp2) = summaries.values()
    assert abs(e1 - e2) < 4 * np.hypot(s1, s2), summaries
    assert abs(p1 - p2) < 4 * np.hypot(sp1, sp2), summaries
