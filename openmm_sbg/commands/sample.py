"""``openmm-sbg sample``: SMC (or importance) sampling from a trained flow; writes a samples file."""

from __future__ import annotations

import argparse

from openmm_sbg.commands.common import add_system_arguments, target_from_args

HELP = "draw weighted equilibrium samples with a trained flow and SMC; rerun the same command to resume"

EPILOG = """\
The summary's "ess" says how good the run was: the normalised Kish ESS (sum w)^2 / (K sum w^2)
of the proposals' weights for importance sampling (--n-steps 0), and for SMC the smallest ESS
the weights reached at any annealing step before a resampling (t = 1 included).
"ess_since_last_resampling" is the ESS of the weights at t = 1 only. By default
(--com-adjustment auto) an internal-coordinate flow gets exact weights (Gaussian CoM
adjustment, nothing clipped) and a Cartesian flow the paper's protocol (chi3, 0.2% clipped).
"log_z" estimates log of the integral of exp(-U/kT) rho(CoM) over the Cartesian coordinates
in nm; "log_z_convention" says which rho.
"""


#: Where the command's defaults differ from the library's (SMCOptions): a run size to start
#: from, and Metropolis-adjusted moves, since the unadjusted ones the paper (and the library)
#: default to are biased at the default step once the flow is as stiff as the force field,
#: as internal-coordinate flows are.
COMMAND_DEFAULTS = {"n_particles": 1000, "n_steps": 100, "kernel": "mala"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import dataclasses

    from openmm_sbg.smc import SMCOptions
    from openmm_sbg.smc.kernels import KERNELS
    from openmm_sbg.smc.proposal import COM_ADJUSTMENTS
    from openmm_sbg.smc.resampling import RESAMPLERS

    defaults = {field.name: field.default for field in dataclasses.fields(SMCOptions)} | COMMAND_DEFAULTS

    def option(flag: str, help: str, **kwargs) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, default=defaults[dest], help=f"{help} (default {defaults[dest]})", **kwargs)

    add_system_arguments(parser)
    parser.add_argument("--flow", required=True, help="flow checkpoint (.pt) from `openmm-sbg train`, or a shipped model's name (ad2)")
    parser.add_argument("--out", required=True, help="samples file to write (.h5: mdtraj trajectory + log_weights, energies_kT)")
    parser.add_argument("--seed", type=int, default=0)
    option("--n-particles", "proposals drawn / particles kept", type=int)
    option("--n-steps", "annealing steps (the most, for --schedule adaptive); 0 = importance sampling", type=int)
    option("--kernel", "Langevin move: mala (Metropolis-adjusted, step-size adaptation, exact for any step) or ula "
           "(unadjusted, the paper's)", choices=list(KERNELS))
    option("--step-size", "Langevin step size in nm^2", type=float)
    option("--n-mcmc-steps", "Langevin moves per annealing step", type=int)
    option("--schedule", "annealing schedule", choices=["linear", "adaptive"])
    option("--target-cess", "conditional ESS per step for --schedule adaptive", type=float)
    option("--resampling", "resampling scheme", choices=list(RESAMPLERS))
    option("--resample-threshold", "during annealing, resample when the normalised ESS drops below this "
           "(importance sampling ignores it)", type=float)
    parser.add_argument("--final-resample", dest="resample_at_end", action=argparse.BooleanOptionalAction, default=None,
                        help="resample at t = 1 so the particles come out equally weighted (default: yes for SMC; no for "
                             "importance sampling, --n-steps 0, which keeps the independent proposals and their exact weights)")
    option("--energy-cutoff", "drop proposals above this energy in kT", type=float)
    parser.add_argument("--clip-fraction", type=_clip_fraction, default=None, metavar="FRACTION|auto",
                        help="drop this fraction of the largest log-weights (default auto: 0.002, the paper's, with "
                             "--com-adjustment chi3, else 0)")
    parser.add_argument("--com-adjustment", default="auto", choices=["auto", *COM_ADJUSTMENTS],
                        help="centre-of-mass density in the weights (default auto: gaussian, exact, for an internal-"
                             "coordinate flow; chi3, the paper's, for a Cartesian one)")
    option("--batch-size", "particles per flow / force-field evaluation", type=int)
    option("--checkpoint-every", "steps between checkpoints (OUT.ckpt)", type=int)
    parser.add_argument("--restart", action="store_true", help="ignore an existing OUT.ckpt and start afresh")
    parser.add_argument("--device", default="cpu", help="torch device of the flow (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _clip_fraction(text: str) -> float | None:
    return None if text == "auto" else float(text)


def run(args: argparse.Namespace) -> dict:
    import dataclasses

    import torch

    from openmm_sbg import distributed
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.sampling import sample
    from openmm_sbg.smc import SMCOptions

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if distributed.is_launched():
        # Under torchrun each process samples a slice of the particles on its own device.
        args.device = str(distributed.init(args.device).device)
    if args.system is None and args.pdb is None:
        # The checkpoint knows its molecule.
        flow = TarFlow.load(args.flow, map_location=args.device)
        target = flow.target(platform=args.platform)
    else:
        target = target_from_args(args)
        flow = TarFlow.load(args.flow, target=target, map_location=args.device)
    # Every option the parser knows by its SMCOptions name goes to the sampler as it is.
    options = {field.name: getattr(args, field.name) for field in dataclasses.fields(SMCOptions) if hasattr(args, field.name)}
    return sample(target, flow, args.out, seed=args.seed, restart=args.restart, **options)


def progress_path(args: argparse.Namespace) -> str:
    """The checkpoint an interrupted run resumes from."""
    return args.out + ".ckpt"
