"""Training: the loss goes down, runs resume exactly, checkpoints are safe; the CLI command."""

import json
import math

import numpy as np
import pytest
import torch

from openmm_sbg import cli
from openmm_sbg.flow import FlowConfig, TarFlow, TrainOptions, train
from openmm_sbg.flow.refine import RefineOptions
from openmm_sbg.flow.training import one_cycle_lr
from openmm_sbg.md import MDConfig, split_labels, write_trajectory

TINY = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=1)



def thermal_frames(target, n, sigma=0.01, seed=0) -> np.ndarray:
    """``n`` frames of the target's structure with Gaussian jitter (nm): cheap ad2-like data."""
    rng = np.random.default_rng(seed)
    return (target.positions[None] + rng.normal(scale=sigma, size=(n, target.n_atoms, 3))).astype(np.float32)


def test_short_training_lowers_validation_nll(ad2):
    frames = thermal_frames(ad2, 400)
    options = TrainOptions(steps=40, batch_size=64, lr=3e-3, seed=0)
    flow = train(frames[:320], frames[320:], target=ad2, config=TINY, options=options, progress=False)
    history = flow.metadata["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 40
    assert flow.metadata["val_nll_per_dim"] < history[0]["val_nll_per_dim"] - 0.1
    assert flow.metadata["complete"] and flow.metadata["n_train"] == 320
    assert flow.std == pytest.approx(float(np.std(frames[:320] - frames[:320].mean(1, keepdims=True))), rel=1e-4)


@pytest.mark.parametrize("select_best", [True, False])
def test_result_holds_the_best_or_the_last_validated_weights(ad2, select_best):
    """Eight training frames overfit at once, so validation gets worse: only select_best keeps the earlier weights."""
    from openmm_sbg.flow.fitting import feature_tensor
    from openmm_sbg.flow.training import validation_nll

    frames = thermal_frames(ad2, 108)
    options = TrainOptions(steps=12, batch_size=8, lr=1e-2, warmup=0.0, ema_decay=0.5, seed=0, select_best=select_best)
    config = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=1, representation="internal")
    flow = train(frames[:8], frames[8:], target=ad2, config=config, options=options, progress=False)
    history = flow.metadata["history"]
    best = min(history, key=lambda entry: entry["val_nll_per_dim"])
    assert best["step"] < 12, "the test needs a run whose last epoch is not its best"
    chosen = best if select_best else history[-1]
    assert flow.metadata["selected_step"] == chosen["step"]
    assert flow.metadata["val_nll_per_dim"] == chosen["val_nll_per_dim"]
    # The weights returned are the ones that scored that validation NLL.
    assert validation_nll(flow, feature_tensor(frames[8:], flow), options.seed) == pytest.approx(chosen["val_nll_per_dim"], abs=1e-6)


def test_patience_stops_a_fit_whose_validation_stopped_improving(ad2):
    """Eight frames at a high rate overfit at once: with patience 2 the fit stops two epochs after its best."""
    frames = thermal_frames(ad2, 108)
    options = TrainOptions(steps=12, batch_size=8, lr=1e-2, warmup=0.0, ema_decay=0.5, seed=0, patience=2)
    config = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=1, representation="internal")
    flow = train(frames[:8], frames[8:], target=ad2, config=config, options=options, progress=False)
    record, history = flow.metadata, flow.metadata["history"]
    best = min(history, key=lambda entry: entry["val_nll_per_dim"])
    assert record["steps"] < 12 and record["stopped"].startswith("the validation NLL has not improved for 2 epochs")
    assert [entry["step"] for entry in history][-3:] == [best["step"], best["step"] + 1, best["step"] + 2]
    assert record["selected_step"] == best["step"] and record["complete"]
    # Without patience the same fit runs every step, through the same first epochs.
    full = train(frames[:8], frames[8:], target=ad2, config=config, options=TrainOptions(**{**options.to_dict(), "patience": None}),
                 progress=False)
    assert full.metadata["steps"] == 12 and full.metadata["stopped"] is None
    assert [e["val_nll_per_dim"] for e in full.metadata["history"][: len(history)]] == [e["val_nll_per_dim"] for e in history]


