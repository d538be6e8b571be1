"""The SBG runs shared by the time-to-quality and free-energy benchmarks: methods, budgets, scoring.

Not a script: both benchmarks import it, so neither imports the other.
"""

from __future__ import annotations

import os

import numpy as np
from _common import ROOT, Timer, basin_labels, dihedrals_and_energies, populations

#: Sampler options of each method; budgets (particles, steps, seeds) come from :func:`default_budgets`.
METHODS = {
    "IS": dict(n_steps=0),
    "SMC linear+ULA (paper)": dict(schedule="linear", kernel="ula"),
    "SMC adaptive+MALA": dict(schedule="adaptive", kernel="mala"),
}


def budget(n_particles: int, n_steps: int = 0, seeds: int = 2, target_cess: float | None = None) -> dict:
    """One budget: ``n_steps`` is the step count (linear) or the most steps (adaptive, whose
    actual count is set by ``target_cess``)."""
    options = {"n_particles": n_particles, "n_steps": n_steps}
    if target_cess is not None:
        options["target_cess"] = target_cess
    label = f"K={n_particles}" + (f" L={n_steps}" if n_steps and target_cess is None else "") + (f" cESS={target_cess:g}" if target_cess is not None else "")
    return {"label": label, "options": options, "seeds": seeds}


def default_budgets(quick: bool) -> dict[str, list[dict]]:
    """Budgets sized for 2 shared CPU cores (about 15 minutes of SBG in all)."""
    if quick:
        return {"IS": [budget(256, seeds=1)], "SMC linear+ULA (paper)": [budget(128, 5, 1)], "SMC adaptive+MALA": [budget(128, 200, 1, 0.5)]}
    return {
        "IS": [budget(1000), budget(4000), budget(10000)],
        "SMC linear+ULA (paper)": [budget(250, 30), budget(250, 100), budget(500, 400, seeds=1)],
        "SMC adaptive+MALA": [budget(250, 1000, target_cess=0.5), budget(250, 1000, target_cess=0.9), budget(500, 1000, seeds=1, target_cess=0.99)],
    }


# ------------------------------------------------------------------------------ metrics
class Scorer:
    """E-W2 and T-W2 of (weighted) samples against the reference."""

    def __init__(self, reference_path: str, max_samples: int, seed: int = 0):
        self.angles, self.energies = dihedrals_and_energies(reference_path)
        self.max_samples = max_samples
        self.seed = seed

    def score(self, angles, energies, weights=None) -> dict:
        from openmm_sbg import metrics

        return {
            "energy_w2": metrics.energy_w2(energies, self.energies, weights=weights),
            "torus_w2": metrics.torus_w2(angles, self.angles, weights=weights, max_samples=self.max_samples, seed=self.seed),
        }

    def noise_floor(self) -> dict:
        """The reference's first half against its second half."""
        from openmm_sbg import metrics

        half = len(self.energies) // 2
        return {
            "frames_per_half": half,
            "energy_w2": metrics.energy_w2(self.energies[:half], self.energies[half:]),
            "torus_w2": metrics.torus_w2(self.angles[:half], self.angles[half:], max_samples=self.max_samples, seed=self.seed),
            "populations_first_half": populations(basin_labels(self.angles[:half])).tolist(),
            "populations_second_half": populations(basin_labels(self.angles[half:])).tolist(),
        }


# ------------------------------------------------------------------------------ SBG
def run_sbg(target, flow, scorer: Scorer, budgets: dict, save_dir, seeds: list[int] | None = None) -> list[dict]:
    """Run every method's budgets (seeds ``0 .. budget['seeds'] - 1`` unless ``seeds`` is given)."""
    from openmm_sbg import SMCSampler, metrics

    rows = []
    for method, options in METHODS.items():
        for spec in budgets.get(method, []):
            for seed in seeds if seeds is not None else range(spec["seeds"]):
                kwargs = {**options, **spec["options"]}
                sampler = SMCSampler(target, flow, progress=False, **kwargs)
                with Timer() as timer:
                    result = sampler.run(seed=seed)
                traj = result.to_mdtraj()
                angles = metrics.backbone_dihedrals(traj)
                weights = result.weights
                row = {
                    "method": method,
                    "budget": spec["label"],
                    "options": kwargs,
                    "n_particles": kwargs["n_particles"],
                    "n_steps": int(len(result.diagnostics.get("t", []))),
                    "seed": seed,
                    "seconds": timer.seconds,
                    "ess": result.ess,
                    "ess_proposals": result.info["ess_proposals"],
                    "n_kept": result.info["n_kept"],
                    "log_z": result.log_z,
                    "n_resampling": result.info["n_resampling"],
                    "mean_acceptance": float(np.nanmean(result.diagnostics["acceptance"])) if kwargs["n_steps"] else None,
                    "energy_mean": float(np.sum(weights * result.energies)),
                    "wrong_chirality": metrics.wrong_chirality_fraction(traj, weights),
                    "populations": populations(basin_labels(angles), weights).tolist(),
                }
                row.update(scorer.score(angles, result.energies, weights))
                if save_dir is not None:
                    name = f"{method.split()[0]}-{method.split()[1] if kwargs['n_steps'] else ''}-{spec['label']}-s{seed}"
                    name = name.replace(" ", "_").replace("+", "-").replace("=", "").replace("(", "").replace(")", "") + ".h5"
                    row["file"] = os.path.relpath(os.path.join(save_dir, name), ROOT)
                    result.save(os.path.join(save_dir, name))
                rows.append(row)
                print(
                    f"  {method} {spec['label']} (L={row['n_steps']}) seed {seed}: {timer.seconds:.1f} s, ESS {result.ess:.4f}, "
                    f"<E> {row['energy_mean']:.2f} kT, E-W2 {row['energy_w2']:.3f}, T-W2 {row['torus_w2']:.3f}, log Z {result.log_z:.2f}",
                    flush=True,
                )
    return rows


def groups_of(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by budget label, cheapest (mean wall-clock) first."""
    labels = {r["budget"] for r in rows}
    groups = [(label, [r for r in rows if r["budget"] == label]) for label in labels]
    return sorted(groups, key=lambda g: np.mean([r["seconds"] for r in g[1]]))
