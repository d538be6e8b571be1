"""Umbrella sampling along phi (or phi and psi) with plain OpenMM + MBAR: the independent reference for ad2's rare basin.

Windows restrain the backbone dihedral phi (C-N-CA-C) with a periodic harmonic bias
``k/2 * d(phi, phi_k)^2`` at ``--windows`` evenly spaced centres; with ``--psi-windows N``
every phi centre is crossed with N psi centres (a second bias of the same form on psi), so
that no slow degree of freedom is left unbiased: along phi alone, psi inside the phi > 0
windows equilibrates too slowly (the 1-D repeats disagree far beyond their MBAR errors).
Each window runs Langevin dynamics (1 fs, friction 1/ps, Reference platform, as
``openmm-sbg md``) started from the previous window's last configuration (2-D windows run
column by column in a serpentine, so consecutive windows are neighbours),
``--equilibration-ps`` unrecorded then ``--ps`` recorded with (phi, psi) every
``--sample-ps``. pymbar's MBAR on the decorrelated samples of all windows (``timeseries.subsample_correlated_data`` per window) gives the unbiased basin
populations (basins as :mod:`_common`) with MBAR's uncertainty; independent repeats
(``--repeats`` seeds) give a second, seed-to-seed error bar. Wall-clock to a 20% answer for
P(alphaL/C7ax) is measured by analysing growing prefixes of every window.

Every window is saved as it finishes (``runs/bench/umbrella/``), so a rerun resumes.
Run: ``nice python benchmarks/umbrella_sampling.py`` (about 7 minutes per repeat and
temperature on one core); it writes ``results/umbrella_sampling.json`` and the
"Rare basin: umbrella sampling reference" section of RESULTS.md. The converged reference is
the grid: ``--temperatures 300 --repeats 3 --windows 24 --psi-windows 24 --ps 50
--equilibration-ps 5 --tag 2d-grid`` (41-71 minutes per repeat on one shared core, and
minutes per MBAR solve, each kept as ``mbar-<fraction>.json`` in the repeat's folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BASIN_RULE,
    BASINS,
    WORK,
    basin_labels,
    command_line,
    header,
    machine,
    publish,
)

HEADING = "### Rare basin: umbrella sampling reference"
STORE = WORK / "umbrella"


def restrained_context(temperature_K: float, k_kj_per_rad2: float, seed: int, restrain_psi: bool):
    """A Context of ad2 with movable periodic harmonic restraints on phi (global ``phi0``) and, if asked, psi (``psi0``)."""
    import openmm
    from openmm import unit

    from openmm_sbg import systems

    target = systems.get("ad2", temperature=temperature_K)
    system = target.system  # the target keeps its own copy
    restrained = [("phi", phi_atoms(target.topology))] + ([("psi", psi_atoms(target.topology))] if restrain_psi else [])
    for name, atoms in restrained:
        bias = openmm.CustomTorsionForce(f"0.5*k_{name}*dtheta^2; dtheta = min(d, 2*pi - d); d = abs(theta - {name}0); pi = 3.141592653589793")
        bias.addGlobalParameter(f"k_{name}", k_kj_per_rad2)
        bias.addGlobalParameter(f"{name}0", 0.0)
        bias.addTorsion(*atoms, [])
        system.addForce(bias)
    integrator = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(target.positions)
    return context, integrator, target.topology


def _dihedral_atoms(topology, compute) -> tuple[int, int, int, int]:
    import mdtraj

    indices, _ = compute(mdtraj.Trajectory(np.zeros((1, topology.getNumAtoms(), 3)), mdtraj.Topology.from_openmm(topology)))
    return tuple(int(i) for i in indices[0])


def phi_atoms(topology) -> tuple[int, int, int, int]:
    """Indices of phi (C of ACE, N, CA, C of ALA), from mdtraj's definition."""
    import mdtraj

    return _dihedral_atoms(topology, mdtraj.compute_phi)


def psi_atoms(topology) -> tuple[int, int, int, int]:
    """Indices of psi (N, CA, C of ALA, N of NME), from mdtraj's definition."""
    import mdtraj

    return _dihedral_atoms(topology, mdtraj.compute_psi)


