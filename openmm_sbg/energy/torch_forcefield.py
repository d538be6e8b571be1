"""A batched torch force field compiled from an ``openmm.System``.

Every parameter is read from the System's forces (never from a force-field file), and each
term reproduces the formula of OpenMM's Reference platform, so energies agree with OpenMM to
round-off in float64. All configurations of a batch are evaluated in one call: bonded terms
gather their atoms, pairwise terms work on fixed lists of atom pairs ``[B, P]``; there is no
Python loop over configurations. Forces are ``-grad U`` by autograd, so the energy is also
differentiable for callers that need it.

Supported forces: ``HarmonicBondForce``, ``HarmonicAngleForce``, ``PeriodicTorsionForce``,
``NonbondedForce`` (NoCutoff, or CutoffNonPeriodic with its reaction field and optional
switching function), ``GBSAOBCForce``, and the ``CustomGBForce`` that OpenMM's
``implicit/obc1.xml`` and ``implicit/obc2.xml`` create (recognised by its expressions; other
CustomGBForces are not supported).
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import openmm
import torch
from openmm import unit

from openmm_sbg.energy.base import EnergyBackend

#: Coulomb's constant 1/(4 pi eps0) in kJ/mol nm/e^2, exactly as OpenMM's C++ code uses it.
ONE_4PI_EPS0 = 138.93545764438198

#: OpenMM's dielectric offset of OBC radii (nm), used by GBSAOBCForce.
_OBC_DIELECTRIC_OFFSET = 0.009
#: Solvent probe radius of the ACE surface-area term (nm), used by GBSAOBCForce.
_ACE_PROBE_RADIUS = 0.14
#: OBC2 (GBSAOBCForce) Born-radius coefficients alpha, beta, gamma.
_OBC2_COEFFICIENTS = (1.0, 0.8, 4.85)

#: Cap on ``batch * pairs`` per chunk: keeps the autograd graph of the pair terms to a few
#: hundred MB in float64 however large the batch (chignolin: ~100 configurations per chunk).
DEFAULT_MAX_PAIR_ELEMENTS = 2**20


class UnsupportedForceError(ValueError):
    """The System holds a force (or a force setting) the torch force field does not implement."""


def _value(quantity, unit_) -> float:
    """Strip an ``openmm.unit`` quantity to a float in ``unit_`` (bare numbers pass through)."""
    return quantity.value_in_unit(unit_) if unit.is_quantity(quantity) else float(quantity)


def _distances(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Distances ``[B, P]`` between atoms ``i[p]`` and ``j[p]``."""
    return (x[:, j] - x[:, i]).norm(dim=-1)


class _Term(torch.nn.Module):
    """One energy term; ``forward(x [B, N, 3]) -> energy [B]`` in kJ/mol."""

    #: Pairs the term evaluates per configuration (sizes the batch chunks).
    n_pairs: int = 0


