"""Subcommands of the ``openmm-sbg`` command line (see :mod:`openmm_sbg.cli`)."""
