"""Metrics on the states a reference visits: samples in a basin the reference MD never reached are set apart."""

import os

import mdtraj
import numpy as np
import pytest

from openmm_sbg import data, populations, shipped
from openmm_sbg.evaluation import reference_states_comparison

ALPHA_L_FRAMES = os.path.join(os.path.dirname(__file__), "data", "ad2-alphaL-C7ax.pdb")


@pytest.fixture(scope="module")
def reference():
    return data.load_trajectory(shipped.reference_path("ad2"))[:300]


def test_samples_outside_the_reference_states_are_set_apart(ad2, reference):
    rare = mdtraj.load(ALPHA_L_FRAMES)
    labeller = populations.backbone_state_labeller(ad2.topology)
    assert set(labeller(rare.xyz)) == {2} and 2 not in set(labeller(reference.xyz))
    samples = mdtraj.join([reference, rare])
    energies = ad2.energy(samples.xyz.astype(np.float64)).numpy()
    weights = np.ones(samples.n_frames)
    weights[reference.n_frames:] = 3.0  # the rare frames weigh more: their share is known exactly
    result = reference_states_comparison(samples, reference, energies, energies[: reference.n_frames], weights)
    assert result["states"] == ["C7eq/beta", "alphaR"]
    assert result["weight_outside"] == pytest.approx(3.0 * rare.n_frames / (reference.n_frames + 3.0 * rare.n_frames))
    # What is left is the reference itself: both distances vanish.
    assert result["energy_w2_kT"] == pytest.approx(0.0, abs=1e-9)
    assert result["torus_w2"] == pytest.approx(0.0, abs=1e-5)


def test_nothing_to_set_apart_when_the_reference_visits_every_sampled_state(ad2, reference):
    energies = ad2.energy(reference.xyz.astype(np.float64)).numpy()
    assert reference_states_comparison(reference, reference, energies, energies, np.ones(reference.n_frames)) is None
