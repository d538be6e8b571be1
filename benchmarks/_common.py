"""Helpers shared by every benchmark script (none imports another script).

Not part of the package: machine description (with the GPUs torch sees), the RESULTS.md
section writer, timing, reference loading and the alanine-dipeptide basin definitions.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from openmm_sbg.io import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
PLOTS = HERE / "plots"
#: Raw results (JSON) behind the tables; small, committed next to the scripts.
DATA = HERE / "results"
#: Large intermediate files (MD trajectories, samples): gitignored.
WORK = ROOT / "runs" / "bench"


def machine() -> str:
    """One line: CPU model, cores, the GPUs torch sees (or "no GPU"), load, versions."""
    import mdtraj
    import openmm
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.*)", cpuinfo.read_text()) if cpuinfo.exists() else []
    cpu = names[0].strip() if names else platform.processor() or platform.machine()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"{len(gpus)} GPU(s): {', '.join(gpus)}"
    else:
        gpu = "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores (nproc), {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread(s)), OpenMM {openmm.__version__}, "
        f"mdtraj {mdtraj.__version__}; load average at start {load}"
    )


def write_section(heading: str, body: str) -> None:
    """Replace (or append) the section ``heading`` of RESULTS.md, leaving other sections alone.

    A section runs to the next heading of its own level or above, so a script's ``### table``
    sits inside the report's ``## question`` section and is replaced there. A section not yet
    in the file is appended at its end: move it under its question.
    """
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body.strip()}\n\n"
    level = len(heading) - len(heading.lstrip("#"))
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^#{{1,{level}}} |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(RESULTS, text.rstrip("\n") + "\n")


def save_json(name: str, payload: dict) -> Path:
    path = DATA / name
    atomic_write_text(path, json.dumps(payload, indent=1, default=float))
    return path


def load_json(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def default_flow() -> str:
    """The shipped ad2 flow."""
    from openmm_sbg import shipped

    return shipped.model_path("ad2")


# ------------------------------------------------------------------- reference and basins
def dihedrals_and_energies(path, frames=None):
    """Backbone (phi, psi) in radians ``[T, 2]`` and energies in kT ``[T]`` of an `openmm-sbg md` file."""
    from openmm_sbg import data, metrics

    traj = data.load_trajectory(path)
    meta = data.read_metadata(path)
    if frames is not None:
        traj = traj[frames]
    energies = np.asarray(meta["energies_kT"])
    return metrics.backbone_dihedrals(traj), (energies if frames is None else energies[frames])


#: ad2 basins on the (phi, psi) map, degrees. alphaL/C7ax: 0 <= phi < 120 (left-handed side; the
#: strip 120 <= phi <= 180 continues the beta region across the periodic boundary); on the rest,
#: alphaR: -120 <= psi < 50, otherwise C7eq/beta (C7eq, beta and PII).
BASINS = ("C7eq/beta", "alphaR", "alphaL/C7ax")
BASIN_RULE = (
    "alphaL/C7ax: 0 <= phi < 120 deg; otherwise alphaR: -120 <= psi < 50 deg; otherwise C7eq/beta "
    "(C7eq, beta, PII; includes phi >= 120, the beta region across the periodic boundary)"
)


def basin_labels(angles: np.ndarray) -> np.ndarray:
    """Basin index (into :data:`BASINS`) of each frame's (phi, psi) in radians."""
    phi, psi = np.degrees(angles[:, 0]), np.degrees(angles[:, 1])
    left = (phi >= 0) & (phi < 120)
    alpha_r = ~left & (psi >= -120) & (psi < 50)
    labels = np.zeros(len(phi), dtype=int)
    labels[alpha_r] = 1
    labels[left] = 2
    return labels


def populations(labels: np.ndarray, weights=None) -> np.ndarray:
    weights = np.full(len(labels), 1.0 / len(labels)) if weights is None else np.asarray(weights) / np.sum(weights)
    return np.array([weights[labels == k].sum() for k in range(len(BASINS))])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def weight_tail(log_weights) -> tuple[float, float, float]:
    """Normalised ESS, the largest single weight's share and the Pareto k of a set of log-weights."""
    import torch

    from openmm_sbg.smc.weights import normalised_ess, pareto_k

    log_weights = torch.as_tensor(log_weights, dtype=torch.float64)
    return normalised_ess(log_weights), float(torch.softmax(log_weights, 0).max()), pareto_k(log_weights)


def command_line(script: str, argv) -> str:
    """The command that reproduces this run, for RESULTS.md."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    return f"nice python benchmarks/{script} {' '.join(args)}".rstrip()


def axes(figsize=(5, 3.5)):
    """A matplotlib figure and axes for a plot file (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_plot(figure, name: str) -> str:
    """Write ``figure`` to ``benchmarks/plots/<name>``; the path relative to benchmarks/, for RESULTS.md."""
    figure.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOTS / name, dpi=120)
    return f"plots/{name}"


def header(results: dict, description: str, columns: list[str] | None = None) -> list[str]:
    """The first lines of a RESULTS.md section: the machine, the command and what it ran, then a table's head."""
    lines = [f"Machine: {results['machine']}.", "", f"Command: `{results['command']}`. {description}"]
    if columns:
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines


def publish(results: dict, json_name: str, heading: str, text: str, write: bool = True) -> None:
    """Print the section; unless ``write`` is false, keep the JSON and rewrite the RESULTS.md section."""
    print(text)
    if write:
        save_json(json_name, results)
        write_section(heading, text)
