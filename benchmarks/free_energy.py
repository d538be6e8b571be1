"""Free energy on ad2: basin populations, basin free-energy differences and log Z, SBG vs MD.

- MD: basin populations of ``openmm-sbg md`` runs (the independent reference and the
  training run) with uncertainties from the statistical inefficiency of each basin indicator
  (``pymbar.timeseries``) and, independently, from block averages (``--blocks`` contiguous blocks).
- SBG: the same from repeated seeds (mean ± standard error over seeds) of importance
  sampling and the two SMC variants; the SBG runs are those of
  ``benchmarks/time_to_quality.py`` (read from ``benchmarks/results/time_to_quality.json``),
  plus extra seeds of one budget per method run here (``--seeds``, ``FREE_ENERGY_BUDGETS``;
  kept in ``results/free_energy_extra_rows.json`` and not rerun while that file exists).
- Basin free-energy differences ``dF(A->B) = -ln(p_B / p_A)`` in kT, and SBG's
  ``log Z = log(Z_T / Z_S)`` per method with its seed-to-seed spread (MD has no log Z; IS and
  SMC estimate the same number, so their difference is a consistency check).

Run: ``nice python benchmarks/free_energy.py`` after ``time_to_quality.py`` (a few minutes
more with the default extra seeds); it writes ``benchmarks/results/free_energy.json`` and the
"Free energy" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402  # noqa: E402
    BASIN_RULE,
    BASINS,
    DATA,
    ROOT,
    WORK,
    basin_labels,
    command_line,
    default_flow,
    dihedrals_and_energies,
    header,
    load_json,
    machine,
    publish,
    save_json,
)
from _sbg_runs import METHODS, Scorer, default_budgets, groups_of, run_sbg  # noqa: E402

HEADING = "### Free energy"
PAIRS = ((0, 1), (0, 2))  # dF(C7eq/beta -> alphaR), dF(C7eq/beta -> alphaL/C7ax)


def delta_f(pops) -> list[float]:
    with np.errstate(divide="ignore"):
        return [float(-np.log(pops[b] / pops[a])) if pops[a] > 0 else float("nan") for a, b in PAIRS]


def md_analysis(path: str, blocks: int) -> dict:
    from pymbar import timeseries

    from openmm_sbg import data

    angles, _ = dihedrals_and_energies(path)
    labels = basin_labels(angles)
    n = len(labels)
    pops = np.array([(labels == k).mean() for k in range(len(BASINS))])
    g, err_g = [], []
    for k in range(len(BASINS)):
        indicator = (labels == k).astype(float)
        if indicator.min() == indicator.max():  # never (or always) visited: no fluctuation to analyse
            g.append(float("nan"))
            err_g.append(float("nan"))
            continue
        inefficiency = float(timeseries.statistical_inefficiency(indicator))
        g.append(inefficiency)
        err_g.append(float(np.sqrt(pops[k] * (1 - pops[k]) * inefficiency / n)))
    block_pops = np.array([[(chunk == k).mean() for k in range(len(BASINS))] for chunk in np.array_split(labels, blocks)])
    block_df = np.array([delta_f(p) for p in block_pops])
    # Delta method for dF(A->B) = -ln pB + ln pA with the g-based errors (A, B treated as independent: conservative).
    df = delta_f(pops)
    df_err_g = [
        float(np.hypot(err_g[a] / pops[a], err_g[b] / pops[b])) if pops[b] > 0 and pops[a] > 0 else float("nan") for a, b in PAIRS
    ]
    return {
        "file": os.path.relpath(path, ROOT),
        "frames": n,
        "ns": float(data.load_trajectory(path).time[-1]) * 1e-3,
        "populations": pops.tolist(),
        "statistical_inefficiency_frames": g,
        "population_err_g": err_g,
        "population_err_blocks": (block_pops.std(axis=0, ddof=1) / np.sqrt(blocks)).tolist(),
        "blocks": blocks,
        "delta_f": df,
        "delta_f_err_g": df_err_g,
        "delta_f_err_blocks": [
            float(np.nanstd(block_df[:, i], ddof=1) / np.sqrt(np.isfinite(block_df[:, i]).sum())) if np.isfinite(block_df[:, i]).sum() > 1 else float("nan")
            for i in range(len(PAIRS))
        ],
        "transitions_into": [int(np.sum((labels[1:] == k) & (labels[:-1] != k))) for k in range(len(BASINS))],
    }


def sbg_groups(rows: list[dict]) -> list[dict]:

    groups = []
    for method in METHODS:
        for label, group in groups_of([r for r in rows if r["method"] == method]):
            pops = np.array([r["populations"] for r in group])
            log_z = np.array([r["log_z"] for r in group])
            m = len(group)

            def se(values):
                if m < 2:
                    return [float("nan")] * np.atleast_1d(values[0]).size
                return np.atleast_1d(np.nanstd(values, axis=0, ddof=1) / np.sqrt(m)).tolist()

            with np.errstate(all="ignore"):
                groups.append({
                    "method": method, "budget": label, "seeds": sorted(r["seed"] for r in group),
                    "seconds_mean": float(np.mean([r["seconds"] for r in group])),
                    "ess_mean": float(np.mean([r["ess"] for r in group])),
                    "populations": pops.mean(axis=0).tolist(), "populations_se": se(pops),
                    # dF from the seed-averaged populations (one seed alone often leaves a basin empty),
                    # its error from theirs by the delta method.
                    "delta_f": delta_f(pops.mean(axis=0)),
                    "delta_f_se": [float(np.hypot(se(pops)[a] / pops[:, a].mean(), se(pops)[b] / pops[:, b].mean())) for a, b in PAIRS],
                    "log_z": float(log_z.mean()), "log_z_se": se(log_z)[0], "log_z_sd": float(log_z.std(ddof=1)) if m > 1 else float("nan"),
                })
    return groups


#: The budget of each method (a time-to-quality label) repeated over seeds here.
FREE_ENERGY_BUDGETS = {"IS": "K=4000", "SMC linear+ULA (paper)": "K=250 L=100", "SMC adaptive+MALA": "K=250 cESS=0.9"}


def extra_runs(n_seeds: int, flow_path: str, reference: str, max_samples: int, known: list[dict]) -> list[dict]:
    """Seeds 0..n_seeds-1 of each method's :data:`FREE_ENERGY_BUDGETS` budget that ``known`` lacks."""
    from openmm_sbg import TarFlow, systems

    flow = TarFlow.load(flow_path)
    target = systems.get("ad2")
    scorer = Scorer(reference, max_samples)
    rows = []
    for method, budgets in default_budgets(False).items():
        spec = next(b for b in budgets if b["label"] == FREE_ENERGY_BUDGETS[method])
        have = {r["seed"] for r in known if (r["method"], r["budget"]) == (method, spec["label"])}
        missing = [s for s in range(n_seeds) if s not in have]
        if missing:
            rows += run_sbg(target, flow, scorer, {method: [spec]}, WORK / "ttq-samples", seeds=missing)
    return rows


