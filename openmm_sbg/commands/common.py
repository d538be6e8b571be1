"""Arguments shared by subcommands: which system to work on."""

from __future__ import annotations

import argparse

from openmm import app, unit


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """A built-in system name, or a PDB plus force-field files."""
    from openmm_sbg.systems import names

    parser.add_argument("system", nargs="?", help=f"built-in system: {', '.join(names())}")
    parser.add_argument("--pdb", help="PDB file of your own molecule (instead of SYSTEM)")
    parser.add_argument(
        "--forcefield", nargs="+", default=["amber14-all.xml", "implicit/obc1.xml"],
        help="OpenMM force-field files for --pdb (default: amber14-all.xml implicit/obc1.xml)",
    )
    parser.add_argument("--temperature", type=float, default=None, help="kelvin (default: the system's; 300 for --pdb)")
    parser.add_argument(
        "--cutoff", type=float, default=None,
        help="nonbonded cutoff in nm for --pdb (CutoffNonPeriodic); default: no cutoff",
    )
    parser.add_argument("--platform", default=None, help="OpenMM platform (Reference, CPU, CUDA, OpenCL); default: OpenMM's choice. "
             "On a CPU, Reference is as fast as CPU for the amber99 OBC systems (ad2, al4) but CPU is 3-7x faster "
             "for the amber14 implicit/obc1 ones (al3, al6, chignolin), whose CustomGBForce Reference computes slowly")


def target_from_args(args: argparse.Namespace):
    """The BoltzmannTarget that the system arguments describe."""
    from openmm_sbg import systems

    if (args.system is None) == (args.pdb is None):
        raise ValueError("give either a built-in SYSTEM name or --pdb FILE (with --forcefield)")
    if args.system is not None:
        kwargs = {"platform": args.platform}
        if args.temperature is not None:
            kwargs["temperature"] = args.temperature * unit.kelvin
        return systems.get(args.system, **kwargs)
    method = app.NoCutoff if args.cutoff is None else app.CutoffNonPeriodic
    cutoff = None if args.cutoff is None else args.cutoff * unit.nanometer
    temperature = 300.0 if args.temperature is None else args.temperature
    return systems.from_pdb(
        args.pdb, args.forcefield, temperature * unit.kelvin, nonbonded_method=method,
        nonbonded_cutoff=cutoff, platform=args.platform,
    )
