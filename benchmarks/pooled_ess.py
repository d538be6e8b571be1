"""Importance-sampling ESS of flows on many proposals: pooled, with its spread and the weights' tail.

The ESS of one set of 10,000 proposals scatters widely when the weights have a heavy tail: a
rare heavy proposal drags down the one set it lands in, and the other sets overstate. This
benchmark draws ``--sets`` independent sets per flow (seeds ``--first-seed`` on), scores them
exactly as refinement does (:func:`openmm_sbg.flow.refine.importance_weights`: Gaussian CoM
adjustment, no clipping), and reports the mean and spread of the per-set ESS, the ESS of all
sets pooled with a bootstrap over sets, the largest single proposal's share of the pooled
weight, and the Pareto k of the pooled weights (:func:`openmm_sbg.smc.weights.pareto_k`).
Each flow's log-weights are kept under ``runs/bench/pooled-ess/`` (keyed by the checkpoint's
content and the seeds); a rerun reuses them.

Writes ``results/pooled_ess-TAG.json`` and the section "Importance-sampling ESS, pooled, TAG"
of RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

HEADING = "### Importance-sampling ESS, pooled"
PROPOSALS_PER_SET = 10_000
BOOTSTRAP = 200


def log_weight_sets(path: str, target, args) -> list:
    """``args.sets`` tensors of log-weights of ``PROPOSALS_PER_SET`` proposals each, cached on disk."""
    import torch

    from openmm_sbg import TarFlow
    from openmm_sbg.flow.refine import importance_weights

    with open(path, "rb") as handle:  # keyed by content: a retrained file at the same path is scored afresh
        digest = hashlib.sha1(handle.read()).hexdigest()[:12]
    cache = common.WORK / "pooled-ess" / f"{args.system}-{digest}-seed{args.first_seed}-{args.sets}x{PROPOSALS_PER_SET}.pt"
    if cache.exists():
        return list(torch.load(cache).split(PROPOSALS_PER_SET))
    flow = TarFlow.load(path, target=target)
    sets = [importance_weights(flow, target, PROPOSALS_PER_SET, torch.Generator().manual_seed(args.first_seed + s))[1]
            for s in range(args.sets)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.cat(sets), f"{cache}.partial")
    os.replace(f"{cache}.partial", cache)
    return sets


def summarise(sets: list) -> dict:
    import torch

    from openmm_sbg.smc.weights import normalised_ess

    per_set = [normalised_ess(log_w) for log_w in sets]
    pooled = torch.cat(sets)
    rng = np.random.default_rng(0)
    bootstrap = [normalised_ess(torch.cat([sets[i] for i in rng.integers(0, len(sets), len(sets))])) for _ in range(BOOTSTRAP)]
    ess, largest, k = common.weight_tail(pooled)
    return {"per_set": per_set, "pooled": ess, "pooled_sd": float(np.std(bootstrap)), "largest_weight_share": largest, "pareto_k": k}


def report(results: dict) -> str:
    n = results["sets"] * PROPOSALS_PER_SET
    what = (f"Target `{results['system']}` at 300 K. {results['sets']} sets of {PROPOSALS_PER_SET:,} proposals per flow "
            f"(seeds {results['first_seed']}-{results['first_seed'] + results['sets'] - 1}), exact weights (Gaussian CoM "
            f"adjustment, no clipping). Pooled: the ESS of all {n:,} proposals together, ± the sd of a bootstrap over sets. "
            "Pareto k: the tail of the pooled weights; above 0.5 their variance is infinite.")
    lines = common.header(results, what, ["flow", "ESS per set, mean ± sd", "lowest set", f"ESS pooled ({n:,})",
                                          "largest weight", "Pareto k"])
    for row in results["flows"]:
        per_set = np.array(row["per_set"])
        lines.append(f"| `{os.path.basename(row['flow'])}` | {per_set.mean():.3f} ± {per_set.std(ddof=1):.3f} | {per_set.min():.3f} | "
                     f"{row['pooled']:.3f} ± {row['pooled_sd']:.3f} | {row['largest_weight_share']:.4f} | {row['pareto_k']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", nargs="+", default=["ad2"], help="flow checkpoints or shipped model names")
    parser.add_argument("--system", default="ad2", help="built-in system the flows model (default ad2)")
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=100, help="seed of the first set (default 100: not the other benchmarks' seeds)")
    parser.add_argument("--tag", required=True, help="names the JSON file and the RESULTS.md section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from openmm_sbg import shipped, systems

    torch.set_num_threads(1)
    target = systems.get(args.system)
    results = {"system": args.system, "machine": common.machine(), "command": common.command_line("pooled_ess.py", argv),
               "sets": args.sets, "first_seed": args.first_seed, "flows": []}
    for flow in args.flows:
        path = shipped.flow_path(flow)
        results["flows"].append({"flow": path, **summarise(log_weight_sets(path, target, args))})
        print(results["flows"][-1], flush=True)
    common.publish(results, f"pooled_ess-{args.tag}.json", f"{HEADING}, {args.tag}", report(results), write=not args.no_write)


if __name__ == "__main__":
    main()
