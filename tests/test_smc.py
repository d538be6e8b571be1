"""SMC end to end on targets whose normaliser and moments are known exactly."""

import math

import numpy as np
import pytest
import torch

from openmm_sbg.smc import GaussianProposal, KernelInfo, SMCSampler, pareto_k
from openmm_sbg.smc.testing import DoubleWellTarget, GaussianTarget

N_SEEDS = 12


def _runs(target, proposal, n_particles, n_steps, **options):
    options = {"com_adjustment": "none", "clip_fraction": 0.0, "progress": False, "batch_size": 100_000, **options}
    sampler = SMCSampler(target, proposal, n_particles, n_steps, **options)
    return [sampler.run(seed) for seed in range(N_SEEDS)]


def _assert_log_z(results, exact):
    estimates = np.array([r.log_z for r in results])
    standard_error = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 3 * standard_error + 1e-3, (estimates, exact)


def _assert_moments(results, target):
    # Per-run weighted moments; their spread over seeds gives the standard error. Four
    # standard errors, as each test compares a dozen moments at once.
    means = np.array([np.einsum("k,kij->ij", r.weights, r.positions) for r in results])
    second = np.array([np.einsum("k,kij->ij", r.weights, r.positions**2) for r in results])
    for estimates, exact in ((means, target.coordinate_mean), (second, target.coordinate_var + target.coordinate_mean**2)):
        standard_error = estimates.std(axis=0, ddof=1) / math.sqrt(len(estimates))
        assert (np.abs(estimates.mean(0) - exact) < 4 * standard_error + 1e-3).all(), (estimates.mean(0), exact)


@pytest.fixture
def shifted_gaussian():
    # A proposal N(0, 1) against a target shifted by 0.7 and squeezed to std 0.6: IS alone
    # has an ESS of a few percent in 6 dimensions.
    target = GaussianTarget(torch.full((2, 3), 0.7), torch.tensor([[0.6, 0.8, 0.5], [0.7, 0.6, 0.9]]))
    return target, GaussianProposal(torch.zeros(2, 3), 1.0)


@pytest.mark.parametrize("kernel, step_size", [("mala", 0.1), ("ula", 0.01)])
def test_smc_recovers_log_z_and_moments_of_a_shifted_rescaled_gaussian(shifted_gaussian, kernel, step_size):
    target, proposal = shifted_gaussian
    results = _runs(target, proposal, 2000, 20, kernel=kernel, step_size=step_size)
    _assert_log_z(results, target.log_z)
    _assert_moments(results, target)
    assert all(r.diagnostics["t"][-1] == 1.0 for r in results)


def test_importance_sampling_recovers_log_z_of_a_gaussian(shifted_gaussian):
    target, proposal = shifted_gaussian
    _assert_log_z(_runs(target, proposal, 4000, 0), target.log_z)


@pytest.mark.parametrize("dims", [1, 2])
def test_smc_recovers_log_z_and_moments_of_a_double_well(dims):
    target = DoubleWellTarget(dims=dims)
    proposal = GaussianProposal(torch.zeros(1, 3), 1.3)
    results = _runs(target, proposal, 2000, 20, kernel="mala", step_size=0.05)
    _assert_log_z(results, target.log_z)
    _assert_moments(results, target)


def test_adaptive_schedule_recovers_log_z_of_a_double_well():
    target = DoubleWellTarget(dims=2)
    proposal = GaussianProposal(torch.zeros(1, 3), 1.3)
    results = _runs(target, proposal, 2000, 200, kernel="mala", step_size=0.05, schedule="adaptive", target_cess=0.95)
    _assert_log_z(results, target.log_z)
    assert all(1 < len(r.diagnostics["t"]) < 200 and r.diagnostics["t"][-1] == 1.0 for r in results)


