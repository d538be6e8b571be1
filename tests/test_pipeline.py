"""`openmm-sbg run` / run_pipeline end to end on a tiny budget: stages skipped, interrupted and resumed."""

import dataclasses
import json

import numpy as np
import pytest

from openmm_sbg import cli, pipeline, sampling
from openmm_sbg.flow import TrainOptions
from openmm_sbg.smc import SMCResult

TINY = dict(ns=0.004, frame_interval_ps=0.02, training=TrainOptions(steps=4, batch_size=16, lr=1e-3),
            n_particles=48, n_steps=0, sample_temperatures_K=(350,))


def test_interrupted_pipeline_resumes_without_redoing_finished_stages(ad2, tmp_path, monkeypatch):
    config = pipeline.PipelineConfig(**TINY)
    calls = {"sample": 0}
    real_sample = sampling.sample

    def interrupted_once(*args, **kwargs):
        calls["sample"] += 1
        if calls["sample"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C during the first sampling stage
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(ad2, tmp_path, config, platform="Reference", progress=False)
    assert (tmp_path / "data.h5").exists() and (tmp_path / "flow.pt").exists()
    assert not (tmp_path / "summary.json").exists()

    summary = pipeline.run_pipeline(ad2, tmp_path, config, platform="Reference", progress=False)
    assert summary.ran_now == ["sample-300K", "sample-350K", "evaluate"]
    assert calls["sample"] == 3
    assert summary.training.steps == 4 and summary.data.frames == 200
    at_300, at_350 = summary.temperatures["300"], summary.temperatures["350"]
    for result in (at_300, at_350):
        assert result["states"]["samples"] == pytest.approx(np.array(result["states"]["samples"]))
        assert sum(result["states"]["samples"]) == pytest.approx(1.0)
        assert np.isfinite(result["log_z"]) and 0 < result["ess"] <= 1
    # Importance sampling: bootstrap error bars; the reference is the held-out MD at 300 K only.
    assert len(at_300["states"]["samples_bootstrap_error"]) == 3 and "reference" not in at_350["states"]
    assert at_300["reference_split"] == "test" and np.isfinite(at_300["energy_w2_kT"])
    # Temperature transfer: the same proposals (same seed), reweighted with the energy at 350 K
    # (clipping the largest weights may drop a different proposal at each temperature).
    cold, hot = SMCResult.load(at_300["samples_file"]), SMCResult.load(at_350["samples_file"])
    row_of = {x.tobytes(): i for i, x in enumerate(cold.positions)}
    pairs = np.array([(row_of[x.tobytes()], j) for j, x in enumerate(hot.positions) if x.tobytes() in row_of])
    assert len(pairs) >= len(hot.positions) - 2
    c, h = pairs[:, 0], pairs[:, 1]
    np.testing.assert_allclose(hot.energies[h] * 350, cold.energies[c] * 300, rtol=1e-9)
    shift = (hot.log_weights[h] - cold.log_weights[c]) - (cold.energies[c] - hot.energies[h])
    np.testing.assert_allclose(shift, shift[0], atol=1e-8)
    assert json.loads((tmp_path / "summary.json").read_text())["ran_now"] == summary.ran_now

    # A third call redoes only the evaluation.
    again = pipeline.run_pipeline(ad2, tmp_path, config, platform="Reference", progress=False)
    assert again.ran_now == ["evaluate"]
    assert again.temperatures["300"]["log_z"] == summary.temperatures["300"]["log_z"]


def test_a_folder_with_other_settings_is_refused(ad2, tmp_path):
    (tmp_path / "pipeline.json").write_text(json.dumps({"system": "ad2", "config": {"ns": 1}}))
    with pytest.raises(ValueError, match="other settings"):
        pipeline.run_pipeline(ad2, tmp_path, pipeline.PipelineConfig(**TINY), progress=False)


def test_bad_data_source_is_refused():
    with pytest.raises(ValueError, match="replica-exchange"):
        pipeline.PipelineConfig(data="metadynamics")


@pytest.mark.slow
def test_run_command_with_replica_exchange(tmp_path, capsys):
    argv = ["run", "ad2", "--folder", str(tmp_path), "--data", "replica-exchange", "--n-replicas", "2", "--t-max", "330",
            "--ns", "0.004", "--frame-interval-ps", "0.02", "--train-steps", "3", "--batch-size", "16",
            "--n-particles", "32", "--n-steps", "2", "--platform", "Reference", "--no-progress",
            "--seeded-ns", "0.002", "--seed-below", "1.0"]  # every visited state counts as rare: each is seeded
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    seeded = summary["seeded"]["runs"]
    assert seeded and all(run["status"] == "complete" for run in seeded)
    # Both replicas' frames (2 x 200, 80% train) and 80 training frames of each seeded run.
    assert summary["data"]["exchange_acceptance"] and summary["training"]["n_train"] == 320 + 80 * len(seeded)
    assert summary["temperatures"]["300"]["states"]["samples_bootstrap_error"] is None  # SMC: errors need seeds
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ran_now"] == ["evaluate"]


def test_refine_stage_refines_the_trained_flow_and_the_samplers_use_it(ad2, tmp_path, monkeypatch):
    from openmm_sbg.flow import refine as refine_module

    seen = {}

    def fake_refine(flow, target, options, states=None, checkpoint_path=None, progress=True):
        seen.update(options=options, guarded=states is not None)
        flow.metadata = {**flow.metadata, "refinement": {
            "steps": 7, "seconds": 1.5, "ess": 0.4, "history": [{"ess": 0.2}], "selected_step": 5, "complete": True,
            "stopped": "the ESS has not risen for 3 evaluations"}}
        flow.save(checkpoint_path)
        return flow

    monkeypatch.setattr(refine_module, "refine", fake_refine)
    real_sample, sampled_flows = sampling.sample, []
    monkeypatch.setattr(sampling, "sample", lambda target, flow, *a, **k: (sampled_flows.append(flow), real_sample(target, flow, *a, **k))[1])
    config = pipeline.PipelineConfig(**{**TINY, "sample_temperatures_K": ()}, refine_minutes=2.0)
    summary = pipeline.run_pipeline(ad2, tmp_path, config, platform="Reference", progress=False)
    options = seen["options"]
    assert options.max_seconds == 120 and options.patience == 3 and options.objective == "alpha-2" and seen["guarded"]
    assert summary.refinement.flow == str(tmp_path / "refined.pt") and summary.refinement.start_ess == 0.2
    assert summary.ran_now == ["data", "train", "refine", "sample-300K", "evaluate"]
    assert [flow.metadata["refinement"]["steps"] for flow in sampled_flows] == [7]  # the refined flow was sampled
    assert json.loads((tmp_path / "pipeline.json").read_text())["config"]["refine_minutes"] == 2.0
    # A folder without the stage keeps its settings file as before the stage existed.
    plain = pipeline.PipelineConfig(**TINY)
    assert "refine_minutes" not in plain.to_dict()


def test_run_trains_the_systems_own_small_preset_unless_told():
    import argparse

    from openmm_sbg.commands.run import _preset

    defaults = pipeline.PipelineConfig()
    assert _preset(argparse.Namespace(preset=None, system="al4"), defaults) == "al4-small"
    assert _preset(argparse.Namespace(preset=None, system="ad2"), defaults) == "ad2-small"
    assert _preset(argparse.Namespace(preset=None, system="chignolin"), defaults) == defaults.preset  # no chignolin-small
    assert _preset(argparse.Namespace(preset=None, system=None), defaults) == defaults.preset  # --pdb
    assert _preset(argparse.Namespace(preset="al6-small", system="al4"), defaults) == "al6-small"


def test_training_can_keep_the_lower_replica_exchange_rungs_and_the_seeded_runs(ad2, tmp_path, monkeypatch):
    from openmm_sbg import flow as flow_module
    from openmm_sbg.md import MDConfig, split_labels, write_trajectory

    xyz = np.repeat(np.asarray(ad2.positions, dtype=np.float32)[None], 40, axis=0)
    split = np.repeat(split_labels(10), 4)  # 8 train, 1 val, 1 test ladder sets of 4 rungs
    write_trajectory(str(tmp_path / "data-all-replicas.h5"), ad2, xyz, np.zeros(40), split, MDConfig(n_frames=40),
                     frame_temperature_K=np.tile([300.0, 330.0, 360.0, 390.0], 10))
    write_trajectory(str(tmp_path / "seeded-2.h5"), ad2, xyz[:10], np.zeros(10), split_labels(10), MDConfig(n_frames=10))
    fitted = []

    def fake_train(train_positions, val_positions, **kwargs):
        fitted.append((len(train_positions), len(val_positions), kwargs["config"]))
        raise RuntimeError("stop here")

    monkeypatch.setattr(flow_module, "train", fake_train)
    files = [str(tmp_path / "data-all-replicas.h5"), str(tmp_path / "seeded-2.h5")]
    for kelvin, bins in ((330.0, 8), (None, 0)):
        config = pipeline.PipelineConfig(data="replica-exchange", train_max_temperature_K=kelvin, preset="al4-small", spline_bins=bins)
        with pytest.raises(RuntimeError, match="stop here"):
            pipeline._train(ad2, str(tmp_path), files[0], files[1:], config, "cpu", progress=False)
    # 300 and 330 K: 8 train and 1 val set of two rungs, plus the seeded run's 8 and 1; every rung: four each.
    assert [(n_train, n_val) for n_train, n_val, _ in fitted] == [(2 * 8 + 8, 2 + 1), (4 * 8 + 8, 4 + 1)]
    splined, plain = fitted[0][2], fitted[1][2]
    assert splined == dataclasses.replace(flow_module.get_preset("al4-small"), spline_bins=8) and plain == "al4-small"
    assert "spline_bins" not in pipeline.PipelineConfig().to_dict()
    with pytest.raises(ValueError, match="spline_bins"):
        pipeline.PipelineConfig(spline_bins=1)
    assert pipeline.PipelineConfig(data="replica-exchange", train_max_temperature_K=330.0).to_dict()["train_max_temperature_K"] == 330.0
    assert "train_max_temperature_K" not in pipeline.PipelineConfig().to_dict()  # folders written before it continue
    with pytest.raises(ValueError, match="replica-exchange"):
        pipeline.PipelineConfig(data="md", train_max_temperature_K=330.0)
