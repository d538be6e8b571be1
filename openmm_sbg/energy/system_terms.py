"""From an ``openmm.System`` to the torch force field's terms.

Every parameter is read from the System's forces (never from a force-field file), in
OpenMM's units. Supported forces: ``HarmonicBondForce``, ``HarmonicAngleForce``,
``PeriodicTorsionForce``, ``NonbondedForce`` (NoCutoff, or CutoffNonPeriodic with its
reaction field and optional switching function), ``GBSAOBCForce``, and the ``CustomGBForce``
that OpenMM's ``implicit/obc1.xml`` and ``implicit/obc2.xml`` create (recognised by
:mod:`openmm_sbg.energy.custom_gb`); anything else raises :class:`UnsupportedForceError`.
"""

from __future__ import annotations

import math

import numpy as np
import openmm
from openmm import unit

from openmm_sbg.energy.base import UnsupportedForceError
from openmm_sbg.energy.custom_gb import custom_gb_obc
from openmm_sbg.energy.terms import (
    OBC,
    ONE_4PI_EPS0,
    HarmonicAngles,
    HarmonicBonds,
    Nonbonded,
    PeriodicTorsions,
    Term,
)

#: OpenMM's dielectric offset of OBC radii (nm), used by GBSAOBCForce.
_OBC_DIELECTRIC_OFFSET = 0.009
_KJ_PER_MOL = unit.kilojoule_per_mole
#: Units of GBSAOBCForce's per-particle parameters: charge, radius, scaling factor.
_GBSA_PARTICLE_UNITS = (unit.elementary_charge, unit.nanometer, unit.dimensionless)
#: OBC2 (GBSAOBCForce) Born-radius coefficients alpha, beta, gamma.
_OBC2_COEFFICIENTS = (1.0, 0.8, 4.85)


def _value(quantity, unit_) -> float:
    """Strip an ``openmm.unit`` quantity to a float in ``unit_`` (bare numbers pass through)."""
    return quantity.value_in_unit(unit_) if unit.is_quantity(quantity) else float(quantity)


def _harmonic_bonds(force: openmm.HarmonicBondForce) -> HarmonicBonds:
    bonds = [force.getBondParameters(b) for b in range(force.getNumBonds())]
    return HarmonicBonds(
        [b[:2] for b in bonds],
        [(_value(r0, unit.nanometer), _value(k, _KJ_PER_MOL / unit.nanometer**2)) for *_, r0, k in bonds],
    )


def _harmonic_angles(force: openmm.HarmonicAngleForce) -> HarmonicAngles:
    angles = [force.getAngleParameters(a) for a in range(force.getNumAngles())]
    return HarmonicAngles(
        [a[:3] for a in angles],
        [(_value(t0, unit.radian), _value(k, _KJ_PER_MOL / unit.radian**2)) for *_, t0, k in angles],
    )


def _periodic_torsions(force: openmm.PeriodicTorsionForce) -> PeriodicTorsions:
    torsions = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
    return PeriodicTorsions(
        [t[:4] for t in torsions],
        [(n, _value(phase, unit.radian), _value(k, _KJ_PER_MOL)) for *_, n, phase, k in torsions],
    )


