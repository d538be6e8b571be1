"""State populations and their error bars on a toy with known populations."""

import math

import numpy as np
import pytest

from openmm_sbg import populations

# A 1-D mixture of three Gaussians; the states are the intervals split at -2 and 2. One state is
# rare (2%), as alphaL/C7ax is rare for alanine dipeptide.
MEANS, SIGMA, MIX = np.array([-4.0, 0.0, 4.0]), 0.6, np.array([0.70, 0.28, 0.02])
EDGES = (-2.0, 2.0)


def _cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)((x - MEANS) / (SIGMA * math.sqrt(2))))


def exact_populations():
    below_low, below_high = _cdf(EDGES[0]) @ MIX, _cdf(EDGES[1]) @ MIX
    return np.array([below_low, below_high - below_low, 1 - below_high])


def log_target(x):
    return np.log(np.exp(-0.5 * ((x[:, None] - MEANS) / SIGMA) ** 2) @ MIX)  # unnormalised


def importance_sample(n, seed, proposal_std=3.0):
    """Labels and log-weights of ``n`` proposals from a broad Gaussian."""
    x = np.random.default_rng(seed).normal(0.0, proposal_std, n)
    log_q = -0.5 * (x / proposal_std) ** 2
    return np.digitize(x, EDGES), log_target(x) - log_q


def test_bootstrap_error_bars_cover_the_known_populations():
    truth = exact_populations()
    z = []
    for seed in range(20):
        labels, log_w = importance_sample(4000, seed)
        estimate, error = populations.bootstrap_populations(labels, 3, log_w, n_bootstrap=200, seed=seed)
        assert estimate.sum() == pytest.approx(1.0)
        z.append((estimate - truth) / error)
    z = np.array(z)
    assert np.abs(z).max() < 4.5
    # Calibrated: the z-scores spread as a standard normal does (a 2x wrong error bar fails this).
    assert 0.6 < z.std() < 1.5


def test_delta_method_errors_match_the_bootstrap_and_the_spread_over_seeds():
    truth = exact_populations()
    estimates, errors = [], []
    for seed in range(20):
        labels, log_w = importance_sample(4000, seed)
        error = populations.population_errors(labels, 3, log_w)
        _, bootstrap = populations.bootstrap_populations(labels, 3, log_w, n_bootstrap=400, seed=seed)
        np.testing.assert_allclose(error, bootstrap, rtol=0.2)
        estimates.append(populations.state_populations(labels, 3, log_w))
        errors.append(error)
    z = (np.array(estimates) - truth) / np.array(errors)
    assert np.abs(z).max() < 4.5 and 0.6 < z.std() < 1.5
    # A share that rests on one heavy sample has an error as large as the share itself.
    labels = np.array([0] * 99 + [1])
    log_w = np.r_[np.zeros(99), np.log(40.0)]
    share, error = populations.state_populations(labels, 2, log_w)[1], populations.population_errors(labels, 2, log_w)[1]
    heavy, light = 40 / 139, 1 / 139  # the normalised weights
    assert share == pytest.approx(heavy)
    assert error == pytest.approx(math.sqrt(heavy**2 * (1 - share) ** 2 + 99 * light**2 * share**2), rel=1e-12)
    assert error > 0.7 * share


def test_repeats_combine_to_the_known_populations_within_their_error():
    truth = exact_populations()
    runs = []
    for seed in range(16):
        labels, log_w = importance_sample(2000, seed)
        runs.append(populations.state_populations(labels, 3, log_w))
    mean, stderr = populations.combine_repeats(runs)
    assert np.all(np.abs(mean - truth) < 4 * stderr)
    # The rare state's relative error is small enough to be useful.
    assert stderr[2] / mean[2] < 0.2


def test_state_effective_sizes_count_the_samples_a_state_rests_on():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_allclose(populations.state_effective_sizes(labels, 4), [4, 3, 1, 0])
    # One weight e^10 times the rest: state 1's mass rests on about one sample.
    log_w = np.array([0, 0, 0, 0, 10, 0, 0, 0], dtype=float)
    sizes = populations.state_effective_sizes(labels, 3, log_w)
    assert sizes[0] == pytest.approx(4) and sizes[1] == pytest.approx((np.e**10 + 2) ** 2 / (np.e**20 + 2)) and sizes[1] < 1.001


def test_unweighted_populations_are_fractions():
    np.testing.assert_allclose(populations.state_populations([0, 0, 1, 2], 3), [0.5, 0.25, 0.25])


def test_free_energy_differences_and_their_errors():
    p, e = np.array([0.6, 0.3, 0.1]), np.array([0.01, 0.01, 0.005])
    df, df_err = populations.free_energy_differences(p, e)
    np.testing.assert_allclose(df, [0.0, math.log(2), math.log(6)])
    np.testing.assert_allclose(df_err, [0.0, math.hypot(0.01 / 0.3, 0.01 / 0.6), math.hypot(0.005 / 0.1, 0.01 / 0.6)])
    assert populations.free_energy_differences([0.5, 0.5, 0.0])[2] == math.inf


def test_backbone_states_of_the_three_basins():
    phi_psi = np.radians([[-80, 70], [-70, -40], [60, 40], [170, 150], [-150, 160]])
    np.testing.assert_array_equal(populations.backbone_states(phi_psi), [0, 1, 2, 0, 0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: populations.state_populations([0, 3], 3), "0..2"),
        (lambda: populations.state_populations([0, 1], 3, [0.0]), "one per sample"),
        (lambda: populations.state_populations([0, 1], 3, [0.0, np.nan]), "NaN"),
        (lambda: populations.combine_repeats([[0.5, 0.5]]), "two or more repeats"),
        (lambda: populations.free_energy_differences([0.0, 1.0]), "reference state"),
        (lambda: populations.backbone_states(np.zeros((3, 3))), r"\[T, 2\]"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
