"""FlowIndependenceMove: an openmmtools MCMC move that proposes whole configurations from the flow.

The move is a Metropolis-Hastings independence sampler: ``x' ~ q`` is accepted with
probability ``min(1, w(x') / w(x))``, ``w = pi / q``, ``pi`` the thermodynamic state's
Boltzmann density. It uses exact flow likelihoods, so it leaves ``pi`` invariant however
good or bad the flow is; a good flow makes it jump between basins in one step, which
Langevin dynamics and replica exchange take long to do.

Centre of mass. The force field is translation invariant, so ``exp(-u(x))`` is improper
in the centre of mass ``c`` (the unweighted mean of the positions, as for the flow) and
``pi / q`` has no meaning on its own. The move therefore acts on the internal coordinates
``y = x - c`` only, with the same CoM density ``rho`` that :class:`~openmm_sbg.SMCSampler`
puts into its importance weights (``log w = -u(x) + log rho(c) - log q(x)``,
:func:`~openmm_sbg.smc.proposal.com_log_density`):

1. move the current configuration to a fresh CoM ``c~ ~ rho`` (an exact Gibbs update of
   the proper density ``exp(-u(y)) rho(c)``, whose ``y``-marginal is Boltzmann);
2. run ``n_attempts`` independence MH steps on ``exp(-u) rho`` with proposals from ``q``;
3. translate the result back to the original CoM.

Steps 1-2 leave the Boltzmann distribution of ``y`` invariant whatever the input CoM, and
step 3 means the move never changes the CoM, so it composes exactly with any other move
(Langevin dynamics lets the CoM diffuse freely) and the flow is only ever evaluated near the
CoMs it was trained on. The default ``rho`` is the package's one,
:data:`~openmm_sbg.smc.proposal.DEFAULT_COM_ADJUSTMENT` (``"auto"``, as in
:class:`~openmm_sbg.SMCSampler`, so the move and the sampler weight the same density):
``"gaussian"``, ``N(0, com_std^2 I)``, the CoM distribution the flow was trained with, for a
flow with an analytic Gaussian centre (internal coordinates), where ``w`` then does not
depend on ``c`` at all; ``"chi3"`` (the paper's) for other flows. Both are exact; the
Gaussian one accepts more often.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from openmm import unit
from openmmtools import cache, mcmc, states

from openmm_sbg.flow import TarFlow
from openmm_sbg.openmm.flow_force import load_shared, resolve_flow
from openmm_sbg.smc.proposal import (
    DEFAULT_COM_ADJUSTMENT,
    com_log_density,
    module_dtype_device,
    resolve_com_adjustment,
)

MOVE_COM_ADJUSTMENTS = ("gaussian", "chi3")


def sample_com(kind: str, com_std: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """One CoM ``c [3]`` (nm) drawn from ``rho`` of :func:`~openmm_sbg.smc.proposal.com_log_density`.

    ``"gaussian"``: ``N(0, com_std^2 I)``. ``"chi3"``: density ``prop. to |c|^2 N(c; 0, com_std^2 I)``,
    whose radius is ``com_std`` times a chi variable with 5 degrees of freedom. Without
    ``rng`` it uses numpy's global generator, as openmmtools moves do (``np.random.seed``).
    """
    rng = np.random if rng is None else rng
    if kind == "gaussian":
        return rng.normal(0.0, com_std, 3)
    if kind == "chi3":
        direction = rng.normal(size=3)
        return direction / np.linalg.norm(direction) * com_std * np.linalg.norm(rng.normal(size=5))
    raise ValueError(f"com_adjustment must be one of {MOVE_COM_ADJUSTMENTS}, got {kind!r}")


class FlowIndependenceMove(mcmc.MCMCMove):
    """Propose configurations from a flow; accept with the exact Metropolis-Hastings ratio.

    Works wherever openmmtools moves do: alone in an ``MCMCSampler``, in a ``SequenceMove``
    with ``LangevinDynamicsMove``, inside ``multistate`` samplers at any temperature (the
    acceptance uses each thermodynamic state's reduced potential). Velocities are kept:
    for an unconstrained System they are independent of the positions at equilibrium.

    Parameters
    ----------
    flow
        The flow's checkpoint path (needed to serialise the move, as openmmtools' storage
        does) or a :class:`~openmm_sbg.TarFlow` (snapshotted to a temporary checkpoint, see
        :func:`~openmm_sbg.openmm.flow_force.resolve_flow`).
    n_attempts
        Independence MH steps per :meth:`apply`; their proposals are drawn in one batch.
    com_adjustment
        CoM density ``rho``: ``"auto"`` (default, the sampler's: ``"gaussian"`` for a flow
        with an analytic Gaussian centre, ``"chi3"`` otherwise), ``"chi3"`` or
        ``"gaussian"`` (higher acceptance); see the module docstring.

    Attributes
    ----------
    n_accepted, n_proposed
        Acceptance counts since creation (or the last :meth:`reset_statistics`).
    """

    def __init__(
        self, flow: TarFlow | str | os.PathLike, n_attempts: int = 1, com_adjustment: str = DEFAULT_COM_ADJUSTMENT
    ):
        super().__init__()
        if n_attempts < 1:
            raise ValueError(f"n_attempts must be at least 1, got {n_attempts}")
        if com_adjustment != "auto" and com_adjustment not in MOVE_COM_ADJUSTMENTS:
            raise ValueError(
                f"com_adjustment must be 'auto' or one of {MOVE_COM_ADJUSTMENTS} (the move needs a proper CoM density), "
                f"got {com_adjustment!r}"
            )
        self.flow, self.checkpoint_path = resolve_flow(flow)
        self.n_attempts = n_attempts
        self.com_adjustment = resolve_com_adjustment(com_adjustment, self.flow)
        self.n_accepted = 0
        self.n_proposed = 0

    # ------------------------------------------------------------------ statistics
    @property
    def statistics(self) -> dict:
        """Acceptance counts, as openmmtools moves report them."""
        return {"n_accepted": self.n_accepted, "n_proposed": self.n_proposed}

    @statistics.setter
    def statistics(self, value: dict) -> None:
        self.n_accepted = value["n_accepted"]
        self.n_proposed = value["n_proposed"]

    @property
    def fraction_accepted(self) -> float:
        """Accepted fraction of the proposals so far (NaN before the first)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else float("nan")

    def reset_statistics(self) -> None:
        """Set the acceptance counts to zero."""
        self.n_accepted = self.n_proposed = 0

    # ------------------------------------------------------------------ the move
    def _log_weights(self, x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """``log rho(c) - log q`` of configurations ``[B, N, 3]`` (the reduced potential is added later)."""
        return com_log_density(x, self.flow.com_std, self.com_adjustment) - log_q

    def apply(
        self,
        thermodynamic_state: states.ThermodynamicState,
        sampler_state: states.SamplerState,
        context_cache: cache.ContextCache | None = None,
    ) -> None:
        """Apply ``n_attempts`` independence MH steps to ``sampler_state`` (modified in place)."""
        context, _ = self._get_context_cache(context_cache).get_context(thermodynamic_state)
        sampler_state.apply_to_context(context, ignore_velocities=True)
        reduced_potential = thermodynamic_state.reduced_potential(context)

        positions = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        com = positions.mean(axis=0)
        # Step 1: the current configuration at a fresh CoM drawn from rho.
        current = torch.as_tensor(positions - com + sample_com(self.com_adjustment, self.flow.com_std))[None]
        with torch.no_grad():
            log_q_current = -self.flow.energy(current.to(module_dtype_device(self.flow)[0])).double()
            proposals, log_q = self.flow.sample(self.n_attempts)
        proposals, log_q = proposals.double(), log_q.double()
        log_w = float(self._log_weights(current, log_q_current)[0]) - reduced_potential
        log_w_proposals = self._log_weights(proposals, log_q).numpy()

        # Step 2: sequential independence MH over the pre-drawn proposals (they do not depend
        # on the chain's state, so drawing them together is exact).
        accepted = None
        for k in range(self.n_attempts):
            context.setPositions(proposals[k].numpy())
            u = thermodynamic_state.reduced_potential(context)
            log_w_new = log_w_proposals[k] - u
            if np.isfinite(log_w_new) and math.log(np.random.random()) < log_w_new - log_w:
                accepted, log_w = k, log_w_new
                self.n_accepted += 1
            self.n_proposed += 1

        # Step 3: back to the original CoM, so that the move never moves the CoM.
        if accepted is not None:
            new = proposals[accepted].numpy()
            sampler_state.positions = (new - new.mean(axis=0) + com) * unit.nanometer
        sampler_state.apply_to_context(context, ignore_velocities=True)
        sampler_state.update_from_context(context, ignore_velocities=True)

    # ------------------------------------------------------------------ serialisation
    def __getstate__(self) -> dict:
        # What openmmtools' utils.serialize stores (YAML in multistate NetCDF files).
        return {
            "checkpoint_path": self.checkpoint_path,
            "n_attempts": self.n_attempts,
            "com_adjustment": self.com_adjustment,
            **self.statistics,
        }

    def __setstate__(self, serialization: dict) -> None:
        self.flow = load_shared(serialization["checkpoint_path"])
        self.checkpoint_path = serialization["checkpoint_path"]
        self.n_attempts = serialization["n_attempts"]
        self.com_adjustment = serialization["com_adjustment"]
        self.statistics = serialization

    def __str__(self) -> str:
        return (
            f"FlowIndependenceMove({self.checkpoint_path!r}, n_attempts={self.n_attempts}, "
            f"com_adjustment={self.com_adjustment!r}, accepted {self.n_accepted}/{self.n_proposed})"
        )
