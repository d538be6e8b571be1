"""Write (or update) the record of a shipped model, ``openmm_sbg/models/<name>.json`` (developer tool).

    python tools/model_record.py al4 --checkpoint runs/al4model/al4-ml.pt \\
        --evaluation benchmarks/results/peptide_model-al4.json \\
        --md-summary runs/al4re/al4-re-81.summary.json \\
        --set command="openmm-sbg train al4 ..." --set machine="2 vCPUs ..."

The numbers come from their sources, never by hand: the training (data, its SHA-1, steps,
selected step, stop reason, time, validation NLL) from the checkpoint's own metadata; the
size from the file and the flow; the data's wall-clock from the ``openmm-sbg md --summary``
files; the importance-sampling and SMC results, and the command that made them, from a
``benchmarks/peptide_model.py`` result (its per-seed runs stay there). The prose (what the model is, the train command
with plain file names, the data and reference notes, the machine) is kept from the record
being updated, or given with ``--set KEY=VALUE``; so are any other fields the record has,
such as notes on what was tried before. Copy the checkpoint to ``openmm_sbg/models/<name>.pt``
yourself: the record describes the file named by ``--checkpoint``.
"""

import argparse
import datetime
import json
import pathlib

import torch

from openmm_sbg.flow.model import TarFlow
from openmm_sbg.io import atomic_write_text

MODELS = pathlib.Path(__file__).resolve().parents[1] / "openmm_sbg" / "models"
#: Fields the tool cannot compute; a new record needs each of them from ``--set``.
PROSE = ("what", "command", "data_note", "machine", "reference")
#: The record's field order; fields not named here (notes) follow, in their own order.
ORDER = (
    "model", "what", "command", "data", "data_note", "data_seconds", "data_sha1", "preset", "spline_bins",
    "parameters", "file_bytes", "started_from", "steps", "selected_step", "stopped", "train_seconds", "val_nll_per_dim",
    "machine", "reference", "evaluation", "importance_sampling", "smc",
)


def training_fields(checkpoint: pathlib.Path) -> dict:
    """What the checkpoint says about its training, and its size."""
    flow = TarFlow.load(checkpoint)
    metadata = flow.metadata
    if not metadata.get("complete"):
        raise SystemExit(f"{checkpoint} is from an unfinished training run; rerun its train command to finish it first")
    fields = {
        "data": [pathlib.Path(path).name for path in metadata["data"]],
        "data_sha1": metadata["data_sha1"],
        "preset": metadata["preset"],
        "spline_bins": flow.config.spline_bins,
        "parameters": sum(parameter.numel() for parameter in flow.parameters()),
        "file_bytes": checkpoint.stat().st_size,
        "steps": metadata["steps"],
        "selected_step": metadata["selected_step"],
        "train_seconds": round(total_train_seconds(metadata), 1),
        "val_nll_per_dim": metadata["val_nll_per_dim"],
    }
    if metadata.get("stopped"):
        fields["stopped"] = metadata["stopped"]
    if "started_from" in metadata:  # a fit that went on from another flow (`train --start-from`)
        started = metadata["started_from"]
        fields["started_from"] = {"data": [pathlib.Path(path).name for path in started.get("data", [])],
                                  "steps": started.get("steps"), "val_nll_per_dim": started.get("val_nll_per_dim")}
    return fields


def total_train_seconds(metadata: dict) -> float:
    """Training time of a flow and of every flow it was started from (``started_from``, nested)."""
    started = metadata.get("started_from")
    return metadata["train_seconds"] + (total_train_seconds(started) if started else 0.0)


def evaluation_fields(result_file: pathlib.Path) -> dict:
    """The importance-sampling and SMC results of a ``peptide_model.py`` result, and its command."""
    result = json.loads(result_file.read_text())
    fields = {"evaluation": f"{result['command']} (benchmarks/results/{result_file.name})"}
    for kind in ("importance_sampling", "smc"):
        if kind in result:
            # The label first; the per-seed runs stay in the result file.
            summary = {key: value for key, value in result[kind].items() if key not in ("label", "runs")}
            fields[kind] = {"label": result[kind]["label"], **summary}
    return fields


def data_seconds(summaries: list[pathlib.Path]) -> float:
    """Wall-clock of the MD runs that made the data, from their ``--summary`` files."""
    total = 0.0
    for path in summaries:
        summary = json.loads(path.read_text())
        if summary.get("status") != "complete":
            raise SystemExit(f"{path} is the summary of an unfinished MD run (status {summary.get('status')!r})")
        # run_wall_s spans every invocation of a resumed or extended run; wall_s is the last one's alone.
        whole_run = summary.get("run_wall_s")
        total += float(summary["wall_s"] if whole_run is None else whole_run)
    return round(total, 1)


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        settings[key] = value
    return settings


def build_record(previous: dict, computed: dict, settings: dict, written: str) -> dict:
    """``previous`` updated with ``computed`` and ``settings``, in :data:`ORDER`, then the notes."""
    merged = {**previous, **settings, **computed, "written": written}
    missing = [key for key in PROSE if key not in merged]
    if missing:
        raise SystemExit(f"a new record needs {', '.join(missing)}: pass each as --set KEY=VALUE")
    ordered = {key: merged.pop(key) for key in ORDER if key in merged}
    written = merged.pop("written")
    return {**ordered, **merged, "written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the shipped model's name (its record is openmm_sbg/models/NAME.json)")
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True, help="the trained flow (.pt)")
    parser.add_argument("--evaluation", type=pathlib.Path, required=True, help="benchmarks/results/peptide_model-*.json")
    parser.add_argument("--md-summary", type=pathlib.Path, nargs="*", default=[],
                        help="`openmm-sbg md --summary` files of the runs that made the training data. A summary "
                             "without run_wall_s (written before it was kept) of a run resumed or extended by rerunning "
                             "holds its last invocation's wall-clock only: leave such runs out, and the record keeps the "
                             "data_seconds it has")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a prose field (what, command, data_note, machine, reference, or a note)")
    parser.add_argument("--out", type=pathlib.Path, help="record to write (default: openmm_sbg/models/NAME.json)")
    args = parser.parse_args()
    out = args.out or MODELS / f"{args.name}.json"
    torch.set_num_threads(1)
    previous = json.loads(out.read_text()) if out.exists() else {}
    computed = {"model": f"{args.name}.pt", **training_fields(args.checkpoint), **evaluation_fields(args.evaluation)}
    if args.md_summary:
        computed["data_seconds"] = data_seconds(args.md_summary)
    record = build_record(previous, computed, parse_settings(args.settings), datetime.date.today().isoformat())
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