def test_moment_and_log_z_checks_fail_for_a_kernel_that_ignores_the_target(shifted_gaussian):
    """The checks can fail: a random walk that does not leave exp(-E_t) invariant is caught."""
    target, proposal = shifted_gaussian
    results = _runs(target, proposal, 2000, 20, kernel=_random_walk)
    with pytest.raises(AssertionError):
        _assert_log_z(results, target.log_z)
    with pytest.raises(AssertionError):
        _assert_moments(results, target)


def _random_walk(state, t, potential, step_size, noise, uniform):
    return potential(state.x + 0.3 * noise), KernelInfo(acceptance=torch.ones(len(noise)))


def test_zero_steps_is_importance_sampling(shifted_gaussian):
    target, proposal = shifted_gaussian
    result = SMCSampler(
        target, proposal, 500, 0, com_adjustment="none", clip_fraction=0.0, resample_threshold=0.0,
        resample_at_end=False, progress=False,
    ).run(3)
    x = torch.as_tensor(result.positions)
    log_w = (proposal.energy(x) - target.energy(x)).numpy()
    np.testing.assert_allclose(result.log_weights, log_w, rtol=1e-12)
    assert result.log_z == pytest.approx(np.logaddexp.reduce(log_w) - math.log(500), rel=1e-12)
    assert result.ess == pytest.approx(np.exp(2 * np.logaddexp.reduce(log_w) - np.logaddexp.reduce(2 * log_w)) / 500)
    # One annealing step from t = 0 to 1 weights the same proposals exactly as IS does.
    one_step = SMCSampler(target, proposal, 500, 1, com_adjustment="none", clip_fraction=0.0, progress=False).run(3)
    assert one_step.log_z == pytest.approx(result.log_z, rel=1e-12)


def test_same_seed_same_result_and_different_seed_different_result(shifted_gaussian):
    target, proposal = shifted_gaussian
    sampler = SMCSampler(target, proposal, 300, 5, kernel="mala", step_size=0.1, com_adjustment="none", progress=False)
    first, again, other = sampler.run(1), sampler.run(1), sampler.run(2)
    np.testing.assert_array_equal(first.positions, again.positions)
    assert first.log_z == again.log_z
    assert not np.array_equal(first.positions, other.positions)


def test_weights_stay_finite_with_extreme_energies():
    """NaN, +inf and 1e300 energies give zero weight, never a NaN weight or log Z."""
    target = _Extreme(GaussianTarget(torch.zeros(1, 3), 1.0))
    proposal = GaussianProposal(torch.zeros(1, 3), 1.5)
    for n_steps in (0, 10):
        result = SMCSampler(
            target, proposal, 1000, n_steps, com_adjustment="none", step_size=0.05, resample_at_end=False, progress=False
        ).run(0)
        assert not np.isnan(result.log_weights).any()
        assert np.isfinite(result.log_z)
        assert 0 < result.ess <= 1
        alive = np.isfinite(result.log_weights)
        assert np.isfinite(result.energies[alive]).all() and alive.mean() > 0.5
        assert np.isfinite(result.weights).all()
    # MALA rejects every move into the 1e300 region, so after resampling none is left there.
    resampled = SMCSampler(
        target, proposal, 1000, 10, kernel="mala", com_adjustment="none", step_size=0.05, progress=False
    ).run(0)
    assert (resampled.energies < 1e300).all()


class _Extreme:
    """Wraps a target: NaN energy for x > 1.5, +inf for x < -1.5, 1e300 for 1.2 < y."""

    def __init__(self, target):
        self.target, self.n_atoms = target, target.n_atoms

    def _corrupt(self, x, energy):
        x = torch.as_tensor(x)
        energy = torch.where(x[:, 0, 0] > 1.5, torch.nan, energy)
        energy = torch.where(x[:, 0, 0] < -1.5, torch.inf, energy)
        return torch.where(x[:, 0, 1] > 1.2, 1e300, energy)

    def energy(self, x, allow_nonfinite=True):
        return self._corrupt(x, self.target.energy(x))

    def energy_and_forces(self, x, allow_nonfinite=True):
        energy, forces = self.target.energy_and_forces(x)
        return self._corrupt(x, energy), forces


