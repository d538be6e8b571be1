"""The ``openmm-sbg`` command.

Each subcommand lives in ``openmm_sbg/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> dict``; the dict is the run's JSON summary,
printed and, with ``--summary PATH``, written to a file. A resumable subcommand also defines
``progress_path(args) -> str``, named in the one-line message that Ctrl-C prints. Modules are imported only when
their subcommand runs, so ``openmm-sbg --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys

from openmm_sbg import __version__
from openmm_sbg.io import atomic_write_text

SUBCOMMANDS = ["md", "train", "sample", "evaluate", "run", "demo"]


def _load(name: str):
    return importlib.import_module(f"openmm_sbg.commands.{name}")


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmm-sbg",
        description="Sequential Boltzmann Generators for OpenMM: MD data, TarFlow training, SMC sampling.",
    )
    parser.add_argument("--version", action="version", version=f"openmm-sbg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in names or SUBCOMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as err:
            if err.name != f"openmm_sbg.commands.{name}":
                raise
            continue  # a subcommand whose module is not part of this build
        command = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=getattr(module, "EPILOG", None),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.add_argument("--summary", metavar="PATH", help="also write the JSON summary to PATH")
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the requested subcommand's parser when one is named: its imports may be heavy.
    chosen = [argv[0]] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(chosen).parse_args(argv)
    try:
        summary = args._module.run(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # Errors raised by openmm-sbg name their fix; a traceback would bury it.
        print(f"openmm-sbg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved_in = getattr(args._module, "progress_path", None)
        if saved_in is None:
            print(f"openmm-sbg {args.command}: interrupted", file=sys.stderr)
        else:
            print(
                f"openmm-sbg {args.command}: interrupted; its last checkpoint is in {saved_in(args)}. "
                f"Run the same command to resume: openmm-sbg {shlex.join(argv)}",
                file=sys.stderr,
            )
        return 130
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.summary:
        atomic_write_text(args.summary, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
