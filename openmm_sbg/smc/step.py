"""One SMC annealing step as a pure function of the run, in the style of blackjax's ``smc.base.step``.

:class:`SMCStep` maps ``(run, generator) -> (run, record)``: it reweights the particles to the
schedule's next ``t``, resamples them if its :class:`~openmm_sbg.smc.resampling.ResamplingPolicy`
says so, and moves them with the kernel at the new ``t``. The input :class:`SMCRun` is left as it
was (its tensors too); the step only draws from ``generator``, whose state after the step the new
run carries. :class:`~openmm_sbg.smc.SMCSampler` runs the loop around it.

Where the particles live is one hook, :data:`ParticleMover`: :func:`move_local` moves a
:class:`PathState` that holds them all; the sharded sampler's mover moves the rows its process
holds and gathers the rest (:mod:`openmm_sbg.distributed.sharded_smc`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from openmm_sbg.smc.kernels import Kernel, PathState, Potential, adapt_step_size
from openmm_sbg.smc.resampling import ResamplingPolicy
from openmm_sbg.smc.run_state import SMCRun, StepRecord
from openmm_sbg.smc.schedules import Schedule
from openmm_sbg.smc.weights import jarzynski_increment, log_mean_weight, normalised_ess

#: ``move(particles, which) -> (moved, acceptance)``: one kernel move of ``particles``, which are
#: the alive particles that ``which`` (a boolean mask or slice over the alive ones) picks; the
#: moved particles (``None`` if there were none) and their acceptances. It draws the random
#: numbers of every alive particle, so a mover calls it exactly once, in every process.
MoveRows = Callable[[PathState, "torch.Tensor | slice"], "tuple[PathState | None, torch.Tensor]"]

#: ``mover(state, alive, move) -> (state, acceptance)``: the run's state with the particles at
#: global indices ``alive`` moved by ``move`` (new objects; the input is unchanged), and the
#: acceptances of all ``alive`` particles in their order.
ParticleMover = Callable[[object, torch.Tensor, MoveRows], "tuple[object, torch.Tensor]"]


def with_rows(state: PathState, rows: torch.Tensor, moved: PathState) -> PathState:
    """A copy of ``state`` with the particles at ``rows`` (integer indices) replaced by ``moved``."""
    return PathState(
        *(getattr(state, field.name).index_copy(0, rows, getattr(moved, field.name)) for field in dataclasses.fields(PathState))
    )


def move_local(state: PathState, alive: torch.Tensor, move: MoveRows) -> tuple[PathState, torch.Tensor]:
    """The :data:`ParticleMover` of a state that holds every particle."""
    moved, acceptance = move(state.select(alive), slice(None))
    return (state if moved is None else with_rows(state, alive, moved)), acceptance


@dataclasses.dataclass(frozen=True)
class SMCStep:
    """One annealing step: reweight to the next ``t``, maybe resample, move at the new ``t``.

    Parameters
    ----------
    schedule
        Gives the next ``t`` (:mod:`openmm_sbg.smc.schedules`).
    kernel
        The Langevin move (:mod:`openmm_sbg.smc.kernels`).
    potential
        Path energies and gradients of positions ``[B, N, 3]``, as the kernel needs them.
    resampling
        When and how to resample.
    n_mcmc_steps
        Kernel moves per step.
    batch_size
        Particles per kernel call.
    target_acceptance
        Adapt the step size towards this mean acceptance after each step; ``None``: keep it.
    move_particles
        Where the particles are moved (:data:`ParticleMover`).
    """

    schedule: Schedule
    kernel: Kernel
    potential: Potential
    resampling: ResamplingPolicy
    n_mcmc_steps: int
    batch_size: int
    target_acceptance: float | None = None
    move_particles: ParticleMover = move_local

    def __call__(self, run: SMCRun, generator: torch.Generator) -> tuple[SMCRun, StepRecord]:
        """The run one step on, and what the step reports; ``run`` is unchanged."""
        state, t = run.state, run.t
        t_next = self.schedule.next_time(run.step, t, run.log_w, state.e_source, state.e_target)
        if not t < t_next <= 1.0:
            raise RuntimeError(f"the schedule went from t={t} to t={t_next}; times must increase up to 1")
        run = dataclasses.replace(run, log_w=run.log_w + jarzynski_increment(state.e_source, state.e_target, t, t_next))
        ess = normalised_ess(run.log_w)
        final = t_next == 1.0
        if final:
            run = run.with_final_weights()
        resampled = self.resampling.wants(ess, final)
        if resampled:
            run = self.resampling.resample(run, generator)

        step_size = run.step_size
        state, log_w, mean_acceptance, n_alive = self._move(run.state, run.log_w, t_next, step_size, generator)
        if self.target_acceptance is not None and n_alive:
            run = dataclasses.replace(run, step_size=adapt_step_size(step_size, mean_acceptance, self.target_acceptance))
        log_z = run.final_log_z if final else run.log_z_offset + log_mean_weight(log_w, run.n_norm)
        run = dataclasses.replace(run, state=state, log_w=log_w, t=t_next, step=run.step + 1, generator=generator.get_state())
        return run, StepRecord(t_next, ess, mean_acceptance, resampled, step_size, n_alive, log_z)

    def _move(self, state, log_w: torch.Tensor, t: float, step_size: float, generator: torch.Generator):
        """``n_mcmc_steps`` kernel moves at ``t`` of the particles with non-zero weight.

        Returns the new state and log-weights, the mean acceptance and the number of particles moved.
        """
        acceptance = []
        for _ in range(self.n_mcmc_steps):
            alive = torch.isfinite(log_w).nonzero().squeeze(1)  # zero weight: not worth moving

            def move(particles: PathState, which, n_alive=len(alive)):
                # Draw the random numbers of all alive particles at once so results depend
                # neither on batch_size nor on how the particles are split over processes.
                noise = torch.randn((n_alive, *particles.x.shape[1:]), dtype=torch.float64, generator=generator)
                uniform = torch.rand(n_alive, dtype=torch.float64, generator=generator)
                return self._apply_kernel(particles, t, step_size, noise[which], uniform[which])

            state, moved_acceptance = self.move_particles(state, alive, move)
            if len(moved_acceptance):
                acceptance.append(moved_acceptance)
            # A move onto a non-finite energy (possible with ULA) zeroes that particle's weight
            # at once, so no particle ever has a finite weight and a non-finite energy.
            finite = torch.isfinite(state.e_source) & torch.isfinite(state.e_target)
            log_w = torch.where(finite, log_w, torch.full_like(log_w, -math.inf))
        mean_acceptance = float(torch.cat(acceptance).mean()) if acceptance else float("nan")
        return state, log_w, mean_acceptance, len(alive)

    def _apply_kernel(
        self, moving: PathState, t: float, step_size: float, noise: torch.Tensor, uniform: torch.Tensor
    ) -> tuple[PathState | None, torch.Tensor]:
        """One kernel move of every particle in ``moving``, ``batch_size`` at a time.

        Returns the moved particles (``None`` if there were none) and their acceptances.
        """
        moved, acceptance = [], []
        for start in range(0, len(noise), self.batch_size):
            batch = slice(start, start + self.batch_size)
            new, info = self.kernel(moving.select(batch), t, self.potential, step_size, noise[batch], uniform[batch])
            moved.append(new)
            acceptance.append(info.acceptance)
        if not moved:
            return None, torch.empty(0, dtype=torch.float64)
        return PathState.cat(moved), torch.cat(acceptance)
