"""Resampling: draw particle indices in proportion to their weights.

Each scheme maps ``(log_weights [K], n, generator) -> indices [n]`` and is unbiased: the
expected number of copies of particle ``i`` is ``n W_i``. Systematic resampling has lower
variance than multinomial and is the default. :class:`ResamplingPolicy` decides when a run
resamples and applies the scheme to the run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from openmm_sbg.smc.named import resolve
from openmm_sbg.smc.run_state import SMCRun
from openmm_sbg.smc.weights import log_mean_weight

Resampler = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _probabilities(log_weights: torch.Tensor) -> torch.Tensor:
    log_weights = log_weights.to(torch.float64)
    if not torch.isfinite(log_weights).any():
        raise RuntimeError(
            "every particle has zero weight (non-finite energies or all filtered out); "
            "check the flow and target match, raise the energy cutoff, or use more particles"
        )
    log_weights = torch.where(torch.isnan(log_weights), torch.full_like(log_weights, -torch.inf), log_weights)
    return torch.softmax(log_weights, 0)


def multinomial(log_weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` independent draws from the categorical distribution of the weights."""
    return torch.multinomial(_probabilities(log_weights), n, replacement=True, generator=generator)


def systematic(log_weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling: one uniform offset, ``n`` evenly spaced points on the CDF."""
    probabilities = _probabilities(log_weights)
    cdf = torch.cumsum(probabilities, 0)
    cdf[-1] = 1.0  # rounding must not leave the last points beyond the end of the CDF
    points = (torch.rand((), dtype=torch.float64, generator=generator) + torch.arange(n, dtype=torch.float64)) / n
    indices = torch.searchsorted(cdf, points, right=True)
    return indices.clamp_(max=len(probabilities) - 1)


RESAMPLERS: dict[str, Resampler] = {"systematic": systematic, "multinomial": multinomial}


def get_resampler(resampling: str | Resampler) -> Resampler:
    """A resampling function from its name (``"systematic"``, ``"multinomial"``) or itself."""
    return resolve(resampling, RESAMPLERS, "resampling")

@dataclasses.dataclass(frozen=True)
class ResamplingPolicy:
    """When an SMC run resamples, and how: the strategy :class:`~openmm_sbg.smc.step.SMCStep` asks.

    Parameters
    ----------
    resampler
        The scheme that draws the indices (:func:`systematic`, :func:`multinomial` or a function).
    n_particles
        Particles after a resampling.
    threshold
        Before ``t = 1``, resample when the normalised ESS is below this (0: never).
    at_end
        Resample at ``t = 1``, so the output particles are equally weighted.
    """

    resampler: Resampler
    n_particles: int
    threshold: float
    at_end: bool

    def wants(self, ess: float, final: bool) -> bool:
        """Whether weights of normalised ESS ``ess`` are resampled (``final``: at ``t = 1``)."""
        return self.at_end if final else ess < self.threshold

    def resample(self, run: SMCRun, generator: torch.Generator) -> SMCRun:
        """``run`` with its particles drawn in proportion to their weights, equally weighted after.

        The epoch's mean weight moves into ``log_z_offset``; ``run`` itself is unchanged.
        """
        index = self.resampler(run.log_w, self.n_particles, generator)
        return dataclasses.replace(
            run,
            state=run.state.select(index),
            log_w=torch.zeros(self.n_particles, dtype=torch.float64),
            n_norm=self.n_particles,
            log_z_offset=run.log_z_offset + log_mean_weight(run.log_w, run.n_norm),
        )
