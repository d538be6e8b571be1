"""Energy-aware refinement on ad2: the shipped maximum-likelihood flow against its refined versions.

For the starting flow and each refined checkpoint (``openmm-sbg train --refine``), on the
built-in ``ad2`` target at 300 K:

- importance sampling, ``--n-proposals`` per seed over ``--seeds`` seeds, two ways: the
  paper's (``"chi3"`` CoM adjustment, top 0.2% of log-weights clipped; the protocol of the
  "Internal-coordinate flows" section) and exact (``"gaussian"``, no clipping; the chi3
  factor alone caps the ESS at 0.6, see ``openmm_sbg.flow.refine``);
- E-W2, T-W2 and basin populations of the exact weighting against the shipped reference MD;
- ESS against wall-clock during refinement (from each checkpoint's record), with the
  maximum-likelihood training time shown separately.

Run: ``nice python benchmarks/refinement.py --flows ad2 runs/s3/ad2-refine-wml.pt ...``;
writes ``results/refinement.json``, ``plots/refinement_ess.png`` and the "Energy-aware
refinement" section of RESULTS.md (with ``--tag T``: ``refinement-T.json``,
``refinement-T_ess.png`` and a section of its own, so earlier rows stay).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

HEADING = "### Energy-aware refinement"
#: T-W2 averages this many subsamples of 2,000: single draws of the same weighted set scatter
#: from 0.08 to 0.21, which made an earlier one-draw comparison of T-W2 noise.
TW2_DRAWS = 8
#: The weights stay weights (no resampling at the end): resampled copies add their own noise
#: to the populations and T-W2.
_WEIGHTED = {"resample_threshold": 0.0, "resample_at_end": False}
PROTOCOLS = {"paper": {"com_adjustment": "chi3", "clip_fraction": 0.002, **_WEIGHTED},
             "exact": {"com_adjustment": "gaussian", "clip_fraction": 0.0, **_WEIGHTED}}


def reference_set(paths: list[str], target, split: str | None):
    """Backbone dihedrals ``[T, d]``, energies in kT ``[T]``, the backbone-state labeller and the labels of the reference frames."""
    from openmm_sbg import data, metrics, populations
    from openmm_sbg.md import SPLIT_CODES

    labeller = populations.backbone_state_labeller(target.topology)
    angles, energies, labels = [], [], []
    for path in paths:
        traj = data.load_trajectory(path, target=target, split=split)
        meta = data.read_metadata(path)
        keep = np.ones(len(meta["energies_kT"]), bool) if split is None else meta["split"] == SPLIT_CODES[split]
        angles.append(metrics.backbone_dihedrals(traj))
        energies.append(np.asarray(meta["energies_kT"])[keep])
        labels.append(labeller(traj.xyz))
    return np.concatenate(angles), np.concatenate(energies), labeller, np.concatenate(labels)


def evaluate(path: str, target, reference, args) -> dict:
    from openmm_sbg import SMCSampler, TarFlow, metrics

    flow = TarFlow.load(path, target=target)
    record = flow.metadata.get("refinement")
    row = {"flow": path, "train_seconds": flow.metadata.get("train_seconds"), "refinement": record, "runs": []}
    exact_log_weights = []
    for seed in range(args.seeds):
        entry = {"seed": seed}
        for name, protocol in PROTOCOLS.items():
            with common.Timer() as timer:
                result = SMCSampler(target, flow, n_particles=args.n_proposals, n_steps=0, progress=False, **protocol).run(seed=seed)
            entry[f"ess_{name}"] = result.ess
            entry[f"seconds_{name}"] = timer.seconds
        exact_log_weights.append(result.log_weights)
        traj = result.to_mdtraj()
        angles = metrics.backbone_dihedrals(traj)
        entry["log_z"] = result.log_z
        entry["energy_w2"] = metrics.energy_w2(result.energies, reference[1], result.weights)
        entry["torus_w2"] = metrics.torus_w2(angles, reference[0], result.weights, max_samples=2000, draws=TW2_DRAWS)
        entry["populations"] = common.populations(reference[2](traj.xyz), result.weights).tolist()
        row["runs"].append(entry)
        print(f"{path} seed {seed}: {entry}", flush=True)
    # One ESS of all seeds' proposals together (the raw log-weights share their scale): a heavy
    # tail shows up here, since a rare heavy proposal drags down the one set it lands in.
    row["ess_exact_pooled"], row["largest_weight_share"], row["pareto_k"] = common.weight_tail(np.concatenate(exact_log_weights))
    return row


def plot(rows: list[dict], name: str) -> str:
    figure, axis = common.axes()
    for row in rows:
        record = row["refinement"]
        if record is None:
            continue
        history = record["history"]
        axis.plot([h["seconds"] / 60 for h in history], [h["ess"] for h in history], marker=".",
                  label=f"{os.path.basename(row['flow'])}: {describe_objective(record)}")
    axis.set_xlabel("refinement wall-clock (min; ML training before it not shown)")
    axis.set_ylabel("IS ESS (exact weights, 4096 proposals)")
    axis.legend(fontsize=6)
    return common.save_plot(figure, name)


def mean_sd(runs: list[dict], key: str, digits: int = 3) -> str:
    values = np.array([r[key] for r in runs], dtype=float)
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def pooled_ess(row: dict) -> str:
    """The pooled ESS and the largest weight share (rows written before they existed have neither)."""
    if "ess_exact_pooled" not in row:
        return ""
    k = f"; k {row['pareto_k']:.2f}" if "pareto_k" in row else ""
    return f"{row['ess_exact_pooled']:.3f}; {row['largest_weight_share']:.4f}{k}"


def describe_objective(record: dict) -> str:
    """The objective and the settings that tell refinements apart: data weight, tempering, added blocks, EMA, lr."""
    options = record["options"]
    alone = options["data_weight"] == 1
    parts = ["data alone (control)"] if alone else [options["objective"], f"data weight {options['data_weight']:g}"]
    if options.get("temper_ess"):
        parts.append(f"tempered to ESS {options['temper_ess']:g}")
    added = record.get("provenance", {}).get("added_blocks")
    if added:
        parts.append(f"+{added} blocks")
    parts.append(f"lr {options['lr']:g}, EMA {options['ema_decay']:g}")
    return "; ".join(parts)


def report(results: dict) -> str:
    floor = results["noise_floor"]
    what = (f"Target `{results.get('system', 'ad2')}` at 300 K; reference: {results.get('reference', 'the shipped `ad2-ref.h5`')}. "
            f"Mean ± sd over {results['seeds']} seeds of {results['n_proposals']:,} proposals. ESS (paper): chi3 CoM "
            "adjustment, top 0.2% of log-weights clipped; ESS (exact): Gaussian CoM adjustment, no clipping, which the "
            "metrics and populations use, on the weights themselves (no resampling); pooled: one ESS of all seeds' "
            "proposals together, the largest single proposal's share of their weight, and the Pareto k of their tail "
            "(smc.weights.pareto_k; above 0.5 the weights' variance is infinite and one set's ESS overstates). T-W2: the mean over "
            f"{TW2_DRAWS} weighted subsamples of 2,000. Refinement budget: wall-clock on the shared 2-core machine, with other jobs running.")
    lines = common.header(results, what, ["flow", "objective", "refinement", "selected step", "ESS (paper)", "ESS (exact)", "ESS (exact), pooled; largest weight; Pareto k",
                                   "E-W2 (kT)", "T-W2", f"populations {' / '.join(common.BASINS)}", "log Z"])
    for row in results["flows"]:
        record = row["refinement"]
        runs = row["runs"]
        objective = "" if record is None else describe_objective(record)
        pops = np.mean([r["populations"] for r in runs], axis=0)
        refinement = "none (maximum likelihood)" if record is None else f"{record['steps']} steps, {record['seconds'] / 60:.0f} min"
        if record is not None and record.get("stopped") and "wall-clock" not in record["stopped"]:
            refinement += f", stopped: {record['stopped']}"
        lines.append(
            f"| `{os.path.basename(row['flow'])}` | {objective} | {refinement} | "
            f"{'' if record is None else record['selected_step']} | {mean_sd(runs, 'ess_paper')} | {mean_sd(runs, 'ess_exact')} | "
            f"{pooled_ess(row)} | "
            f"{mean_sd(runs, 'energy_w2', 2)} | {mean_sd(runs, 'torus_w2')} | {' / '.join(f'{p:.3f}' for p in pops)} | "
            f"{mean_sd(runs, 'log_z', 2)} |"
        )
    lines += ["", f"MD noise floor (reference half against half): E-W2 {floor['energy_w2']:.2f} kT, T-W2 {floor['torus_w2']:.3f}; "
              f"MD populations {' / '.join(f'{p:.3f}' for p in floor['populations'])}.", "",
              f"![ESS during refinement]({results['plot']})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", nargs="+", default=["ad2"], help="the starting flow first, then refined checkpoints")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-proposals", type=int, default=10_000)
    parser.add_argument("--system", default="ad2", help="built-in system the flows model (default ad2)")
    parser.add_argument("--reference", nargs="+", default=None,
                        help="reference MD files (default: the shipped reference of --system; ad2 has one)")
    parser.add_argument("--reference-split", default=None, choices=["train", "val", "test"],
                        help="use only this split of the reference files (e.g. test: the held-out block of the training runs)")
    parser.add_argument("--tag", default=None, help="write results/refinement-TAG.json and its own RESULTS.md section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from openmm_sbg import metrics, shipped, systems

    target = systems.get(args.system)
    reference = reference_set(args.reference or [shipped.reference_path(args.system)], target, args.reference_split)
    half = len(reference[1]) // 2
    if args.reference is None:
        described = f"the shipped `{os.path.basename(shipped.reference_path(args.system))}` (independent of all training data)"
    else:
        described = ", ".join(f"`{os.path.basename(p)}`" for p in args.reference) + (
            f", {args.reference_split} split only (the held-out block of each run)" if args.reference_split else "")
    results = {
        "system": args.system, "reference": described,
        "machine": common.machine(), "command": common.command_line("refinement.py", argv), "seeds": args.seeds, "n_proposals": args.n_proposals,
        "noise_floor": {"energy_w2": metrics.energy_w2(reference[1][:half], reference[1][half:]),
                        "torus_w2": metrics.torus_w2(reference[0][:half], reference[0][half:], max_samples=2000, draws=TW2_DRAWS),
                        "populations": common.populations(reference[3]).tolist()},
        "flows": [evaluate(shipped.flow_path(path), target, reference, args) for path in args.flows],
    }
    name, heading = ("refinement", HEADING) if args.tag is None else (f"refinement-{args.tag}", f"{HEADING}, {args.tag}")
    # A --no-write run (a check) leaves the committed plot alone.
    results["plot"] = f"plots/{name}_ess.png" if args.no_write else plot(results["flows"], f"{name}_ess.png")
    common.publish(results, f"{name}.json", heading, report(results), write=not args.no_write)


if __name__ == "__main__":
    main()