def fmt(value, err=None, digits=3) -> str:
    if value is not None and value == np.inf:
        return "+inf (basin empty)"
    if value is None or not np.isfinite(value):
        return "n/a"
    if err is None or not np.isfinite(err):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {err:.{digits}f}"


def report(results: dict) -> str:
    names = " / ".join(BASINS)
    lines = header(
        results,
        f"Basins: {BASIN_RULE}. dF(A->B) = -ln(p_B / p_A) in kT. "
        f"MD errors: `pymbar.timeseries.statistical_inefficiency` of each basin indicator (g, in frames of the file), "
        f"and the standard error over {results['md'][0]['blocks']} contiguous blocks. SBG errors: standard error over seeds. "
        "All populations use the samples' final weights; SBG dF comes from the seed-averaged populations.",
    ) + [
        "",
        f"| source | samples | wall-clock | {names} (g errors for MD) | block errors (MD) | dF(C7eq->alphaR) kT | dF(C7eq->alphaL) kT |",
        "|---|---|---|---|---|---|---|",
    ]
    for md in results["md"]:
        pops = " / ".join(fmt(p, e) for p, e in zip(md["populations"], md["population_err_g"]))
        blocks = " / ".join(fmt(e) for e in md["population_err_blocks"])
        dfs = [f"{fmt(d, eg)} (blocks ± {fmt(eb)})" for d, eg, eb in zip(md["delta_f"], md["delta_f_err_g"], md["delta_f_err_blocks"])]
        lines.append(f"| MD `{md['file']}` | {md['ns']:.0f} ns ({md['frames']} frames) | - | {pops} | {blocks} | {dfs[0]} | {dfs[1]} |")
    for g in results["sbg"]:
        pops = " / ".join(fmt(p, e) for p, e in zip(g["populations"], g["populations_se"]))
        dfs = [fmt(d, e) for d, e in zip(g["delta_f"], g["delta_f_se"])]
        lines.append(
            f"| SBG {g['method']} | {g['budget']}, {len(g['seeds'])} seed{'s' * (len(g['seeds']) > 1)} | {g['seconds_mean']:.0f} s/seed | "
            f"{pops} | - | {dfs[0]} | {dfs[1]} |"
        )
    md0 = results["md"][0]
    lines += [
        "",
        "Statistical inefficiency of the reference's basin indicators: "
        + ", ".join(f"{b} {fmt(g, None, 0)} frames" for b, g in zip(BASINS, md0["statistical_inefficiency_frames"]))
        + f"; transitions into each basin: {', '.join(f'{b} {t}' for b, t in zip(BASINS, md0['transitions_into']))}.",
        "",
        "log Z = log(Z_T / Z_S) of SBG (the flow's normaliser is 1, so this is log of the configurational integral of exp(-E_T) in nm^66, "
        "with the CoM convention of `openmm_sbg.smc.proposal`); mean ± standard error over seeds, and the seed-to-seed standard deviation:",
        "",
        "| method | budget | seeds | log Z | sd over seeds | ESS |",
        "|---|---|---|---|---|---|",
    ]
    for g in results["sbg"]:
        lines.append(
            f"| {g['method']} | {g['budget']} | {len(g['seeds'])} | {fmt(g['log_z'], g['log_z_se'], 2)} | "
            f"{fmt(g['log_z_sd'], None, 2)} | {g['ess_mean']:.4f} |"
        )
    if results.get("log_z_differences"):
        lines += ["", f"log Z differences between methods (budgets {', '.join(FREE_ENERGY_BUDGETS.values())}; 0 if both are right): "
                  + "; ".join(f"{d['pair']}: {fmt(d['difference'], d['se'], 2)}" for d in results["log_z_differences"]) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--md", nargs="+", default=[str(ROOT / "runs" / "ad2-ref.h5"), str(ROOT / "runs" / "ad2-md.h5")], help="MD files")
    parser.add_argument("--reference", default=str(ROOT / "runs" / "ad2-ref.h5"), help="reference for the extra runs' E-W2 / T-W2")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of each method's FREE_ENERGY_BUDGETS budget (those missing from time_to_quality are run here)")
    parser.add_argument("--flow", default=None)
    parser.add_argument("--max-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    rows = list(load_json("time_to_quality.json")["sbg"]) if (DATA / "time_to_quality.json").exists() else []
    cached = load_json("free_energy_extra_rows.json")["rows"] if (DATA / "free_energy_extra_rows.json").exists() else []
    rows += cached
    flow_path = args.flow or default_flow()
    extra = extra_runs(args.seeds, flow_path, args.reference, args.max_samples, rows) if args.seeds else []
    rows += extra
    extra = cached + extra
    if extra and not args.no_results:
        save_json("free_energy_extra_rows.json", {"rows": extra})  # kept at once (they took minutes); reused by later runs
    groups = sbg_groups(rows)
    chosen = {g["method"]: g for g in groups if g["budget"] == FREE_ENERGY_BUDGETS.get(g["method"])}
    differences = []
    methods = list(chosen)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            ga, gb = chosen[a], chosen[b]
            differences.append({"pair": f"{b} - {a}", "difference": gb["log_z"] - ga["log_z"], "se": float(np.hypot(ga["log_z_se"], gb["log_z_se"]))})
    results = {
        "machine": machine(),
        "command": command_line("free_energy.py", argv),
        "md": [md_analysis(path, args.blocks) for path in args.md if os.path.exists(path)],
        "sbg": groups,
        "extra_rows": extra,
        "log_z_differences": differences,
        "wall_minutes": (time.perf_counter() - started) / 60,
    }
    publish(results, "free_energy.json", HEADING, report(results), write=not args.no_results)


if __name__ == "__main__":
    main()
