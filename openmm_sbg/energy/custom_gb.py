"""Recognising the ``CustomGBForce`` of OpenMM's ``implicit/obc1.xml`` and ``implicit/obc2.xml``.

``openmm.app.internal.customgbforces`` writes fixed expressions with the model's constants
appended as definitions (``"; solventDielectric=78.5; ..."``). We match the expression text
against those templates (whitespace removed) and read the constants into an :class:`OBC`
term; anything else is reported as unsupported rather than guessed at.
"""

from __future__ import annotations

import math
import re

import numpy as np
import openmm
from openmm import unit

from openmm_sbg.energy.base import UnsupportedForceError
from openmm_sbg.energy.terms import ACE_PROBE_RADIUS, OBC

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BORN_INTEGRAL = (
    "select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r),0);"
    "U=r+sr2;L=max(or1,D);D=abs(r-sr2)"
)
#: Born-radius expressions of the supported models, with their (alpha, beta, gamma).
_BORN_RADIUS = {
    "1/(1/or-tanh(0.8*psi+2.909125*psi^3)/radius)": (0.8, 0.0, 2.909125),  # OBC1
    "1/(1/or-tanh(psi-0.8*psi^2+4.85*psi^3)/radius)": (1.0, 0.8, 4.85),  # OBC2
}

def _screening_pattern(variable: str) -> str:
    """``(1/soluteDielectric-1/solventDielectric)``, or with salt ``exp(-kappa*variable)``."""
    return rf"\(1/soluteDielectric-(?:1|exp\(-kappa\*{variable}\))/solventDielectric\)"


_SELF_ENERGY = re.compile(rf"-0\.5\*(?P<coulomb>{_NUMBER})\*{_screening_pattern('B')}\*charge\^2/B")
_SURFACE_ENERGY = re.compile(rf"(?P<factor>{_NUMBER})\*\(radius\+(?P<probe>{_NUMBER})\)\^2\*\(radius/B\)\^6")
_PAIR_ENERGY = re.compile(
    rf"-(?P<coulomb>{_NUMBER})\*{_screening_pattern('f')}\*charge1\*charge2(?:/f|\*\(1/f-(?P<shift>{_NUMBER})\))"
)
_BORN_DISTANCE = "sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))"


def _split_expression(expression: str) -> tuple[str, dict[str, str]]:
    """Main expression and its ``name=value`` definitions, whitespace removed."""
    main, *definitions = expression.replace(" ", "").replace("\n", "").split(";")
    parsed = {}
    for d in filter(None, definitions):
        name, _, value = d.partition("=")
        parsed[name] = value
    return main, parsed


def custom_gb_obc(force: openmm.CustomGBForce) -> OBC:
    """Compile the CustomGBForce of ``implicit/obc1.xml`` (or obc2.xml), checking every expression."""

    def unsupported(why: str) -> UnsupportedForceError:
        return UnsupportedForceError(
            f"CustomGBForce: {why}; only the OBC models of implicit/obc1.xml and implicit/obc2.xml are recognised"
        )

    method = force.getNonbondedMethod()
    if method not in (openmm.CustomGBForce.NoCutoff, openmm.CustomGBForce.CutoffNonPeriodic):
        raise unsupported("periodic nonbonded method")
    names = [force.getPerParticleParameterName(p) for p in range(force.getNumPerParticleParameters())]
    if names != ["charge", "or", "sr"]:
        raise unsupported(f"per-particle parameters {names}, expected ['charge', 'or', 'sr']")
    if force.getNumGlobalParameters() or force.getNumTabulatedFunctions() or force.getNumEnergyParameterDerivatives():
        raise unsupported("global parameters or tabulated functions")
    if force.getNumComputedValues() != 2:
        raise unsupported(f"{force.getNumComputedValues()} computed values, expected I and B")

    name, expression, kind = force.getComputedValueParameters(0)
    integral_ok = kind == openmm.CustomGBForce.ParticlePairNoExclusions and expression.replace(" ", "") == _BORN_INTEGRAL
    if name != "I" or not integral_ok:
        raise unsupported("the Born integral I is not OBC's")
    name, expression, kind = force.getComputedValueParameters(1)
    main, defs = _split_expression(expression)
    if name != "B" or kind != openmm.CustomGBForce.SingleParticle or main not in _BORN_RADIUS:
        raise unsupported("the Born radius B is not OBC1's or OBC2's")
    if defs.get("psi") != "I*or" or defs.get("radius") != "or+offset" or "offset" not in defs:
        raise unsupported("the Born radius B is not OBC1's or OBC2's")
    radius_offset = float(defs["offset"])

    constants: dict[str, float] = {}
    surface_factor = None
    pair_shift = 0.0
    found = set()
    for t in range(force.getNumEnergyTerms()):
        expression, kind = force.getEnergyTermParameters(t)
        main, defs = _split_expression(expression)
        for key in ("solventDielectric", "soluteDielectric", "kappa"):
            if key in defs:
                value = float(defs[key])
                if constants.setdefault(key, value) != value:
                    raise unsupported(f"energy terms disagree on {key}")
        single = kind == openmm.CustomGBForce.SingleParticle
        if single and (m := _SELF_ENERGY.fullmatch(main)):
            term = "self"
        elif single and (m := _SURFACE_ENERGY.fullmatch(main)):
            term = "surface"
            same_radius = defs.get("radius") == "or+offset" and float(defs.get("offset", "nan")) == radius_offset
            if float(m["probe"]) != ACE_PROBE_RADIUS or not same_radius:
                raise unsupported("unrecognised surface-area term")
            surface_factor = float(m["factor"])
        elif (
            kind == openmm.CustomGBForce.ParticlePairNoExclusions
            and (m := _PAIR_ENERGY.fullmatch(main))
            and defs.get("f") == _BORN_DISTANCE
        ):
            term = "pair"
            pair_shift = float(m["shift"]) if m["shift"] is not None else 0.0
        else:
            raise unsupported(f"unrecognised energy term {expression!r}")
        if term in found:
            raise unsupported(f"two {term} energy terms")
        found.add(term)
        if "coulomb" in m.re.groupindex and constants.setdefault("coulomb", float(m["coulomb"])) != float(m["coulomb"]):
            raise unsupported("energy terms disagree on Coulomb's constant")
    if not {"self", "pair"} <= found or not {"solventDielectric", "soluteDielectric", "kappa"} <= set(constants):
        raise unsupported("missing the self or pair energy term")

    cutoff = None
    if method == openmm.CustomGBForce.CutoffNonPeriodic:
        cutoff = force.getCutoffDistance().value_in_unit(unit.nanometer)
        if not math.isclose(pair_shift, 1 / cutoff, rel_tol=1e-12):
            raise unsupported(f"pair energy shifted by {pair_shift}, expected 1/cutoff = {1 / cutoff}")
    elif pair_shift != 0:
        raise unsupported("pair energy shifted by 1/cutoff without a cutoff")

    params = np.array([force.getParticleParameters(a) for a in range(force.getNumParticles())], dtype=np.float64)
    return OBC(
        charge=params[:, 0],
        offset_radius=params[:, 1],
        scaled_radius=params[:, 2],
        radius_offset=radius_offset,
        coefficients=_BORN_RADIUS[_split_expression(force.getComputedValueParameters(1)[1])[0]],
        coulomb=constants["coulomb"],
        solute_dielectric=constants["soluteDielectric"],
        solvent_dielectric=constants["solventDielectric"],
        kappa=constants["kappa"],
        surface_factor=surface_factor,
        cutoff=cutoff,
        engulfed_correction=False,
    )
