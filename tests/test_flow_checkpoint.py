"""Flow checkpoints: exact round trip, target identity, wrong-molecule and damaged files."""

import pickle

import numpy as np
import pytest
import torch
from openmm import app, unit

from openmm_sbg import systems
from openmm_sbg.flow import TarFlow
from openmm_sbg.flow.checkpoint import read_checkpoint
from test_flow import TINY, random_flow


@pytest.fixture
def ad2_flow(ad2):
    flow = random_flow(n_atoms=ad2.n_atoms, dtype=torch.float32)
    flow.target_identity = TarFlow(TINY, target=ad2).target_identity
    flow.metadata = {"note": "test", "history": [{"step": 0, "val_nll_per_dim": 1.4}]}
    return flow


def test_round_trip_is_exact(tmp_path, ad2_flow, ad2):
    path = tmp_path / "flow.pt"
    ad2_flow.save(path)
    loaded = TarFlow.load(path, target=ad2)
    assert loaded.config == ad2_flow.config and loaded.n_atoms == 22
    assert loaded.std == ad2_flow.std and loaded.com_std == ad2_flow.com_std
    assert loaded.metadata == ad2_flow.metadata
    for key, value in ad2_flow.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    x = torch.randn(8, 22, 3) * 0.2
    torch.testing.assert_close(loaded.log_prob(x), ad2_flow.log_prob(x), atol=0, rtol=0)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(loaded.sample(4, generator=generator)[0], ad2_flow.sample(4, generator=generator.manual_seed(3))[0])
    assert not loaded.training  # loaded flows are ready for inference


def test_builtin_target_is_rebuilt_by_name(tmp_path, ad2_flow):
    path = tmp_path / "flow.pt"
    ad2_flow.save(path)
    payload = read_checkpoint(path)
    assert payload["target"]["name"] == "ad2" and "system_xml" not in payload["target"]
    target = TarFlow.load(path).target(platform="Reference")
    assert target.name == "ad2" and target.n_atoms == 22
    assert target.temperature == 300 * unit.kelvin


def test_custom_target_is_stored_as_xml_and_rebuilt(tmp_path):
    pdb = app.PDBFile(systems.structure_path("ad2"))
    custom = systems.from_pdb(pdb, ["amber99sbildn.xml"], 350 * unit.kelvin, platform="Reference", backend="openmm")
    path = tmp_path / "flow.pt"
    TarFlow(TINY, target=custom, std=0.2).save(path)
    rebuilt = TarFlow.load(path, target=custom).target(platform="Reference", backend="openmm")
    assert rebuilt.temperature == 350 * unit.kelvin and rebuilt.name is None
    x = custom.positions[None]
    np.testing.assert_allclose(rebuilt.energy(x).numpy(), custom.energy(x).numpy(), rtol=1e-6)


def test_wrong_molecule_names_both(tmp_path, ad2_flow, get_target):
    path = tmp_path / "flow.pt"
    ad2_flow.save(path)
    with pytest.raises(ValueError, match=r"'ad2' \(22 atoms; residues ACE-ALA-NME\).*'al3' \(33 atoms"):
        TarFlow.load(path, target=get_target("al3"))


def test_same_size_different_atoms_is_refused(tmp_path, ad2_flow, ad2):
    path = tmp_path / "flow.pt"
    payload = ad2_flow.checkpoint_payload()
    payload["target"]["atoms"][5][2] = "XX"
    from openmm_sbg.flow.checkpoint import write_checkpoint

    write_checkpoint(path, payload)
    with pytest.raises(ValueError, match="trained for 'ad2'"):
        TarFlow.load(path, target=ad2)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "pickled_object", "missing"])
def test_damaged_files_fail_clearly(tmp_path, ad2_flow, damage):
    path = tmp_path / "flow.pt"
    ad2_flow.save(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = "corrupt, truncated"
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
        expected = "corrupt, truncated"
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
        expected = "not an openmm-sbg TarFlow checkpoint"
    elif damage == "pickled_object":
        torch.save({"format": "openmm-sbg-tarflow", "evil": pickle.PickleError("x")}, path)
        expected = "could run code"
    else:
        path.unlink()
        with pytest.raises(FileNotFoundError, match="does not exist"):
            TarFlow.load(path)
        return
    with pytest.raises(ValueError, match=expected):
        TarFlow.load(path)
