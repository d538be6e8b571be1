"""The SBG annealing path as one OpenMM System with a global parameter ``lambda_sbg``.

``create_annealed_system(target, flow)`` returns a System whose potential energy is

    E(x; lambda) = (1 - lambda) E_flow(x) + lambda (E_ff(x) + E_com(x))

in kJ/mol, with ``E_flow = -kT log q(x)`` (:func:`~openmm_sbg.openmm.create_flow_force`),
``E_ff`` the target's force field and ``E_com = -kT log rho(c)`` the centre-of-mass term
that :class:`~openmm_sbg.SMCSampler` puts on the target side of its path
(:mod:`openmm_sbg.smc.proposal`). Divided by ``kT`` this is exactly the sampler's
``E_t = (1 - t) E_S + t E_T`` at ``t = lambda``, so any OpenMM integrator or openmmtools
move run on it samples the sampler's intermediate distributions.

All terms are collective variables of one ``CustomCVForce``; :class:`AnnealingState` lets
openmmtools drive ``lambda_sbg`` through a ``CompoundThermodynamicState``.
"""

from __future__ import annotations

import copy
import math
import os

import openmm
from openmmtools import states

from openmm_sbg.flow import TarFlow
from openmm_sbg.openmm.flow_force import create_flow_force, resolve_flow
from openmm_sbg.smc.proposal import COM_ADJUSTMENTS, DEFAULT_COM_ADJUSTMENT, resolve_com_adjustment

#: Name of the global parameter that moves the System along the path.
LAMBDA = "lambda_sbg"


def com_restraint_force(n_atoms: int, com_std: float, kT: float, kind: str) -> openmm.CustomCentroidBondForce:
    """``E_com = -kT log rho(c)`` kJ/mol of the unweighted mean ``c`` of all positions (``kT`` in kJ/mol).

    The same function as :func:`openmm_sbg.smc.proposal.com_log_density` (constants
    included), built from OpenMM's centroid force so that it runs on every platform.
    """
    if kind not in ("chi3", "gaussian"):
        raise ValueError(f"kind must be 'chi3' or 'gaussian' (no force is needed for 'none'), got {kind!r}")
    if not com_std or com_std <= 0:
        raise ValueError(f"the CoM term needs the flow's CoM-noise std (flow.com_std > 0), got {com_std!r}")
    # -log N(c; 0, s^2 I) = 1.5 log(2 pi s^2) + r2 / (2 s^2); chi3 adds -log(4 pi r2).
    reduced = f"{1.5 * math.log(2 * math.pi * com_std**2)!r} + r2*{1 / (2 * com_std**2)!r}"
    if kind == "chi3":
        reduced += f" - {math.log(4 * math.pi)!r} - log(r2)"
    force = openmm.CustomCentroidBondForce(1, f"{kT!r}*({reduced}); r2 = x1^2 + y1^2 + z1^2")
    # Equal weights: the flow's CoM is the plain mean of the positions, not the mass-weighted one.
    force.addGroup(list(range(n_atoms)), [1.0] * n_atoms)
    force.addBond([0], [])
    return force


