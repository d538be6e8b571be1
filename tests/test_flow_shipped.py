"""The shipped ad2-small flow loads safely, matches ad2, and proposes sensible molecules."""

import json
import os

import torch

from openmm_sbg.flow import TarFlow
from openmm_sbg.flow.checkpoint import read_checkpoint
from openmm_sbg.shipped import model_path


def test_shipped_model_is_complete_and_small():
    path = model_path("ad2-small")
    assert os.path.getsize(path) < 5e6
    payload = read_checkpoint(path)
    assert "training_state" not in payload and payload["metadata"]["complete"]
    with open(os.path.join(os.path.dirname(path), "ad2-small.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    assert record["val_nll_per_dim"] == payload["metadata"]["val_nll_per_dim"]


def test_shipped_model_samples_ad2(ad2):
    flow = TarFlow.load(model_path("ad2-small"), target=ad2)
    assert flow.target_identity["name"] == "ad2"
    x, log_q = flow.sample(128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-2, rtol=1e-5)
    # Bonded atoms sit where bonds are: the flow has learned the molecule, not noise.
    bonds = torch.tensor([[a.index, b.index] for a, b in ad2.topology.bonds()])
    lengths = (x[:, bonds[:, 0]] - x[:, bonds[:, 1]]).norm(dim=-1)
    assert 0.09 < lengths.median().item() < 0.16
    assert (lengths < 0.25).float().mean().item() > 0.99