@pytest.mark.slow  # a compilation, as the compiled force field's test
def test_compiled_loss_trains_the_same_model(ad2):
    """torch.compile changes how the loss is computed, not what: the same fit to float32 rounding."""
    from openmm_sbg.dynamics import compile_available

    if not compile_available():
        pytest.skip("torch.compile needs a C++ compiler here")
    frames = thermal_frames(ad2, 120)
    options = TrainOptions(steps=6, batch_size=32, lr=1e-3)
    eager = train(frames[:100], frames[100:], target=ad2, config=TINY, options=options, progress=False)
    compiled = train(frames[:100], frames[100:], target=ad2, config=TINY, options=options, progress=False, compile=True)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-5, rtol=1e-4)
    assert compiled.metadata["val_nll_per_dim"] == pytest.approx(eager.metadata["val_nll_per_dim"], abs=1e-5)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, ad2):
    frames = thermal_frames(ad2, 120)
    options = TrainOptions(steps=10, batch_size=32, lr=1e-3)  # 3 steps per epoch
    kwargs = dict(target=ad2, config=TINY, options=options, progress=False)
    reference = train(frames[:100], frames[100:], checkpoint_path=tmp_path / "ref.pt", **kwargs)

    def interrupt(step, loss):
        if step == 8:
            raise KeyboardInterrupt

    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(frames[:100], frames[100:], checkpoint_path=path, callback=interrupt, **kwargs)
    partial = TarFlow.load(path, target=ad2)  # the epoch checkpoint is a usable flow
    assert partial.metadata["steps"] == 6 and not partial.metadata["complete"]
    resumed = train(frames[:100], frames[100:], checkpoint_path=path, **kwargs)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0)
    assert resumed.metadata["val_nll_per_dim"] == reference.metadata["val_nll_per_dim"]
    # A finished run is not silently retrained; different settings do not resume.
    with pytest.raises(ValueError, match="finished flow"):
        train(frames[:100], frames[100:], checkpoint_path=path, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        train(frames[:100], frames[100:], checkpoint_path=path, callback=interrupt, overwrite=True, **kwargs)
    other = dict(kwargs, options=TrainOptions(steps=10, batch_size=32, lr=2e-3))
    with pytest.raises(ValueError, match="different options"):
        train(frames[:100], frames[100:], checkpoint_path=path, **other)


def test_finished_checkpoint_is_small_and_round_trips(tmp_path, ad2):
    frames = thermal_frames(ad2, 60)
    flow = train(frames, target=ad2, config=TINY, options=TrainOptions(steps=2, batch_size=16), progress=False,
                 checkpoint_path=tmp_path / "flow.pt")
    payload = torch.load(tmp_path / "flow.pt", weights_only=True)
    assert "training_state" not in payload  # no optimiser state in a finished file
    assert flow.metadata["n_train"] == 54 and flow.metadata["n_val"] == 6  # last 10% held out


def test_one_cycle_schedule():
    lrs = [one_cycle_lr(step, 100, 1e-3, 0.05) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and int(np.argmax(lrs)) == 5
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_train_rejects_bad_data(ad2):
    with pytest.raises(ValueError, match="frames, atoms, 3"):
        train(np.zeros((10, 22)), target=ad2, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train(np.full((10, 22, 3), np.nan), target=ad2, progress=False)
    with pytest.raises(ValueError, match="target has 22"):
        train(np.random.default_rng(0).normal(size=(10, 5, 3)), target=ad2, progress=False)


def md_file(tmp_path, target, n_frames: int):
    """An `openmm-sbg md`-style file of ``n_frames`` thermal frames with its train/val/test split."""
    data = tmp_path / "md.h5"
    write_trajectory(str(data), target, thermal_frames(target, n_frames), np.zeros(n_frames), split_labels(n_frames),
                     MDConfig(n_frames=n_frames))
    return data


def test_cli_train_writes_flow_and_summary(tmp_path, ad2, capsys):
    data = md_file(tmp_path, ad2, 100)
    out = tmp_path / "flow.pt"
    argv = ["train", "ad2", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "16",
            "--no-progress", "--summary", str(tmp_path / "summary.json")]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_train"] == 80 and summary["n_val"] == 10 and summary["steps"] == 3
    assert math.isfinite(summary["val_nll_per_dim"])
    flow = TarFlow.load(out, target=ad2)
    assert flow.metadata["data"] == [str(data)] and flow.target().name == "ad2"
    # Rerunning the finished command is refused with a clear message, not retrained.
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_train_sizes_the_preset_with_width_blocks_marginals_and_splines(tmp_path, ad2, capsys):
    data = md_file(tmp_path, ad2, 40)
    out = tmp_path / "flow.pt"
    argv = ["train", "ad2", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "8",
            "--width", "32", "--blocks", "6", "--spline-bins", "4", "--marginals", "3", "--no-progress"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["spline_bins"] == 4
    flow = TarFlow.load(out, target=ad2)
    config = flow.config
    assert (config.width, config.n_blocks, config.layers_per_block, config.representation) == (32, 6, 2, "internal")
    assert config.marginals == 3 and flow.representation.gaussianize.loc.shape == (20, 3, 3)
    assert config.spline_bins == 4 and flow.blocks[0].proj_out.out_features == 3 * (2 + 11)
    # A size that makes no flow is refused by name, before any training.
    assert cli.main([*argv[:-9], "--width", "0", "--no-progress", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "width must be a positive integer" in err and "Traceback" not in err
    assert cli.main([*argv[:-9], "--marginals", "2", "--representation", "cartesian", "--no-progress", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "marginals" in err and "internal" in err and "Traceback" not in err
    assert cli.main([*argv[:-9], "--spline-bins", "1", "--no-progress", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "spline_bins must be 0" in err and "Traceback" not in err


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from openmm_sbg.commands import train as train_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "run", interrupted)
    argv = ["train", "ad2", "--data", "md.h5", "--out", str(tmp_path / "flow.pt")]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "flow.pt") in err and "openmm-sbg train ad2 --data md.h5" in err


def test_settings_added_later_are_stored_only_when_set():
    """Checkpoints written before ``patience`` existed resume: an unset one is not stored, a set one is."""
    for options in (TrainOptions, RefineOptions):
        assert "patience" not in options().to_dict()
        assert options(patience=3).to_dict()["patience"] == 3


def test_a_fit_started_from_a_trained_flow_goes_on_from_its_weights_and_coordinates(tmp_path, ad2):
    from openmm_sbg.flow.training import weights_fingerprint

    frames = thermal_frames(ad2, 200)
    config = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=1, representation="internal")
    first = train(frames[:160], frames[160:], target=ad2, config=config,
                  options=TrainOptions(steps=10, batch_size=32, lr=3e-3), progress=False)
    first_weights = {key: value.clone() for key, value in first.state_dict().items()}
    # Wider frames fit other coordinate scales, which the first flow's weights do not assume.
    wider = thermal_frames(ad2, 160, sigma=0.02, seed=1)
    # 5 steps per epoch; the last weights, as the best on the narrower validation frames may be the first flow's own.
    options = TrainOptions(steps=6, batch_size=32, lr=1e-3, select_best=False)
    fresh = train(wider, frames[160:], target=ad2, config=config, options=options, progress=False)
    assert not torch.allclose(fresh.representation.scale, first.representation.scale, rtol=0.1)
    kwargs = dict(target=ad2, initial=first, options=options, progress=False)
    second = train(wider, frames[160:], checkpoint_path=tmp_path / "second.pt", **kwargs)
    # Step 0 scores the first flow itself: same weights, same coordinates, same validation frames and noise.
    assert second.metadata["history"][0]["val_nll_per_dim"] == pytest.approx(first.metadata["val_nll_per_dim"], abs=1e-6)
    for key, value in first.representation.state_dict().items():
        torch.testing.assert_close(second.representation.state_dict()[key], value, atol=0, rtol=0)
    assert second.config == first.config and second.metadata["steps"] == 6
    assert any(not torch.equal(second.state_dict()[key], value) for key, value in first_weights.items())
    for key, value in first_weights.items():  # the flow started from is not touched
        torch.testing.assert_close(first.state_dict()[key], value, atol=0, rtol=0)
    started = second.metadata["started_from"]
    assert started["weights_sha1"] == weights_fingerprint(first) and started["steps"] == 10
    assert TarFlow.load(tmp_path / "second.pt", target=ad2).metadata["started_from"] == started

    # An interrupted started fit resumes to the same flow; from another flow, or from random weights, it does not resume.
    def interrupt(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(wider, frames[160:], checkpoint_path=path, callback=interrupt, **kwargs)
    with pytest.raises(ValueError, match="initial_sha1"):
        train(wider, frames[160:], checkpoint_path=path, **dict(kwargs, initial=fresh))
    with pytest.raises(ValueError, match="initial_sha1"):
        train(wider, frames[160:], checkpoint_path=path, **dict(kwargs, initial=None, config=config))
    resumed = train(wider, frames[160:], checkpoint_path=path, **kwargs)
    for key, value in second.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=0, rtol=0)
    # Another architecture beside the flow is refused by name.
    with pytest.raises(ValueError, match="architecture"):
        train(wider, frames[160:], **dict(kwargs, config=TINY))


def test_cli_train_starts_from_a_flow_and_refuses_sizes_beside_it(tmp_path, ad2, capsys):
    data = md_file(tmp_path, ad2, 60)
    first = tmp_path / "first.pt"
    common = ["train", "ad2", "--data", str(data), "--steps", "2", "--batch-size", "8", "--no-progress"]
    assert cli.main([*common, "--out", str(first), "--width", "32", "--blocks", "2"]) == 0
    capsys.readouterr()
    assert cli.main([*common, "--out", str(tmp_path / "second.pt"), "--start-from", str(first)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["started_from"] == str(first) and (summary["width"], summary["blocks"]) == (32, 2)
    assert summary["preset"] == "ad2-small"
    assert cli.main([*common, "--out", str(tmp_path / "third.pt"), "--start-from", str(first), "--blocks", "4"]) == 2
    err = capsys.readouterr().err
    assert "leave out --blocks" in err and "Traceback" not in err
    assert not (tmp_path / "third.pt").exists()
