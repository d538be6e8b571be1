"""How good is a peptide's flow against its replica-exchange reference? IS and SMC, every residue's populations.

For one system and flow: importance sampling (exact weights, bootstrap errors) and SMC (several
seeds; errors over seeds), each scored against a held-out replica-exchange run (every frame at
the target temperature): exact ESS, E-W2, T-W2, log Z, and every residue's backbone-state
populations next to the reference's, whose errors come from its ladder copies (as in
``reference_check.py``). z is the difference in combined standard errors.

T-W2 rises as the number of samples falls (an empirical measure of fewer points is further from
any other), so a sampler's T-W2 is only comparable at equal sample counts. ``--md-floor`` names an
independent MD run of the same molecule (another replica-exchange run); each sampler's row then
also gives that run's T-W2 against the reference, drawn at the sampler's own sample count: what
long MD itself reaches with as many samples.

Run: ``nice python benchmarks/peptide_model.py al4 --flow al4 --reference al4-re-82.h5 --copies 8``;
writes ``results/peptide_model-<system>.json`` and the section "Peptide model, <system>" of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mdtraj
import numpy as np
from _common import command_line, machine, publish
from reference_check import one_run

from openmm_sbg import metrics, populations, systems
from openmm_sbg.evaluation import evaluate
from openmm_sbg.flow import TarFlow
from openmm_sbg.sampling import sample
from openmm_sbg.smc import SMCResult
from openmm_sbg.smc.options import INDEPENDENT_PROPOSALS


def scored(target, flow, reference: str, folder: str, name: str, seed: int, options: dict, max_samples: int,
           rescore: bool) -> dict:
    """One sampler run, written to ``folder`` (or, ``rescore``, read from it) and scored against every frame of
    ``reference``."""
    out = os.path.join(folder, f"{name}-{seed}.h5")
    if not rescore:
        sample(target, flow, out, seed=seed, restart=True, progress=True, **options)
    elif not os.path.exists(out):
        raise SystemExit(f"--rescore: {out} does not exist; run without --rescore to draw it")
    samples = SMCResult.load(out)
    drawn = {key: samples.info.get(key) for key in ("n_particles", "n_steps", "seed")}
    wanted = {"n_particles": options["n_particles"], "n_steps": options["n_steps"], "seed": seed}
    if drawn != wanted:
        raise SystemExit(f"--rescore: {out} was drawn with {drawn}, this command asks for {wanted}")
    metrics = evaluate(samples, reference, all_frames=True, max_samples=max_samples, seed=seed, target=target)
    residues = metrics["states"]["residues"]
    return {"seed": seed, "seconds": samples.info["seconds"], "ess": metrics["ess"], "energy_w2_kT": metrics["energy_w2_kT"],
            "torus_w2": metrics["torus_w2"], "log_z": metrics["log_z"],
            "populations": [r["samples"] for r in residues],
            "bootstrap_errors": [r["samples_bootstrap_error"] for r in residues]}


def md_floor(md_run: str, reference: str, sizes: set[int], max_samples: int, draws: int = 2) -> dict[int, float]:
    """T-W2 of every frame of ``md_run`` against every frame of ``reference``, with ``md_run`` drawn down to each
    of ``sizes`` frames (without replacement; the mean over ``draws`` draws)."""
    angles = metrics.backbone_dihedrals(mdtraj.load(md_run))
    reference_angles = metrics.backbone_dihedrals(mdtraj.load(reference))
    floors = {}
    for size in sorted(sizes):
        if size > len(angles):
            raise SystemExit(f"--md-floor: {md_run} has {len(angles):,} frames, fewer than the {size:,} samples to match")
        rng = np.random.default_rng(size)
        floors[size] = float(np.mean([
            metrics.torus_w2(angles[rng.choice(len(angles), size, replace=False)], reference_angles,
                             max_samples=max_samples, seed=draw)
            for draw in range(draws)]))
    return floors


def against_reference(pops, errors, reference: dict) -> list[dict]:
    """Per residue: populations, their errors, the reference's, and z per state."""
    rows = []
    for r, name in enumerate(reference["residues"]):
        p, e = np.asarray(pops[r]), np.asarray(errors[r])
        q, f = np.asarray(reference["populations"][r]), np.asarray(reference["standard_errors"][r])
        z = (p - q) / np.sqrt(e**2 + f**2)
        rows.append({"residue": name, "populations": p.tolist(), "errors": e.tolist(), "reference": q.tolist(),
                     "reference_errors": f.tolist(), "z": z.tolist()})
    return rows


