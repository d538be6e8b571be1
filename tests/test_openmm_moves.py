"""FlowIndependenceMove: exact MH with flow proposals, in MCMCSampler and replica exchange."""

import math
import os

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from openmmtools import cache, mcmc, multistate, states, utils

from openmm_sbg import TarFlow, shipped
from openmm_sbg.flow import FlowConfig
from openmm_sbg.openmm import FlowIndependenceMove, sample_com
from toy_molecules import save_perturbed

TINY = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=2)


def _chain_system(k: float) -> openmm.System:
    """Three particles joined by two zero-length harmonic springs: each bond vector is N(0, kT/k I)."""
    system = openmm.System()
    for _ in range(3):
        system.addParticle(12.0)
    springs = openmm.HarmonicBondForce()
    springs.addBond(0, 1, 0.0, k)
    springs.addBond(1, 2, 0.0, k)
    system.addForce(springs)
    return system


@pytest.fixture(scope="module")
def toy_flow_path(tmp_path_factory):
    """A 3-atom flow: roughly iid N(0, 0.1^2) per atom, made non-Gaussian by random weights."""
    torch.manual_seed(1)
    flow = TarFlow(TINY, n_atoms=3, std=0.1)
    return save_perturbed(flow, 0.05, tmp_path_factory.mktemp("toy"))


def _bond_square_means(samples: np.ndarray) -> np.ndarray:
    bonds = np.diff(samples, axis=1)  # [T, 2, 3]
    return (bonds**2).sum(-1).mean(-1)  # [T]


def _batch_mean_error(values: np.ndarray, n_batches: int = 20) -> tuple[float, float]:
    batches = values[: len(values) // n_batches * n_batches].reshape(n_batches, -1).mean(1)
    return float(values.mean()), float(batches.std(ddof=1) / math.sqrt(n_batches))


@pytest.mark.parametrize(
    "com_adjustment,with_langevin", [("gaussian", False), ("chi3", False), ("gaussian", True)]
)
def test_leaves_boltzmann_invariant_on_exact_toy(toy_flow_path, com_adjustment, with_langevin):
    temperature = 300 * unit.kelvin
    kT = (unit.MOLAR_GAS_CONSTANT_R * temperature).value_in_unit(unit.kilojoule_per_mole)
    # Bond variance 0.6 x the flow's (2 x 0.1^2 per coordinate): proposals wider than the target.
    variance = 0.6 * 2 * 0.1**2
    thermodynamic_state = states.ThermodynamicState(_chain_system(kT / variance), temperature)
    start = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.1, 0.1, 0.0]]) + 3.0  # far from the flow's CoM
    sampler_state = states.SamplerState(start * unit.nanometer)
    move = FlowIndependenceMove(toy_flow_path, n_attempts=10, com_adjustment=com_adjustment)
    moves = [move]
    if with_langevin:
        moves.insert(0, mcmc.LangevinDynamicsMove(timestep=2 * unit.femtosecond, n_steps=5))
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    np.random.seed(0)
    torch.manual_seed(0)
    samples = []
    for _ in range(400):
        for m in moves:
            com_before = sampler_state.positions.value_in_unit(unit.nanometer).mean(0)
            m.apply(thermodynamic_state, sampler_state, context_cache)
            if m is move:  # the flow move never moves the centre of mass
                np.testing.assert_allclose(sampler_state.positions.value_in_unit(unit.nanometer).mean(0), com_before, atol=1e-6)
        samples.append(sampler_state.positions.value_in_unit(unit.nanometer))
    mean, error = _batch_mean_error(_bond_square_means(np.array(samples)[50:]))
    exact = 3 * variance
    assert abs(mean - exact) < 4 * error, (mean, exact, error)
    assert 0.05 < move.fraction_accepted < 1.0, move.statistics


def test_sample_com_matches_com_density():
    rng = np.random.default_rng(0)
    gaussian = np.array([sample_com("gaussian", 0.5, rng) for _ in range(4000)])
    chi3 = np.array([sample_com("chi3", 0.5, rng) for _ in range(4000)])
    # E|c|^2 = 3 s^2 for N(0, s^2 I); 5 s^2 for the density |c|^2 N(c; 0, s^2 I) (chi_5 radius).
    assert (gaussian**2).sum(1).mean() == pytest.approx(3 * 0.25, rel=0.05)
    assert (chi3**2).sum(1).mean() == pytest.approx(5 * 0.25, rel=0.05)
    with pytest.raises(ValueError, match="com_adjustment"):
        FlowIndependenceMove(TarFlow(TINY, n_atoms=3), com_adjustment="none")


