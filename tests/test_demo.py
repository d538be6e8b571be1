"""openmm-sbg demo: the whole story on the shipped model, at a test-sized scale."""

import json

import numpy as np

from openmm_sbg.cli import main


def test_demo_samples_evaluates_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out-dir", str(out), "--n-particles", "48", "--n-steps", "3", "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert set(summary["runs"]) == {"importance_sampling", "smc"}
    for name, run in summary["runs"].items():
        assert (out / f"{name}.h5").is_file()
        assert (out / name / "ramachandran.png").is_file() and (out / name / "energy.png").is_file()
        assert 0 < run["ess"] <= 1 and np.isfinite(run["log_z"])
    # What the demo is for: the shipped flow is a usable proposal on its own. The Cartesian
    # model it replaced gave ESS ~1/K (0.02 here) and T-W2 ~1.5-1.9 at this size.
    importance = summary["runs"]["importance_sampling"]
    assert importance["ess"] > 0.08
    assert importance["torus_w2"] < 1.0 and importance["energy_w2_kT"] < 3.0
    assert summary["runs"]["smc"]["n_steps"] == 3
    assert (out / "summary.json").is_file()
    # The shipped `ad2` with its default, exact weights; IS keeps them (independent proposals).
    assert summary["model"] == "ad2.pt" and importance["com_adjustment"] == "gaussian" and importance["clip_fraction"] == 0
    assert importance["states"]["samples_bootstrap_error"] is not None
    # The table's floor: the reference against itself, half against half.
    floor = summary["noise_floor"]
    assert floor["frames_per_half"] == 2500 and 0 < floor["energy_w2_kT"] < 1 and 0 < floor["torus_w2"] < 0.5
    assert "MD half vs half (floor)" in captured.err


def test_demo_refuses_a_flow_of_another_molecule(tmp_path, capsys):
    from openmm_sbg import systems
    from openmm_sbg.flow import FlowConfig, TarFlow

    path = tmp_path / "al3.pt"
    TarFlow(FlowConfig(width=16, n_blocks=1, layers_per_block=1, heads=1), target=systems.get("al3"), std=0.2).save(path)
    code = main(["demo", "--flow", str(path), "--out-dir", str(tmp_path / "demo"), "--no-progress"])
    assert code == 2 and "give a flow of the built-in ad2 system" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "summary.json").exists()
