"""tools/model_record.py: shipped records agree with their checkpoints, and a record keeps its prose."""

import importlib.util
import json
import pathlib

import pytest

from openmm_sbg.flow.checkpoint import read_checkpoint
from openmm_sbg.shipped import model_names, model_path

_TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "model_record.py"
_spec = importlib.util.spec_from_file_location("model_record", _TOOL)
model_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_record)


def _record(name: str) -> dict:
    return json.loads(pathlib.Path(model_path(name)).with_suffix(".json").read_text())


# The records the tool writes: models trained by maximum likelihood and evaluated by
# benchmarks/peptide_model.py. (The ad2 records describe a refinement, or predate the tool;
# test_flow_shipped checks those.)
TRAINED = [name for name in model_names()
           if "evaluation" in _record(name) and "refinement" not in read_checkpoint(model_path(name))["metadata"]]


def test_the_peptide_models_have_tool_written_records():
    assert {"al3", "al4", "al6"} <= set(TRAINED)


@pytest.mark.parametrize("name", TRAINED)
def test_record_states_what_its_checkpoint_holds(name):
    path = pathlib.Path(model_path(name))
    record = _record(name)
    computed = model_record.training_fields(path)
    assert {key: record.get(key) for key in computed} == computed
    assert record["model"] == path.name


def test_update_keeps_prose_and_notes_and_orders_fields():
    previous = {"written": "2026-01-01", "notes_on_earlier_models": "kept", "what": "a flow", "command": "train",
                "data_note": "d", "machine": "m", "reference": "r", "steps": 10}
    record = model_record.build_record(previous, {"model": "x.pt", "steps": 20}, {"machine": "new"}, "2026-02-02")
    assert record["steps"] == 20 and record["machine"] == "new" and record["notes_on_earlier_models"] == "kept"
    keys = list(record)
    assert keys[0] == "model" and keys[-1] == "written" and record["written"] == "2026-02-02"
    assert keys.index("notes_on_earlier_models") > keys.index("steps")


def test_new_record_without_prose_is_refused():
    with pytest.raises(SystemExit, match="--set"):
        model_record.build_record({}, {"model": "x.pt"}, {"what": "a flow"}, "2026-02-02")


def test_settings_need_key_and_value():
    assert model_record.parse_settings(["machine=2 cores=shared"]) == {"machine": "2 cores=shared"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        model_record.parse_settings(["machine"])


def test_training_time_counts_every_flow_a_fit_started_from():
    chain = {"train_seconds": 10.0, "started_from": {"train_seconds": 100.0, "started_from": {"train_seconds": 1000.0}}}
    assert model_record.total_train_seconds(chain) == 1110.0
    assert model_record.total_train_seconds({"train_seconds": 5.0}) == 5.0


def test_data_time_spans_every_call_of_a_resumed_run(tmp_path):
    resumed = tmp_path / "resumed.json"  # wall_s: the last call only
    resumed.write_text(json.dumps({"status": "complete", "wall_s": 30.0, "run_wall_s": 300.0}))
    older = tmp_path / "older.json"  # written before run_wall_s was kept
    older.write_text(json.dumps({"status": "complete", "wall_s": 40.0}))
    assert model_record.data_seconds([resumed, older]) == 340.0
    unfinished = tmp_path / "unfinished.json"
    unfinished.write_text(json.dumps({"status": "interrupted", "wall_s": 1.0, "run_wall_s": 1.0}))
    with pytest.raises(SystemExit, match="unfinished"):
        model_record.data_seconds([unfinished])
