"""Proposals: the flow's samples and their energy ``E_S``, with the centre-of-mass adjustment.

A proposal is any object with ``sample(n, generator=None) -> (x [n, N, 3] nm, log_q [n])``,
``log_prob(x) -> [B]``, ``energy(x) = -log_prob(x)`` (differentiable in ``x``), ``n_atoms``
and ``com_std``; :class:`~openmm_sbg.flow.TarFlow` is one and :class:`GaussianProposal`
another.

Centre of mass. The flow is trained on centred configurations plus CoM noise
``c ~ N(0, com_std^2 I)``, so its samples carry a random CoM that the (translation
invariant) target does not care about. The importance weights are the paper's,
``log w = E_S - E_T`` with ``E_S = -log q(x) + log rho(c)``, where ``c`` is the *unweighted*
mean of the atom positions (the flow trainer subtracts that mean, not the mass-weighted
one) and ``rho`` one of

- ``"gaussian"``: the density ``N(c; 0, com_std^2 I)`` of the CoM itself. For a flow whose
  centre is analytic, ``N(0, com_std^2 I)`` and independent of the rest (the
  ``internal`` representation), it cancels the flow's CoM factor exactly: the weights are
  then exact and depend on the internal coordinates only;
- ``"chi3"`` (the paper's protocol): the chi distribution with 3 degrees of freedom of
  ``|c|``, scale ``com_std``, read as a function of ``c``. It leaves a factor
  ``|c|^2`` in the weights, which alone caps the normalised ESS at 0.6;
- ``"none"``: no adjustment, for proposals whose CoM is part of the target;
- ``"auto"`` (the default of every sampler and move of the package,
  :data:`DEFAULT_COM_ADJUSTMENT`): ``"gaussian"`` for a flow with an analytic Gaussian
  centre, ``"chi3"`` otherwise (Cartesian flows, other proposals); see
  :func:`resolve_com_adjustment`. With it the clipped fraction defaults to 0 for exact
  weights and to the paper's 0.2% for ``"chi3"`` (:func:`resolve_clip_fraction`).

Along the annealing path the term goes on the target side instead:
``E_S = -log q(x)`` and ``E_T' = E_T - log rho(c)``. The weight increments
``-(dt)(E_T' - E_S)`` are the same, but every intermediate ``exp(-E_t)`` is then a proper
density (the paper's placement makes them improper in the CoM, which biases log Z; see
``tests/test_smc.py``). Either way the weighted distribution of internal coordinates is
exact.

log Z (the one convention, reported by :class:`~openmm_sbg.smc.SMCResult` and the JSON
summaries of ``sample`` and ``demo``): an estimate of
``log integral exp(-E_T(x)) rho(c(x)) dx`` over all ``3N`` Cartesian coordinates, with
``E_T = U / kT`` (dimensionless) and ``x`` in nm, so ``Z`` is in nm^(3N). With
``"gaussian"`` ``rho`` integrates to 1, so ``Z`` is the configurational integral of
``exp(-U/kT)`` with the (infinite) translational volume replaced by 1 and
``-kT log Z`` the configurational free energy on that scale; ``"chi3"`` adds
``log(12 pi com_std^2)`` (the integral of its ``rho``); ``"none"`` is the plain integral.
Only differences of log Z between runs with the same convention mean anything physical.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

COM_ADJUSTMENTS = ("chi3", "gaussian", "none")
#: The CoM density every sampler and move of the package uses unless told otherwise:
#: ``"auto"``, resolved per flow by :func:`resolve_com_adjustment`.
DEFAULT_COM_ADJUSTMENT = "auto"
#: The fraction of largest log-weights the paper's protocol drops (with ``"chi3"``).
PAPER_CLIP_FRACTION = 0.002


class Proposal(Protocol):
    """What :class:`~openmm_sbg.smc.SMCSampler` needs from a flow."""

    n_atoms: int
    com_std: float | None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...

    def energy(self, x: torch.Tensor) -> torch.Tensor: ...


def has_gaussian_centre(flow) -> bool:
    """Whether ``flow``'s centre of mass is analytic, ``N(0, com_std^2 I)`` and independent of the rest.

    True for a :class:`~openmm_sbg.TarFlow` over internal coordinates (its representation
    draws the six rigid-body degrees of freedom analytically); a proposal may say so itself
    with an attribute ``gaussian_centre``.
    """
    declared = getattr(flow, "gaussian_centre", None)
    if declared is not None:
        return bool(declared)
    return getattr(getattr(flow, "representation", None), "n_rigid", 0) > 0


def resolve_com_adjustment(kind: str, flow) -> str:
    """The CoM density to use with ``flow``: ``kind`` itself, or for ``"auto"`` ``"gaussian"``
    where the flow has an analytic Gaussian centre (exact weights) and ``"chi3"`` (the paper's) otherwise."""
    if kind == "auto":
        return "gaussian" if has_gaussian_centre(flow) else "chi3"
    if kind not in COM_ADJUSTMENTS:
        raise ValueError(f"com_adjustment must be 'auto' or one of {COM_ADJUSTMENTS}, got {kind!r}")
    return kind


def resolve_clip_fraction(clip_fraction: float | None, com_adjustment: str) -> float:
    """``clip_fraction``, or for ``None`` the protocol's: the paper's 0.2% with ``"chi3"``, 0 (exact weights) otherwise."""
    if clip_fraction is None:
        return PAPER_CLIP_FRACTION if com_adjustment == "chi3" else 0.0
    return float(clip_fraction)


def log_z_convention(kind: str, com_std: float | None) -> str:
    """One sentence saying what a run's log Z estimates with the CoM density ``kind`` (for JSON summaries)."""
    base = "log of the integral of exp(-U/kT) rho(c) over the 3N Cartesian coordinates in nm (Z in nm^(3N)), c the unweighted mean position"
    if kind == "gaussian":
        return f"{base}; rho = N(0, s^2 I) with s = com_std = {com_std:.6g} nm integrates to 1, so the translational volume counts as 1"
    if kind == "chi3":
        return (f"{base}; rho = the chi3 density of |c| (the paper's), s = com_std = {com_std:.6g} nm, integrates to "
                f"12 pi s^2: subtract log(12 pi s^2) = {math.log(12 * math.pi * com_std**2):.6g} for the Gaussian convention")
    return f"{base}; rho = 1 (no CoM adjustment)"


def com_log_density(x: torch.Tensor, com_std: float | None, kind: str) -> torch.Tensor:
    """``log rho(c)`` per configuration, ``c`` the unweighted mean of the positions ``x [B, N, 3]``.

    ``kind`` is ``"chi3"``, ``"gaussian"`` or ``"none"`` (resolve ``"auto"`` first with
    :func:`resolve_com_adjustment`); see the module docstring. Differentiable in ``x``.
    """
    if kind not in COM_ADJUSTMENTS:
        raise ValueError(f"com_adjustment must be one of {COM_ADJUSTMENTS}, got {kind!r}")
    if kind == "none":
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if not com_std or com_std <= 0:
        raise ValueError(
            f"the CoM adjustment {kind!r} needs the flow's CoM-noise std (flow.com_std > 0), got {com_std!r}; "
            "pass com_adjustment='none' for a proposal without CoM noise"
        )
    r2 = x.mean(dim=1).square().sum(-1)
    gaussian = -1.5 * math.log(2 * math.pi * com_std**2) - r2 / (2 * com_std**2)
    if kind == "gaussian":
        return gaussian
    # chi_3(r; s) = 4 pi r^2 N(c; 0, s^2 I): the density of |c| rather than of c.
    return gaussian + math.log(4 * math.pi) + torch.log(r2)


def module_dtype_device(module) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of a torch module's first parameter or buffer (float64 on CPU otherwise)."""
    if isinstance(module, torch.nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
    return torch.float64, torch.device("cpu")


def _energy_and_grad(fn, x: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.enable_grad() if need_grad else torch.no_grad():
        x = x.detach().requires_grad_(need_grad)
        energy = fn(x)
        if not need_grad:
            grad = None
        elif energy.requires_grad:
            grad = torch.autograd.grad(energy.sum(), x)[0]
        else:  # a constant, e.g. no CoM adjustment
            grad = torch.zeros_like(x)
    return energy.detach(), grad


def source_energy(flow: Proposal, x: torch.Tensor, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``E_S(x) = -log q(x)`` in kT and, if ``need_grad``, its gradient in kT/nm.

    ``x`` is float64 on the CPU; the flow runs in its own dtype and device and the results
    come back as float64 on the CPU.
    """
    dtype, device = module_dtype_device(flow)
    energy, grad = _energy_and_grad(flow.energy, x.to(dtype=dtype, device=device), need_grad)
    energy = energy.to(dtype=torch.float64, device="cpu")
    return energy, None if grad is None else grad.to(dtype=torch.float64, device="cpu")


def com_energy(
    x: torch.Tensor, com_std: float | None, kind: str, need_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``-log rho(c)`` in kT (added to the target's energy on the path) and its gradient."""
    return _energy_and_grad(lambda y: -com_log_density(y, com_std, kind), x, need_grad)


def draw_proposals(flow: Proposal, n: int, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` samples of the flow, drawn ``batch_size`` at a time, as float64 on the CPU."""
    chunks = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x, _ = flow.sample(min(batch_size, n - start), generator=generator)
            chunks.append(x.detach().to(dtype=torch.float64, device="cpu"))
    return torch.cat(chunks)


class GaussianProposal(torch.nn.Module):
    """A Gaussian proposal ``N(mean, diag(std^2))`` over configurations ``[N, 3]`` in nm.

    A stand-in for a trained flow (tests, baselines such as "sample around the minimised
    structure"), implementing the same protocol.

    Parameters
    ----------
    mean
        ``[N, 3]`` mean configuration in nm.
    std
        Standard deviation in nm: a number or an ``[N, 3]`` array.
    com_std
        The std of the proposal's centre of mass per coordinate, used by the CoM
        adjustment; defaults to the exact value for a scalar ``std``, ``std / sqrt(N)``.
    """

    def __init__(self, mean, std, com_std: float | None = None):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        if mean.ndim != 2 or mean.shape[1] != 3:
            raise ValueError(f"mean must have shape [n_atoms, 3], got {tuple(mean.shape)}")
        std = torch.as_tensor(std, dtype=torch.float64).expand_as(mean).clone()
        if (std <= 0).any():
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.n_atoms = mean.shape[0]
        # CoM variance per coordinate: sum_i std_i^2 / N^2 (exact when std is isotropic).
        self.com_std = float(std.square().mean().sqrt() / math.sqrt(self.n_atoms)) if com_std is None else com_std

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn((n, *self.mean.shape), dtype=self.mean.dtype, generator=generator)
        x = self.mean + self.std * noise
        return x, self.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        return (-0.5 * z.square() - self.std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(x)
