"""`openmm-sbg sample` and `openmm-sbg evaluate` end to end on alanine dipeptide."""

import json
import os

import h5py
import mdtraj
import numpy as np
import pytest
import torch

from openmm_sbg import cli
from openmm_sbg.flow import FlowConfig, TarFlow
from openmm_sbg.smc import GaussianProposal, SMCResult


class _GaussianFlow(GaussianProposal):
    """A stand-in for a trained TarFlow: a narrow Gaussian around the minimised structure."""

    def __init__(self, target):
        x0 = torch.as_tensor(target.positions)
        super().__init__(x0 - x0.mean(0), 0.003)
        self._target = target

    def target(self, **kwargs):
        return self._target


def _main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_writes_a_samples_file_and_summary(tmp_path, monkeypatch, capsys, ad2):
    monkeypatch.setattr(TarFlow, "load", classmethod(lambda cls, path, target=None, map_location="cpu": _GaussianFlow(ad2)))
    flow_path = tmp_path / "flow.pt"
    flow_path.write_bytes(b"stand-in")
    out, summary = tmp_path / "samples.h5", tmp_path / "summary.json"
    argv = ["sample", "--flow", str(flow_path), "--n-particles", "16", "--n-steps", "3", "--out", str(out),
            "--batch-size", "8", "--no-progress", "--summary", str(summary)]
    code, _, err = _main(argv, capsys)
    assert code == 0, err
    record = json.loads(summary.read_text())
    assert record["n_particles"] == 16 and record["n_steps"] == 3 and record["system"] == "ad2"
    assert np.isfinite(record["log_z"]) and 0 < record["ess"] <= 1
    assert record["wrong_chirality_fraction"] == 0.0
    assert not os.path.exists(str(out) + ".ckpt")
    assert mdtraj.load(str(out)).n_frames == 16
    with h5py.File(out) as handle:
        assert handle["log_weights"].shape == (16,) and np.isfinite(handle["energies_kT"][()]).all()

    code, _, err = _main(argv[:-2] + ["--out", str(tmp_path / "samples.dcd")], capsys)
    assert code == 2 and ".h5" in err


def test_sample_with_a_real_flow_checkpoint(tmp_path, capsys, ad2):
    """An (untrained) TarFlow checkpoint: the command loads it and rebuilds its target."""
    flow = TarFlow(FlowConfig(width=64, n_blocks=2, layers_per_block=1, heads=1), target=ad2, std=0.15)
    flow.save(tmp_path / "flow.pt")
    out = tmp_path / "is.h5"
    code, stdout, err = _main(["sample", "--flow", str(tmp_path / "flow.pt"), "--n-particles", "8", "--n-steps", "0",
                               "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["n_steps"] == 0
    assert SMCResult.load(out).positions.shape == (8, 22, 3)
    code, _, err = _main(["sample", "--flow", str(tmp_path / "missing.pt"), "--out", str(out)], capsys)
    assert code == 2 and "openmm-sbg train" in err


def _reference(path, ad2, n=30):
    """An `openmm-sbg md`-style file: mdtraj HDF5 + per-frame split codes and energies."""
    rng = np.random.default_rng(0)
    xyz = ad2.positions[None] + rng.normal(0, 0.004, size=(n, 22, 3))
    traj = mdtraj.Trajectory(xyz.astype(np.float32), mdtraj.Topology.from_openmm(ad2.topology))
    traj.save_hdf5(str(path))
    energies = ad2.energy(traj.xyz.astype(np.float64)).numpy()
    with h5py.File(path, "a") as handle:
        handle["split"] = np.repeat(np.array([0, 1, 2], dtype=np.int8), n // 3)
        handle["energies_kT"] = energies
    return traj, energies


def test_evaluate_gives_zero_distances_for_the_reference_itself_and_writes_plots(tmp_path, capsys, ad2):
    reference, energies = _reference(tmp_path / "md.h5", ad2)
    samples = SMCResult(reference.xyz.astype(np.float64), np.zeros(30), energies, 0.0, 1.0,
                        topology=ad2.topology, info={"system": "ad2"})
    samples.save(tmp_path / "samples.h5")
    base = ["evaluate", "--samples", str(tmp_path / "samples.h5"), "--reference", str(tmp_path / "md.h5")]

    code, stdout, err = _main(base + ["--all-frames", "--plots", str(tmp_path / "plots")], capsys)
    assert code == 0, err
    record = json.loads(stdout)
    assert record["reference_frames"] == 30 and record["reference_split"] == "all"
    assert record["energy_w2_kT"] == pytest.approx(0.0, abs=1e-9)
    assert record["torus_w2"] == pytest.approx(0.0, abs=1e-5)
    assert record["wrong_chirality_fraction"] == 0.0
    assert sorted(os.listdir(tmp_path / "plots")) == ["energy.png", "ramachandran.png"]

    # Against the test split only (the last third) the sets differ.
    code, stdout, err = _main(base, capsys)
    assert code == 0, err
    record = json.loads(stdout)
    assert record["reference_frames"] == 10 and record["reference_split"] == "test"
    assert record["energy_w2_kT"] > 0 and record["torus_w2"] > 0