def summarise(runs: list[dict], reference: dict, independent: bool) -> dict:
    """Mean metrics over seeds; populations with bootstrap errors (one IS run) or errors over seeds (SMC)."""
    means = {key: float(np.mean([run[key] for run in runs])) for key in ("ess", "energy_w2_kT", "torus_w2", "log_z", "seconds")}
    spread = {f"{key}_sd": float(np.std([run[key] for run in runs], ddof=1)) if len(runs) > 1 else None
              for key in ("energy_w2_kT", "torus_w2", "log_z")}
    per_residue = np.asarray([run["populations"] for run in runs])  # [seed, residue, state]
    if independent and len(runs) == 1:
        pops, errors = per_residue[0], np.asarray(runs[0]["bootstrap_errors"])
    else:
        pairs = [populations.combine_repeats(per_residue[:, r]) for r in range(per_residue.shape[1])]
        pops, errors = np.stack([p for p, _ in pairs]), np.stack([e for _, e in pairs])
    return {**means, **spread, "residues": against_reference(pops, errors, reference), "runs": runs}


def table(results: dict) -> str:
    samplers = [(label, key) for label, key in (("IS", "importance_sampling"), ("SMC", "smc")) if key in results]
    floors = "md_floor" in results
    rows = ["| sampler | exact ESS | E-W2 (kT) | T-W2 |" + (" T-W2 of MD, as many samples |" if floors else "")
            + " log Z | wall-clock (s) |", "|---|---|---|---|" + ("---|" if floors else "") + "---|---|"]
    for label, key in samplers:
        s = results[key]
        sd = lambda name: f" ± {s[name + '_sd']:.2f}" if s.get(name + "_sd") is not None else ""  # noqa: E731
        floor = f" {s['md_floor_torus_w2']:.2f} ({s['samples_scored']:,}) |" if floors else ""
        rows.append(f"| {label} ({s['label']}) | {s['ess']:.3f} | {s['energy_w2_kT']:.2f}{sd('energy_w2_kT')} | "
                    f"{s['torus_w2']:.2f}{sd('torus_w2')} |{floor} {s['log_z']:.2f} | {s['seconds']:.0f} |")
    rows += ["", "| residue | state | reference | " + " | ".join(f"{label} | z" for label, _ in samplers) + " |",
             "|---|---|---|" + "---|---|" * len(samplers)]
    for r, residue in enumerate(results["reference"]["residues"]):
        for k, state in enumerate(populations.BACKBONE_STATES):
            ref = results["reference"]
            cells = [f"{ref['populations'][r][k]:.3f} ± {ref['standard_errors'][r][k]:.3f}"]
            for _, key in samplers:
                row = results[key]["residues"][r]
                cells += [f"{row['populations'][k]:.3f} ± {row['errors'][k]:.3f}", f"{row['z'][k]:+.1f}"]
            rows.append(f"| {residue} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=systems.names())
    parser.add_argument("--flow", required=True, help="a shipped model's name or a checkpoint")
    parser.add_argument("--reference", required=True, help="held-out replica-exchange output (target temperature)")
    parser.add_argument("--copies", type=int, default=8, help="ladder copies of the reference run")
    parser.add_argument("--burn-in-ps", type=float, default=100,
                        help="simulated time dropped at the start of each reference copy")
    parser.add_argument("--proposals", type=int, default=20000, help="importance-sampling proposals")
    parser.add_argument("--smc-particles", type=int, default=2000)
    parser.add_argument("--smc-steps", type=int, default=50)
    parser.add_argument("--smc-seeds", type=int, default=2, help="SMC repeats (two or more: their spread is the error)")
    parser.add_argument("--folder", default=None, help="where the samples files go (default: a temporary folder)")
    parser.add_argument("--max-samples", type=int, default=10_000,
                        help="samples per set in T-W2 (a weighted set is resampled to this many by weight); default "
                             "10,000, the paper's")
    parser.add_argument("--rescore", action="store_true",
                        help="score the samples files already in --folder (drawn by this command) instead of drawing "
                             "them again: a change of metric settings costs no sampling")
    parser.add_argument("--is-only", action="store_true",
                        help="importance sampling alone, printed and not written: screens a candidate flow before "
                             "its SMC runs")
    parser.add_argument("--md-floor", default=None, metavar="RUN",
                        help="an independent MD run of the molecule (not the reference): its T-W2 against the "
                             "reference at each sampler's sample count is reported beside the sampler's")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    if args.smc_seeds < 2 and not args.is_only:
        parser.error("--smc-seeds must be 2 or more: SMC's population errors are the spread over its seeds")
    if args.rescore and args.folder is None:
        parser.error("--rescore reads the samples files of an earlier run: give its --folder")

    target = systems.get(args.system)
    flow = TarFlow.load(args.flow, target=target)
    reference, _ = one_run(args.reference, args.copies, args.burn_in_ps, args.max_samples)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or scratch
        os.makedirs(folder, exist_ok=True)
        scoring = {"max_samples": args.max_samples, "rescore": args.rescore}
        importance = scored(target, flow, args.reference, folder, "is", 0,
                            {**INDEPENDENT_PROPOSALS, "n_steps": 0, "resample_at_end": False, "n_particles": args.proposals},
                            **scoring)
        smc = [scored(target, flow, args.reference, folder, "smc", seed,
                      {"n_particles": args.smc_particles, "n_steps": args.smc_steps, "kernel": "mala", "resample_at_end": False},
                      **scoring)
               for seed in range(0 if args.is_only else args.smc_seeds)]
    results = {
        "system": args.system, "flow": args.flow, "reference": reference, "machine": machine(),
        "command": command_line("peptide_model.py", None),
        "importance_sampling": {**summarise([importance], reference, independent=True), "label": f"{args.proposals:,} proposals"},
    }
    if smc:
        results["smc"] = {**summarise(smc, reference, independent=False),
                          "label": f"{args.smc_particles:,} particles, {args.smc_steps} MALA steps, {args.smc_seeds} seeds"}
    if args.md_floor:
        samplers = [results[key] for key in ("importance_sampling", "smc") if key in results]
        counts = [min(args.proposals, args.max_samples)] + ([min(args.smc_particles, args.max_samples)] if smc else [])
        floors = md_floor(args.md_floor, args.reference, set(counts), args.max_samples)
        results["md_floor"] = {"run": os.path.basename(args.md_floor), "torus_w2_by_samples": floors}
        for sampler, count in zip(samplers, counts):
            sampler.update(samples_scored=count, md_floor_torus_w2=floors[count])
    text = (f"Machine: {results['machine']}\n\nCommand: `{results['command']}`. Flow `{args.flow}`; reference "
            f"`{os.path.basename(args.reference)}`, all {reference['frames_used']:,} target-temperature frames after "
            f"{args.burn_in_ps:g} ps of each of its {args.copies} copies for the populations (errors over copies), every "
            f"frame for E-W2 and T-W2 (T-W2 on {args.max_samples:,} samples per set). IS populations carry bootstrap "
            "errors, SMC's the error over seeds; z is the difference in combined standard errors."
            + (f" MD at as many samples: `{results['md_floor']['run']}`, every frame, drawn down to the sampler's "
               "sample count (mean of two draws)." if args.md_floor else "") + "\n\n" + table(results))
    publish(results, f"peptide_model-{args.system}.json", f"### Peptide model, {args.system}", text,
            write=not (args.no_write or args.is_only))


if __name__ == "__main__":
    main()
