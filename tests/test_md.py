"""openmm-sbg md: resumable runs, splits, and loading the data back."""

import json

import h5py
import numpy as np
import pytest

from openmm_sbg.cli import main
from openmm_sbg.data import load_positions, load_trajectory, read_metadata
from openmm_sbg.md import MDConfig, run_md, split_labels, write_trajectory

CONFIG = MDConfig(n_frames=24, steps_per_frame=20, equilibration_steps=50, frames_per_checkpoint=5, seed=3)


def test_interrupted_run_resumes_to_the_same_frames(ad2, tmp_path):
    whole, resumed = str(tmp_path / "whole.h5"), str(tmp_path / "resumed.h5")
    run_md(ad2, whole, CONFIG, platform="Reference", progress=False)
    stopped = run_md(ad2, resumed, CONFIG, platform="Reference", progress=False, stop_after_frames=7)
    assert stopped.status == "interrupted" and not (tmp_path / "resumed.h5").exists()
    committed = json.loads((tmp_path / "resumed.h5.work" / "progress.json").read_text())["wall_s"]
    summary = run_md(ad2, resumed, CONFIG, platform="Reference", progress=False)
    assert summary.frames == 24
    # The whole run's wall-clock adds the first call's, to its last commit, to this call's.
    assert committed > 0 and summary.run_wall_s == pytest.approx(committed + summary.wall_s, rel=1e-12)
    a, b = load_positions(whole, ad2), load_positions(resumed, ad2)
    assert a.shape == b.shape == (24, 22, 3)
    np.testing.assert_array_equal(a, b)  # the checkpoint carries the integrator's random state
    assert not (tmp_path / "resumed.h5.work").exists()


def test_resume_with_other_settings_is_refused(ad2, tmp_path):
    out = str(tmp_path / "md.h5")
    run_md(ad2, out, CONFIG, platform="Reference", progress=False, stop_after_frames=5)
    other = MDConfig(n_frames=24, steps_per_frame=40, equilibration_steps=50, frames_per_checkpoint=5)
    with pytest.raises(ValueError, match="delete that folder"):
        run_md(ad2, out, other, platform="Reference", progress=False)


def test_output_has_energies_splits_and_loads_by_split(ad2, tmp_path):
    out = str(tmp_path / "md.h5")
    run_md(ad2, out, CONFIG, platform="Reference", progress=False)
    meta = read_metadata(out)
    np.testing.assert_array_equal(meta["split"], split_labels(24))
    x = load_positions(out, ad2)
    np.testing.assert_allclose(meta["energies_kT"][:3], ad2.energy(x[:3]).numpy(), rtol=1e-4)
    sizes = [len(load_positions(out, ad2, split=s)) for s in ("train", "val", "test")]
    assert sizes == [19, 3, 2] and sum(sizes) == 24
    with h5py.File(out) as handle:
        assert handle.attrs["system"] == "ad2"


def test_dcd_output_keeps_metadata_beside_it(ad2, tmp_path):
    out = str(tmp_path / "md.dcd")
    run_md(ad2, out, CONFIG, platform="Reference", progress=False)
    assert load_trajectory(out, target=ad2, split="test").n_frames == 2
    with pytest.raises(ValueError, match="no topology"):
        load_trajectory(out)


def test_split_labels_are_contiguous_time_blocks():
    labels = split_labels(10, (0.6, 0.2, 0.2))
    assert labels.tolist() == [0] * 6 + [1] * 2 + [2] * 2


