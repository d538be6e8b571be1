"""The population of a basin plain MD does not visit: alanine dipeptide's alphaL/C7ax at two temperatures.

    python examples/rare_states.py                       # the shipped flow (minutes)
    python examples/rare_states.py --workflow work/      # the whole workflow for your own run (about an hour on 2 cores)

Plain 300 K MD of this molecule (55 ns in benchmarks/RESULTS.md) never crosses to phi > 0.
The shipped `ad2` flow was taught that basin from 300 K MD started inside it, so it proposes
it, and importance weights give its exact Boltzmann mass at any temperature (0.0216 ± 0.0004
at 300 K over 20 seeds of 10,000 proposals; umbrella sampling: 0.0224 ± 0.0006). The basin's
mass rests on about 150 effective proposals per 10,000 (printed), so one run scatters by ~9%
and the error bar comes from independent seeds, not one run's bootstrap.
``--workflow`` runs the data -> train -> sample -> evaluate pipeline (``openmm-sbg run``,
replica exchange with MD seeded in the rare basins) from scratch in a folder; rerun the
same command after an interruption and it continues.
"""

import argparse

from openmm import unit

from openmm_sbg import PipelineConfig, SMCSampler, TarFlow, populations, run_pipeline, systems

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--workflow", metavar="FOLDER", help="run replica exchange, training and sampling in FOLDER")
parser.add_argument("--flow", default="ad2", help="a shipped model's name or a checkpoint (default ad2)")
parser.add_argument("--temperatures", type=float, nargs=2, default=[300.0, 350.0])
parser.add_argument("--n-proposals", type=int, default=20_000, help="proposals per seed")
parser.add_argument("--seeds", type=int, default=4, help="independent importance-sampling runs per temperature")
args = parser.parse_args()

if args.workflow:
    config = PipelineConfig(data="replica-exchange", ns=1.0, n_steps=0, n_particles=args.n_proposals,
                            sample_temperatures_K=(args.temperatures[1],))
    summary = run_pipeline(systems.get("ad2", temperature=args.temperatures[0] * unit.kelvin), args.workflow, config)
    for kelvin, result in summary.temperatures.items():
        states = result["states"]
        print(f"{kelvin} K: " + ", ".join(f"{n} {p:.4f} ± {e:.4f}" for n, p, e in zip(states["names"], states["samples"], states["samples_bootstrap_error"])))
else:
    for kelvin in args.temperatures:
        target = systems.get("ad2", temperature=kelvin * unit.kelvin)
        flow = TarFlow.load(args.flow, target=target)
        labeller = populations.backbone_state_labeller(target.topology)
        per_seed, rests_on = [], []
        for seed in range(args.seeds):
            # Independent proposals with their exact weights (the default for an internal-coordinate
            # flow: nothing clipped, which would bias a rare basin), not resampled.
            result = SMCSampler(target, flow, n_particles=args.n_proposals, n_steps=0, resample_at_end=False,
                                progress=False).run(seed=seed)
            labels = labeller(result.positions)
            per_seed.append(populations.state_populations(labels, 3, result.log_weights))
            rests_on.append(populations.state_effective_sizes(labels, 3, result.log_weights)[2])
        p, error = populations.combine_repeats(per_seed)
        df, df_error = populations.free_energy_differences(p, error)
        print(f"{kelvin:g} K, {args.seeds} seeds: "
              + ", ".join(f"{n} {q:.4f} ± {e:.4f}" for n, q, e in zip(populations.BACKBONE_STATES, p, error))
              + f"; dF(C7eq/beta -> alphaL/C7ax) = {df[2]:.2f} ± {df_error[2]:.2f} kT"
              + f"; alphaL/C7ax rests on {sum(rests_on) / len(rests_on):.0f} effective proposals per seed")
