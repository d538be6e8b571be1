"""The SMC building blocks one by one: weights, filters, resampling, schedules, kernels, CoM, I/O."""

import math

import h5py
import mdtraj
import numpy as np
import pytest
import scipy.stats
import torch

from openmm_sbg.smc import (
    AdaptiveSchedule,
    GaussianProposal,
    PathState,
    SMCResult,
    SMCSampler,
    com_log_density,
    conditional_ess,
    energy_cutoff_filter,
    jarzynski_increment,
    linear_schedule,
    mala_step,
    multinomial,
    normalised_ess,
    pareto_k,
    source_energy,
    systematic,
    top_fraction_filter,
    ula_step,
)
from openmm_sbg.smc.testing import GaussianTarget


# ---------------------------------------------------------------------------- weights
def test_normalised_ess_of_equal_and_degenerate_weights():
    assert normalised_ess(torch.zeros(10)) == pytest.approx(1.0)
    assert normalised_ess(torch.tensor([0.0, -math.inf, -math.inf, -math.inf])) == pytest.approx(0.25)
    assert normalised_ess(torch.tensor([math.nan, math.inf, 0.0, 0.0])) == pytest.approx(0.5)
    assert normalised_ess(torch.full((3,), -math.inf)) == 0.0
    # Two weights 1 and 3: (1 + 3)^2 / (2 (1 + 9)) = 0.8.
    assert normalised_ess(torch.log(torch.tensor([1.0, 3.0]))) == pytest.approx(0.8)