def test_loading_checks_atoms_and_files(get_target, ad2, tmp_path):
    out = str(tmp_path / "md.h5")
    run_md(ad2, out, MDConfig(n_frames=2, steps_per_frame=5, equilibration_steps=0), platform="Reference", progress=False)
    with pytest.raises(ValueError, match="another molecule"):
        load_positions(out, get_target("al3"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_positions(tmp_path / "nothing.h5")


def test_md_command_writes_file_and_summary(tmp_path, capsys):
    out, summary = tmp_path / "md.h5", tmp_path / "md.json"
    code = main(["md", "ad2", "--ns", "0.002", "--frame-interval-ps", "0.1", "--equilibration-ps", "0.01",
                 "--platform", "Reference", "--out", str(out), "--summary", str(summary), "--no-progress"])
    assert code == 0 and out.exists() and summary.exists()
    assert '"frames": 20' in capsys.readouterr().out


def test_md_command_reports_bad_input_without_traceback(tmp_path, capsys):
    code = main(["md", "--pdb", str(tmp_path / "missing.pdb"), "--ns", "1", "--out", str(tmp_path / "x.h5")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_a_run_can_be_finished_early_or_extended(ad2, tmp_path):
    out = str(tmp_path / "md.h5")
    run_md(ad2, out, CONFIG, platform="Reference", progress=False, stop_after_frames=12)
    shorter = MDConfig(**{**CONFIG.__dict__, "n_frames": 8})
    assert run_md(ad2, out, shorter, platform="Reference", progress=False).frames == 8
    whole = str(tmp_path / "whole.h5")
    run_md(ad2, whole, CONFIG, platform="Reference", progress=False)
    np.testing.assert_array_equal(load_positions(out, ad2), load_positions(whole, ad2)[:8])


def test_md_can_start_from_a_frame_of_another_trajectory(ad2, tmp_path):
    import mdtraj

    from openmm_sbg import systems

    start = mdtraj.load(str(systems.structure_path("ad2")))
    shifted = start.slice([0, 0])
    shifted.xyz[1] += np.array([5.0, 0.0, 0.0], dtype=np.float32)  # frame 1: the structure moved 5 nm along x
    shifted.save_hdf5(str(tmp_path / "start.h5"))
    out = tmp_path / "md.h5"
    code = main(["md", "ad2", "--start", str(tmp_path / "start.h5"), "--start-frame", "-1", "--ns", "0.001",
                 "--frame-interval-ps", "0.1", "--equilibration-ps", "0.01", "--platform", "Reference",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    first = load_positions(str(out), ad2)[0]
    # No CMMotionRemover and a short run: the centre stays near the start frame's, 5 nm from the PDB's.
    assert np.linalg.norm(first.mean(0) - start.xyz[0].mean(0) - [5.0, 0.0, 0.0]) < 0.05


def test_md_start_frame_errors_say_what_to_change(tmp_path, capsys):
    import mdtraj

    from openmm_sbg import systems

    mdtraj.load(str(systems.structure_path("al3"))).save_hdf5(str(tmp_path / "al3.h5"))
    common = ["--ns", "0.001", "--platform", "Reference", "--out", str(tmp_path / "x.h5"), "--no-progress"]
    assert main(["md", "ad2", "--start", str(tmp_path / "al3.h5"), *common]) == 2
    assert "give a frame of this molecule" in capsys.readouterr().err
    assert main(["md", "al3", "--start", str(tmp_path / "al3.h5"), "--start-frame", "3", *common]) == 2
    assert "outside" in capsys.readouterr().err
    assert main(["md", "ad2", "--start", str(tmp_path / "none.h5"), *common]) == 2
    assert "no such file" in capsys.readouterr().err


def test_training_frames_keep_the_lower_rungs_of_a_pooled_replica_exchange_file(ad2, tmp_path):
    from openmm_sbg import data

    # 40 frames in ladder order (300, 330, 360, 390 K, ten times), each frame's x-shift its index.
    xyz = (np.asarray(ad2.positions)[None] + np.arange(40)[:, None, None] * [1.0, 0.0, 0.0]).astype(np.float32)
    split = np.repeat(split_labels(10), 4)  # 8 train, 1 val, 1 test ladder sets
    path = str(tmp_path / "pooled.h5")
    write_trajectory(path, ad2, xyz, np.zeros(40), split, MDConfig(n_frames=40), frame_temperature_K=np.tile([300.0, 330.0, 360.0, 390.0], 10))
    train, val, held_out = data.training_frames(path, ad2, max_temperature_K=330.0)
    shift = lambda frames: np.rint(frames[:, 0, 0] - np.asarray(ad2.positions)[0, 0]).astype(int).tolist()  # noqa: E731
    train_rows = np.flatnonzero(split == 0)
    assert shift(train) == [i for i in train_rows if i % 4 < 2]  # the 300 and 330 K frames of the train split
    assert shift(val) == [32, 33] and "330 K" in held_out
    assert len(data.training_frames(path, ad2)[0]) == len(train_rows)  # no temperature: every frame
    with pytest.raises(ValueError, match="lowest is 300 K"):
        data.training_frames(path, ad2, max_temperature_K=250.0)
    plain = str(tmp_path / "plain.h5")
    write_trajectory(plain, ad2, xyz, np.zeros(40), split, MDConfig(n_frames=40))
    with pytest.raises(ValueError, match="all-replicas"):
        data.training_frames(plain, ad2, max_temperature_K=330.0)
