"""benchmarks/_common.py: a benchmark replaces its own RESULTS.md section and JSON, atomically, and no other."""

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
