"""The shipped flows load safely by name, match ad2, and propose sensible molecules."""

import json
import os

import pytest
import torch

from openmm_sbg import SMCSampler
from openmm_sbg.flow import TarFlow
from openmm_sbg.flow.checkpoint import read_checkpoint
from openmm_sbg.shipped import model_names, model_path

# Exactly two: `ad2`, the model to use, and `ad2-cartesian`, the paper's Cartesian
# representation (for its chi3 protocol and comparison with the paper).
SHIPPED = {"ad2": "internal", "ad2-cartesian": "cartesian"}


def test_every_shipped_model_is_listed():
    assert sorted(SHIPPED) == model_names()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_complete_and_small(name):
    path = model_path(name)
    assert os.path.getsize(path) < 5e6
    payload = read_checkpoint(path)
    assert "training_state" not in payload and payload["metadata"]["complete"]
    assert payload["config"].get("representation", "cartesian") == SHIPPED[name]
    with open(os.path.join(os.path.dirname(path), f"{name}.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    refinement = payload["metadata"].get("refinement")
    if refinement is None:
        assert record["val_nll_per_dim"] == payload["metadata"]["val_nll_per_dim"]
    else:  # a refined flow's record describes the refinement and where it started
        assert refinement["complete"] and "refine_state" not in payload
        assert record["refinement"]["selected_step"] == refinement["selected_step"]
        assert record["refinement"]["ess"] == refinement["ess"]
        assert refinement["provenance"]["data"] == record["data"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_samples_ad2(ad2, name):
    flow = TarFlow.load(name, target=ad2)  # by name, as `--flow ad2`
    assert flow.target_identity["name"] == "ad2"
    x, log_q = flow.sample(128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-2, rtol=1e-5)
    # Bonded atoms sit where bonds are: the flow has learned the molecule, not noise.
    bonds = torch.tensor([[a.index, b.index] for a, b in ad2.topology.bonds()])
    lengths = (x[:, bonds[:, 0]] - x[:, bonds[:, 1]]).norm(dim=-1)
    assert 0.09 < lengths.median().item() < 0.16
    assert (lengths < 0.25).float().mean().item() > 0.99


def test_internal_model_is_a_useful_proposal(ad2):
    """Importance sampling with the shipped internal flow: a usable ESS and both backbone basins.

    The Cartesian model gives an ESS of about 0.002 here; the internal one about 0.2-0.3 on
    10,000 proposals (benchmarks/RESULTS.md).
    """
    from openmm_sbg import metrics

    result = SMCSampler(ad2, TarFlow.load("ad2", target=ad2), n_particles=2000, n_steps=0, progress=False).run(seed=0)
    assert result.ess > 0.05
    phi, psi = metrics.backbone_dihedrals(result.to_mdtraj()).T
    alpha_r = float(result.weights[(phi < 0) & (psi > -2.1) & (psi < 0.87)].sum())
    assert 0.25 < alpha_r < 0.6  # MD: 0.41


@pytest.mark.slow
def test_internal_model_log_z_from_is_and_smc_agree(ad2):
    """log Z over seeds: importance sampling and SMC (adaptive MALA) estimate the same number."""
    import numpy as np

    flow = TarFlow.load("ad2", target=ad2)
    estimates = {"is": [], "smc": []}
    for seed in range(4):
        estimates["is"].append(SMCSampler(ad2, flow, n_particles=4000, n_steps=0, progress=False).run(seed=seed).log_z)
        smc = SMCSampler(ad2, flow, n_particles=1000, n_steps=20, kernel="mala", progress=False)
        estimates["smc"].append(smc.run(seed=seed).log_z)
    means = {name: np.mean(values) for name, values in estimates.items()}
    errors = {name: np.std(values, ddof=1) / np.sqrt(len(values)) for name, values in estimates.items()}
    assert abs(means["is"] - means["smc"]) < 3 * np.hypot(errors["is"], errors["smc"]) + 0.05, (estimates, errors)
