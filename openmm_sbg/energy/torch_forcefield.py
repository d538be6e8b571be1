"""A batched torch force field compiled from an ``openmm.System``.

Every parameter is read from the System's forces (never from a force-field file), and each
term reproduces the formula of OpenMM's Reference platform, so energies agree with OpenMM to
round-off in float64. All configurations of a batch are evaluated in one call: bonded terms
gather their atoms, pairwise terms work on fixed lists of atom pairs ``[P, B]``; there is no
Python loop over configurations. Forces are analytic, computed in the same pass as the
energy (cheaper than an autograd graph); a custom autograd function makes the energy
differentiable for callers that need it, and the tests check both against OpenMM.

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
from collections.abc import Callable

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
_KJ_PER_MOL = unit.kilojoule_per_mole
#: Units of GBSAOBCForce's per-particle parameters: charge, radius, scaling factor.
_GBSA_PARTICLE_UNITS = (unit.elementary_charge, unit.nanometer, unit.dimensionless)
#: OBC2 (GBSAOBCForce) Born-radius coefficients alpha, beta, gamma.
_OBC2_COEFFICIENTS = (1.0, 0.8, 4.85)

#: Default cap on ``batch * pairs`` per chunk. On CPU, chunks of about 2**19 pair elements
#: balance per-operation overhead (small chunks) against cache misses (large ones); on GPUs
#: larger chunks fill the device, and the cap only bounds memory.
CPU_PAIR_ELEMENTS = 2**19
GPU_PAIR_ELEMENTS = 2**23


class UnsupportedForceError(ValueError):
    """The System holds a force (or a force setting) the torch force field does not implement."""


def _value(quantity, unit_) -> float:
    """Strip an ``openmm.unit`` quantity to a float in ``unit_`` (bare numbers pass through)."""
    return quantity.value_in_unit(unit_) if unit.is_quantity(quantity) else float(quantity)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the leading (x, y, z) dimension."""
    return (a * b).sum(0)


def _gather(xc: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Positions ``[3, P, B]`` of atoms ``i`` from coordinate-major positions ``xc [3, N, B]``."""
    return xc.index_select(1, i)


def _pair_vectors(xc: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors ``x_j - x_i`` ``[3, P, B]`` and squared distances ``[P, B]``."""
    d = _gather(xc, j) - _gather(xc, i)
    return d, _dot(d, d)


def _add_pair_gradient(grad: torch.Tensor, i: torch.Tensor, j: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> None:
    """Add ``dU/dr / r`` (``w [P, B]``) of pair distances along ``d = x_j - x_i`` to ``grad [3, N, B]``."""
    g = w * d
    grad.index_add_(1, j, g)
    grad.index_add_(1, i, -g)


class _Term(torch.nn.Module):
    """One energy term, evaluated in coordinate-major layout ``[3, N, B]``.

    Every array is then a stack of contiguous ``[B]`` rows: gathers and scatters of atoms copy
    whole rows and vector components are leading slices, which keeps elementwise work dense.

    ``forward(xc [3, N, B], grad [3, N, B] | None) -> energy [B]`` in kJ/mol; when ``grad``
    is given, the term adds its analytic gradient dU/dx to it (one pass, no autograd graph).
    """

    #: Pairs the term evaluates per configuration (sizes the batch chunks).
    n_pairs: int = 0

    def _indices(self, name: str, rows) -> None:
        self.register_buffer(name, torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1).T.contiguous())

    def _constants(self, names: tuple[str, ...], rows) -> None:
        table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(names))
        for k, name in enumerate(names):
            # [T, 1]: broadcasts against [T, B] in atom-major layout.
            self.register_buffer(name, table[:, k : k + 1].clone())


