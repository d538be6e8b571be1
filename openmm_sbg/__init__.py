"""openmm-sbg: Sequential Boltzmann Generators for OpenMM.

Public names are imported lazily so that ``import openmm_sbg`` stays fast and a command
that needs only OpenMM does not pay for torch model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use
    from openmm_sbg import data, metrics, populations, shipped, systems
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.pipeline import PipelineConfig, run_pipeline
    from openmm_sbg.smc import SMCResult, SMCSampler
    from openmm_sbg.target import BoltzmannTarget

__version__ = "0.1.0"

_LAZY = {
    "BoltzmannTarget": ("openmm_sbg.target", "BoltzmannTarget"),
    "TarFlow": ("openmm_sbg.flow", "TarFlow"),
    "SMCSampler": ("openmm_sbg.smc", "SMCSampler"),
    "SMCResult": ("openmm_sbg.smc", "SMCResult"),
    "PipelineConfig": ("openmm_sbg.pipeline", "PipelineConfig"),
    "run_pipeline": ("openmm_sbg.pipeline", "run_pipeline"),
    "systems": ("openmm_sbg.systems", None),
    "populations": ("openmm_sbg.populations", None),
    "metrics": ("openmm_sbg.metrics", None),
    "data": ("openmm_sbg.data", None),
    "shipped": ("openmm_sbg.shipped", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'openmm_sbg' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
