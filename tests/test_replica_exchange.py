"""Temperature replica exchange: the lowest replica at the target temperature, in `md`'s file format, resumable."""

import json

import numpy as np
import pytest

from openmm_sbg import cli, data
from openmm_sbg.md import MDConfig
from openmm_sbg.replica_exchange import ReplicaExchangeConfig, geometric_ladder, run_replica_exchange


def test_geometric_ladder():
    ladder = geometric_ladder(300, 600, 4)
    assert ladder[0] == pytest.approx(300) and ladder[-1] == pytest.approx(600)
    ratios = np.array(ladder[1:]) / np.array(ladder[:-1])
    np.testing.assert_allclose(ratios, ratios[0])
    with pytest.raises(ValueError, match="ladder"):
        geometric_ladder(300, 200, 4)


def test_ladder_must_start_at_the_target_temperature(ad2, tmp_path):
    config = ReplicaExchangeConfig(MDConfig(n_frames=2, steps_per_frame=10), temperatures_K=(310, 400))
    with pytest.raises(ValueError, match="target is at 300"):
        run_replica_exchange(ad2, str(tmp_path / "re.h5"), config, progress=False)


def test_interrupted_run_resumes_and_writes_the_lowest_replica(ad2, tmp_path):
    config = ReplicaExchangeConfig(MDConfig(n_frames=6, steps_per_frame=20, equilibration_steps=20), geometric_ladder(300, 450, 3))
    out = str(tmp_path / "re.h5")
    partial = run_replica_exchange(ad2, out, config, progress=False, stop_after_frames=3)
    assert partial.status == "interrupted" and partial.frames == 3
    committed = json.loads((tmp_path / "re.h5.work" / "wall_clock.json").read_text())["wall_s"]
    summary = run_replica_exchange(ad2, out, config, progress=False, all_replicas=True)
    assert summary.status == "complete" and summary.frames == 6
    # The whole run's wall-clock adds the first call's, to its last iteration, to this call's.
    assert committed > 0 and summary.run_wall_s == pytest.approx(committed + summary.wall_s, rel=1e-12)
    assert summary.iterations_this_call == 3
    assert len(summary.exchange_acceptance) == 2 and all(0 <= a <= 1 for a in summary.exchange_acceptance)
    # The file is an `openmm-sbg md` file: frames, split and energies in kT at the target temperature.
    frames = data.load_positions(out, target=ad2)
    meta = data.read_metadata(out)
    assert frames.shape == (6, 22, 3) and len(meta["split"]) == 6
    energies = ad2.energy(frames.astype(np.float64)).numpy()
    np.testing.assert_allclose(meta["energies_kT"], energies, rtol=1e-4, atol=1e-3)
    # Every replica's frames, in the same format; `train` takes the file as it takes `md` output.
    pooled = data.load_positions(summary.all_replicas, target=ad2)
    pooled_meta = data.read_metadata(summary.all_replicas)
    assert pooled.shape == (18, 22, 3) and len(pooled_meta["split"]) == 18
    kelvin = pooled_meta["frame_temperature_K"].reshape(6, 3)
    assert all(sorted(row) == pytest.approx(sorted(config.temperatures_K)) for row in kelvin)
    np.testing.assert_allclose(pooled_meta["energies_kT"], ad2.energy(pooled.astype(np.float64)).numpy(), rtol=1e-4, atol=1e-3)
    # Each frame of the lowest-temperature file is the replica that sat at 300 K at that iteration.
    at_target = np.isclose(kelvin.reshape(-1), 300)
    np.testing.assert_allclose(pooled[at_target], frames, atol=1e-6)
    # The split follows iterations: a frame's replicas share its time block.
    np.testing.assert_array_equal(pooled_meta["split"].reshape(6, 3), np.repeat(meta["split"][:, None], 3, axis=1))


def test_cli_replica_exchange(tmp_path, capsys):
    out = tmp_path / "re.h5"
    argv = ["md", "ad2", "--replica-exchange", "--n-replicas", "2", "--t-max", "330", "--ns", "0.004",
            "--frame-interval-ps", "0.02", "--equilibration-ps", "0.02", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 200 and summary["temperatures_K"] == pytest.approx([300, 330])
    assert len(data.load_positions(str(out))) == 200