def window_centres(args) -> np.ndarray:
    """(windows, 2) centres (phi0, psi0) in radians, psi0 NaN for 1-D; 2-D in a serpentine order."""
    phis = np.linspace(-math.pi, math.pi, args.windows, endpoint=False)
    if not args.psi_windows:
        return np.stack([phis, np.full_like(phis, np.nan)], axis=1)
    psis = np.linspace(-math.pi, math.pi, args.psi_windows, endpoint=False)
    return np.array([(phi, psi) for i, phi in enumerate(phis) for psi in (psis if i % 2 == 0 else psis[::-1])])


def run_windows(temperature_K: float, seed: int, args) -> dict:
    """Run (or resume) one repeat: every window's (phi, psi) samples and its wall-clock."""
    from openmm import unit

    import mdtraj

    centres = window_centres(args)
    grid = f"w{args.windows}" + (f"x{args.psi_windows}-eq{args.equilibration_ps:g}" if args.psi_windows else "")
    tag = f"T{temperature_K:g}-seed{seed}-{grid}-k{args.k:g}-ps{args.ps:g}"
    folder = STORE / tag
    folder.mkdir(parents=True, exist_ok=True)
    context, integrator, topology = restrained_context(temperature_K, args.k, seed, restrain_psi=bool(args.psi_windows))
    md_top = mdtraj.Topology.from_openmm(topology)
    quartets = np.array([phi_atoms(topology), psi_atoms(topology)])
    steps_per_sample = int(round(args.sample_ps * 1000))
    n_samples = int(round(args.ps / args.sample_ps))
    windows = []
    progress = tqdm(total=len(centres), desc=f"umbrella {temperature_K:g} K seed {seed}", unit="window", mininterval=30)
    for i, (phi0, psi0) in enumerate(centres):
        path = folder / f"window{i:03d}.npz"
        if path.exists():
            saved = np.load(path)
            if str(saved.get("convention")) != "iupac":
                raise ValueError(f"{path} holds dihedrals of another sign convention; delete {folder} to rerun it")
            windows.append({"phi": saved["phi"], "psi": saved["psi"], "seconds": float(saved["seconds"])})
            context.setPositions(saved["last_positions"])
            progress.update()
            continue
        start = time.perf_counter()
        context.setParameter("phi0", float(phi0))
        if args.psi_windows:
            context.setParameter("psi0", float(psi0))
        if i == 0:
            context.setVelocitiesToTemperature(temperature_K * unit.kelvin, seed + 1)
        integrator.step(int(round(args.equilibration_ps * 1000)))
        xyz = np.empty((n_samples, md_top.n_atoms, 3), dtype=np.float32)
        for s in range(n_samples):
            integrator.step(steps_per_sample)
            xyz[s] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        phi, psi = mdtraj.compute_dihedrals(mdtraj.Trajectory(xyz, md_top), quartets).T.astype(np.float64)
        seconds = time.perf_counter() - start
        last = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, phi=phi, psi=psi, seconds=seconds, last_positions=last, convention="iupac")
        os.replace(tmp, path)
        windows.append({"phi": phi, "psi": psi, "seconds": seconds})
        progress.update()
    progress.close()
    return {"centres": centres, "windows": windows, "folder": folder}


def periodic_bias(angle: np.ndarray, centre: float, k: float) -> np.ndarray:
    d = np.abs(angle - centre) % (2 * math.pi)
    d = np.minimum(d, 2 * math.pi - d)
    return 0.5 * k * d**2


def window_bias(phi: np.ndarray, psi: np.ndarray, centre: np.ndarray, k: float) -> np.ndarray:
    """Bias energy (kJ/mol) of the window at ``centre`` = (phi0, psi0); psi0 NaN means phi only."""
    bias = periodic_bias(phi, centre[0], k)
    return bias if np.isnan(centre[1]) else bias + periodic_bias(psi, centre[1], k)


