"""Time to answer: from nothing to ad2's alphaL/C7ax population within 20%, counted whole.

Runs one ``openmm-sbg run ad2 --data replica-exchange ...`` from an empty folder (or continues
it: every stage resumes) and reads its ``summary.json``: each stage's wall-clock, and per
temperature the importance-weighted P(alphaL/C7ax) with its bootstrap standard error. The SBG
time to the 300 K answer is every stage up to and including that temperature's sampling and
the evaluation; each further temperature costs its own sampling only (the same flow). Next to
it: umbrella sampling on the same machine type (``results/umbrella_sampling-2d-grid.json``:
MBAR over a (phi, psi) grid of windows, its time to a 20% answer per repeat; a new temperature
needs new windows) and plain MD (no visit in 55 ns at 300 K, ``results/rare_basin*.json``).

Run: ``nice python benchmarks/time_to_answer.py --folder runs/tta``; extra ``openmm-sbg run``
options follow ``--``. Writes ``results/time_to_answer.json`` and the "Time to answer" section
of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import command_line, header, load_json, machine, publish  # noqa: E402

HEADING = "### Time to answer: ad2's alphaL/C7ax from nothing"
RARE = 2  # alphaL/C7ax in openmm_sbg.populations.BACKBONE_STATES
#: The stages that stand between nothing and the 300 K answer (the first temperature sampled).
BEFORE_SAMPLING = ("data", "seed", "train", "refine")


def run_command(folder: str, temperatures: list[float], threads: int, extra: list[str]) -> list[str]:
    return ["openmm-sbg", "run", "ad2", "--data", "replica-exchange", "--folder", folder, "--n-steps", "0",
            "--sample-temperatures", *[f"{t:g}" for t in temperatures[1:]], "--threads", str(threads), "--no-progress", *extra]


def answer(summary: dict, kelvin: float) -> tuple[float, float]:
    """P(alphaL/C7ax) and its bootstrap standard error at ``kelvin`` from a pipeline summary."""
    states = summary["temperatures"][f"{kelvin:g}"]["states"]
    return states["samples"][RARE], states["samples_bootstrap_error"][RARE]


def umbrella_reference() -> dict:
    """The umbrella-sampling answer at 300 K and its measured time to a 20% answer (mean over repeats)."""
    row = load_json("umbrella_sampling-2d-grid.json")["temperatures"][0]
    return {"p_alphaL": row["populations"][RARE], "p_alphaL_error": row["seed_stderr"][RARE],
            "seconds_to_20_percent": float(np.mean(row["seconds_to_20_percent"])),
            "seconds_to_20_percent_each": row["seconds_to_20_percent"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="runs/tta", help="the pipeline's folder (rerun to continue it)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 350.0, 400.0],
                        help="the first is the target's (ad2: 300 K); the rest are sampled from the same flow")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every stage (an idle 2-core machine: 2)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep results/ and RESULTS.md as they are")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    command = run_command(args.folder, args.temperatures, args.threads, extra)
    started = time.perf_counter()
    # The console script of this interpreter's environment (a virtual environment need not be on PATH).
    local = os.path.join(os.path.dirname(sys.executable), command[0])
    subprocess.run([local if os.path.exists(local) else command[0], *command[1:]], check=True)
    process_seconds = time.perf_counter() - started
    with open(os.path.join(args.folder, "summary.json")) as handle:
        summary = json.load(handle)

    stages = summary["wall_clock_s"]
    first = f"sample-{args.temperatures[0]:g}K"
    to_answer = {name: stages[name] for name in (*BEFORE_SAMPLING, first, "evaluate") if name in stages}
    p, error = answer(summary, args.temperatures[0])
    umbrella = umbrella_reference()
    more = {f"{t:g}": dict(zip(("p_alphaL", "p_alphaL_error"), answer(summary, t)), extra_seconds=stages[f"sample-{t:g}K"])
            for t in args.temperatures[1:]}
    results = {
        "machine": machine(),
        "command": " ".join(shlex.quote(part) for part in command),
        "benchmark_command": command_line("time_to_answer.py", argv),
        "total_seconds": sum(to_answer.values()),
        "process_seconds": process_seconds,
        "ran_now": summary["ran_now"],
        "stages": to_answer,
        "p_alphaL": p,
        "p_alphaL_error": error,
        "relative_error": error / p if p > 0 else None,
        "within_20_percent": bool(p > 0 and error / p <= 0.2),
        "umbrella_p_alphaL": umbrella["p_alphaL"],
        "umbrella_p_alphaL_error": umbrella["p_alphaL_error"],
        "z_against_umbrella": (p - umbrella["p_alphaL"]) / np.hypot(error, umbrella["p_alphaL_error"]),
        "umbrella_seconds": umbrella["seconds_to_20_percent"],
        "umbrella_seconds_each_repeat": umbrella["seconds_to_20_percent_each"],
        "other_temperatures": more,
        "training": summary["training"],
    }
    publish(results, "time_to_answer.json", HEADING, report(results))


def report(results: dict) -> str:
    minutes = lambda seconds: f"{seconds / 60:.1f} min"  # noqa: E731
    lines = header(results, "Every stage from an empty folder; the SBG total is the time to the "
                   "300 K answer (stages before sampling, 300 K sampling, evaluation).",
                   ["method", "stages", "P(alphaL/C7ax) at 300 K", "wall-clock to a 20% answer"])
    stages = " + ".join(f"{name} {minutes(seconds)}" for name, seconds in results["stages"].items())
    lines.append(f"| SBG | {stages} | {results['p_alphaL']:.4f} ± {results['p_alphaL_error']:.4f} "
                 f"({100 * results['relative_error']:.0f}%) | {minutes(results['total_seconds'])} |")
    each = ", ".join(minutes(s) for s in results["umbrella_seconds_each_repeat"])
    lines.append(f"| umbrella sampling (MBAR, (phi, psi) grid) | windows | {results['umbrella_p_alphaL']:.4f} ± "
                 f"{results['umbrella_p_alphaL_error']:.4f} | {minutes(results['umbrella_seconds'])} (mean; repeats {each}) |")
    lines.append("| plain MD | | no visit in 55 ns | not reached |")
    lines += ["", "| temperature | P(alphaL/C7ax), SBG | extra wall-clock, SBG |", "|---|---|---|"]
    for kelvin, row in results["other_temperatures"].items():
        lines.append(f"| {kelvin} K | {row['p_alphaL']:.4f} ± {row['p_alphaL_error']:.4f} | {minutes(row['extra_seconds'])} |")
    lines += ["", f"The 300 K answer is {results['z_against_umbrella']:+.1f} combined standard errors from umbrella "
              "sampling's. Umbrella sampling pays its windows again at each new temperature."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
