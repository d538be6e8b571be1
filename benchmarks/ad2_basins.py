"""Exact-weight importance sampling of an ad2 flow: pooled ESS over seeds, every basin's population, E-W2/T-W2.

For each seed (100, 101, ...): ``--n-proposals`` proposals with exact weights (Gaussian CoM
adjustment, nothing clipped), their normalised Kish ESS and Pareto k, the weighted backbone-state
populations (C7eq/beta, alphaR, alphaL/C7ax) and, for the first three seeds at 300 K, E-W2 and
T-W2 against the shipped reference MD. That reference never visits alphaL/C7ax, so the metrics
are also given on the states it visits ("common": the samples in alphaL/C7ax dropped), and
P(alphaL/C7ax) is compared with umbrella sampling (0.0224 ± 0.0006 at 300 K, "Rare basins").
The error of P is the standard error over seeds.

Run: ``nice python benchmarks/ad2_basins.py --flow ad2 --seeds 20 --n-proposals 10000`` (and
``--temperature 350 --seeds 3 --n-proposals 20000``); writes ``results/ad2_basins-<T>K.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import mdtraj
import numpy as np
import torch
from _common import save_json
from openmm import unit

from openmm_sbg import metrics, populations, systems
from openmm_sbg.data import load_trajectory
from openmm_sbg.flow import TarFlow
from openmm_sbg.flow.refine import importance_weights
from openmm_sbg.shipped import flow_path, reference_path
from openmm_sbg.smc.weights import normalised_ess, pareto_k


def one_seed(flow, target, label, reference, reference_energies, seed: int, n: int, with_metrics: bool) -> dict:
    x, log_w = importance_weights(flow, target, n, torch.Generator().manual_seed(seed))
    lw, labels = log_w.numpy(), label(x.numpy())
    row = {"seed": seed, "ess": normalised_ess(log_w), "pareto_k": pareto_k(log_w),
           "populations": populations.state_populations(labels, 3, lw).tolist(),
           "proposed": populations.state_populations(labels, 3).tolist(),
           "alphaL_effective_proposals": float(populations.state_effective_sizes(labels, 3, lw)[2])}
    if with_metrics:
        traj = mdtraj.Trajectory(x.numpy().astype(np.float32), reference.topology)
        w, e = np.exp(lw - lw.max()), target.energy(x).numpy()
        common = np.flatnonzero(labels != 2)
        row["e_w2"] = metrics.energy_w2(e, reference_energies, weights=w)
        row["t_w2"] = metrics.torus_w2(metrics.backbone_dihedrals(traj), metrics.backbone_dihedrals(reference), weights=w)
        row["e_w2_common"] = metrics.energy_w2(e[common], reference_energies, weights=w[common])
        row["t_w2_common"] = metrics.torus_w2(metrics.backbone_dihedrals(traj[common]), metrics.backbone_dihedrals(reference),
                                              weights=w[common])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", default="ad2", help="shipped name or checkpoint (default ad2)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n-proposals", type=int, default=10_000)
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = systems.get("ad2", temperature=args.temperature * unit.kelvin)
    flow = TarFlow.load(flow_path(args.flow), target=target)
    label = populations.backbone_state_labeller(target.topology)
    reference = load_trajectory(reference_path("ad2"), target)
    reference_energies = target.energy(torch.as_tensor(reference.xyz, dtype=torch.float64)).numpy()
    started, rows, log_ws = time.perf_counter(), [], []
    for seed in range(100, 100 + args.seeds):
        rows.append(one_seed(flow, target, label, reference, reference_energies, seed, args.n_proposals,
                             with_metrics=seed < 103 and args.temperature == 300.0))
        print(json.dumps(rows[-1]), flush=True)
    ess = np.array([r["ess"] for r in rows])
    p = np.array([r["populations"][2] for r in rows])
    summary = {
        "flow": args.flow, "kelvin": args.temperature, "seeds": args.seeds, "n_proposals": args.n_proposals,
        "ess_mean": ess.mean(), "ess_sd": ess.std(ddof=1), "ess_min": ess.min(),
        "p_alphaL": p.mean(), "p_alphaL_se": p.std(ddof=1) / np.sqrt(len(p)),
        "populations_mean": np.mean([r["populations"] for r in rows], 0).tolist(),
        "proposed_mean": np.mean([r["proposed"] for r in rows], 0).tolist(),
        "seconds": time.perf_counter() - started, "rows": rows,
    }
    for key in ("e_w2", "t_w2", "e_w2_common", "t_w2_common"):
        summary[key] = [r[key] for r in rows if key in r]
    save_json(f"ad2_basins-{args.temperature:g}K.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, default=float))


if __name__ == "__main__":
    main()