class _HarmonicBonds(_Term):
    def __init__(self, force: openmm.HarmonicBondForce):
        super().__init__()
        idx, params = [], []
        for b in range(force.getNumBonds()):
            i, j, r0, k = force.getBondParameters(b)
            idx.append((i, j))
            params.append((_value(r0, unit.nanometer), _value(k, unit.kilojoule_per_mole / unit.nanometer**2)))
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long).reshape(-1, 2).T.contiguous())
        params = torch.tensor(params, dtype=torch.float64).reshape(-1, 2)
        self.register_buffer("r0", params[:, 0].clone())
        self.register_buffer("k", params[:, 1].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _distances(x, self.idx[0], self.idx[1])
        return (0.5 * self.k * (r - self.r0) ** 2).sum(-1)


def _angles(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Angles ``[B, A]`` at atom ``idx[1]``; atan2 stays accurate near 0 and pi, unlike acos."""
    a = x[:, idx[0]] - x[:, idx[1]]
    b = x[:, idx[2]] - x[:, idx[1]]
    return torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))


class _HarmonicAngles(_Term):
    def __init__(self, force: openmm.HarmonicAngleForce):
        super().__init__()
        idx, params = [], []
        for a in range(force.getNumAngles()):
            i, j, k, theta0, kk = force.getAngleParameters(a)
            idx.append((i, j, k))
            params.append((_value(theta0, unit.radian), _value(kk, unit.kilojoule_per_mole / unit.radian**2)))
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long).reshape(-1, 3).T.contiguous())
        params = torch.tensor(params, dtype=torch.float64).reshape(-1, 2)
        self.register_buffer("theta0", params[:, 0].clone())
        self.register_buffer("k", params[:, 1].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.k * (_angles(x, self.idx) - self.theta0) ** 2).sum(-1)


def _dihedrals(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """IUPAC dihedral angles ``[B, T]`` (OpenMM's sign convention) of atoms ``idx[0..3]``."""
    b1 = x[:, idx[1]] - x[:, idx[0]]
    b2 = x[:, idx[2]] - x[:, idx[1]]
    b3 = x[:, idx[3]] - x[:, idx[2]]
    n1 = torch.linalg.cross(b1, b2)
    n2 = torch.linalg.cross(b2, b3)
    y = b2.norm(dim=-1) * (b1 * n2).sum(-1)
    return torch.atan2(y, (n1 * n2).sum(-1))


class _PeriodicTorsions(_Term):
    def __init__(self, force: openmm.PeriodicTorsionForce):
        super().__init__()
        idx, params = [], []
        for t in range(force.getNumTorsions()):
            i, j, k, m, n, phase, kk = force.getTorsionParameters(t)
            idx.append((i, j, k, m))
            params.append((n, _value(phase, unit.radian), _value(kk, unit.kilojoule_per_mole)))
        self.register_buffer("idx", torch.tensor(idx, dtype=torch.long).reshape(-1, 4).T.contiguous())
        params = torch.tensor(params, dtype=torch.float64).reshape(-1, 3)
        self.register_buffer("periodicity", params[:, 0].clone())
        self.register_buffer("phase", params[:, 1].clone())
        self.register_buffer("k", params[:, 2].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = _dihedrals(x, self.idx)
        return (self.k * (1 + torch.cos(self.periodicity * phi - self.phase))).sum(-1)


class _Nonbonded(_Term):
    """Coulomb + Lennard-Jones of a NoCutoff or CutoffNonPeriodic NonbondedForce.

    Ordinary pairs use the Lorentz-Berthelot combined parameters; with a cutoff they are cut
    at ``r_c`` and Coulomb gets OpenMM's reaction field ``1/r + k_rf r^2 - c_rf``. Exceptions
    (1-4 pairs with their scaled parameters) are, as in OpenMM, neither cut off nor given a
    reaction field; excluded pairs (exceptions with zero parameters) contribute nothing.
    """

    def __init__(self, force: openmm.NonbondedForce):
        super().__init__()
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
            epsilon[a] = _value(e, unit.kilojoule_per_mole)

        exceptions, excluded = [], set()
        for e in range(force.getNumExceptions()):
            i, j, qq, s, eps = force.getExceptionParameters(e)
            excluded.add((min(i, j), max(i, j)))
            qq, s, eps = _value(qq, unit.elementary_charge**2), _value(s, unit.nanometer), _value(eps, unit.kilojoule_per_mole)
            if qq != 0 or eps != 0:
                exceptions.append((i, j, qq, s, eps))

        i, j = np.triu_indices(n, k=1)
        keep = np.array([(a, b) not in excluded for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
        i, j = i[keep], j[keep]
        qq = charge[i] * charge[j]
        eps = np.sqrt(epsilon[i] * epsilon[j])
        # Pairs with neither charge nor LJ contribute exactly zero; skipping them saves work.
        active = (qq != 0) | (eps != 0)
        self._register_pairs("pair", i[active], j[active], qq[active], 0.5 * (sigma[i] + sigma[j])[active], eps[active])
        exc = np.array(exceptions, dtype=np.float64).reshape(-1, 5)
        self._register_pairs("exc", exc[:, 0].astype(np.int64), exc[:, 1].astype(np.int64), exc[:, 2], exc[:, 3], exc[:, 4])
        self.n_pairs = int(active.sum()) + len(exc)

        self.cutoff = None
        self.switch_distance = None
        if method == openmm.NonbondedForce.CutoffNonPeriodic:
            rc = _value(force.getCutoffDistance(), unit.nanometer)
            eps_rf = force.getReactionFieldDielectric()
            self.cutoff = rc
            self.k_rf = (eps_rf - 1) / ((2 * eps_rf + 1) * rc**3)
            self.c_rf = 3 * eps_rf / ((2 * eps_rf + 1) * rc)
            if force.getUseSwitchingFunction():
                self.switch_distance = _value(force.getSwitchingDistance(), unit.nanometer)

    def _register_pairs(self, prefix: str, i, j, qq, sigma, epsilon) -> None:
        self.register_buffer(f"{prefix}_idx", torch.tensor(np.stack([i, j]), dtype=torch.long).reshape(2, -1))
        self.register_buffer(f"{prefix}_qq", ONE_4PI_EPS0 * torch.tensor(qq, dtype=torch.float64))
        self.register_buffer(f"{prefix}_sigma", torch.tensor(sigma, dtype=torch.float64))
        self.register_buffer(f"{prefix}_4eps", 4 * torch.tensor(epsilon, dtype=torch.float64))

    @staticmethod
    def _lennard_jones(r: torch.Tensor, sigma: torch.Tensor, four_eps: torch.Tensor) -> torch.Tensor:
        s6 = (sigma / r) ** 6
        return four_eps * (s6 * s6 - s6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _distances(x, self.pair_idx[0], self.pair_idx[1])
        lj = self._lennard_jones(r, self.pair_sigma, self.pair_4eps)
        if self.cutoff is None:
            pair = self.pair_qq / r + lj
        else:
            if self.switch_distance is not None:
                t = ((r - self.switch_distance) / (self.cutoff - self.switch_distance)).clamp(min=0)
                lj = lj * (1 + t**3 * (-10 + t * (15 - 6 * t)))
            coulomb = self.pair_qq * (1 / r + self.k_rf * r**2 - self.c_rf)
            pair = (coulomb + lj) * (r < self.cutoff)
        r_exc = _distances(x, self.exc_idx[0], self.exc_idx[1])
        exc = self.exc_qq / r_exc + self._lennard_jones(r_exc, self.exc_sigma, self.exc_4eps)
        return pair.sum(-1) + exc.sum(-1)


class _OBC(_Term):
    """Generalized Born (OBC) solvation: Born radii, polar energy and ACE surface term.

    Shared by ``GBSAOBCForce`` and the ``CustomGBForce`` of ``implicit/obc1.xml``; they
    differ only in constants and in whether an atom buried inside another's scaled sphere
    gets the extra ``2 (1/rho_i - 1/L)`` term (GBSAOBCForce's C++ code adds it, the
    CustomGBForce expression does not).

    Parameters
    ----------
    charge, offset_radius, scaled_radius
        Per-atom charge (e), radius minus the dielectric offset, and that times the
        screening factor (nm).
    radius_offset
        Added to ``offset_radius`` to give the radius in the tanh term and the ACE term.
    coefficients
        ``(alpha, beta, gamma)`` of ``tanh(alpha psi - beta psi^2 + gamma psi^3)``.
    coulomb, solute_dielectric, solvent_dielectric, kappa
        Polar energy ``-coulomb (1/eps_in - exp(-kappa f)/eps_out) q_i q_j / f``.
    surface_factor
        ACE prefactor ``4 pi gamma_SA`` (kJ/mol/nm^2), or ``None`` for no surface term.
    cutoff
        Pairs at or beyond it are ignored, and pair energies are shifted by ``1/cutoff``.
    engulfed_correction
        Whether to add GBSAOBCForce's term for an atom inside another's scaled sphere.
    """

    def __init__(
        self,
        charge: np.ndarray,
        offset_radius: np.ndarray,
        scaled_radius: np.ndarray,
        radius_offset: float,
        coefficients: tuple[float, float, float],
        coulomb: float,
        solute_dielectric: float,
        solvent_dielectric: float,
        kappa: float,
        surface_factor: float | None,
        cutoff: float | None,
        engulfed_correction: bool,
    ):
        super().__init__()
        n = len(charge)
        i, j = np.triu_indices(n, k=1)
        # Born-radius sums run over ordered pairs: (i, j) and (j, i) share a distance.
        self.register_buffer("idx", torch.tensor(np.stack([i, j]), dtype=torch.long))
        self.register_buffer("target", torch.tensor(np.concatenate([i, j]), dtype=torch.long))
        self.register_buffer("rho_target", torch.tensor(np.concatenate([offset_radius[i], offset_radius[j]])))
        self.register_buffer("sr_other", torch.tensor(np.concatenate([scaled_radius[j], scaled_radius[i]])))
        self.register_buffer("offset_radius", torch.tensor(offset_radius, dtype=torch.float64))
        self.register_buffer("radius", torch.tensor(offset_radius + radius_offset, dtype=torch.float64))
        self.register_buffer("charge", torch.tensor(charge, dtype=torch.float64))
        self.register_buffer("qq", torch.tensor(charge[i] * charge[j], dtype=torch.float64))
        self.n_pairs = 3 * len(i)
        self.alpha, self.beta, self.gamma = coefficients
        self.coulomb = coulomb
        self.solute_dielectric = solute_dielectric
        self.solvent_dielectric = solvent_dielectric
        self.kappa = kappa
        self.surface_factor = surface_factor
        self.cutoff = cutoff
        self.engulfed_correction = engulfed_correction

    def _screening(self, f: torch.Tensor) -> torch.Tensor:
        """``1/eps_in - exp(-kappa f)/eps_out``: the dielectric factor of a Born distance ``f``."""
        if self.kappa == 0:
            return torch.full_like(f, 1 / self.solute_dielectric - 1 / self.solvent_dielectric)
        return 1 / self.solute_dielectric - torch.exp(-self.kappa * f) / self.solvent_dielectric

    def born_radii(self, r: torch.Tensor) -> torch.Tensor:
        """Born radii ``[B, N]`` from pair distances ``r [B, P]`` (OBC's HCT-style integral)."""
        r2 = torch.cat([r, r], dim=-1)
        rho, sr = self.rho_target, self.sr_other
        upper = r2 + sr
        lower = torch.maximum(rho, (r2 - sr).abs())
        inv_u, inv_l = 1 / upper, 1 / lower
        term = (
            inv_l
            - inv_u
            + 0.25 * (r2 - sr**2 / r2) * (inv_u**2 - inv_l**2)
            + 0.5 * torch.log(lower / upper) / r2
        )
        if self.engulfed_correction:
            term = term + 2 * (1 / rho - inv_l) * (rho < sr - r2)
        keep = rho < upper
        if self.cutoff is not None:
            keep = keep & (r2 < self.cutoff)
        term = term * keep
        integral = torch.zeros(r.shape[0], len(self.radius), dtype=r.dtype, device=r.device)
        integral = integral.index_add(1, self.target, term)
        psi = 0.5 * integral * self.offset_radius
        tanh = torch.tanh(psi * (self.alpha + psi * (-self.beta + psi * self.gamma)))
        return 1 / (1 / self.offset_radius - tanh / self.radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _distances(x, self.idx[0], self.idx[1])
        born = self.born_radii(r)
        energy = -0.5 * self.coulomb * (self._screening(born) * self.charge**2 / born).sum(-1)
        if self.surface_factor is not None:
            energy = energy + (
                self.surface_factor * (self.radius + _ACE_PROBE_RADIUS) ** 2 * (self.radius / born) ** 6
            ).sum(-1)
        b1b2 = born[:, self.idx[0]] * born[:, self.idx[1]]
        f = torch.sqrt(r**2 + b1b2 * torch.exp(-(r**2) / (4 * b1b2)))
        if self.cutoff is None:
            pair = self.qq * self._screening(f) / f
        else:
            pair = self.qq * self._screening(f) * (1 / f - 1 / self.cutoff) * (r < self.cutoff)
        return energy - self.coulomb * pair.sum(-1)


def _gbsa_obc(force: openmm.GBSAOBCForce) -> _OBC:
    method = force.getNonbondedMethod()
    if method not in (openmm.GBSAOBCForce.NoCutoff, openmm.GBSAOBCForce.CutoffNonPeriodic):
        raise UnsupportedForceError("GBSAOBCForce: only NoCutoff and CutoffNonPeriodic are supported")
    params = np.array(
        [
            [_value(v, u) for v, u in zip(force.getParticleParameters(a), (unit.elementary_charge, unit.nanometer, unit.dimensionless))]
            for a in range(force.getNumParticles())
        ]
    ).reshape(-1, 3)
    offset_radius = params[:, 1] - _OBC_DIELECTRIC_OFFSET
    surface = _value(force.getSurfaceAreaEnergy(), unit.kilojoule_per_mole / unit.nanometer**2)
    return _OBC(
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
        cutoff=_value(force.getCutoffDistance(), unit.nanometer) if method == openmm.GBSAOBCForce.CutoffNonPeriodic else None,
        engulfed_correction=True,
    )


# ----------------------------------------------------------------------------------------
# Recognising the CustomGBForce of implicit/obc1.xml and implicit/obc2.xml.
#
# openmm.app.internal.customgbforces writes fixed expressions with the model's constants
# appended as definitions ("; solventDielectric=78.5; ..."). We match the expression text
# against those templates (whitespace removed) and read the constants; anything else is
# reported as unsupported rather than guessed at.

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BORN_INTEGRAL = "select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r),0);U=r+sr2;L=max(or1,D);D=abs(r-sr2)"
#: Born-radius expressions of the supported models, with their (alpha, beta, gamma).
_BORN_RADIUS = {
    "1/(1/or-tanh(0.8*psi+2.909125*psi^3)/radius)": (0.8, 0.0, 2.909125),  # OBC1
    "1/(1/or-tanh(psi-0.8*psi^2+4.85*psi^3)/radius)": (1.0, 0.8, 4.85),  # OBC2
}
_SCREENING = r"\(1/soluteDielectric-(?P<salt>1|exp\(-kappa\*(?P<var>[Bf])\))/solventDielectric\)"
_SELF_ENERGY = re.compile(rf"-0\.5\*(?P<coulomb>{_NUMBER})\*{_SCREENING}\*charge\^2/B")
_SURFACE_ENERGY = re.compile(rf"(?P<factor>{_NUMBER})\*\(radius\+(?P<probe>{_NUMBER})\)\^2\*\(radius/B\)\^6")
_PAIR_ENERGY = re.compile(
    rf"-(?P<coulomb>{_NUMBER})\*{_SCREENING}\*charge1\*charge2(?:/f|\*\(1/f-(?P<shift>{_NUMBER})\))"
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


def _custom_gb_obc(force: openmm.CustomGBForce) -> _OBC:
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
    if name != "I" or kind != openmm.CustomGBForce.ParticlePairNoExclusions or expression.replace(" ", "") != _BORN_INTEGRAL:
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
        if kind == openmm.CustomGBForce.SingleParticle and (m := _SELF_ENERGY.fullmatch(main)):
            term = "self"
            constants.setdefault("coulomb", float(m["coulomb"]))
            salt_ok = (m["salt"] == "1") or m["var"] == "B"
        elif kind == openmm.CustomGBForce.SingleParticle and (m := _SURFACE_ENERGY.fullmatch(main)):
            term = "surface"
            if float(m["probe"]) != _ACE_PROBE_RADIUS or defs.get("radius") != "or+offset" or float(defs.get("offset", "nan")) != radius_offset:
                raise unsupported("unrecognised surface-area term")
            surface_factor = float(m["factor"])
            salt_ok = True
        elif kind == openmm.CustomGBForce.ParticlePairNoExclusions and (m := _PAIR_ENERGY.fullmatch(main)):
            term = "pair"
            if defs.get("f") != _BORN_DISTANCE:
                raise unsupported("unrecognised Born distance f in the pair energy")
            constants.setdefault("coulomb", float(m["coulomb"]))
            pair_shift = float(m["shift"]) if m["shift"] is not None else 0.0
            salt_ok = (m["salt"] == "1") or m["var"] == "f"
        else:
            raise unsupported(f"unrecognised energy term {expression!r}")
        if not salt_ok or term in found or ("coulomb" in m.groupdict() and float(m["coulomb"]) != constants["coulomb"]):
            raise unsupported(f"unrecognised energy term {expression!r}")
        found.add(term)
    if not {"self", "pair"} <= found or not {"solventDielectric", "soluteDielectric", "kappa"} <= set(constants):
        raise unsupported("missing the self or pair energy term")

    cutoff = None
    if method == openmm.CustomGBForce.CutoffNonPeriodic:
        cutoff = _value(force.getCutoffDistance(), unit.nanometer)
        if not math.isclose(pair_shift, 1 / cutoff, rel_tol=1e-12):
            raise unsupported(f"pair energy shifted by {pair_shift}, expected 1/cutoff = {1 / cutoff}")
    elif pair_shift != 0:
        raise unsupported("pair energy shifted by 1/cutoff without a cutoff")

    params = np.array([force.getParticleParameters(a) for a in range(force.getNumParticles())], dtype=np.float64)
    return _OBC(
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


_COMPILERS = {
    openmm.HarmonicBondForce: _HarmonicBonds,
    openmm.HarmonicAngleForce: _HarmonicAngles,
    openmm.PeriodicTorsionForce: _PeriodicTorsions,
    openmm.NonbondedForce: _Nonbonded,
    openmm.GBSAOBCForce: _gbsa_obc,
    openmm.CustomGBForce: _custom_gb_obc,
}


def _compile(force: openmm.Force) -> _Term:
    compiler = _COMPILERS.get(type(force))
    if compiler is None:
        raise UnsupportedForceError(f"{type(force).__name__} is not implemented by the torch force field")
    return compiler(force)


class TorchForceField(EnergyBackend):
    """Batched energies and forces of an ``openmm.System``, in torch.

    Parameters
    ----------
    system
        The System (not modified). Raises :class:`UnsupportedForceError`, naming every
        problem, if it holds a force (or setting) this backend does not implement.
    groups
        Optional set of force groups to evaluate, as in ``Context.getState(groups=...)``.
    max_pair_elements
        Largest ``batch * pairs`` evaluated at once; bigger batches are split into chunks so
        memory stays bounded. Results do not depend on it.

    Notes
    -----
    Works on any device and dtype: parameters are copied to the input's device and dtype on
    first use. Use float64 to reproduce OpenMM to round-off; float32 is faster and accurate
    to about 1e-5 relative for well-formed configurations.
    """

    name = "torch"

    def __init__(
        self,
        system: openmm.System,
        groups: set[int] | None = None,
        max_pair_elements: int = DEFAULT_MAX_PAIR_ELEMENTS,
    ):
        terms, problems = [], []
        for force in system.getForces():
            # CMMotionRemover acts on velocities only; it has no energy.
            if isinstance(force, openmm.CMMotionRemover):
                continue
            if groups is None or force.getForceGroup() in groups:
                try:
                    terms.append(_compile(force))
                except UnsupportedForceError as err:
                    problems.append(str(err))
        if problems:
            raise UnsupportedForceError("the torch force field cannot evaluate this System: " + "; ".join(problems))
        self._terms = torch.nn.ModuleList(terms)
        self.n_atoms = system.getNumParticles()
        pairs = sum(t.n_pairs for t in self._terms)
        self.chunk_size = max(1, max_pair_elements // max(pairs, 1))
        self._copies: dict[tuple[torch.device, torch.dtype], torch.nn.ModuleList] = {}

    def _terms_for(self, x: torch.Tensor) -> torch.nn.ModuleList:
        key = (x.device, x.dtype)
        if key not in self._copies:
            self._copies[key] = copy.deepcopy(self._terms).to(device=x.device, dtype=x.dtype)
        return self._copies[key]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape [batch, {self.n_atoms}, 3] in nm; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"positions must be a floating-point tensor, got {x.dtype}")

    def _potential(self, x: torch.Tensor) -> torch.Tensor:
        terms = self._terms_for(x)
        energy = x.new_zeros(x.shape[0])
        for term in terms:
            energy = energy + term(x)
        return energy

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Energies ``[B]`` in kJ/mol; differentiable with respect to ``x`` (autograd)."""
        self._check(x)
        return torch.cat([self._potential(chunk) for chunk in x.split(self.chunk_size)])

    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies ``[B]`` (kJ/mol) and forces ``-grad U`` ``[B, N, 3]`` (kJ/mol/nm), detached."""
        self._check(x)
        energies, forces = [], []
        for chunk in x.detach().split(self.chunk_size):
            with torch.enable_grad():
                chunk = chunk.detach().requires_grad_(True)
                energy = self._potential(chunk)
                # A System whose evaluated forces have no terms has a constant (zero) energy.
                grad = torch.autograd.grad(energy.sum(), chunk)[0] if energy.requires_grad else torch.zeros_like(chunk)
            energies.append(energy.detach())
            forces.append(-grad)
        return torch.cat(energies), torch.cat(forces)
