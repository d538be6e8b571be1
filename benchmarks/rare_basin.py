"""Rare basin of ad2: SBG with a flow trained on replica-exchange data against umbrella sampling and plain MD.

- SBG: importance sampling at each ``--temperatures`` from one flow (``--flow``, trained on
  300 K MD plus every replica of a replica-exchange run), ``--n-proposals`` proposals per
  seed, no weight clipping (clipping the largest weights would bias a rare basin's mass),
  the ``"gaussian"`` CoM adjustment; basin populations with bootstrap errors per seed and
  the standard error over seeds; P(alphaL/C7ax) against the proposals used, to find the
  sampling time to a 20% answer (when no single seed reaches it, the seeds needed for the
  spread over seeds, divided by sqrt(seeds), to reach it).
- Reference: ``benchmarks/umbrella_sampling.py`` (MBAR over windows along phi, or on a
  (phi, psi) grid), read from ``results/umbrella_sampling-2d-grid.json`` or ``--umbrella``.
- Plain MD: frames in alphaL/C7ax and the first visit in each ``--md`` file at 300 K.
- Wall-clock counted whole: replica exchange (``--re-seconds``, as measured by its runs)
  + any MD seeded from its frames (``--seeded-md-seconds``) + training and refinement (the
  flow's record) + sampling, against umbrella sampling's and MD's.

Run: ``nice python benchmarks/rare_basin.py --flow runs/s3/ad2-re-flow.pt --re-seconds S``;
writes ``results/rare_basin.json``, ``plots/rare_basin.png`` and the "Rare basin" section
of RESULTS.md (with ``--tag T``: ``rare_basin-T.json``, ``rare_basin-T.png`` and a section of
its own).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DATA, axes, command_line, header, load_json, machine, publish, save_json, save_plot  # noqa: E402

HEADING = "### Rare basin: alphaL/C7ax from replica-exchange data"
RARE = 2  # index of alphaL/C7ax in openmm_sbg.populations.BACKBONE_STATES


def sbg_runs(flow_path: str, temperature: float, seeds: int, n_proposals: int) -> list[dict]:
    """One importance-sampling run per seed; runs already in ``results/rare_basin_runs.json`` are reused.

    The runs are kept apart from the report, so more seeds can be added and the report redone
    (e.g. once the umbrella-sampling reference is complete) without sampling again.
    """
    from openmm import unit

    from openmm_sbg import populations, systems
    from openmm_sbg.flow import TarFlow

    store = DATA / "rare_basin_runs.json"
    done = load_json(store.name) if store.exists() else {}
    target = systems.get("ad2", temperature=temperature * unit.kelvin)
    flow = TarFlow.load(flow_path, target=target)
    labeller = populations.backbone_state_labeller(target.topology)
    runs = []
    for seed in range(seeds):
        key = f"{flow_path}|{temperature:g}|{n_proposals}|{seed}"
        if key not in done:
            done[key] = _importance_sampling(target, flow, labeller, n_proposals, seed)
            save_json(store.name, done)
        run = done[key]
        runs.append(run)
        print(f"{temperature:g} K seed {seed}: ESS {run['ess']:.3f}, P(alphaL) {run['populations'][RARE]:.5f} ± "
              f"{run['bootstrap_errors'][RARE]:.5f}, {run['seconds']:.0f} s", flush=True)
    return runs


def _importance_sampling(target, flow, labeller, n_proposals: int, seed: int) -> dict:
    from openmm_sbg import populations
    from openmm_sbg.smc import SMCSampler

    start = time.perf_counter()
    result = SMCSampler(
        target, flow, n_particles=n_proposals, n_steps=0, clip_fraction=0.0, com_adjustment="gaussian",
        resample_at_end=False, resample_threshold=0.0, progress=False,
    ).run(seed=seed)
    seconds = time.perf_counter() - start
    labels = labeller(result.positions)
    pops, errors = populations.bootstrap_populations(labels, 3, result.log_weights, n_bootstrap=300, seed=seed)
    return {
        "seed": seed, "seconds": seconds, "ess": result.ess, "log_z": result.log_z,
        "rare_ess": float(populations.state_effective_sizes(labels, 3, result.log_weights)[RARE]),
        "populations": pops.tolist(), "bootstrap_errors": errors.tolist(),
        "proposal_populations": (np.bincount(labels, minlength=3) / len(labels)).tolist(),
        "time_to_20_percent": _time_to_20_percent(labels, result.log_weights, seconds),
    }


def _time_to_20_percent(labels, log_weights, seconds: float) -> float | None:
    """Sampling seconds (pro rata) of the smallest prefix whose bootstrap relative error on P(alphaL) is <= 20%."""
    from openmm_sbg import populations

    n = len(labels)
    for fraction in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0):
        m = max(int(n * fraction), 100)
        pops, errors = populations.bootstrap_populations(labels[:m], 3, log_weights[:m], n_bootstrap=200)
        if pops[RARE] > 0 and errors[RARE] / pops[RARE] <= 0.2:
            return fraction * seconds
    return None


def md_visits(paths: list[str]) -> list[dict]:
    from openmm_sbg import data, metrics, populations

    rows = []
    for path in paths:
        traj = data.load_trajectory(path)
        labels = populations.backbone_states(metrics.backbone_dihedrals(traj)[:, :2])
        hits = np.flatnonzero(labels == RARE)
        rows.append({"file": os.path.basename(path), "ns": float(traj.time[-1] / 1000), "frames": int(traj.n_frames),
                     "alphaL_frames": int(len(hits)), "first_visit_ns": float(traj.time[hits[0]] / 1000) if len(hits) else None})
    return rows


def summarise(runs: list[dict]) -> dict:
    from openmm_sbg import populations

    pops = np.array([r["populations"] for r in runs])
    mean, stderr = populations.combine_repeats(pops) if len(runs) > 1 else (pops[0], np.array(runs[0]["bootstrap_errors"]))
    df, df_err = populations.free_energy_differences(mean, stderr)
    hits = [r["time_to_20_percent"] for r in runs if r["time_to_20_percent"] is not None]
    seconds_per_seed = float(np.mean([r["seconds"] for r in runs]))
    if hits:
        to_20 = float(np.mean(hits))
    else:
        # No single seed reaches 20%: independent seeds pool, the error shrinking as
        # 1/sqrt(seeds). One seed's error is taken from the spread over seeds, since a
        # heavy-tailed seed's bootstrap understates it.
        rare = np.array([r["populations"][RARE] for r in runs])
        relative = float(rare.std(ddof=1) / rare.mean()) if len(runs) > 1 and rare.mean() > 0 else math.inf
        needed = math.ceil((relative / 0.2) ** 2) if math.isfinite(relative) else None
        to_20 = needed * seconds_per_seed if needed is not None and needed <= len(runs) else None
    return {"populations": mean.tolist(), "errors": stderr.tolist(), "dF_kT": df.tolist(), "dF_err_kT": df_err.tolist(),
            "ess": float(np.mean([r["ess"] for r in runs])), "seconds_per_seed": seconds_per_seed,
            "seconds_to_20_percent": to_20,
            "proposal_alphaL": float(np.mean([r["proposal_populations"][RARE] for r in runs])),
            # Runs of an earlier version of this script lack it.
            "rare_ess_per_seed": float(np.mean([r["rare_ess"] for r in runs if "rare_ess" in r] or [math.nan]))}


def plot(results: dict, name: str) -> str:
    figure, axis = axes()
    temps = [float(t) for t in results["sbg"]]
    sbg = [results["sbg"][f"{t:g}"] for t in temps]
    axis.errorbar(np.array(temps) - 2, [s["populations"][RARE] for s in sbg], [s["errors"][RARE] for s in sbg], fmt="o", label="SBG (IS, RE-trained flow)")
    us = {r["temperature_K"]: r for r in results["umbrella"]["temperatures"]}
    ut = [t for t in temps if t in us]
    axis.errorbar(np.array(ut) + 2, [us[t]["populations"][RARE] for t in ut], [_us_errors(us[t])[RARE] for t in ut], fmt="s", label="umbrella sampling + MBAR")
    axis.set_xlabel("temperature (K)")
    axis.set_ylabel("P(alphaL/C7ax)")
    axis.legend(fontsize=8)
    return save_plot(figure, name)


def _us_errors(row: dict) -> list[float]:
    """Umbrella sampling's error per basin: over repeats, or MBAR's where there is one repeat."""
    return [e if np.isfinite(e) else m for e, m in zip(row["seed_stderr"], row["mbar_error_of_mean"])]


def _us_description(umbrella: dict) -> str:
    s = umbrella["settings"]
    grid = f"{s['windows']} × {s['psi_windows']} windows on (phi, psi)" if s.get("psi_windows") else f"{s['windows']} windows along phi"
    return (f"`results/{umbrella.get('file', 'umbrella_sampling.json')}`, {grid}, k = {s['k']:g} kJ/mol/rad², "
            f"{s['equilibration_ps']:g} + {s['ps']:g} ps per window, errors over independent repeats")


def report(results: dict) -> str:
    flow = results["flow"]
    seeds = " and ".join(f"{len(v['runs'])} seeds at {k} K" for k, v in results["sbg"].items())
    refined = flow.get("refinement")
    refinement = (f" Then refined with the energy ({refined['objective']}, data weight {refined['data_weight']:g}, {refined['minutes']:.0f} min) "
                  f"on {refined['data']}." if refined else "")
    what = f"Flow `{flow['path']}`: preset {flow['preset']}, trained on {flow['data']} ({flow['n_train']} training frames; {flow['train_seconds'] / 60:.0f} min, selected step {flow['selected_step']}).{refinement} SBG is importance sampling, {results['n_proposals']} proposals per seed, {seeds}, no weight clipping; errors are standard errors over seeds. Basins as in the other sections (alphaL/C7ax: 0 <= phi < 120 deg). Umbrella sampling: {_us_description(results['umbrella'])}."
    lines = header(results, what, ['T (K)', 'method', 'C7eq/beta', 'alphaR', 'alphaL/C7ax', 'dF(C7eq/beta -> alphaR) (kT)', 'dF(C7eq/beta -> alphaL/C7ax) (kT)', 'IS ESS', 'proposals in alphaL/C7ax'])
    us = {r["temperature_K"]: r for r in results["umbrella"]["temperatures"]}
    for key, s in results["sbg"].items():
        t = float(key)
        p, e = s["populations"], s["errors"]
        lines.append(f"| {t:g} | SBG | {p[0]:.3f} ± {e[0]:.3f} | {p[1]:.3f} ± {e[1]:.3f} | {p[2]:.5f} ± {e[2]:.5f} | "
                     f"{s['dF_kT'][1]:.2f} ± {s['dF_err_kT'][1]:.2f} | {s['dF_kT'][2]:.2f} ± {s['dF_err_kT'][2]:.2f} | {s['ess']:.3f} | {s['proposal_alphaL']:.4f} |")
        if t in us:
            u = us[t]
            ue = _us_errors(u)
            up = u["populations"]
            lines.append(f"| {t:g} | umbrella sampling | {up[0]:.3f} ± {ue[0]:.3f} | {up[1]:.3f} ± {ue[1]:.3f} | {up[2]:.5f} ± {ue[2]:.5f} | "
                         f"{-math.log(up[1] / up[0]):.2f} | {-math.log(up[2] / up[0]):.2f} | | |")
            z = (p[2] - up[2]) / math.hypot(e[2], ue[2])
            s["z_vs_umbrella"] = z
    lines += ["", "Agreement on P(alphaL/C7ax), (SBG - umbrella) / combined standard error: "
              + ", ".join(f"{k} K: {s['z_vs_umbrella']:+.2f}" for k, s in results["sbg"].items() if "z_vs_umbrella" in s)
              + "; relative standard error of SBG: "
              + ", ".join(f"{k} K: {s['errors'][RARE] / s['populations'][RARE]:.1%}" for k, s in results["sbg"].items()) + "."]
    lines += ["", "How many proposals carry the alphaL/C7ax mass: the Kish effective sample size of the weights inside it is "
              + ", ".join(f"{s['rare_ess_per_seed']:.1f} per seed at {k} K" for k, s in results["sbg"].items() if math.isfinite(s.get("rare_ess_per_seed", math.nan)))
              + f" (of {results['n_proposals']:,} proposals). When it is a handful, one seed's estimate is heavy-tailed and its "
              "bootstrap error unreliable, which is why the error above is the spread over seeds."]
    md = results["md"]
    total_ns = sum(r["ns"] for r in md)
    visits = sum(r["alphaL_frames"] for r in md)
    lines += ["", f"Plain MD at 300 K: {visits} alphaL/C7ax frames in {total_ns:.0f} ns over {len(md)} runs ("
              + ", ".join(f"{r['file']}: {r['ns']:.0f} ns, first visit " + (f"{r['first_visit_ns']:.1f} ns" if r["first_visit_ns"] is not None else "none") for r in md) + ")."]
    w = results["wall_clock_s"]
    data_seconds = w["replica_exchange"] + w.get("seeded_md", 0.0)
    data = f"replica exchange {w['replica_exchange'] / 60:.0f} min" + (f" + seeded MD {w['seeded_md'] / 60:.0f} min" if w.get("seeded_md") else "")
    training = f"{w['training'] / 60:.0f} min" + (f" + refinement {w['refinement'] / 60:.0f} min" if w.get("refinement") else "")
    fitting_seconds = w["training"] + w.get("refinement", 0.0)
    s300 = results["sbg"].get("300")
    u300 = us.get(300.0)
    lines += ["", "Wall-clock to P(alphaL/C7ax) at 300 K with at most 20% relative error, counted whole, one core each:", "",
              "| method | data | training | sampling / analysis | total |", "|---|---|---|---|---|",
              f"| SBG | {data} | {training} | "
              + (f"{s300['seconds_to_20_percent']:.0f} s | {(data_seconds + fitting_seconds + s300['seconds_to_20_percent']) / 60:.0f} min |" if s300 and s300["seconds_to_20_percent"] else "not reached | |")]
    if u300 is not None:
        hits = [h for h in u300["seconds_to_20_percent"] if h is not None]
        lines.append(f"| umbrella sampling + MBAR | {np.mean(hits) / 60:.1f} min of windows | | MBAR not counted | {np.mean(hits) / 60:.1f} min |" if hits else "| umbrella sampling | not reached | | | |")
    lines.append(f"| plain MD | no visit in {total_ns:.0f} ns ({results['md_ns_per_min']:.1f} ns/min: {total_ns / results['md_ns_per_min']:.0f} min) | | | not reached |")
    lines += ["", f"![P(alphaL/C7ax) by temperature]({results['plot']})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", required=True)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 350.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3], help="seeds per temperature (one count for all, or one each)")
    parser.add_argument("--n-proposals", type=int, default=50_000)
    parser.add_argument("--re-seconds", type=float, required=True, help="wall-clock of the replica-exchange data, s")
    parser.add_argument("--seeded-md-seconds", type=float, default=0.0,
                        help="wall-clock (one core, summed over runs) of MD started from replica-exchange frames in the basin, s")
    parser.add_argument("--md", nargs="+", default=["runs/ad2-md30.h5", "runs/ad2-md15b.h5"])
    parser.add_argument("--md-ns-per-min", type=float, default=1.4, help="plain MD speed on this machine, one core")
    parser.add_argument("--umbrella", default="umbrella_sampling-2d-grid.json", help="the umbrella-sampling results (under results/) to compare with")
    parser.add_argument("--tag", default=None, help="write results/rare_basin-TAG.json and its own RESULTS.md section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from openmm_sbg import shipped
    from openmm_sbg.flow import TarFlow

    record = TarFlow.load(args.flow).metadata
    sbg = {}
    if len(args.seeds) not in (1, len(args.temperatures)):
        parser.error("give one --seeds count, or one per temperature")
    seeds = dict(zip(args.temperatures, args.seeds * len(args.temperatures) if len(args.seeds) == 1 else args.seeds))
    for temperature in args.temperatures:
        runs = sbg_runs(args.flow, temperature, seeds[temperature], args.n_proposals)
        sbg[f"{temperature:g}"] = {**summarise(runs), "runs": runs}
    results = {
        "machine": machine(), "command": command_line("rare_basin.py", argv), "seeds": args.seeds, "n_proposals": args.n_proposals,
        "flow": {"path": args.flow, "preset": record.get("preset"), "data": ", ".join(os.path.basename(p) for p in record.get("data", [])),
                 "n_train": record["n_train"], "train_seconds": record["train_seconds"], "selected_step": record["selected_step"]},
        "umbrella": {**load_json(args.umbrella), "file": args.umbrella},
        "md": md_visits([*args.md, shipped.reference_path("ad2")]),
        "md_ns_per_min": args.md_ns_per_min,
        "sbg": sbg,
    }
    refinement = record.get("refinement") or {}
    if refinement:
        results["flow"]["refinement"] = {
            "objective": refinement["options"]["objective"], "data_weight": refinement["options"]["data_weight"],
            "minutes": refinement["seconds"] / 60,
            "data": ", ".join(os.path.basename(p) for p in refinement.get("provenance", {}).get("data", [])) or "no data"}
    results["wall_clock_s"] = {"replica_exchange": args.re_seconds, "seeded_md": args.seeded_md_seconds,
                               "training": record["train_seconds"], "refinement": refinement.get("seconds", 0.0)}
    name, heading = ("rare_basin", HEADING) if args.tag is None else (f"rare_basin-{args.tag}", f"{HEADING}, {args.tag}")
    results["plot"] = plot(results, f"{name}.png")
    publish(results, f"{name}.json", heading, report(results), write=not args.no_write)


if __name__ == "__main__":
    main()