@pytest.mark.parametrize("shape", [0.3, 0.8])
def test_pareto_k_recovers_the_tail_shape_of_pareto_weights(shape):
    # w = U^-shape has a Pareto tail of that shape: over seeds the estimate centres on it.
    estimates = [pareto_k(-shape * torch.rand(20_000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log())
                 for seed in range(8)]
    assert abs(np.mean(estimates) - shape) < 0.05, estimates


def test_pareto_k_of_light_tails_unusable_weights_and_too_few():
    log_w = 0.5 * torch.randn(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert pareto_k(log_w) < 0.2
    # Clashes (-inf, NaN) are not part of the tail; the scale of the log-weights does not matter.
    with_clashes = torch.cat([log_w, torch.tensor([-math.inf, math.nan])])
    assert pareto_k(with_clashes) == pytest.approx(pareto_k(log_w + 1000.0), abs=1e-9)
    assert pareto_k(torch.zeros(10)) == math.inf
    assert pareto_k(torch.zeros(1000)) == -math.inf


def test_jarzynski_increment_and_nonfinite_energies():
    e_source = torch.tensor([1.0, 2.0, 0.0, math.nan])
    e_target = torch.tensor([3.0, 1.0, math.inf, 0.0])
    increment = jarzynski_increment(e_source, e_target, 0.25, 0.75)
    assert increment[:2].tolist() == [-1.0, 0.5]
    assert increment[2:].tolist() == [-math.inf, -math.inf]


def test_conditional_ess_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    log_w, log_v = torch.randn(50, generator=generator, dtype=torch.float64), torch.randn(50, generator=generator, dtype=torch.float64)
    w = torch.softmax(log_w, 0)
    v = log_v.exp()
    assert conditional_ess(log_w, log_v) == pytest.approx(float((w * v).sum() ** 2 / (w * v**2).sum()))
    assert conditional_ess(log_w, torch.zeros(50)) == pytest.approx(1.0)


def test_filters_drop_high_energies_and_the_top_log_weights():
    energies = torch.tensor([1.0, 5.0, math.nan, 2.0])
    assert energy_cutoff_filter(energies, 3.0).tolist() == [True, False, False, True]
    assert energy_cutoff_filter(energies, None).tolist() == [True, True, False, True]
    log_w = torch.arange(1000, dtype=torch.float64)
    keep = top_fraction_filter(log_w, 0.002)
    assert keep.sum() == 998 and not keep[-2:].any()
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_filter(log_w, 1.5)


# ---------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("resampler", [systematic, multinomial])
def test_resampling_keeps_the_weighted_mean_unbiased(resampler):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(40, generator=generator, dtype=torch.float64)
    log_w = 2 * torch.randn(40, generator=generator, dtype=torch.float64)
    log_w[3] = -math.inf
    exact = float((torch.softmax(log_w, 0) * values).sum())
    means = torch.stack([values[resampler(log_w, 40, generator)].mean() for _ in range(4000)])
    standard_error = float(means.std()) / math.sqrt(len(means))
    assert abs(float(means.mean()) - exact) < 4 * standard_error
    # A resampler that keeps only the heaviest particle is biased, and is caught.
    heaviest = values[log_w.argmax()].item()
    assert abs(heaviest - exact) > 4 * standard_error


def test_systematic_resampling_gives_floor_or_ceil_copies():
    log_w = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        counts = torch.bincount(systematic(log_w, 10, generator), minlength=4)
        expected = 10 * log_w.exp()
        assert ((counts - expected).abs() < 1).all()


def test_resampling_with_no_weight_left_is_a_clear_error():
    with pytest.raises(RuntimeError, match="zero weight"):
        systematic(torch.full((4,), -math.inf), 4, torch.Generator())


# ---------------------------------------------------------------------------- schedules
def test_linear_schedule_reaches_one_exactly():
    schedule = linear_schedule(7)
    assert schedule.times[-1] == 1.0 and schedule.max_steps == 7
    assert schedule.next_time(6, schedule.times[6], None, None, None) == 1.0
    with pytest.raises(ValueError):
        linear_schedule(0)


def test_adaptive_schedule_keeps_the_conditional_ess_at_its_target():
    generator = torch.Generator().manual_seed(0)
    e_source = torch.randn(500, generator=generator, dtype=torch.float64)
    e_target = 20 * torch.randn(500, generator=generator, dtype=torch.float64)
    log_w = torch.zeros(500, dtype=torch.float64)
    schedule = AdaptiveSchedule(target_cess=0.9)
    t_next = schedule.next_time(0, 0.2, log_w, e_source, e_target)
    assert 0.2 < t_next < 1.0
    cess = conditional_ess(log_w, jarzynski_increment(e_source, e_target, 0.2, t_next))
    assert cess == pytest.approx(0.9, abs=1e-3)
    # When the whole remaining path is easy the schedule jumps to 1.
    assert schedule.next_time(0, 0.2, log_w, e_source, e_source + 0.01) == 1.0


def test_adaptive_schedule_ends_at_one_on_its_last_allowed_step():
    generator = torch.Generator().manual_seed(0)
    e_source = torch.randn(500, generator=generator, dtype=torch.float64)
    e_target = 20 * torch.randn(500, generator=generator, dtype=torch.float64)
    log_w = torch.zeros(500, dtype=torch.float64)
    schedule = AdaptiveSchedule(target_cess=0.9, max_steps=3)
    assert schedule.next_time(1, 0.2, log_w, e_source, e_target) < 1.0
    with pytest.warns(RuntimeWarning, match="3-step limit"):
        assert schedule.next_time(2, 0.2, log_w, e_source, e_target) == 1.0


# ---------------------------------------------------------------------------- kernels
def _gaussian_potential(x):
    energy = 0.5 * x.square().flatten(1).sum(1)
    return PathState(x, energy, energy, x, x)


def test_ula_step_is_the_langevin_update():
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    noise = torch.randn_like(x)
    state, info = ula_step(_gaussian_potential(x), 0.5, _gaussian_potential, 0.01, noise, torch.rand(5))
    torch.testing.assert_close(state.x, x - 0.01 * x + math.sqrt(0.02) * noise)
    assert (info.acceptance == 1).all()


def test_mala_leaves_the_target_invariant_even_with_a_large_step():
    generator = torch.Generator().manual_seed(0)
    state = _gaussian_potential(torch.randn(4000, 1, 3, dtype=torch.float64, generator=generator))
    for _ in range(30):
        noise = torch.randn(state.x.shape, dtype=torch.float64, generator=generator)
        uniform = torch.rand(4000, dtype=torch.float64, generator=generator)
        state, info = mala_step(state, 1.0, _gaussian_potential, 1.5, noise, uniform)
    assert 0.1 < float(info.acceptance.mean()) < 0.9
    assert float(state.x.var()) == pytest.approx(1.0, abs=0.05)
    # ULA with the same step is far off: variance 1 / (1 - h / 2) = 4.
    ula = _gaussian_potential(torch.randn(4000, 1, 3, dtype=torch.float64, generator=generator))
    for _ in range(30):
        ula, _ = ula_step(ula, 1.0, _gaussian_potential, 1.5, torch.randn(ula.x.shape, dtype=torch.float64, generator=generator), None)
    assert float(ula.x.var()) > 2.5


# ---------------------------------------------------------------------------- CoM adjustment
def test_com_log_density_is_the_chi3_and_gaussian_density():
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    c = x.mean(1).numpy()
    r = np.linalg.norm(c, axis=1)
    sigma = 0.3
    np.testing.assert_allclose(com_log_density(x, sigma, "chi3").numpy(), scipy.stats.chi.logpdf(r, 3, scale=sigma))
    gaussian = scipy.stats.multivariate_normal(np.zeros(3), sigma**2 * np.eye(3)).logpdf(c)
    np.testing.assert_allclose(com_log_density(x, sigma, "gaussian").numpy(), gaussian)
    assert (com_log_density(x, None, "none") == 0).all()
    with pytest.raises(ValueError, match="com_std"):
        com_log_density(x, None, "chi3")


def test_gaussian_com_adjustment_makes_the_proposal_energy_translation_invariant():
    """For an isotropic Gaussian around a centred structure, -log q(x) + log N(c) depends on x - c only."""
    mean = torch.randn(5, 3, dtype=torch.float64)
    proposal = GaussianProposal(mean - mean.mean(0), 0.2)
    x, _ = proposal.sample(4, torch.Generator().manual_seed(0))
    shifted = x + torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)

    def adjusted(y):
        return source_energy(proposal, y, need_grad=False)[0] + com_log_density(y, proposal.com_std, "gaussian")

    torch.testing.assert_close(adjusted(x), adjusted(shifted))
    # Without the adjustment (or with a wrong sigma) the energy changes with the shift.
    unadjusted = [source_energy(proposal, y, need_grad=False)[0] for y in (x, shifted)]
    assert not torch.allclose(*unadjusted)


def test_source_energy_gradient_is_that_of_minus_log_q():
    proposal = GaussianProposal(torch.zeros(3, 3), torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    energy, grad = source_energy(proposal, x)
    torch.testing.assert_close(energy, -proposal.log_prob(x))
    torch.testing.assert_close(grad, x / proposal.std**2)


# ---------------------------------------------------------------------------- driver
def test_mismatched_flow_and_bad_settings_are_clear_errors():
    target = GaussianTarget(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="flow models 3 atoms"):
        SMCSampler(target, GaussianProposal(torch.zeros(3, 3), 1.0), 10, 2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        SMCSampler(target, GaussianProposal(torch.zeros(2, 3), 1.0), 10, 2, kernel="hmc")
    with pytest.raises(ValueError, match="step_size"):
        SMCSampler(target, GaussianProposal(torch.zeros(2, 3), 1.0), 10, 2, step_size=0.0)


class _Crashing:
    """A target that raises after a number of force evaluations: a run killed part way."""

    def __init__(self, target, calls):
        self.target, self.n_atoms, self.calls = target, target.n_atoms, calls

    def energy(self, x, allow_nonfinite=True):
        return self.target.energy(x)

    def energy_and_forces(self, x, allow_nonfinite=True):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.target.energy_and_forces(x)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(tmp_path):
    target = GaussianTarget(torch.full((2, 3), 0.5), 0.7)
    proposal = GaussianProposal(torch.zeros(2, 3), 1.0)
    options = dict(kernel="mala", step_size=0.1, com_adjustment="none", progress=False, batch_size=64, checkpoint_every=3)
    reference = SMCSampler(target, proposal, 200, 10, **options).run(seed=5)

    path = tmp_path / "run.ckpt"
    # 200 particles in batches of 64: 4 evaluations for the proposals, 4 per step; crash in step 8.
    with pytest.raises(KeyboardInterrupt):
        SMCSampler(_Crashing(target, 4 + 4 * 7 + 2), proposal, 200, 10, checkpoint_path=path, **options).run(seed=5)
    saved = torch.load(path, weights_only=True)["run"]
    assert saved["step"] == 6
    resumed = SMCSampler(target, proposal, 200, 10, checkpoint_path=path, **options).run(seed=5, resume=True)
    # The wall-clock counts the interrupted call up to its checkpoint, not the last call alone.
    assert 0 < saved["earlier_seconds"] < resumed.info["seconds"]
    np.testing.assert_array_equal(resumed.positions, reference.positions)
    np.testing.assert_array_equal(resumed.log_weights, reference.log_weights)
    assert resumed.log_z == reference.log_z
    for key in reference.diagnostics:
        np.testing.assert_array_equal(resumed.diagnostics[key], reference.diagnostics[key])

    with pytest.raises(ValueError, match="other settings or seed"):
        SMCSampler(target, proposal, 200, 10, checkpoint_path=path, **options).run(seed=6, resume=True)


def test_result_saves_an_mdtraj_readable_file_and_loads_back(tmp_path, ad2):
    x0 = torch.as_tensor(ad2.positions)
    proposal = GaussianProposal(x0 - x0.mean(0), 0.003)
    result = SMCSampler(ad2, proposal, 12, 2, batch_size=8, progress=False).run(seed=0)
    assert result.positions.shape == (12, 22, 3) and np.isfinite(result.energies).all()
    path = tmp_path / "samples.h5"
    result.save(path)
    traj = mdtraj.load(str(path))
    assert traj.n_frames == 12 and traj.n_atoms == 22
    np.testing.assert_allclose(traj.xyz, result.positions, atol=1e-6)
    with h5py.File(path) as handle:
        np.testing.assert_array_equal(handle["log_weights"][()], result.log_weights)
        np.testing.assert_array_equal(handle["energies_kT"][()], result.energies)
        assert handle.attrs["log_z"] == result.log_z
    loaded = SMCResult.load(path)
    assert loaded.log_z == result.log_z and loaded.info["system"] == "ad2"
    np.testing.assert_array_equal(loaded.diagnostics["t"], result.diagnostics["t"])
    with pytest.raises(ValueError, match=".h5"):
        result.save(tmp_path / "samples.dcd")