def test_all_proposals_dropped_is_a_clear_error(shifted_gaussian):
    target, proposal = shifted_gaussian
    sampler = SMCSampler(target, proposal, 100, 2, energy_cutoff=-1.0, com_adjustment="none", progress=False)
    with pytest.raises(RuntimeError, match="raise the cutoff"):
        sampler.run(0)


def test_filters_drop_the_requested_proposals(shifted_gaussian):
    target, proposal = shifted_gaussian
    result = SMCSampler(
        target, proposal, 1000, 0, energy_cutoff=8.0, clip_fraction=0.01, com_adjustment="none", progress=False
    ).run(0)
    info = result.info
    assert info["n_after_energy_cutoff"] < 1000
    assert info["n_kept"] == info["n_after_energy_cutoff"] - int(0.01 * info["n_after_energy_cutoff"])
    assert result.energies.max() <= 8.0


def test_the_proposals_weight_tail_is_reported(shifted_gaussian):
    target, proposal = shifted_gaussian
    result = SMCSampler(target, proposal, 2000, 0, com_adjustment="none", clip_fraction=0.0, resample_threshold=0.0,
                        resample_at_end=False, progress=False).run(0)
    k = result.info["pareto_k_proposals"]
    assert math.isfinite(k) and k == pareto_k(torch.as_tensor(result.log_weights))


@pytest.mark.parametrize("adjustment, extra", [("gaussian", 0.0), ("chi3", "chi3")])
def test_com_adjustment_gives_the_internal_log_z_of_a_translation_invariant_target(adjustment, extra):
    """Two atoms on a spring: Z is infinite, but with the CoM density rho(c) it is known.

    E_T = |x1 - x2|^2 / (2 tau^2); with x1, x2 = c +- d/2 (unit Jacobian),
    integral exp(-E_T) rho(c) = (2 pi tau^2)^(3/2) * integral rho, and integral rho is 1 for
    the Gaussian and 3 sigma^2 * 4 pi for chi_3(|c|) read as a function of c.
    """
    tau = 0.3
    target = _Spring(tau)
    proposal = GaussianProposal(torch.tensor([[0.15, 0.0, 0.0], [-0.15, 0.0, 0.0]]), 0.25)
    sigma = proposal.com_std
    exact = 1.5 * math.log(2 * math.pi * tau**2)
    if extra == "chi3":
        exact += math.log(12 * math.pi * sigma**2)
    results = _runs(target, proposal, 2000, 10, kernel="mala", step_size=0.01, com_adjustment=adjustment)
    _assert_log_z(results, exact)


class _Spring(GaussianTarget):
    def __init__(self, tau):
        self.tau, self.n_atoms = tau, 2

    def _energy(self, x):
        return (x[:, 0] - x[:, 1]).square().sum(-1) / (2 * self.tau**2)


def _stay(state, t, potential, step_size, noise, uniform):
    return state, KernelInfo(acceptance=torch.ones(len(noise)))


def _break_half_at_the_end(state, t, potential, step_size, noise, uniform):
    if t < 1.0:
        return _stay(state, t, potential, step_size, noise, uniform)
    x = state.x.clone()
    x[::2] = torch.nan
    return potential(x), KernelInfo(acceptance=torch.ones(len(noise)))


def test_a_final_move_onto_nonfinite_energies_zeroes_weights_but_keeps_log_z(shifted_gaussian):
    target, proposal = shifted_gaussian
    options = dict(com_adjustment="none", progress=False)
    intact = SMCSampler(target, proposal, 200, 4, kernel=_stay, **options).run(0)
    broken = SMCSampler(target, proposal, 200, 4, kernel=_break_half_at_the_end, **options).run(0)
    assert broken.log_z == intact.log_z and broken.ess == intact.ess
    assert np.isneginf(broken.log_weights[::2]).all() and (broken.log_weights[1::2] == 0).all()
    assert np.isfinite(broken.weights).all() and (broken.weights[::2] == 0).all()
