"""Annealing schedules: the sequence of times ``0 = t_0 < t_1 < ... < t_L = 1``.

A schedule answers ``next_time(step, t, log_weights, e_source, e_target)``: the time after
``t`` given the current particles. Both schedules here end at ``t = 1`` exactly (the
paper's code stops at 0.99, leaving its samples short of the target).
"""

from __future__ import annotations

import warnings
from typing import Protocol, Sequence

import torch

from openmm_sbg.smc.weights import conditional_ess, jarzynski_increment, largest_exponent_keeping_ess


class Schedule(Protocol):
    """What :class:`~openmm_sbg.smc.SMCSampler` needs from a schedule."""

    #: Upper bound on the number of annealing steps (for progress bars and checks).
    max_steps: int

    def next_time(
        self, step: int, t: float, log_weights: torch.Tensor, e_source: torch.Tensor, e_target: torch.Tensor
    ) -> float:
        """The time of annealing step ``step + 1``, given the particles at time ``t``."""


class FixedSchedule:
    """A schedule given in advance as the list of times, from 0 to 1 inclusive.

    Parameters
    ----------
    times
        Increasing times starting at 0 and ending at 1.
    """

    def __init__(self, times: Sequence[float]):
        times = [float(t) for t in times]
        if len(times) < 2 or times[0] != 0.0 or times[-1] != 1.0:
            raise ValueError(f"schedule times must start at 0 and end at 1, got {times[:3]}...{times[-3:]}")
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError("schedule times must be strictly increasing")
        self.times = times
        self.max_steps = len(times) - 1

    def next_time(self, step, t, log_weights, e_source, e_target) -> float:
        return self.times[step + 1]

    def __repr__(self) -> str:
        return f"FixedSchedule({self.max_steps} steps)"


def linear_schedule(n_steps: int) -> FixedSchedule:
    """The paper's schedule: ``n_steps`` equal steps, ``t_k = k / n_steps``, ending at 1 exactly."""
    if n_steps < 1:
        raise ValueError(f"a linear schedule needs n_steps >= 1, got {n_steps}; use n_steps=0 for importance sampling")
    return FixedSchedule([k / n_steps for k in range(n_steps + 1)])


class AdaptiveSchedule:
    """Choose each next time so that the conditional ESS of the step equals ``target_cess``.

    The step from ``t`` to ``t'`` multiplies the weights by ``exp(-(t' - t)(E_T - E_S))``;
    the conditional ESS of those increments decreases with ``t'``, so bisection finds the
    largest ``t'`` that keeps it at the target. Hard regions get small steps, easy ones
    large steps, without tuning ``n_steps`` per system.

    Parameters
    ----------
    target_cess
        Conditional ESS to keep per step, in (0, 1); closer to 1 gives more, smaller steps.
    max_steps
        At most this many steps: the last one goes to t = 1 (with a warning if its
        conditional ESS is below the target).
    min_step
        Smallest step in ``t``; guards against stalling when energies are extreme.
    tolerance
        Bisection tolerance on ``t``.
    """

    def __init__(self, target_cess: float = 0.99, max_steps: int = 1000, min_step: float = 1e-6, tolerance: float = 1e-7):
        if not 0 < target_cess < 1:
            raise ValueError(f"target_cess must be in (0, 1), got {target_cess}")
        self.target_cess = target_cess
        self.max_steps = max_steps
        self.min_step = min_step
        self.tolerance = tolerance

    def next_time(self, step, t, log_weights, e_source, e_target) -> float:
        def cess_at(t_next: float) -> float:
            return conditional_ess(log_weights, jarzynski_increment(e_source, e_target, t, t_next))

        if step >= self.max_steps - 1:
            # The last allowed step goes to t = 1 whatever its conditional ESS: the weights stay
            # exact (the increment is the usual one), only their variance grows. Raising here
            # would throw away the whole run.
            if t < 1.0 and cess_at(1.0) < self.target_cess:
                warnings.warn(
                    f"the adaptive schedule reached its {self.max_steps}-step limit at t = {t:.4f}; the last step "
                    f"goes to t = 1 with conditional ESS {cess_at(1.0):.3f}. Raise n_steps or lower target_cess.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return 1.0

        t_next = largest_exponent_keeping_ess(cess_at, self.target_cess, t, 1.0, self.tolerance)
        return min(1.0, max(t_next, t + self.min_step))

    def __repr__(self) -> str:
        return f"AdaptiveSchedule(target_cess={self.target_cess})"


def get_schedule(schedule: str | Schedule, n_steps: int, target_cess: float = 0.99) -> Schedule | None:
    """A schedule from its name (``"linear"``, ``"adaptive"``) or itself; ``None`` for IS.

    ``n_steps = 0`` means plain importance sampling whatever the name; for the adaptive
    schedule ``n_steps`` is the most steps it may take.
    """
    if not isinstance(schedule, str):
        return schedule
    if n_steps == 0:
        return None
    if schedule == "linear":
        return linear_schedule(n_steps)
    if schedule == "adaptive":
        return AdaptiveSchedule(target_cess=target_cess, max_steps=n_steps)
    raise ValueError(f"schedule must be 'linear', 'adaptive' or a Schedule object, got {schedule!r}")


__all__ = ["Schedule", "FixedSchedule", "AdaptiveSchedule", "linear_schedule", "get_schedule"]
