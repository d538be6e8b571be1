"""Seeded MD: which replica-exchange frames start it, and the pipeline stage that runs it."""

import os

import mdtraj
import numpy as np
import pytest
import torch

from openmm_sbg import pipeline, populations
from openmm_sbg.data import load_positions
from openmm_sbg.flow import TarFlow
from openmm_sbg.md import MDConfig, split_labels, write_trajectory
from openmm_sbg.seeding import rare_state_seeds

ALPHA_L_FRAMES = os.path.join(os.path.dirname(__file__), "data", "ad2-alphaL-C7ax.pdb")


def test_rare_states_are_seeded_from_the_coldest_replica_that_visits_them():
    temperatures = np.array([300.0] * 6 + [350.0] * 4 + [400.0] * 4)
    labels = np.array([0, 0, 0, 1, 1, 0] + [0, 2, 2, 2] + [2, 3, 2, 0])
    seeds = rare_state_seeds(labels, temperatures, 300.0, n_states=5, below=0.2)
    # State 0 (4/6) and 1 (2/6) are common at 300 K; 4 is never visited; 2 and 3 are rare there.
    assert [s["state"] for s in seeds] == [2, 3]
    assert seeds[0]["from_K"] == 350.0 and seeds[0]["frame"] == 8  # middle of frames 7, 8, 9
    assert seeds[1]["from_K"] == 400.0 and seeds[1]["frame"] == 11
    assert seeds[0]["fraction_at_target"] == 0.0
    # A threshold above a common state's fraction seeds it too, from the target temperature itself.
    assert [s["state"] for s in rare_state_seeds(labels, temperatures, 300.0, 5, below=0.5)] == [1, 2, 3]
    assert rare_state_seeds(labels, temperatures, 300.0, 5, below=0.5)[0]["from_K"] == 300.0
    # 0: only states the target temperature never visits; 1: every visited state.
    assert [s["state"] for s in rare_state_seeds(labels, temperatures, 300.0, 5, below=0.0)] == [2, 3]
    assert [s["state"] for s in rare_state_seeds(labels, temperatures, 300.0, 5, below=1.0)] == [0, 1, 2, 3]


def test_rare_state_seeds_need_frames_at_the_target_temperature():
    with pytest.raises(ValueError, match="no frame is at the target temperature 300 K"):
        rare_state_seeds([0, 1], [310.0, 350.0], 300.0, 2, 0.1)
    with pytest.raises(ValueError, match="labels"):
        rare_state_seeds([0, 1, 1], [300.0, 350.0], 300.0, 2, 0.1)


def test_the_seed_stage_runs_target_temperature_md_inside_a_rare_state(ad2, tmp_path):
    # Replica-exchange-like data: 300 K frames in C7eq/beta and alphaR only, alphaL/C7ax at 330 K.
    labeller = populations.backbone_state_labeller(ad2.topology)
    # C7eq/beta and alphaR from the shipped flow, alphaL/C7ax (phi > 0) from a small file of such frames.
    x = TarFlow.load("ad2", target=ad2).sample(1000, generator=torch.Generator().manual_seed(0))[0].double().numpy()
    x = np.concatenate([x, mdtraj.load(ALPHA_L_FRAMES).xyz.astype(np.float64)])
    labels = labeller(x)
    # Low-energy proposals: minimisation from them stays in their basin.
    energies = ad2.energy(x).numpy()
    pick = [np.flatnonzero(labels == k)[np.argsort(energies[labels == k])[:4]] for k in range(3)]
    frames = np.concatenate([pick[0], pick[1], pick[0][:2], pick[2]])
    temperatures = [300.0] * 8 + [330.0] * 6
    write_trajectory(str(tmp_path / "data-all-replicas.h5"), ad2, x[frames].astype(np.float32), energies[frames],
                     split_labels(len(frames)), MDConfig(n_frames=len(frames)), frame_temperature_K=temperatures)
    config = pipeline.PipelineConfig(data="replica-exchange", seeded_ns=0.002, frame_interval_ps=0.05)
    result = pipeline._seed(ad2, str(tmp_path), config, "Reference", progress=False)
    assert [run.state_name for run in result.runs] == ["alphaL/C7ax"]
    run = result.runs[0]
    assert run.from_K == 330.0 and run.fraction_at_target == 0.0 and run.status == "complete"
    seeded = load_positions(run.out, ad2)
    assert len(seeded) == 40
    # 10 ps after minimising the chosen frame, the run is still in the state it was seeded in.
    assert (labeller(seeded[:5]) == 2).all()
    # Rerunning the stage keeps the finished run.
    assert pipeline._seed(ad2, str(tmp_path), config, "Reference", progress=False).runs[0].out == run.out


def test_every_residue_rare_state_is_seeded_and_recorded(ad2, tmp_path, monkeypatch):
    from openmm_sbg.pipeline_results import SeedingResult

    # Two labelled residues over 8 frames, 4 at 300 K then 4 at 330 K: residue A is never in state 2 at 300 K
    # (its frame 6 at 330 K is), residue B is in state 1 at 300 K only once in four (frame 2).
    labels = np.array([[0, 0], [0, 0], [1, 1], [1, 0], [0, 0], [0, 0], [2, 0], [1, 0]])
    temperatures = [300.0] * 4 + [330.0] * 4
    x = np.zeros((8, ad2.topology.getNumAtoms(), 3), dtype=np.float32) + np.arange(8)[:, None, None]
    write_trajectory(str(tmp_path / "data-all-replicas.h5"), ad2, x, np.zeros(8), split_labels(8), MDConfig(n_frames=8),
                     frame_temperature_K=temperatures)
    monkeypatch.setattr(populations, "residue_state_labeller", lambda topology: (["ALA2", "ALA3"], lambda positions: labels))
    started = []
    monkeypatch.setattr(pipeline, "_seeded_md", lambda start, out, md, *args: started.append((start.positions[0, 0], out, md.seed)))
    config = pipeline.PipelineConfig(data="replica-exchange", seeded_ns=0.002, frame_interval_ps=0.05, seed_below=0.25)
    result = pipeline._seed(ad2, str(tmp_path), config, "Reference", progress=False)
    # ALA2: state 2 (absent at 300 K, from 330 K's frame 6); ALA3: state 1 (a quarter of 300 K's frames, from frame 2).
    assert [(run.residue, run.state, run.frame, run.from_K) for run in result.runs] == [("ALA2", 2, 6, 330.0), ("ALA3", 1, 2, 300.0)]
    assert [os.path.basename(out) for _, out, _ in started] == ["seeded-ALA2-2.h5", "seeded-ALA3-1.h5"]
    assert [float(first) for first, _, _ in started] == [6.0, 2.0]  # each run starts from its chosen frame
    assert len({seed for _, _, seed in started}) == 2  # with its own noise
    assert SeedingResult.from_dict(result.to_dict()) == result
