"""An SMC kernel that moves each particle with an openmmtools MCMCMove on the annealed System.

``SMCSampler(target, flow, ..., kernel=OpenMMMoveKernel(target, flow))`` runs the same SMC
(proposals, filters, Jarzynski weights, schedule, resampling, outputs) as the batched path,
but every particle's move at ``t`` is an openmmtools move -- ``LangevinDynamicsMove`` by
default, or ``GHMCMove``, a ``SequenceMove``, ... -- under the
:func:`~openmm_sbg.openmm.create_annealed_state` thermodynamic state at
``lambda_sbg = t``, on any OpenMM platform, through openmmtools' context cache (one Context
serves every ``t``).

Trade-offs against the batched kernels (:mod:`openmm_sbg.smc.kernels`): particles move one
at a time and the flow is evaluated once per integration step and particle through
``openmm.PythonForce``, so it is much slower per particle on a CPU; it gains OpenMM's
integrators (masses, thermostat) and any move openmmtools has. The driver's ``step_size``,
``noise`` and ``uniform`` are not used: the move draws its own random numbers inside
OpenMM, so runs are statistically, not bitwise, reproducible from the seed.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from openmm import unit
from openmmtools import cache, mcmc, states

from openmm_sbg.energy.openmm_backend import platform_by_name
from openmm_sbg.flow import TarFlow
from openmm_sbg.openmm.annealed import create_annealed_state
from openmm_sbg.smc.kernels import KernelInfo, PathState, Potential
from openmm_sbg.openmm.flow_force import resolve_flow
from openmm_sbg.smc.proposal import DEFAULT_COM_ADJUSTMENT, resolve_com_adjustment


def default_move() -> mcmc.LangevinDynamicsMove:
    """10 steps of 1 fs Langevin dynamics (10/ps friction), velocities drawn afresh each time.

    SMC particles carry no velocities, so each move starts from the Maxwell-Boltzmann
    distribution; without constraints 1 fs keeps the X-H bonds stable.
    """
    return mcmc.LangevinDynamicsMove(
        timestep=1.0 * unit.femtosecond,
        collision_rate=10.0 / unit.picosecond,
        n_steps=10,
        reassign_velocities=True,
    )


class OpenMMMoveKernel:
    """SMC kernel (``smc.kernels`` protocol) applying an openmmtools move to each particle.

    Parameters
    ----------
    target
        The :class:`~openmm_sbg.BoltzmannTarget` (the same one given to the sampler).
    flow
        The flow (or its checkpoint path) given to the sampler.
    move
        The openmmtools ``MCMCMove`` applied to every particle at each annealing step;
        :func:`default_move` if ``None``. Moves reporting ``n_accepted``/``n_proposed``
        (GHMC, Metropolized moves) feed the sampler's acceptance diagnostics.
    com_adjustment
        Must equal the sampler's ``com_adjustment`` (default ``"auto"`` for both, which
        resolves the same way for the same flow), so that the annealed System's energy is
        the sampler's ``E_t``; checked on the first call.
    platform
        OpenMM platform name (``"CUDA"``, ``"CPU"``, ``"Reference"``); ``None``: the fastest.

    Examples
    --------
    >>> kernel = OpenMMMoveKernel(target, "flow.pt", platform="CUDA")          # doctest: +SKIP
    >>> sampler = SMCSampler(target, TarFlow.load("flow.pt"), 1000, 100, kernel=kernel,
    ...                      adapt_step_size=False)                             # doctest: +SKIP
    """

    def __init__(
        self,
        target,
        flow: TarFlow | str | os.PathLike,
        move: mcmc.MCMCMove | None = None,
        com_adjustment: str = DEFAULT_COM_ADJUSTMENT,
        platform: str | None = None,
    ):
        self.thermodynamic_state = create_annealed_state(target, flow, 0.0, com_adjustment)
        self.move = default_move() if move is None else move
        self.platform = platform
        self.context_cache = cache.ContextCache(platform=platform_by_name(platform))
        self.com_adjustment = resolve_com_adjustment(com_adjustment, resolve_flow(flow)[0])
        self._checked = False

    def __call__(
        self,
        state: PathState,
        t: float,
        potential: Potential,
        step_size: float,
        noise: torch.Tensor,
        uniform: torch.Tensor,
    ) -> tuple[PathState, KernelInfo]:
        """Move every particle of ``state`` with the openmmtools move at ``lambda_sbg = t``."""
        self.thermodynamic_state.lambda_sbg = t
        if not self._checked and len(state.x):
            self._check_energy(state, t)
        x = state.x.numpy()
        moved = np.empty_like(x)
        acceptance = np.ones(len(x))
        counts = self._counts()
        for i, positions in enumerate(x):
            sampler_state = states.SamplerState(positions * unit.nanometer)
            try:
                self.move.apply(self.thermodynamic_state, sampler_state, self.context_cache)
            except mcmc.IntegratorMoveError as err:
                # The integrator blew up even after restarts: the particle gets non-finite
                # energies, which the driver turns into zero weight.
                warnings.warn(f"particle {i} at t={t:.4g}: {err}; dropping it")
                moved[i] = np.nan
                continue
            moved[i] = sampler_state.positions.value_in_unit(unit.nanometer)
            new_counts = self._counts()
            if counts is not None and new_counts[1] > counts[1]:
                acceptance[i] = (new_counts[0] - counts[0]) / (new_counts[1] - counts[1])
            counts = new_counts
        return potential(torch.as_tensor(moved)), KernelInfo(acceptance=torch.as_tensor(acceptance))

    def _counts(self) -> tuple[int, int] | None:
        statistics = getattr(self.move, "statistics", None)
        if isinstance(statistics, dict) and {"n_accepted", "n_proposed"} <= statistics.keys():
            return statistics["n_accepted"], statistics["n_proposed"]
        return None

    def _check_energy(self, state: PathState, t: float) -> None:
        """The annealed System must reproduce the sampler's ``E_t``; a mismatch means another flow,
        target or CoM adjustment, and the moves would sample the wrong distribution."""
        expected = float(state.energy(t)[0])
        if not math.isfinite(expected):
            return
        context, _ = self.context_cache.get_context(self.thermodynamic_state)
        context.setPositions(state.x[0].numpy())
        actual = self.thermodynamic_state.reduced_potential(context)
        if not abs(actual - expected) <= 1e-2 + 1e-4 * abs(expected):
            raise ValueError(
                f"the annealed System's energy at t={t:.4g} is {actual:.6g} kT but the sampler's E_t is "
                f"{expected:.6g} kT; build OpenMMMoveKernel with the sampler's target, flow and "
                f"com_adjustment (kernel has {self.com_adjustment!r})"
            )
        self._checked = True

    def __repr__(self) -> str:
        # The SMC driver keys its checkpoints by this text: no addresses, no running counts.
        settings = {k: v for k, v in self.move.__getstate__().items() if k not in ("n_accepted", "n_proposed")}
        return (
            f"OpenMMMoveKernel(move={type(self.move).__name__}{settings}, "
            f"com_adjustment={self.com_adjustment!r}, platform={self.platform!r})"
        )