def _ad2_sampler(ad2, n_attempts: int, langevin_steps: int):
    """MCMCSampler on ad2 with Langevin dynamics then the shipped flow's independence move; seeded."""
    move = FlowIndependenceMove(shipped.model_path("ad2"), n_attempts=n_attempts)
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=langevin_steps), move])
    sampler = mcmc.MCMCSampler(
        states.ThermodynamicState(ad2.system, ad2.temperature), states.SamplerState(ad2.positions * unit.nanometer), sequence
    )
    np.random.seed(0)
    torch.manual_seed(0)
    return sampler, move


def test_works_in_mcmc_sampler_on_ad2_and_serialises(ad2):
    sampler, move = _ad2_sampler(ad2, n_attempts=8, langevin_steps=10)
    sampler.run(5)
    assert move.n_proposed == 40
    assert np.isfinite(sampler.sampler_state.potential_energy / unit.kilojoule_per_mole)
    # The shipped internal-coordinate flow is close enough to the Boltzmann distribution that
    # independence proposals are accepted (a move that never accepts, or always does, is broken;
    # exactness is tested on the toy above).
    assert 0 < move.n_accepted < move.n_proposed
    restored = utils.deserialize(utils.serialize(move))
    assert restored.statistics == move.statistics
    assert restored.checkpoint_path == os.path.abspath(shipped.model_path("ad2"))
    assert restored.flow is move.flow, "copies share one loaded flow"


def test_replica_exchange_with_flow_move_writes_and_reads_back(ad2, tmp_path):
    path = shipped.model_path("ad2")
    temperatures = [300, 330, 360] * unit.kelvin
    thermodynamic_states = [states.ThermodynamicState(ad2.system, t) for t in temperatures]
    move = mcmc.SequenceMove(
        [mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=10), FlowIndependenceMove(path, n_attempts=4)]
    )
    storage = str(tmp_path / "replica_exchange.nc")
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=3)
    sampler.create(thermodynamic_states, states.SamplerState(ad2.positions * unit.nanometer), reporter)
    sampler.run()
    assert sampler.iteration == 3
    reporter.close()

    reader = multistate.MultiStateReporter(storage, open_mode="r")
    energies, _, _ = reader.read_energies()
    assert energies.shape == (4, 3, 3)  # iterations 0..3, replicas, states
    assert np.isfinite(energies).all()
    stored_moves = reader.read_mcmc_moves()
    flow_moves = [m.move_list[1] for m in stored_moves]
    assert all(isinstance(m, FlowIndependenceMove) for m in flow_moves)
    assert sum(m.n_proposed for m in flow_moves) == 3 * 3 * 4
    resumed = multistate.ReplicaExchangeSampler.from_storage(reader)
    assert resumed.iteration == 3
    reader.close()


@pytest.mark.slow
def test_ad2_basin_populations_match_reference(ad2):
    """Flow moves + Langevin at 300 K against an independent estimate of the phi < 0 population."""
    import mdtraj

    from openmm_sbg import data, metrics

    sampler, move = _ad2_sampler(ad2, n_attempts=10, langevin_steps=50)
    frames = []
    for _ in range(600):
        sampler.run(1)
        frames.append(sampler.sampler_state.positions.value_in_unit(unit.nanometer))
    topology = mdtraj.Topology.from_openmm(ad2.topology)
    phi = metrics.backbone_dihedrals(mdtraj.Trajectory(np.array(frames[100:]), topology))[:, 0]
    chain_mean, chain_error = _batch_mean_error((phi > 0).astype(float))
    reference = metrics.backbone_dihedrals(data.load_trajectory(shipped.reference_path("ad2")))[:, 0]
    reference_mean, reference_error = float((reference > 0).mean()), 0.005
    print(f"FlowIndependenceMove acceptance at 300 K: {move.fraction_accepted:.3f}")
    assert abs(chain_mean - reference_mean) < 4 * math.hypot(chain_error, reference_error) + 0.01
