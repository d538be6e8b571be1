"""Metrics against hand-computed values, and the plots."""

import math

import mdtraj
import numpy as np
import pytest

from openmm_sbg import metrics, systems


def test_effective_sample_size():
    assert metrics.effective_sample_size(np.zeros(5)) == pytest.approx(1.0)
    assert metrics.effective_sample_size(np.log([1.0, 3.0])) == pytest.approx(0.8)


def test_energy_w2_is_zero_for_identical_sets_and_matches_hand_values():
    energies = np.array([3.0, -1.0, 2.5, 7.0])
    assert metrics.energy_w2(energies, energies[::-1]) == pytest.approx(0.0, abs=1e-12)
    # A shift by 2 kT moves every quantile by 2.
    assert metrics.energy_w2(energies, energies + 2.0) == pytest.approx(2.0)
    # {0, 1} vs {0, 3}: sorted pairs (0, 0), (1, 3): sqrt((0 + 4) / 2).
    assert metrics.energy_w2([1.0, 0.0], [0.0, 3.0]) == pytest.approx(math.sqrt(2.0))
    # Weights: {0 with 3/4, 4 with 1/4} vs {0}: sqrt(16 / 4) = 2.
    assert metrics.energy_w2([0.0, 4.0], [0.0], weights=[3.0, 1.0]) == pytest.approx(2.0)
    # Non-finite energies are dropped.
    assert metrics.energy_w2([0.0, np.inf, np.nan], [0.0]) == pytest.approx(0.0, abs=1e-12)


def test_torus_w2_is_zero_for_identical_sets_and_matches_hand_values():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-np.pi, np.pi, size=(30, 2))
    assert metrics.torus_w2(angles, angles[::-1]) == pytest.approx(0.0, abs=1e-7)
    # Across the periodic boundary: 3.0 and -3.0 are 2 pi - 6 = 0.283 apart, not 6.
    assert metrics.torus_w2([[3.0]], [[-3.0]]) == pytest.approx(2 * np.pi - 6.0)
    # Two points each: {(0, 0), (1, 0)} vs {(0, 0.5), (1, -0.5)}: each moves 0.5.
    assert metrics.torus_w2([[0.0, 0.0], [1.0, 0.0]], [[1.0, -0.5], [0.0, 0.5]]) == pytest.approx(0.5)
    # Weights: {0 with 1/2, 1 with 1/2} vs {0}: sqrt(1/2).
    assert metrics.torus_w2([[0.0], [1.0]], [[0.0]]) == pytest.approx(math.sqrt(0.5))
    assert metrics.torus_w2([[0.0], [1.0]], [[0.0]], weights=[1.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="angles per sample"):
        metrics.torus_w2(angles, angles[:, :1])


def test_torus_w2_subsampling_stays_close_to_the_exact_value():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 0.5, size=(600, 2))
    b = rng.normal(0.3, 0.5, size=(600, 2))
    exact = metrics.torus_w2(a, b)
    assert metrics.torus_w2(a, b, max_samples=300) == pytest.approx(exact, rel=0.25)


def test_torus_w2_draws_average_independent_subsamples():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.0, 0.5, size=(400, 2)), rng.normal(0.3, 0.5, size=(400, 2))
    # The same stream: the average of four draws is the mean of the four single draws it makes.
    stream = np.random.default_rng(5)
    singles = []
    for _ in range(4):
        xa, wa = metrics._subsample(a, None, 100, stream)
        xb, wb = metrics._subsample(b, None, 100, stream)
        singles.append(metrics.torus_w2(xa, xb, wa, wb))
    assert metrics.torus_w2(a, b, max_samples=100, seed=5, draws=4) == pytest.approx(np.mean(singles), rel=1e-12)
    assert len(set(np.round(singles, 12))) == 4  # the draws differ
    assert metrics.torus_w2(a, b, draws=3) == metrics.torus_w2(a, b)  # no subsampling: one exact value
    with pytest.raises(ValueError, match="draws"):
        metrics.torus_w2(a, b, draws=0)


def _ad2_frames(n=5, noise=0.002):
    traj = mdtraj.load(systems.structure_path("ad2"))
    rng = np.random.default_rng(0)
    xyz = traj.xyz + rng.normal(0, noise, size=(n, *traj.xyz.shape[1:])).astype(np.float32)
    return mdtraj.Trajectory(xyz, traj.topology)


def test_backbone_dihedrals_and_wrong_chirality():
    traj = _ad2_frames()
    angles = metrics.backbone_dihedrals(traj)
    assert angles.shape == (5, 2)
    assert metrics.wrong_chirality_fraction(traj) == 0.0
    # The mirror image (x -> -x) turns every L residue into D, with the same energy.
    mirrored = mdtraj.Trajectory(-traj.xyz, traj.topology)
    assert metrics.wrong_chirality_fraction(mirrored) == 1.0
    both = mdtraj.join([traj[:3], mirrored[:1]])
    assert metrics.wrong_chirality_fraction(both) == pytest.approx(0.25)
    assert metrics.wrong_chirality_fraction(both, weights=[1, 1, 1, 3]) == pytest.approx(0.5)
    # Mirroring negates the dihedrals, so T-W2 sees it.
    np.testing.assert_allclose(metrics.backbone_dihedrals(mirrored), -angles, atol=1e-5)


def test_plots_are_written(tmp_path):
    traj = _ad2_frames(20, noise=0.01)
    rama = metrics.ramachandran_plot(traj, traj[::2], tmp_path / "rama.png", weights=np.arange(20) + 1.0)
    energy = metrics.energy_histogram_plot(np.arange(20.0), np.arange(20.0) + 1, tmp_path / "sub" / "energy.png")
    for path in (rama, energy):
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
