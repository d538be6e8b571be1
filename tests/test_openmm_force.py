"""The flow as an OpenMM force and the lambda-annealed System, on the CPU and Reference platforms."""

import copy
import dataclasses

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from openmmtools import cache, mcmc, states

from openmm_sbg import TarFlow, systems
from openmm_sbg.flow import get_preset
from openmm_sbg.flow.features import fit_representation
from openmm_sbg.flow.presets import REPRESENTATIONS
from openmm_sbg.openmm import (
    AnnealingState,
    create_annealed_state,
    create_annealed_system,
    create_flow_force,
    create_torch_force,
    flow_energy_module,
)
from openmm_sbg.smc.proposal import com_energy, resolve_com_adjustment
from toy_molecules import save_perturbed

PLATFORMS = ["Reference", "CPU"]


@pytest.fixture(scope="module", params=REPRESENTATIONS)
def flow_path(request, tmp_path_factory):
    """A small ad2 flow of each representation with random (non-identity) blocks, saved as a checkpoint."""
    torch.manual_seed(0)
    target = systems.get("ad2", platform="Reference")
    flow = TarFlow(dataclasses.replace(get_preset("ad2-small"), representation=request.param), target=target, std=0.3)
    fit_representation(flow.representation, _configurations(target, n=64))
    return save_perturbed(flow, 0.02, tmp_path_factory.mktemp("flow"))


def _configurations(target, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return torch.as_tensor(target.positions[None] + 0.01 * rng.normal(size=(n, target.n_atoms, 3)))


def _flow_energy_and_grad(flow, x):
    x = x.clone().requires_grad_(True)
    energy = flow.energy(x.float()).double()
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), grad


def _context(system, platform):
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_flow_force_matches_flow_energy_and_autograd(ad2, flow_path, platform):
    flow = TarFlow.load(flow_path)
    system = openmm.System()
    for i in range(ad2.n_atoms):
        system.addParticle(ad2.system.getParticleMass(i))
    system.addForce(create_flow_force(flow_path, ad2.temperature))
    context = _context(system, platform)
    x = _configurations(ad2)
    energy, grad = _flow_energy_and_grad(flow, x)
    for i in range(len(x)):
        context.setPositions(x[i].numpy())
        state = context.getState(getEnergy=True, getForces=True)
        np.testing.assert_allclose(state.getPotentialEnergy() / unit.kilojoule_per_mole / ad2.kT_kj_per_mol, energy[i], rtol=1e-6)
        forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) / ad2.kT_kj_per_mol
        np.testing.assert_allclose(forces, -grad[i].numpy(), rtol=1e-4, atol=1e-3 * float(grad[i].abs().max()))


def test_flow_force_survives_copy_and_xml(ad2, flow_path):
    system = openmm.System()
    for _ in range(ad2.n_atoms):
        system.addParticle(1.0)
    system.addForce(create_flow_force(flow_path, ad2.temperature))
    xml = openmm.XmlSerializer.serialize(system)
    assert len(xml) < 100_000, "the force should serialise as a checkpoint path, not the weights"
    x = _configurations(ad2, n=1)[0].numpy()
    energies = []
    for copied in (system, copy.deepcopy(system), openmm.XmlSerializer.deserialize(xml)):
        context = _context(copied, "Reference")
        context.setPositions(x)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy() / unit.kilojoule_per_mole)
    assert energies[0] == pytest.approx(energies[1]) == pytest.approx(energies[2])


def test_in_memory_flow_is_snapshotted(ad2, flow_path):
    flow = TarFlow.load(flow_path)
    force = create_flow_force(flow, ad2.temperature)
    assert len(openmm.XmlSerializer.serialize(force)) < 100_000


def test_torchscript_module_matches_flow(ad2, flow_path):
    flow = TarFlow.load(flow_path)
    module = flow_energy_module(flow_path, ad2.temperature)
    x = _configurations(ad2)
    energy, grad = _flow_energy_and_grad(flow, x)
    for i in range(len(x)):
        xi = x[i].clone().requires_grad_(True)
        value = module(xi)
        (module_grad,) = torch.autograd.grad(value, xi)
        assert float(value.detach()) / ad2.kT_kj_per_mol == pytest.approx(float(energy[i]), rel=1e-5)  # float32 sums
        np.testing.assert_allclose(module_grad.numpy() / ad2.kT_kj_per_mol, grad[i].numpy(), rtol=1e-4, atol=1e-4)


def test_torch_force_needs_openmm_torch(ad2, flow_path):
    try:
        import openmmtorch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="openmm-torch"):
            create_torch_force(flow_path, ad2.temperature)
    else:
        force = create_torch_force(flow_path, ad2.temperature)
        assert force.getNumGlobalParameters() == 0


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("com_adjustment", ["none", "chi3", "gaussian"])
def test_annealed_system_is_the_interpolation(ad2, flow_path, platform, com_adjustment):
    flow = TarFlow.load(flow_path)
    system = create_annealed_system(ad2, flow_path, com_adjustment=com_adjustment)
    context = _context(system, platform)
    x = _configurations(ad2, n=2)
    e_flow, _ = _flow_energy_and_grad(flow, x)
    e_ff = ad2.energy(x)
    e_com = com_energy(x, flow.com_std, com_adjustment, need_grad=False)[0]
    for lam in (0.0, 1.0, 0.3):
        context.setParameter("lambda_sbg", lam)
        for i in range(len(x)):
            context.setPositions(x[i].numpy())
            energy = context.getState(getEnergy=True).getPotentialEnergy() / unit.kilojoule_per_mole / ad2.kT_kj_per_mol
            expected = (1 - lam) * float(e_flow[i]) + lam * (float(e_ff[i]) + float(e_com[i]))
            assert energy == pytest.approx(expected, abs=1e-3), (lam, i)


def test_annealed_system_rejects_bad_arguments(ad2, flow_path):
    with pytest.raises(ValueError, match="com_adjustment"):
        create_annealed_system(ad2, flow_path, com_adjustment="mass")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        create_annealed_system(ad2, flow_path, lambda_sbg=1.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_annealed_system(ad2, "/nonexistent/flow.pt")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_annealing_state_drives_lambda_in_langevin_move(ad2, flow_path, platform):
    compound = create_annealed_state(ad2, flow_path, lambda_sbg=0.0)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName(platform))
    move = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, n_steps=5, reassign_velocities=True)
    sampler_state = states.SamplerState(ad2.positions * unit.nanometer)
    x = torch.as_tensor(ad2.positions[None])
    for lam in (0.0, 0.5, 1.0):
        compound.lambda_sbg = lam
        move.apply(compound, sampler_state, context_cache)
        context, _ = context_cache.get_context(compound)
        assert context.getParameter("lambda_sbg") == lam
    assert len(context_cache) == 1, "every lambda should share one Context"
    assert np.isfinite(sampler_state.potential_energy / unit.kilojoule_per_mole)
    # At lambda = 1 the annealed System is the force field (plus the CoM term, by default
    # the sampler's: Gaussian for an internal flow, chi3 for a Cartesian one).
    compound.lambda_sbg = 1.0
    context.setPositions(ad2.positions)
    flow = TarFlow.load(flow_path)
    e_com = com_energy(x, flow.com_std, resolve_com_adjustment("auto", flow), need_grad=False)[0]
    assert compound.reduced_potential(context) == pytest.approx(float(ad2.energy(x) + e_com), abs=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compound.lambda_sbg = -0.1
    assert isinstance(compound._composable_states[0], AnnealingState)