class _HarmonicBonds(_Term):
    def __init__(self, force: openmm.HarmonicBondForce):
        super().__init__()
        bonds = [force.getBondParameters(b) for b in range(force.getNumBonds())]
        self._indices("idx", [b[:2] for b in bonds])
        self._constants(
            ("r0", "k"),
            [(_value(r0, unit.nanometer), _value(k, _KJ_PER_MOL / unit.nanometer**2)) for *_, r0, k in bonds],
        )

    def forward(self, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        d, r2 = _pair_vectors(xc, self.idx[0], self.idx[1])
        r = r2.sqrt()
        stretch = r - self.r0
        if grad is not None:
            _add_pair_gradient(grad, self.idx[0], self.idx[1], self.k * stretch / r, d)
        return (0.5 * self.k * stretch**2).sum(0)


class _HarmonicAngles(_Term):
    def __init__(self, force: openmm.HarmonicAngleForce):
        super().__init__()
        angles = [force.getAngleParameters(a) for a in range(force.getNumAngles())]
        self._indices("idx", [a[:3] for a in angles])
        self._constants(
            ("theta0", "k"),
            [(_value(t0, unit.radian), _value(k, _KJ_PER_MOL / unit.radian**2)) for *_, t0, k in angles],
        )

    def forward(self, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        centre = _gather(xc, self.idx[1])
        a = _gather(xc, self.idx[0]) - centre
        b = _gather(xc, self.idx[2]) - centre
        ab = _dot(a, b)
        cross = _dot(c := torch.linalg.cross(a, b, dim=0), c).sqrt()
        # atan2 stays accurate near 0 and pi, where acos loses digits.
        delta = torch.atan2(cross, ab) - self.theta0
        if grad is not None:
            scale = self.k * delta / cross
            g_a = scale * (ab / _dot(a, a) * a - b)
            g_b = scale * (ab / _dot(b, b) * b - a)
            grad.index_add_(1, self.idx[0], g_a)
            grad.index_add_(1, self.idx[2], g_b)
            grad.index_add_(1, self.idx[1], -(g_a + g_b))
        return (0.5 * self.k * delta**2).sum(0)


class _PeriodicTorsions(_Term):
    def __init__(self, force: openmm.PeriodicTorsionForce):
        super().__init__()
        torsions = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
        self._indices("idx", [t[:4] for t in torsions])
        self._constants(
            ("periodicity", "phase", "k"),
            [(n, _value(phase, unit.radian), _value(k, _KJ_PER_MOL)) for *_, n, phase, k in torsions],
        )

    def forward(self, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        x0, x1, x2, x3 = (_gather(xc, self.idx[k]) for k in range(4))
        b1, b2, b3 = x1 - x0, x2 - x1, x3 - x2
        n1 = torch.linalg.cross(b1, b2, dim=0)
        n2 = torch.linalg.cross(b2, b3, dim=0)
        b2_sq = _dot(b2, b2)
        b2_norm = b2_sq.sqrt()
        # IUPAC sign convention, as OpenMM.
        phi = torch.atan2(b2_norm * _dot(b1, n2), _dot(n1, n2))
        angle = self.periodicity * phi - self.phase
        if grad is not None:
            dphi = -self.k * self.periodicity * torch.sin(angle)
            g0 = -dphi * b2_norm / _dot(n1, n1) * n1
            g3 = dphi * b2_norm / _dot(n2, n2) * n2
            p = _dot(b1, b2) / b2_sq
            q = _dot(b3, b2) / b2_sq
            grad.index_add_(1, self.idx[0], g0)
            grad.index_add_(1, self.idx[1], q * g3 - (1 + p) * g0)
            grad.index_add_(1, self.idx[2], p * g0 - (1 + q) * g3)
            grad.index_add_(1, self.idx[3], g3)
        return (self.k * (1 + torch.cos(angle))).sum(0)


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
            raise UnsupportedForceError(
                "NonbondedForce: parameter offsets (global-parameter scaling) are not supported"
            )
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
            if qq != 0 or eps != 0:
                exceptions.append((i, j, qq, s, eps))

        i, j = np.triu_indices(n, k=1)
        keep = np.array([(a, b) not in excluded for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
        i, j = i[keep], j[keep]
        qq = charge[i] * charge[j]
        eps = np.sqrt(epsilon[i] * epsilon[j])
        # Pairs with neither charge nor LJ contribute exactly zero; skipping them saves work.
        active = (qq != 0) | (eps != 0)
        self._pairs("pair", i[active], j[active], qq[active], 0.5 * (sigma[i] + sigma[j])[active], eps[active])
        exc = np.array(exceptions, dtype=np.float64).reshape(-1, 5)
        self._pairs("exc", exc[:, 0], exc[:, 1], exc[:, 2], exc[:, 3], exc[:, 4])
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

    def _pairs(self, prefix: str, i, j, qq, sigma, epsilon) -> None:
        """Store a pair list with Coulomb ``K q_i q_j`` and LJ ``4 eps sigma^12``, ``4 eps sigma^6``."""
        self.register_buffer(f"{prefix}_idx", torch.tensor(np.stack([i, j]), dtype=torch.long).reshape(2, -1))
        sigma6 = torch.tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 6
        four_eps = 4 * torch.tensor(epsilon, dtype=torch.float64).reshape(-1, 1)
        self.register_buffer(f"{prefix}_qq", ONE_4PI_EPS0 * torch.tensor(qq, dtype=torch.float64).reshape(-1, 1))
        self.register_buffer(f"{prefix}_c12", four_eps * sigma6**2)
        self.register_buffer(f"{prefix}_c6", four_eps * sigma6)

    def _pair_energy(self, prefix: str, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        idx = getattr(self, f"{prefix}_idx")
        qq, c12, c6 = (getattr(self, f"{prefix}_{name}") for name in ("qq", "c12", "c6"))
        d, r2 = _pair_vectors(xc, idx[0], idx[1])
        inv_r2 = 1 / r2
        inv_r = inv_r2.sqrt()
        inv_r6 = inv_r2**3
        lj = (c12 * inv_r6 - c6) * inv_r6
        dlj = -(12 * c12 * inv_r6 - 6 * c6) * inv_r6 * inv_r2  # dU/dr / r
        cut = prefix == "pair" and self.cutoff is not None
        if not cut:
            energy = qq * inv_r + lj
            w = -qq * inv_r * inv_r2 + dlj
        else:
            r = r2 * inv_r
            if self.switch_distance is not None:
                t = ((r - self.switch_distance) / (self.cutoff - self.switch_distance)).clamp(min=0)
                switch = 1 + t**3 * (-10 + t * (15 - 6 * t))
                dswitch = -30 * t**2 * (1 - t) ** 2 / (self.cutoff - self.switch_distance)
                dlj = dlj * switch + lj * dswitch * inv_r
                lj = lj * switch
            inside = (r < self.cutoff).to(r.dtype)
            energy = (qq * (inv_r + self.k_rf * r2 - self.c_rf) + lj) * inside
            w = (qq * (2 * self.k_rf - inv_r * inv_r2) + dlj) * inside
        if grad is not None:
            _add_pair_gradient(grad, idx[0], idx[1], w, d)
        return energy.sum(0)

    def forward(self, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return self._pair_energy("pair", xc, grad) + self._pair_energy("exc", xc, grad)


class _OBC(_Term):
    """Generalized Born (OBC) solvation: Born radii, polar energy and ACE surface term.

    Shared by ``GBSAOBCForce`` and the ``CustomGBForce`` of ``implicit/obc1.xml`` and
    ``implicit/obc2.xml``; they differ only in constants and in whether an atom buried inside another's scaled sphere
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

        def column(values) -> torch.Tensor:
            return torch.tensor(np.asarray(values, dtype=np.float64)).reshape(-1, 1)

        self.register_buffer("idx", torch.tensor(np.stack([i, j]), dtype=torch.long))
        # Born-radius sums run over ordered pairs, stacked [2, P, 1]: (i, j) then (j, i).
        self.register_buffer("rho_pair", torch.stack([column(offset_radius[i]), column(offset_radius[j])]))
        self.register_buffer("sr_pair", torch.stack([column(scaled_radius[j]), column(scaled_radius[i])]))
        self.register_buffer("rho", column(offset_radius))
        self.register_buffer("radius", column(offset_radius + radius_offset))
        self.register_buffer("charge_sq", column(charge**2))
        self.register_buffer("qq", column(charge[i] * charge[j]))
        self.n_pairs = 3 * len(i)
        self.alpha, self.beta, self.gamma = coefficients
        self.coulomb = coulomb
        self.inner = 1 / solute_dielectric
        self.outer = 1 / solvent_dielectric
        self.kappa = kappa
        self.surface_factor = surface_factor
        self.cutoff = cutoff
        self.engulfed_correction = engulfed_correction

    def _screening(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``S = 1/eps_in - exp(-kappa f)/eps_out`` at Born distance ``f``, and ``dS/df``."""
        if self.kappa == 0:
            return torch.full_like(f, self.inner - self.outer), torch.zeros_like(f)
        salt = torch.exp(-self.kappa * f) * self.outer
        return self.inner - salt, self.kappa * salt

    def _born_integral(self, r: torch.Tensor, inside: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """OBC's HCT integral ``T`` per ordered pair ``[2, P, B]`` and ``dT/dr``."""
        rho, sr = self.rho_pair, self.sr_pair
        inv_r = 1 / r
        upper = r + sr
        lower = torch.maximum(rho, (r - sr).abs())
        inv_u2, inv_l = 1 / upper**2, 1 / lower
        inv_l2 = inv_l**2
        log_ratio = torch.log(lower / upper)
        term = inv_l - 1 / upper + 0.25 * (r - sr**2 * inv_r) * (inv_u2 - inv_l2) + 0.5 * log_ratio * inv_r
        dterm = 0.25 * (1 + (sr * inv_r) ** 2) * (inv_u2 - inv_l2) - 0.5 * log_ratio * inv_r**2
        # Inside the other atom's scaled sphere the lower limit moves with r: d/dr of T through
        # L = sr - r is 2/L^2. GBSAOBCForce's extra term 2 (1/rho - 1/L) cancels that derivative.
        engulfed = (rho < sr - r).to(r.dtype)
        if self.engulfed_correction:
            term = term + 2 * (1 / rho - inv_l) * engulfed
        else:
            dterm = dterm + 2 * inv_l2 * engulfed
        keep = (rho < upper).to(r.dtype)
        if inside is not None:
            keep = keep * inside
        return term * keep, dterm * keep

    def forward(self, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        i, j = self.idx
        d, r2 = _pair_vectors(xc, i, j)
        r = r2.sqrt()
        inside = None if self.cutoff is None else (r < self.cutoff).to(r.dtype)
        term, dterm = self._born_integral(r, inside)
        integral = torch.zeros(len(self.rho), r.shape[1], dtype=r.dtype, device=r.device)
        integral.index_add_(0, i, term[0]).index_add_(0, j, term[1])
        psi = 0.5 * integral * self.rho
        tanh = torch.tanh(psi * (self.alpha + psi * (-self.beta + psi * self.gamma)))
        born = 1 / (1 / self.rho - tanh / self.radius)

        screening, dscreening = self._screening(born)
        energy = -0.5 * self.coulomb * (self.charge_sq * screening / born).sum(0)
        if grad is not None:
            d_born = -0.5 * self.coulomb * self.charge_sq * (dscreening - screening / born) / born
        if self.surface_factor is not None:
            surface = self.surface_factor * (self.radius + _ACE_PROBE_RADIUS) ** 2 * (self.radius / born) ** 6
            energy = energy + surface.sum(0)
            if grad is not None:
                d_born = d_born - 6 * surface / born

        b_i, b_j = born[i], born[j]
        b_ij = b_i * b_j
        gauss = torch.exp(-r2 / (4 * b_ij))
        f2 = r2 + b_ij * gauss
        inv_f = f2.rsqrt()
        screening, dscreening = self._screening(f2 * inv_f)
        shifted = inv_f if self.cutoff is None else inv_f - 1 / self.cutoff
        pair = -self.coulomb * self.qq * screening * shifted
        if inside is not None:
            pair = pair * inside
        energy = energy + pair.sum(0)
        if grad is None:
            return energy

        # dU/df of the pair terms, then chain rule through f(r, B_i, B_j).
        d_f = -self.coulomb * self.qq * (dscreening * shifted - screening * inv_f**2)
        if inside is not None:
            d_f = d_f * inside
        w = d_f * (1 - 0.25 * gauss) * inv_f
        d_bij = d_f * 0.5 * gauss * (1 + r2 / (4 * b_ij)) * inv_f
        d_born = d_born.index_add(0, i, d_bij * b_j).index_add(0, j, d_bij * b_i)
        # dU/dI through the Born radius, then dI/dr of both ordered pairs.
        dz = self.alpha + psi * (-2 * self.beta + 3 * self.gamma * psi)
        d_integral = d_born * born**2 * (1 - tanh**2) * dz * 0.5 * self.rho / self.radius
        w = w + (d_integral[i] * dterm[0] + d_integral[j] * dterm[1]) / r
        _add_pair_gradient(grad, i, j, w, d)
        return energy


def _gbsa_obc(force: openmm.GBSAOBCForce) -> _OBC:
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
        cutoff=cutoff,
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
            if float(m["probe"]) != _ACE_PROBE_RADIUS or not same_radius:
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
        memory stays bounded and, on CPU, data stays in cache. Default: ``CPU_PAIR_ELEMENTS``
        on CPU, ``GPU_PAIR_ELEMENTS`` elsewhere. Results do not depend on it.
    compile
        Compile the evaluation with ``torch.compile`` (needs a C++ compiler on CPU, Triton on
        GPU). The first call for each device and dtype takes tens of seconds; afterwards fused
        kernels run several times faster than eager torch. Batches are evaluated in chunks of
        one fixed size (the last one padded), so nothing is compiled twice. Worth it for long
        runs (SMC, benchmarks), not for a few calls.

    Notes
    -----
    Works on any device and dtype: parameters are copied to the input's device and dtype on
    first use. Use float64 to reproduce OpenMM to round-off; float32 is faster and accurate
    to about 1e-5 relative for well-formed configurations. Forces are analytic (computed with
    the energy, no autograd graph); :meth:`energy` is still differentiable with respect to
    the positions through a custom autograd function.
    """

    name = "torch"

    def __init__(
        self,
        system: openmm.System,
        groups: set[int] | None = None,
        max_pair_elements: int | None = None,
        compile: bool = False,
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
        self._pairs = max(1, sum(t.n_pairs for t in self._terms))
        self._max_pair_elements = max_pair_elements
        self.compile = compile
        if compile:
            self.name = "torch-compiled"
        self._chunk_functions: dict[tuple[torch.device, torch.dtype, bool], Callable] = {}

    def chunk_size(self, device: torch.device | str = "cpu") -> int:
        """Configurations evaluated at once on ``device``."""
        cap = self._max_pair_elements
        if cap is None:
            cap = CPU_PAIR_ELEMENTS if torch.device(device).type == "cpu" else GPU_PAIR_ELEMENTS
        return max(1, cap // self._pairs)

    def _chunk_function(self, x: torch.Tensor, forces: bool) -> Callable:
        """``f(xc [3, N, B]) -> (energy [B], dU/dx [3, N, B] | None)`` for x's device and dtype."""
        key = (x.device, x.dtype, forces)
        if key not in self._chunk_functions:
            terms = copy.deepcopy(self._terms).to(device=x.device, dtype=x.dtype)

            def evaluate(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                grad = torch.zeros_like(xc) if forces else None
                energy = xc.new_zeros(xc.shape[2])
                for term in terms:
                    energy = energy + term(xc, grad)
                return energy, grad

            self._chunk_functions[key] = torch.compile(evaluate) if self.compile else evaluate
        return self._chunk_functions[key]

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape [batch, {self.n_atoms}, 3] in nm; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"positions must be a floating-point tensor, got {x.dtype}")

    def _evaluate(self, x: torch.Tensor, forces: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Energies ``[B]`` and, if ``forces``, gradients dU/dx ``[B, N, 3]``, chunk by chunk."""
        evaluate = self._chunk_function(x, forces)
        size = self.chunk_size(x.device)
        energies, grads = [], []
        for chunk in x.detach().split(size):
            n = chunk.shape[0]
            if self.compile and n < size:
                # Compiled code is specialised to one shape: pad with copies of a real
                # configuration rather than compile again for every batch size.
                chunk = torch.cat([chunk, chunk[-1:].expand(size - n, -1, -1)])
            energy, grad = evaluate(chunk.permute(2, 1, 0).contiguous())
            energies.append(energy[:n])
            if forces:
                grads.append(grad[..., :n].permute(2, 1, 0))
        return torch.cat(energies), torch.cat(grads) if forces else None

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Energies ``[B]`` in kJ/mol; differentiable with respect to ``x`` (first derivatives)."""
        self._check(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Potential.apply(x, self)
        return self._evaluate(x, forces=False)[0]

    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies ``[B]`` (kJ/mol) and forces ``-grad U`` ``[B, N, 3]`` (kJ/mol/nm), detached."""
        self._check(x)
        energy, grad = self._evaluate(x, forces=True)
        return energy, -grad


class _Potential(torch.autograd.Function):
    """Autograd hook: the energy's gradient is the analytic one computed with it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forcefield: TorchForceField) -> torch.Tensor:
        energy, grad = forcefield._evaluate(x, forces=True)
        ctx.save_for_backward(grad)
        return energy

    @staticmethod
    def backward(ctx, grad_energy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad_energy[:, None, None] * grad, None