def mbar_populations(run: dict, temperature_K: float, k: float, fraction: float = 1.0, initial_f_k=None) -> dict:
    """Unbiased basin populations (and MBAR's standard errors) from the first ``fraction`` of every window.

    MBAR's asymptotic covariance is taken with ``"svd-ew"`` (the pseudoinverse through an
    eigendecomposition): plain SVD fails to converge for the hundreds of states of a grid.
    ``initial_f_k`` (from a solve on more of the same windows) shortens the solve. A grid's
    solve takes minutes, so each result is kept in the repeat's folder and reused.
    """
    from pymbar import MBAR, timeseries

    cache = run["folder"] / f"mbar-{fraction:.3f}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return {**saved, "f_k": np.array(saved["f_k"])}

    kT = 0.0083144626 * temperature_K
    phis, psis, counts = [], [], []
    for w, centre in zip(run["windows"], run["centres"]):
        n = max(int(len(w["phi"]) * fraction), 10)
        phi, psi = w["phi"][:n], w["psi"][:n]
        keep = timeseries.subsample_correlated_data(window_bias(phi, psi, centre, k))
        phis.append(phi[keep])
        psis.append(psi[keep])
        counts.append(len(keep))
    phi, psi = np.concatenate(phis), np.concatenate(psis)
    u_kn = np.stack([window_bias(phi, psi, c, k) / kT for c in run["centres"]])
    mbar = MBAR(u_kn, np.array(counts), solver_protocol="robust", initial_f_k=initial_f_k)
    labels = basin_labels(np.stack([phi, psi], axis=1))
    indicators = np.stack([(labels == b).astype(float) for b in range(len(BASINS))])
    u_unbiased = np.zeros_like(phi)
    pops, errs = [], []
    for a in indicators:
        out = mbar.compute_expectations(a, u_kn=u_unbiased, uncertainty_method="svd-ew")
        pops.append(float(out["mu"][0]) if np.ndim(out["mu"]) else float(out["mu"]))
        errs.append(float(np.ravel(out["sigma"])[0]))
    result = {"populations": pops, "errors": errs, "decorrelated_samples": int(sum(counts)), "f_k": mbar.f_k.tolist()}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cache)
    return {**result, "f_k": mbar.f_k}


