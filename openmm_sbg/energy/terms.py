"""The torch force field's energy terms: batched kernels with analytic gradients.

Each term reproduces the formula of OpenMM's Reference platform, so energies agree with
OpenMM to round-off in float64. All configurations of a batch are evaluated in one call:
bonded terms gather their atoms, pairwise terms work on fixed lists of atom pairs ``[P, B]``;
there is no Python loop over configurations. Forces are analytic, computed in the same pass
as the energy (cheaper than an autograd graph). Terms take plain numbers in OpenMM's units
(nm, kJ/mol, radians, e); :mod:`openmm_sbg.energy.system_terms` reads them from a System.
"""

from __future__ import annotations

import numpy as np
import torch

#: Coulomb's constant 1/(4 pi eps0) in kJ/mol nm/e^2, exactly as OpenMM's C++ code uses it.
ONE_4PI_EPS0 = 138.93545764438198
#: Solvent probe radius of the ACE surface-area term (nm).
ACE_PROBE_RADIUS = 0.14


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


class Term(torch.nn.Module):
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


class BondedTerm(Term):
    """A term over fixed groups of atoms: ``atoms`` one row of atom indices per group,
    ``parameters`` one row of :attr:`parameter_names` per group."""

    parameter_names: tuple[str, ...] = ()

    def __init__(self, atoms, parameters):
        super().__init__()
        self._indices("idx", atoms)
        self._constants(self.parameter_names, parameters)


class HarmonicBonds(BondedTerm):
    """``k/2 (r - r0)^2`` over atoms ``(i, j)``; ``r0`` in nm, ``k`` in kJ/mol/nm^2."""

    parameter_names = ("r0", "k")

    def forward(self, xc: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        d, r2 = _pair_vectors(xc, self.idx[0], self.idx[1])
        r = r2.sqrt()
        stretch = r - self.r0
        if grad is not None:
            _add_pair_gradient(grad, self.idx[0], self.idx[1], self.k * stretch / r, d)
        return (0.5 * self.k * stretch**2).sum(0)


class HarmonicAngles(BondedTerm):
    """``k/2 (theta - theta0)^2`` over atoms ``(i, j, k)``; ``theta0`` in rad, ``k`` in kJ/mol/rad^2."""

    parameter_names = ("theta0", "k")

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


class PeriodicTorsions(BondedTerm):
    """``k (1 + cos(n phi - phase))`` over atoms ``(i, j, k, l)``; ``phase`` in rad, ``k`` in kJ/mol."""

    parameter_names = ("periodicity", "phase", "k")

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


class Nonbonded(Term):
    """Coulomb + Lennard-Jones of a NoCutoff or CutoffNonPeriodic NonbondedForce.

    With a cutoff, ordinary pairs are cut at ``r_c`` and Coulomb gets OpenMM's reaction field
    ``1/r + k_rf r^2 - c_rf``. Exceptions (1-4 pairs with their scaled parameters) are, as in
    OpenMM, neither cut off nor given a reaction field. Excluded pairs are in neither list.

    Parameters
    ----------
    pairs, exceptions
        ``(i, j, q_i q_j [e^2], sigma [nm], epsilon [kJ/mol])`` of each pair, as arrays.
    cutoff
        Cutoff distance (nm) of ordinary pairs, or ``None`` for none.
    reaction_field_dielectric
        Dielectric of the reaction field beyond the cutoff.
    switch_distance
        Where the LJ switching function starts (nm), or ``None`` for no switching.
    """

    def __init__(
        self,
        pairs: tuple[np.ndarray, ...],
        exceptions: tuple[np.ndarray, ...],
        cutoff: float | None = None,
        reaction_field_dielectric: float | None = None,
        switch_distance: float | None = None,
    ):
        super().__init__()
        self._pairs("pair", *pairs)
        self._pairs("exc", *exceptions)
        self.n_pairs = len(pairs[0]) + len(exceptions[0])
        self.cutoff = cutoff
        self.switch_distance = switch_distance
        if cutoff is not None:
            self.k_rf = (reaction_field_dielectric - 1) / ((2 * reaction_field_dielectric + 1) * cutoff**3)
            self.c_rf = 3 * reaction_field_dielectric / ((2 * reaction_field_dielectric + 1) * cutoff)

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


class OBC(Term):
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
            surface = self.surface_factor * (self.radius + ACE_PROBE_RADIUS) ** 2 * (self.radius / born) ** 6
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
