"""openmm-sbg demo: the whole story on the shipped model, at a test-sized scale."""

import json

import numpy as np

from openmm_sbg.cli import main


def test_demo_samples_evaluates_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out-dir", str(out), "--n-particles", "48", "--n-steps", "3", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) == {"importance_sampling", "smc"}
    for name, run in summary["runs"].items():
        assert (out / f"{name}.h5").is_file()
        assert (out / name / "ramachandran.png").is_file() and (out / name / "energy.png").is_file()
        assert 0 < run["ess"] <= 1 and np.isfinite(run["log_z"])
        assert run["energy_w2_kT"] >= 0 and run["torus_w2"] >= 0
    assert summary["runs"]["smc"]["n_steps"] == 3
    assert (out / "summary.json").is_file()