def _nonbonded(force: openmm.NonbondedForce) -> Nonbonded:
    """Ordinary pairs with Lorentz-Berthelot combined parameters, and the exceptions."""
    method = force.getNonbondedMethod()
    if method not in (openmm.NonbondedForce.NoCutoff, openmm.NonbondedForce.CutoffNonPeriodic):
        raise UnsupportedForceError(
            "NonbondedForce: only NoCutoff and CutoffNonPeriodic are supported (the System is non-periodic)"
        )
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise UnsupportedForceError("NonbondedForce: parameter offsets (global-parameter scaling) are not supported")
    n = force.getNumParticles()
    charge, sigma, epsilon = np.zeros(n), np.zeros(n), np.zeros(n)
    for a in range(n):
        q, s, e = force.getParticleParameters(a)
        charge[a] = _value(q, unit.elementary_charge)
        sigma[a] = _value(s, unit.nanometer)
        epsilon[a] = _value(e, _KJ_PER_MOL)

    exceptions, excluded = [], set()
    for e in range(force.getNumExceptions()):
        i, j, qq, s, eps = force.getExceptionParameters(e)
        excluded.add((min(i, j), max(i, j)))
        qq, s, eps = _value(qq, unit.elementary_charge**2), _value(s, unit.nanometer), _value(eps, _KJ_PER_MOL)
        # Exceptions with zero parameters are exclusions: they contribute nothing.
        if qq != 0 or eps != 0:
            exceptions.append((i, j, qq, s, eps))

    i, j = np.triu_indices(n, k=1)
    keep = np.array([(a, b) not in excluded for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
    i, j = i[keep], j[keep]
    qq = charge[i] * charge[j]
    eps = np.sqrt(epsilon[i] * epsilon[j])
    # Pairs with neither charge nor LJ contribute exactly zero; skipping them saves work.
    active = (qq != 0) | (eps != 0)
    pairs = (i[active], j[active], qq[active], 0.5 * (sigma[i] + sigma[j])[active], eps[active])
    exc = np.array(exceptions, dtype=np.float64).reshape(-1, 5)

    if method == openmm.NonbondedForce.NoCutoff:
        return Nonbonded(pairs, tuple(exc.T))
    switch_distance = None
    if force.getUseSwitchingFunction():
        switch_distance = _value(force.getSwitchingDistance(), unit.nanometer)
    return Nonbonded(
        pairs,
        tuple(exc.T),
        cutoff=_value(force.getCutoffDistance(), unit.nanometer),
        reaction_field_dielectric=force.getReactionFieldDielectric(),
        switch_distance=switch_distance,
    )


def _gbsa_obc(force: openmm.GBSAOBCForce) -> OBC:
    method = force.getNonbondedMethod()
    if method not in (openmm.GBSAOBCForce.NoCutoff, openmm.GBSAOBCForce.CutoffNonPeriodic):
        raise UnsupportedForceError("GBSAOBCForce: only NoCutoff and CutoffNonPeriodic are supported")
    params = np.array(
        [
            [_value(v, u) for v, u in zip(force.getParticleParameters(a), _GBSA_PARTICLE_UNITS)]
            for a in range(force.getNumParticles())
        ]
    ).reshape(-1, 3)
    offset_radius = params[:, 1] - _OBC_DIELECTRIC_OFFSET
    cutoff = None
    if method == openmm.GBSAOBCForce.CutoffNonPeriodic:
        cutoff = _value(force.getCutoffDistance(), unit.nanometer)
    surface = _value(force.getSurfaceAreaEnergy(), _KJ_PER_MOL / unit.nanometer**2)
    return OBC(
        charge=params[:, 0],
        offset_radius=offset_radius,
        scaled_radius=offset_radius * params[:, 2],
        radius_offset=_OBC_DIELECTRIC_OFFSET,
        coefficients=_OBC2_COEFFICIENTS,
        coulomb=ONE_4PI_EPS0,
        solute_dielectric=force.getSoluteDielectric(),
        solvent_dielectric=force.getSolventDielectric(),
        kappa=0.0,
        surface_factor=4 * math.pi * surface if surface != 0 else None,
        cutoff=cutoff,
        engulfed_correction=True,
    )


_TRANSLATIONS = {
    openmm.HarmonicBondForce: _harmonic_bonds,
    openmm.HarmonicAngleForce: _harmonic_angles,
    openmm.PeriodicTorsionForce: _periodic_torsions,
    openmm.NonbondedForce: _nonbonded,
    openmm.GBSAOBCForce: _gbsa_obc,
    openmm.CustomGBForce: custom_gb_obc,
}


def system_terms(system: openmm.System, groups: set[int] | None = None) -> list[Term]:
    """The terms of ``system``'s forces (in ``groups``, if given); raises naming every unsupported one."""
    terms, problems = [], []
    for force in system.getForces():
        # CMMotionRemover acts on velocities only; it has no energy.
        if isinstance(force, openmm.CMMotionRemover):
            continue
        if groups is not None and force.getForceGroup() not in groups:
            continue
        translate = _TRANSLATIONS.get(type(force))
        try:
            if translate is None:
                raise UnsupportedForceError(f"{type(force).__name__} is not implemented by the torch force field")
            terms.append(translate(force))
        except UnsupportedForceError as err:
            problems.append(str(err))
    if problems:
        raise UnsupportedForceError("the torch force field cannot evaluate this System: " + "; ".join(problems))
    return terms
