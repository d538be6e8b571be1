"""Langevin kernels that move particles along the annealing path ``E_t = (1-t) E_S + t E_T``.

Kernels are pure functions in the style of blackjax: ``kernel(state, t, potential,
step_size, noise, uniform) -> (state, info)``. The random numbers come in as arguments
(``noise`` standard normal like ``state.x``, ``uniform`` in (0, 1) one per particle), so the
driver can draw them once for all particles and results do not depend on how particles are
split into batches. ``potential(x) -> PathState`` evaluates both energies and gradients.

Units: energies in kT and positions in nm, so the step size ``h`` is in nm^2; the
displacement per step is about ``sqrt(2 h)`` nm per coordinate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import torch

from openmm_sbg.smc.named import resolve


@dataclasses.dataclass
class PathState:
    """Particles with their source and target energies (kT) and gradients (kT/nm).

    Everything has a leading particle dimension ``B``: ``x [B, N, 3]`` in nm, energies
    ``[B]``, gradients ``[B, N, 3]``. Keeping both ends of the path lets the same evaluation
    serve the weight update (``E_T - E_S``) and the move at any ``t``.
    """

    x: torch.Tensor
    e_source: torch.Tensor
    e_target: torch.Tensor
    grad_source: torch.Tensor
    grad_target: torch.Tensor

    def energy(self, t: float) -> torch.Tensor:
        """``E_t = (1 - t) E_S + t E_T`` per particle."""
        return _interpolate(self.e_source, self.e_target, t)

    def grad(self, t: float) -> torch.Tensor:
        """Gradient of ``E_t`` with respect to ``x``."""
        return _interpolate(self.grad_source, self.grad_target, t)

    def select(self, index: torch.Tensor | slice) -> PathState:
        """The particles at ``index`` (a slice, a boolean mask or integer indices)."""
        if isinstance(index, slice):
            return PathState(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))
        index = _as_indices(index)
        return PathState(*(getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)))

    def assign(self, index: torch.Tensor, other: PathState) -> None:
        """Overwrite the particles at ``index`` (boolean mask or integer indices) with ``other``, in place."""
        index = _as_indices(index)
        for field in dataclasses.fields(self):
            getattr(self, field.name).index_copy_(0, index, getattr(other, field.name))

    @staticmethod
    def where(mask: torch.Tensor, chosen: PathState, other: PathState) -> PathState:
        """Per particle, ``chosen`` where ``mask`` is true, else ``other`` (new tensors)."""
        fields = []
        for field in dataclasses.fields(PathState):
            a, b = getattr(chosen, field.name), getattr(other, field.name)
            fields.append(torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b))
        return PathState(*fields)

    @staticmethod
    def cat(states: list[PathState]) -> PathState:
        """Join batches of particles."""
        return PathState(*(torch.cat([getattr(s, f.name) for s in states]) for f in dataclasses.fields(PathState)))


def _as_indices(index: torch.Tensor) -> torch.Tensor:
    # Boolean-mask indexing is orders of magnitude slower than index_select on CPU torch.
    return index.nonzero().squeeze(1) if index.dtype == torch.bool else index


def _interpolate(source: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    # At the ends use one side only, so that an infinite energy at the other end (weight
    # zero anyway) cannot turn into inf * 0 = NaN.
    if t == 0.0:
        return source
    if t == 1.0:
        return target
    return (1.0 - t) * source + t * target


class KernelInfo(NamedTuple):
    """Per-particle outcome of one kernel step."""

    #: Metropolis acceptance probability (1 for unadjusted Langevin).
    acceptance: torch.Tensor


Potential = Callable[[torch.Tensor], PathState]
Kernel = Callable[[PathState, float, Potential, float, torch.Tensor, torch.Tensor], tuple[PathState, KernelInfo]]


def _langevin_proposal(state: PathState, t: float, step_size: float, noise: torch.Tensor) -> torch.Tensor:
    return state.x - step_size * state.grad(t) + math.sqrt(2.0 * step_size) * noise


def ula_step(
    state: PathState, t: float, potential: Potential, step_size: float, noise: torch.Tensor, uniform: torch.Tensor
) -> tuple[PathState, KernelInfo]:
    """Unadjusted Langevin: ``x <- x - h grad E_t(x) + sqrt(2h) xi`` (the paper's move).

    Cheap and never rejects, but leaves ``exp(-E_t)`` invariant only up to an O(h) error,
    which biases the Jarzynski weights; keep ``h`` well below the stability limit
    (about ``2 / (largest Hessian eigenvalue of E_T)``, ~1e-5 nm^2 for stiff bonds in kT).
    ``uniform`` is unused.
    """
    new_state = potential(_langevin_proposal(state, t, step_size, noise))
    return new_state, KernelInfo(acceptance=torch.ones_like(state.e_source))


def mala_step(
    state: PathState, t: float, potential: Potential, step_size: float, noise: torch.Tensor, uniform: torch.Tensor
) -> tuple[PathState, KernelInfo]:
    """Metropolis-adjusted Langevin: the Langevin proposal, accepted with the MH probability.

    Leaves ``exp(-E_t)`` exactly invariant, so the SMC weights are unbiased for any step
    size; proposals with non-finite energy are rejected.
    """
    proposal = potential(_langevin_proposal(state, t, step_size, noise))
    energy, proposal_energy = state.energy(t), proposal.energy(t)
    forward = proposal.x - state.x + step_size * state.grad(t)
    backward = state.x - proposal.x + step_size * proposal.grad(t)
    log_ratio = (
        energy
        - proposal_energy
        + (forward.square().flatten(1).sum(1) - backward.square().flatten(1).sum(1)) / (4.0 * step_size)
    )
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
    acceptance = torch.exp(log_ratio.clamp(max=0.0))
    return PathState.where(uniform < acceptance, proposal, state), KernelInfo(acceptance=acceptance)


def adapt_step_size(step_size: float, acceptance: float, target: float = 0.574, rate: float = 1.0) -> float:
    """Next MALA step size from the mean acceptance of the last step.

    ``log h <- log h + rate (acceptance - target)``: grow when accepting more than the
    target (0.574 is optimal for MALA in high dimension), shrink otherwise. Adapting from
    the population between SMC steps keeps every individual move exact.
    """
    return step_size * math.exp(rate * (acceptance - target))


KERNELS: dict[str, Kernel] = {"ula": ula_step, "mala": mala_step}


def get_kernel(kernel: str | Kernel) -> Kernel:
    """A kernel from its name (``"ula"``, ``"mala"``) or itself."""
    return resolve(kernel, KERNELS, "kernel")
