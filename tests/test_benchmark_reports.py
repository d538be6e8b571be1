"""Benchmark helpers: a benchmark replaces its own RESULTS.md section and JSON, atomically, and no other
(benchmarks/_common.py); a reference's burn-in is simulated time (benchmarks/reference_check.py)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

_HELPERS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"


@pytest.fixture
def common(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_common", _HELPERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(module, "DATA", tmp_path / "results")
    return module


REPORT = """# Results

## Question

Prose about the question.

### Table, al4

| old | table |

### Table, al3

| al3 | table |

## Next question

More prose.
"""


def test_a_section_is_replaced_in_place_and_nothing_else_changes(common):
    common.RESULTS.write_text(REPORT)
    common.write_section("### Table, al4", "| new | table |")
    text = common.RESULTS.read_text()
    assert text == REPORT.replace("| old | table |", "| new | table |")
    assert list(common.RESULTS.parent.iterdir()) == [common.RESULTS], "a temporary file was left behind"


def test_a_new_section_is_appended(common):
    common.RESULTS.write_text(REPORT)
    common.write_section("### Table, al6", "| al6 |")
    assert common.RESULTS.read_text() == REPORT + "\n### Table, al6\n\n| al6 |\n"


def test_results_json_round_trips_numpy_scalars_into_a_new_folder(common):
    common.save_json("check.json", {"ess": np.float32(0.5), "seeds": [0, 1]})
    assert common.load_json("check.json") == {"ess": 0.5, "seeds": [0, 1]}
    assert json.loads((common.DATA / "check.json").read_text())["ess"] == 0.5
    assert [path.name for path in common.DATA.iterdir()] == ["check.json"], "a temporary file was left behind"


def _reference_check(monkeypatch):
    monkeypatch.syspath_prepend(str(_HELPERS.parent))  # reference_check imports its helpers by bare name
    spec = importlib.util.spec_from_file_location("reference_check", _HELPERS.parent / "reference_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copies_file(tmp_path, interval_ps: float, copies: int = 2, frames: int = 6) -> str:
    """``copies`` ladder copies of ``frames`` frames each, ``interval_ps`` apart, as `openmm-sbg md` stores them."""
    import mdtraj

    from openmm_sbg import systems

    structure = mdtraj.load(str(systems.structure_path("al3")))
    rng = np.random.default_rng(0)
    xyz = structure.xyz + rng.normal(scale=0.01, size=(copies * frames, *structure.xyz.shape[1:]))
    time = np.tile(np.arange(1, frames + 1) * interval_ps, copies)
    path = str(tmp_path / "run.h5")
    mdtraj.Trajectory(xyz.astype(np.float32), structure.topology, time=time).save_hdf5(path)
    return path


@pytest.mark.parametrize("interval_ps, dropped", [(0.5, 4), (1.0, 2)])
def test_reference_burn_in_is_simulated_time_not_frames(tmp_path, monkeypatch, interval_ps, dropped):
    reference_check = _reference_check(monkeypatch)
    run, angles = reference_check.one_run(_copies_file(tmp_path, interval_ps), copies=2, burn_in_ps=2.0)
    assert run["burn_in_frames"] == dropped
    assert run["frames_used"] == len(angles) == 2 * (6 - dropped)


def test_a_burn_in_longer_than_a_copy_is_refused(tmp_path, monkeypatch):
    reference_check = _reference_check(monkeypatch)
    with pytest.raises(SystemExit, match="smaller --burn-in-ps"):
        reference_check.one_run(_copies_file(tmp_path, 1.0), copies=2, burn_in_ps=6.0)