def analyse(temperature_K: float, runs: list[dict], args) -> dict:
    per_seed = [mbar_populations(r, temperature_K, args.k) for r in runs]
    f_k = [s.pop("f_k") for s in per_seed]
    pops = np.array([s["populations"] for s in per_seed])
    mean = pops.mean(axis=0)
    spread = pops.std(axis=0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.full(len(BASINS), float("nan"))
    mbar_err = np.sqrt(np.sum(np.array([s["errors"] for s in per_seed]) ** 2, axis=0)) / len(runs)
    seconds = [sum(w["seconds"] for w in r["windows"]) for r in runs]
    # Time to a 20% answer: the shortest prefix of one repeat whose MBAR relative error on
    # P(alphaL/C7ax) is at most 20% and whose estimate lies within 20% of the all-repeat mean.
    # A grid's solves are slow (hundreds of states), so its prefixes are coarser.
    fractions = (0.25, 0.5, 0.75, 1.0) if args.psi_windows else np.linspace(0.05, 1.0, 20)
    to_20 = []
    for r, secs, f in zip(runs, seconds, f_k):
        hit = None
        for fraction in fractions:
            est = mbar_populations(r, temperature_K, args.k, fraction, initial_f_k=f)
            p, e = est["populations"][2], est["errors"][2]
            if p > 0 and e / p <= 0.2 and abs(p - mean[2]) <= 0.2 * mean[2]:
                hit = float(fraction * secs)
                break
        to_20.append(hit)
    return {
        "temperature_K": temperature_K,
        "per_seed": per_seed,
        "populations": mean.tolist(),
        "seed_stderr": spread.tolist(),
        "mbar_error_of_mean": mbar_err.tolist(),
        "seconds_per_repeat": seconds,
        "simulated_ns_per_repeat": len(runs[0]["centres"]) * (args.ps + args.equilibration_ps) / 1000,
        "seconds_to_20_percent": to_20,
    }


def fmt(p: float, e: float) -> str:
    return f"{p:.4f} ± {e:.4f}" if p < 0.01 else f"{p:.3f} ± {e:.3f}"


def report(results: dict) -> str:
    s = results["settings"]
    grid = f"{s['windows']} × {s['psi_windows']} windows on a (phi, psi) grid (periodic harmonic biases on both" if s.get("psi_windows") else f"{s['windows']} windows along phi (periodic harmonic bias"
    what = f"{grid}, k = {s['k']:g} kJ/mol/rad²), {s['equilibration_ps']:g} ps equilibration + {s['ps']:g} ps recorded per window ((phi, psi) every {s['sample_ps']:g} ps), Langevin 1 fs, friction 1/ps, OpenMM Reference platform, one core; MBAR (pymbar) on the samples of each window decorrelated with `timeseries.subsample_correlated_data`. Basins: {BASIN_RULE}."
    lines = header(results, what, ['T (K)', 'repeats', 'C7eq/beta', 'alphaR', 'alphaL/C7ax (phi > 0)', 'dF(C7eq/beta -> alphaL/C7ax) (kT)', 'simulated ns per repeat', 'wall-clock per repeat', 'to a 20% answer on alphaL/C7ax'])
    for r in results["temperatures"]:
        pops, err = r["populations"], r["seed_stderr"]
        mbar = r["mbar_error_of_mean"]
        err = [e if np.isfinite(e) else m for e, m in zip(err, mbar)]
        df = -math.log(pops[2] / pops[0])
        df_err = math.hypot(err[2] / pops[2], err[0] / pops[0])
        hits = [h for h in r["seconds_to_20_percent"] if h is not None]
        to20 = f"{np.mean(hits):.0f} s ({len(hits)}/{len(r['seconds_to_20_percent'])} repeats)" if hits else "not reached"
        lines.append(
            f"| {r['temperature_K']:g} | {len(r['per_seed'])} | {fmt(pops[0], err[0])} | {fmt(pops[1], err[1])} | "
            f"{fmt(pops[2], err[2])} | {df:.2f} ± {df_err:.2f} | {r['simulated_ns_per_repeat']:.1f} | "
            f"{np.mean(r['seconds_per_repeat']):.0f} s | {to20} |"
        )
    lines += [
        "",
        "Errors are standard errors over the independent repeats (MBAR's own standard error of the mean of repeats, "
        "where there is one repeat). Per repeat, MBAR's relative error on P(alphaL/C7ax): "
        + "; ".join(
            f"{r['temperature_K']:g} K: " + ", ".join(f"{s['errors'][2] / s['populations'][2]:.1%}" for s in r["per_seed"])
            for r in results["temperatures"]
        )
        + ". Wall-clock to a 20% answer is the shortest prefix of one repeat's windows whose MBAR relative error "
        "is at most 20% and whose estimate lies within 20% of the all-repeat mean (the windows run one after another, "
        "so a prefix of every window costs that fraction of the repeat's wall-clock).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 350.0])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 2], help="independent repeats per temperature")
    parser.add_argument("--windows", type=int, default=36, help="window centres along phi")
    parser.add_argument("--psi-windows", type=int, default=0, help="window centres along psi for each phi centre (0: bias phi only)")
    parser.add_argument("--k", type=float, default=200.0, help="bias force constant, kJ/mol/rad^2")
    parser.add_argument("--ps", type=float, default=200.0, help="recorded time per window")
    parser.add_argument("--equilibration-ps", type=float, default=20.0)
    parser.add_argument("--sample-ps", type=float, default=0.2)
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first repeat (later repeats count up)")
    parser.add_argument("--tag", default=None, help="write results/umbrella_sampling-TAG.json and its own RESULTS.md section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if len(args.repeats) != len(args.temperatures):
        parser.error("give one --repeats count per temperature")
    results = {"machine": machine(), "command": command_line("umbrella_sampling.py", argv), "temperatures": [],
               "settings": {k: getattr(args, k) for k in ("windows", "psi_windows", "k", "ps", "equilibration_ps", "sample_ps")}}
    for temperature, repeats in zip(args.temperatures, args.repeats):
        runs = [run_windows(temperature, seed, args) for seed in range(args.first_seed, args.first_seed + repeats)]
        results["temperatures"].append(analyse(temperature, runs, args))
    name, heading = ("umbrella_sampling", HEADING) if args.tag is None else (f"umbrella_sampling-{args.tag}", f"{HEADING}, {args.tag}")
    publish(results, f"{name}.json", heading, report(results), write=not args.no_write)


if __name__ == "__main__":
    main()
