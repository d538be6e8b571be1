"""Time to quality on ad2: E-W2 and T-W2 against long reference MD as a function of wall-clock.

Compares, on this machine and in one run:

- (a) OpenMM MD (``openmm_sbg.md.run_md``, the same settings as ``openmm-sbg md``) on the
  fastest OpenMM platform here (Reference and CPU are both timed first): a fresh run from the
  minimised PDB structure, evaluated on prefixes. Longer horizons use prefixes of a longer
  existing ``openmm-sbg md`` run (``--long-md``), with wall-clock taken from the fresh run's
  measured cost per frame;
- (b) SBG importance sampling (``n_steps=0``);
- (c) SBG SMC with the paper's linear schedule and unadjusted Langevin (ULA);
- (d) SBG SMC with the adaptive schedule and MALA;

each with the trained flow (the shipped ``ad2`` model by default). Flow training time
is read from the checkpoint's metadata and reported separately, not added to the curves.
SBG wall-clock is the whole ``SMCSampler.run`` (drawing proposals, energies, annealing).

The reference is an independent MD run (``--reference``, default the shipped ``ad2-ref.h5``, all
frames); its first half against its second half gives the noise floor of each metric.
T-W2 subsamples both sets to ``--max-samples`` (by weight) for the exact EMD, for every
method alike.

Run: ``nice python benchmarks/time_to_quality.py`` (10-20 minutes on 2 shared cores); it writes
``benchmarks/results/time_to_quality.json``, two plots in ``benchmarks/plots/`` and the
"Time to quality" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BASINS,
    PLOTS,
    ROOT,
    WORK,
    Timer,
    basin_labels,
    command_line,
    default_flow,
    dihedrals_and_energies,
    load_json,
    machine,
    populations,
    save_json,
    write_section,
)
from _sbg_runs import METHODS, Scorer, default_budgets, groups_of, run_sbg  # noqa: E402

HEADING = "### Time to quality"

# ------------------------------------------------------------------------------ MD
def platform_rates(target, n_steps: int = 3000) -> dict[str, float]:
    """ns/day of each OpenMM platform here, with the integrator of ``openmm-sbg md``."""
    import openmm
    from openmm import unit

    rates = {}
    for name in ("Reference", "CPU"):
        integrator = openmm.LangevinMiddleIntegrator(target.temperature, 1 / unit.picosecond, 1 * unit.femtosecond)
        context = openmm.Context(target.system, integrator, openmm.Platform.getPlatformByName(name))
        context.setPositions(target.positions)
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
        integrator.step(200)
        start = time.perf_counter()
        integrator.step(n_steps)
        context.getState(positions=True)
        rates[name] = n_steps * 1e-6 / (time.perf_counter() - start) * 86400
        del context, integrator
    return rates


def prefix_lengths(n_frames: int, first: int = 20, per_decade: int = 5) -> list[int]:
    grid = np.unique(np.round(np.logspace(np.log10(first), np.log10(n_frames), 1 + int(per_decade * np.log10(n_frames / first)))).astype(int))
    return [int(n) for n in grid if n <= n_frames]


def run_md_curve(target, scorer: Scorer, ns: float, platform: str, seed: int, long_md: str | None) -> dict:
    from openmm_sbg import md

    out = str(WORK / "ttq-md.h5")
    for stale in (out, out + ".work"):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.exists(stale):
            os.remove(stale)
    os.makedirs(WORK, exist_ok=True)
    config = md.MDConfig(n_frames=int(round(ns * 2000)), seed=seed)  # a frame every 0.5 ps, as openmm-sbg md
    with Timer() as timer:
        summary = md.run_md(target, out, config, platform=platform, progress=False)
    loop = summary.wall_s  # the stepping loop (frames, checkpoints)
    overhead = timer.seconds - loop  # minimisation, 10 ps equilibration, writing the file: all counted up front
    per_frame = loop / summary.frames
    angles, energies = dihedrals_and_energies(out)
    points = []
    for n in prefix_lengths(len(energies)):
        point = {"source": "fresh", "frames": n, "ns": n * 5e-4, "seconds": overhead + n * per_frame}
        point.update(scorer.score(angles[:n], energies[:n]))
        points.append(point)
        print(f"  MD {point['ns']:.3f} ns, {point['seconds']:.1f} s: E-W2 {point['energy_w2']:.3f}, T-W2 {point['torus_w2']:.3f}", flush=True)
    if long_md and os.path.exists(long_md):
        from openmm_sbg import data

        long_angles, long_energies = dihedrals_and_energies(long_md)
        # The longer run may save frames at another interval: convert through simulated time.
        frame_ns = float(data.load_trajectory(long_md)[:2].timestep) * 1e-3
        for n in prefix_lengths(len(long_energies)):
            if n * frame_ns <= summary.simulated_ns:
                continue
            point = {
                "source": os.path.relpath(long_md, ROOT),
                "frames": n,
                "ns": n * frame_ns,
                "seconds": overhead + n * frame_ns / 5e-4 * per_frame,
            }
            point.update(scorer.score(long_angles[:n], long_energies[:n]))
            points.append(point)
            print(f"  MD* {point['ns']:.3f} ns, {point['seconds']:.1f} s: E-W2 {point['energy_w2']:.3f}, T-W2 {point['torus_w2']:.3f}", flush=True)
        long_populations = populations(basin_labels(long_angles)).tolist()
    else:
        long_populations = None
    return {
        "platform": platform,
        "seed": seed,
        "simulated_ns": summary.simulated_ns,
        "total_seconds": timer.seconds,
        "overhead_seconds": overhead,
        "ns_per_day": summary.ns_per_day,
        "long_md": long_md,
        "long_md_populations": long_populations,
        "points": points,
    }


# ------------------------------------------------------------------------------ report
def plot(results: dict, metric: str, label: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    md_points = results["md"]["points"]
    fresh = [p for p in md_points if p["source"] == "fresh"]
    longer = [p for p in md_points if p["source"] != "fresh"]
    axis.plot([p["seconds"] for p in fresh], [p[metric] for p in fresh], "k-o", ms=3, label=f"OpenMM MD ({results['md']['platform']})")
    if longer:
        axis.plot(
            [fresh[-1]["seconds"]] + [p["seconds"] for p in longer], [fresh[-1][metric]] + [p[metric] for p in longer],
            "k--o", ms=3, mfc="none", label="OpenMM MD, longer run (time from measured rate)",
        )
    markers = {"IS": "s", "SMC linear+ULA (paper)": "^", "SMC adaptive+MALA": "D"}
    colors = {"IS": "tab:blue", "SMC linear+ULA (paper)": "tab:orange", "SMC adaptive+MALA": "tab:green"}
    for method in METHODS:
        rows = [r for r in results["sbg"] if r["method"] == method]
        if not rows:
            continue
        axis.scatter([r["seconds"] for r in rows], [r[metric] for r in rows], marker=markers[method], color=colors[method], alpha=0.5, s=18)
        means = [[np.mean([r[key] for r in group]) for _, group in groups_of(rows)] for key in ("seconds", metric)]
        axis.plot(*means, color=colors[method], marker=markers[method], label=f"SBG {method} (mean of seeds)")
    floor = results["noise_floor"][metric]
    axis.axhline(floor, color="grey", ls=":", label="reference half vs half")
    axis.set(xscale="log", yscale="log", xlabel="wall-clock (s), training excluded", ylabel=label,
             title=f"ad2: {label} vs long MD ({results['machine_short']})")
    axis.legend(fontsize=7)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def time_to_reach(points: list[tuple[float, float]], level: float):
    """Wall-clock from which every later (seconds, value) point stays at or below ``level``."""
    points = sorted(points)
    for i, (seconds, _) in enumerate(points):
        if all(value <= level for _, value in points[i:]):
            return seconds
    return None


def format_reach(seconds, first_point: bool) -> str:
    if seconds is None:
        return "-"
    return f"<= {seconds:.1f} s (first point)" if first_point else f"{seconds:.0f} s"


def group_means(rows: list[dict], metric: str) -> list[tuple[float, float]]:
    return [(float(np.mean([r["seconds"] for r in g])), float(np.mean([r[metric] for r in g]))) for _, g in groups_of(rows)]


def report(results: dict) -> str:
    md, floor = results["md"], results["noise_floor"]
    lines = [
        f"Machine: {results['machine']}.",
        "",
        f"Command: `{results['command']}` ({results['wall_minutes']:.0f} min in all). Reference: `{results['reference']}` "
        f"({results['reference_frames']} frames, {results.get('reference_ns', results['reference_frames'] * 5e-4):.0f} ns, independent of the training data); "
        f"T-W2 subsamples each set to {results['max_samples']} by weight. Flow: `{results['flow']}` "
        f"(preset {results['flow_preset']}, {results['train_steps']} training steps, val NLL/dim {results['val_nll']:.3f}); its "
        f"training took {results['train_seconds'] / 60:.0f} min as recorded in the checkpoint, not counted below.",
        "",
        f"Noise floor (reference first half vs second half, {floor['frames_per_half']} frames each): "
        f"E-W2 {floor['energy_w2']:.3f} kT, T-W2 {floor['torus_w2']:.3f}. Reference mean energy {results['reference_energy_mean']:.2f} kT. Basin populations "
        f"({', '.join(BASINS)}) first half {fmt_pops(floor['populations_first_half'])}, second half {fmt_pops(floor['populations_second_half'])}."
        + independent_floor(results),
        "",
        "MD platform speed here (ns/day, short test): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["platform_rates"].items())
        + f"; chosen: {md['platform']}. The fresh MD run (seed {md['seed']}) simulated {md['simulated_ns']:.1f} ns in "
        f"{md['total_seconds']:.0f} s ({md['ns_per_day']:.0f} ns/day in its stepping loop; {md['overhead_seconds']:.1f} s of "
        "minimisation, equilibration and file writing counted at the start). Points beyond it are prefixes of "
        f"`{os.path.relpath(md['long_md'], ROOT) if md['long_md'] else None}` (an earlier `openmm-sbg md` run of the same system, part of the flow's training data) at the fresh run's cost per simulated ps.",
        "",
        "![E-W2 vs wall-clock](plots/time_to_quality_energy_w2.png) ![T-W2 vs wall-clock](plots/time_to_quality_torus_w2.png)",
        "",
        "OpenMM MD prefixes:",
        "",
        "| simulated ns | wall-clock s | E-W2 (kT) | T-W2 |",
        "|---|---|---|---|",
    ]
    for p in md["points"]:
        star = "" if p["source"] == "fresh" else " *"
        lines.append(f"| {p['ns']:.3g}{star} | {p['seconds']:.1f} | {p['energy_w2']:.3f} | {p['torus_w2']:.3f} |")
    lines += [
        "",
        "SBG (mean ± standard deviation over seeds; ESS: `SMCResult.ess`, for IS the proposals' Kish ESS, for SMC the smallest ESS before a resampling; default weights):",
        "",
        "| method | budget | steps taken | seeds | wall-clock s | ESS | mean energy (kT) | E-W2 (kT) | T-W2 | log Z |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in results["sbg"] if r["method"] == method]
        for label, group in groups_of(rows):
            lines.append(
                f"| {method} | {label} | {np.mean([r['n_steps'] for r in group]):.0f} | {len(group)} | {pm(group, 'seconds', 1)} | "
                f"{pm(group, 'ess', 4)} | {pm(group, 'energy_mean', 2)} | "
                f"{pm(group, 'energy_w2', 3)} | {pm(group, 'torus_w2', 3)} | {pm(group, 'log_z', 2)} |"
            )
    lines += ["", "Wall-clock to reach a level and stay there (MD: every longer prefix at or below it; SBG: every larger budget's seed mean; "
              "training excluded; `-`: not reached within the budgets run):", "",
              "| level | MD | " + " | ".join(f"SBG {m}" for m in METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for metric, unit_, absolute in (("energy_w2", " kT", (5.0, 1.0)), ("torus_w2", "", (1.0, 0.5))):
        for name_, level in [(f"{a:g}", a) for a in absolute] + [(f"{f:g} x floor", f * floor[metric]) for f in (2.0, 1.25)]:
            md_points = [(p["seconds"], p[metric]) for p in md["points"]]
            cells = [time_to_reach(md_points, level)]
            for method in METHODS:
                cells.append(time_to_reach(group_means([r for r in results["sbg"] if r["method"] == method], metric), level))
            name = "E-W2" if metric == "energy_w2" else "T-W2"
            lines.append(f"| {name} <= {name_} ({level:.3f}{unit_}) | " + " | ".join(format_reach(c, i == 0 and c == min(md_points)[0]) for i, c in enumerate(cells)) + " |")
    return "\n".join(lines)


def independent_floor(results: dict) -> str:
    longer = [p for p in results["md"]["points"] if p["source"] != "fresh"]
    if not longer:
        return ""
    last = max(longer, key=lambda p: p["frames"])
    return (
        f" Between independent runs: the whole {last['ns']:.0f} ns run `{last['source']}` against the reference gives "
        f"E-W2 {last['energy_w2']:.3f} kT and T-W2 {last['torus_w2']:.3f} (its populations "
        f"{fmt_pops(results['md']['long_md_populations'])}); T-W2 is dominated by the C7eq/alphaR split, whose statistical "
        "error in 10 ns of MD is about ±0.03 (see Free energy)."
    )


def pm(rows: list[dict], key: str, digits: int) -> str:
    values = np.array([r[key] for r in rows], dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def fmt_pops(values) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=None, help="long reference MD (openmm-sbg md file; default: the shipped ad2-ref.h5)")
    parser.add_argument("--long-md", default=str(ROOT / "runs" / "ad2-md.h5"), help="a longer MD run for the MD curve beyond --md-ns ('' to skip)")
    parser.add_argument("--flow", default=None, help="trained flow (default: the shipped ad2)")
    parser.add_argument("--md-ns", type=float, default=1.0, help="length of the fresh MD run (ns)")
    parser.add_argument("--md-seed", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=2000, help="T-W2 subsample size (exact EMD cost grows as its square)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the script")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md / plots")
    parser.add_argument("--report-only", action="store_true", help="redo plots and the RESULTS.md section from results/time_to_quality.json")
    args = parser.parse_args(argv)
    if args.report_only:
        finish(load_json("time_to_quality.json"))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from openmm_sbg import TarFlow, data, shipped, systems

    flow_path = shipped.flow_path(args.flow) if args.flow else default_flow()
    args.reference = args.reference or shipped.reference_path("ad2")
    flow = TarFlow.load(flow_path)
    target = systems.get("ad2")  # the batched torch force field (backend "auto")
    scorer = Scorer(args.reference, args.max_samples)
    results = {
        "machine": machine(),
        "machine_short": f"{os.cpu_count()} CPU cores",
        "command": command_line("time_to_quality.py", argv),
        "reference": os.path.relpath(args.reference, ROOT),
        "reference_frames": len(scorer.energies),
        "reference_ns": float(data.load_trajectory(args.reference).time[-1]) * 1e-3,
        "reference_energy_mean": float(np.mean(scorer.energies)),
        "max_samples": args.max_samples,
        "flow": os.path.relpath(flow_path, ROOT),
        "flow_preset": flow.metadata.get("preset", "?"),
        "train_seconds": flow.metadata.get("train_seconds", float("nan")),
        "train_steps": flow.metadata.get("steps"),
        "val_nll": flow.metadata.get("val_nll_per_dim", float("nan")),
        "flow_complete": flow.metadata.get("complete"),
    }
    print("noise floor ...", flush=True)
    results["noise_floor"] = scorer.noise_floor()
    print(results["noise_floor"], flush=True)
    print("MD platforms ...", flush=True)
    results["platform_rates"] = platform_rates(target)
    best = max(results["platform_rates"], key=results["platform_rates"].get)
    print(results["platform_rates"], flush=True)
    results["md"] = run_md_curve(target, scorer, 0.05 if args.quick else args.md_ns, best, args.md_seed, None if args.quick else (args.long_md or None))
    save_dir = WORK / "ttq-samples"
    os.makedirs(save_dir, exist_ok=True)
    results["sbg"] = run_sbg(target, flow, scorer, default_budgets(args.quick), save_dir)
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    if args.no_results:
        print(report(results))
        return
    save_json("time_to_quality.json", results)
    finish(results)


def finish(results: dict) -> None:
    for metric, label in (("energy_w2", "E-W2 (kT)"), ("torus_w2", "T-W2")):
        plot(results, metric, label, PLOTS / f"time_to_quality_{metric}.png")
    write_section(HEADING, report(results))
    print(report(results))


if __name__ == "__main__":
    main()