def create_annealed_system(
    target,
    flow: TarFlow | str | os.PathLike,
    com_adjustment: str = DEFAULT_COM_ADJUSTMENT,
    lambda_sbg: float = 1.0,
) -> openmm.System:
    """One System interpolating between the flow (``lambda_sbg = 0``) and the target (``1``).

    Parameters
    ----------
    target
        The :class:`~openmm_sbg.BoltzmannTarget` (its System, masses and temperature).
    flow
        The :class:`~openmm_sbg.TarFlow` proposal or the path of its checkpoint (a path
        keeps the serialised System small).
    com_adjustment
        The CoM term on the target side, as in :class:`~openmm_sbg.SMCSampler` (use the
        sampler's value): ``"auto"`` (the default of both: ``"gaussian"`` for a flow with an
        analytic Gaussian centre, ``"chi3"`` otherwise), ``"chi3"``, ``"gaussian"``, or
        ``"none"`` for the bare ``(1 - lambda) E_flow + lambda E_ff``.
    lambda_sbg
        Default value of the global parameter in new Contexts.

    Returns
    -------
    openmm.System
        Same particles and masses as ``target.system``; its only force is a
        ``CustomCVForce`` with collective variables ``flow``, ``ff0``, ``ff1``, ... (the
        target's forces) and, with a CoM adjustment, ``com``.
    """
    if com_adjustment != "auto" and com_adjustment not in COM_ADJUSTMENTS:
        raise ValueError(f"com_adjustment must be 'auto' or one of {COM_ADJUSTMENTS}, got {com_adjustment!r}")
    if not 0.0 <= lambda_sbg <= 1.0:
        raise ValueError(f"lambda_sbg must lie in [0, 1], got {lambda_sbg}")
    flow_model, flow_path = resolve_flow(flow)
    com_adjustment = resolve_com_adjustment(com_adjustment, flow_model)
    if flow_model.n_atoms != target.n_atoms:
        raise ValueError(f"the flow models {flow_model.n_atoms} atoms but the target has {target.n_atoms}")
    system = openmm.System()
    for i in range(target.system.getNumParticles()):
        system.addParticle(target.system.getParticleMass(i))

    target_terms = []
    cv_force = openmm.CustomCVForce("")  # the expression needs the CV names, set below
    cv_force.addCollectiveVariable("flow", create_flow_force(flow_path, target.temperature))
    for i, force in enumerate(target.system.getForces()):
        cv_force.addCollectiveVariable(f"ff{i}", copy.deepcopy(force))
        target_terms.append(f"ff{i}")
    if com_adjustment != "none":
        cv_force.addCollectiveVariable(
            "com", com_restraint_force(target.n_atoms, flow_model.com_std, target.kT_kj_per_mol, com_adjustment)
        )
        target_terms.append("com")
    cv_force.setEnergyFunction(f"(1 - {LAMBDA})*flow + {LAMBDA}*({' + '.join(target_terms)})")
    cv_force.addGlobalParameter(LAMBDA, lambda_sbg)
    system.addForce(cv_force)
    return system


class AnnealingState(states.GlobalParameterState):
    """openmmtools composable state controlling ``lambda_sbg`` of an annealed System.

    Examples
    --------
    >>> system = create_annealed_system(target, flow)                  # doctest: +SKIP
    >>> state = states.CompoundThermodynamicState(
    ...     states.ThermodynamicState(system, target.temperature),
    ...     [AnnealingState.from_system(system)])                      # doctest: +SKIP
    >>> state.lambda_sbg = 0.3                                          # doctest: +SKIP
    """

    lambda_sbg = states.GlobalParameterState.GlobalParameter(LAMBDA, standard_value=1.0)

    @lambda_sbg.validator
    def lambda_sbg(self, instance, new_value):
        if new_value is not None and not 0.0 <= new_value <= 1.0:
            raise ValueError(f"lambda_sbg must lie in [0, 1], got {new_value}")
        return new_value


def create_annealed_state(
    target,
    flow: TarFlow | str | os.PathLike,
    lambda_sbg: float = 0.0,
    com_adjustment: str = DEFAULT_COM_ADJUSTMENT,
) -> states.CompoundThermodynamicState:
    """A ``CompoundThermodynamicState`` of the annealed System at the target's temperature.

    Set ``state.lambda_sbg`` to move along the path; openmmtools' context cache reuses one
    Context for every ``lambda_sbg``.
    """
    system = create_annealed_system(target, flow, com_adjustment, lambda_sbg)
    thermodynamic_state = states.ThermodynamicState(system, target.temperature)
    return states.CompoundThermodynamicState(thermodynamic_state, [AnnealingState.from_system(system)])
