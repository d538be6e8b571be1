"""TarFlow proposal: exact-likelihood normalizing flow, its training and checkpoints.

>>> from openmm_sbg.flow import TarFlow
>>> flow = TarFlow.load("flow.pt", target=target)
>>> x, log_q = flow.sample(1024)
"""

from openmm_sbg.flow.model import TarFlow
from openmm_sbg.flow.presets import FlowConfig, get_preset, preset_names
from openmm_sbg.flow.training import TrainOptions, train

__all__ = ["FlowConfig", "TarFlow", "TrainOptions", "get_preset", "preset_names", "train"]
