"""Batched Langevin dynamics: many walkers of one System integrated together in torch.

The scheme is OpenMM's ``LangevinMiddleIntegrator`` (Zhang et al., J. Phys. Chem. A 123, 6056
(2019)), step for step, for an unconstrained System::

    v += dt F(x) / m                          (full kick with the forces at x)
    x += dt/2 v
    v  = a v + sqrt(kT/m (1 - a^2)) R,        a = exp(-gamma dt)
    x += dt/2 v

Units are OpenMM's: nm, ps, amu (g/mol) and kJ/mol, so ``F/m`` is in nm/ps^2 and ``kT/m`` in
nm^2/ps^2. Each walker has its own temperature (replica exchange permutes them) and its own
counter-based random stream (:mod:`openmm_sbg.dynamics.noise`), so the state is positions,
velocities, temperatures and one step count: :meth:`BatchedLangevin.state_dict` is a complete
checkpoint, and a resumed run is bit for bit the uninterrupted one.

Forces come from the :class:`~openmm_sbg.energy.TorchForceField`; a System it cannot evaluate
makes :func:`batched_force_field` raise :class:`BatchedEngineUnavailable`, which says why.
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import torch
from openmm import unit

from openmm_sbg.dynamics import noise
from openmm_sbg.energy import TorchForceField, UnsupportedForceError
from openmm_sbg.energy.base import EnergyBackend
from openmm_sbg.energy.torch_forcefield import CPU_PAIR_ELEMENTS, GPU_PAIR_ELEMENTS

#: R in kJ/mol/K, as OpenMM's BOLTZ.
MOLAR_GAS_CONSTANT = (unit.MOLAR_GAS_CONSTANT_R).value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


class BatchedEngineUnavailable(ValueError):
    """The batched engine cannot run this System (or on this device); the message says why and what to use instead."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, refusing CUDA where torch sees no GPU."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BatchedEngineUnavailable(
            f"device {device} was asked for but torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu"
        )
    return device


def resolve_precision(precision: str | torch.dtype) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        if precision not in PRECISIONS.values():
            raise ValueError(f"precision must be float32 or float64, got {precision}")
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def batched_force_field(
    system: openmm.System, n_walkers: int, device: str | torch.device = "cpu", compile: bool = False
) -> TorchForceField:
    """A TorchForceField for ``n_walkers`` configurations at a time, in chunks that divide the batch evenly.

    Raises :class:`BatchedEngineUnavailable` (naming every unsupported force) if the torch force
    field cannot evaluate ``system``.
    """
    try:
        probe = TorchForceField(system, max_pair_elements=2**50)
    except UnsupportedForceError as err:
        raise BatchedEngineUnavailable(
            f"the batched engine (--walkers) integrates with the torch force field, which refused this System: {err}. "
            "Run without --walkers: OpenMM integrates any System, one trajectory per run"
        ) from err
    pairs = max(1, 2**50 // probe.chunk_size())  # pair interactions per configuration
    cap = CPU_PAIR_ELEMENTS if torch.device(device).type == "cpu" else GPU_PAIR_ELEMENTS
    # Equal chunks: a compiled force field pads the last chunk to the chunk size.
    n_chunks = max(1, math.ceil(n_walkers * pairs / cap))
    chunk = math.ceil(n_walkers / n_chunks)
    return TorchForceField(system, max_pair_elements=chunk * pairs, compile=compile)


def compile_available(device: str | torch.device = "cpu") -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` here (a C++ compiler on CPU, Triton on GPU)."""
    import importlib.util
    import os
    import shutil

    if torch.device(device).type == "cpu":
        return any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
    return importlib.util.find_spec("triton") is not None


def ladder_copies(n_frames: int, n_temperatures: int, device: str | torch.device = "cpu") -> int:
    """Copies of a ladder that fill a batch (about 64 walkers on CPU, 1,024 on a GPU) and divide ``n_frames``.

    A run of ``n_frames`` frames per temperature becomes ``copies`` runs of ``n_frames / copies``.
    """
    walkers = 64 if torch.device(device).type == "cpu" else 1024
    most = max(1, walkers // n_temperatures)
    return max(c for c in range(1, min(most, n_frames) + 1) if n_frames % c == 0)


def system_masses(system: openmm.System) -> np.ndarray:
    """Particle masses in amu (g/mol), ``[N]``."""
    return np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])


def as_kelvin(temperatures, n_walkers: int) -> torch.Tensor:
    """Per-walker temperatures ``[n_walkers]`` (float64, K) from a number, a sequence or a Quantity."""
    if unit.is_quantity(temperatures):
        temperatures = temperatures.value_in_unit(unit.kelvin)
    kelvin = torch.as_tensor(np.asarray(temperatures, dtype=np.float64)).reshape(-1)
    if kelvin.numel() == 1:
        kelvin = kelvin.expand(n_walkers).clone()
    if kelvin.shape != (n_walkers,) or not bool(torch.all(kelvin >= 0)):
        raise ValueError(f"temperatures must be one non-negative number of kelvin or {n_walkers} of them")
    return kelvin


class BatchedLangevin:
    """``B`` walkers of one System under LangevinMiddle dynamics, integrated as one batch.

    Parameters
    ----------
    backend
        Energies and forces in kJ/mol and kJ/mol/nm for ``[B, N, 3]`` positions in nm
        (normally :func:`batched_force_field`).
    masses
        ``[N]`` particle masses in amu (:func:`system_masses`); zero-mass particles stay put, as in OpenMM.
    positions
        Starting positions ``[B, N, 3]`` in nm (array, tensor or length Quantity).
    temperatures
        Kelvin per walker (``[B]``) or one for all; a Quantity works too.
    timestep, friction
        ``openmm.unit`` quantities (or numbers in fs and 1/ps).
    seed
        Seed of every walker's stream.
    walker_ids
        Global index of each walker's random stream (default ``0..B-1``); a walker's
        trajectory depends on its id and the seed, not on the batch around it.
    velocities
        Starting velocities ``[B, N, 3]`` in nm/ps; default: Maxwell-Boltzmann at each walker's
        temperature (:meth:`draw_velocities`).
    device, precision
        Where and in which float type to integrate (``"float32"`` or ``"float64"``).
    compile
        ``torch.compile`` the integration step (the noise and the update, fused); default: when
        the backend is compiled. Compiled and eager steps may differ in the last bit, so resume
        a run with the setting it was started with to continue it bit for bit.
    """

    def __init__(
        self,
        backend: EnergyBackend,
        masses,
        positions,
        temperatures,
        timestep=1.0 * unit.femtosecond,
        friction=1.0 / unit.picosecond,
        seed: int = 0,
        walker_ids=None,
        velocities=None,
        device: str | torch.device = "cpu",
        precision: str | torch.dtype = "float32",
        compile: bool | None = None,
    ):
        self.backend = backend
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision)
        self.x = _tensor(positions, unit.nanometer).to(self.device, self.dtype).clone()
        if self.x.ndim != 3 or self.x.shape[2] != 3:
            raise ValueError(f"positions must be [walkers, atoms, 3] in nm, got shape {tuple(self.x.shape)}")
        self.n_walkers, self.n_atoms = self.x.shape[:2]
        masses = torch.as_tensor(np.asarray(masses, dtype=np.float64))
        if masses.shape != (self.n_atoms,) or bool(torch.any(masses < 0)):
            raise ValueError(f"masses must be {self.n_atoms} non-negative numbers (amu)")
        self.inverse_mass = torch.where(masses > 0, 1.0 / masses.clamp(min=1e-300), 0.0)[:, None].to(self.device, self.dtype)
        self.timestep_ps = _value(timestep, unit.picosecond, 1e-3)
        self.friction_per_ps = _value(friction, unit.picosecond**-1, 1.0)
        if self.timestep_ps <= 0 or self.friction_per_ps < 0:
            raise ValueError("the timestep must be positive and the friction non-negative")
        self.seed = int(seed)
        self.walker_ids = torch.arange(self.n_walkers) if walker_ids is None else torch.as_tensor(walker_ids).reshape(-1)
        if self.walker_ids.shape != (self.n_walkers,):
            raise ValueError(f"walker_ids must hold {self.n_walkers} integers")
        self.walker_ids = self.walker_ids.to(self.device, torch.int64)
        self.temperature_K = as_kelvin(temperatures, self.n_walkers).to(self.device)
        self.step_count = 0
        compiled = compile if compile is not None else bool(getattr(backend, "compile", False))
        self._update = torch.compile(self._middle_step, dynamic=False) if compiled else self._middle_step
        if velocities is None:
            self.v = self.draw_velocities()
        else:
            self.v = _tensor(velocities, unit.nanometer / unit.picosecond).to(self.device, self.dtype).clone()
        if self.v.shape != self.x.shape:
            raise ValueError(f"velocities must have the positions' shape {tuple(self.x.shape)}")
        self._update_forces()

    # ------------------------------------------------------------------ state
    def draw_velocities(self) -> torch.Tensor:
        """Maxwell-Boltzmann velocities (nm/ps) at each walker's temperature, from its own stream."""
        keys = noise.walker_keys(self.seed, noise.VELOCITIES, self.step_count, self.walker_ids)
        z = noise.normals(keys, 3 * self.n_atoms, self.dtype).reshape(self.x.shape)
        kT = (MOLAR_GAS_CONSTANT * self.temperature_K).to(self.dtype)[:, None, None]
        return z * torch.sqrt(kT * self.inverse_mass)

    def _update_forces(self) -> None:
        energy, forces = self.backend.energy_and_forces(self.x)
        self.energy_kj, self.forces = energy, forces

    def set_temperatures(self, temperatures, rescale_velocities: bool = True) -> None:
        """New per-walker temperatures; velocities scaled by ``sqrt(T_new / T_old)`` (exact for an exchange)."""
        new = as_kelvin(temperatures, self.n_walkers).to(self.device)
        if rescale_velocities:
            ratio = torch.where(self.temperature_K > 0, new / self.temperature_K.clamp(min=1e-300), 1.0)
            self.v = self.v * torch.sqrt(ratio).to(self.dtype)[:, None, None]
        self.temperature_K = new

    def state_dict(self) -> dict:
        """Everything a resumed run needs (tensors on the CPU)."""
        return {
            "x": self.x.cpu(), "v": self.v.cpu(), "temperature_K": self.temperature_K.cpu(),
            "step_count": self.step_count, "seed": self.seed, "walker_ids": self.walker_ids.cpu(),
            "timestep_ps": self.timestep_ps, "friction_per_ps": self.friction_per_ps, "dtype": str(self.dtype),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; the integrator settings and precision must match."""
        mine = {k: getattr(self, k) for k in ("seed", "timestep_ps", "friction_per_ps")} | {"dtype": str(self.dtype)}
        theirs = {k: state[k] for k in mine}
        if mine != theirs:
            raise ValueError(f"the saved state was made with {theirs}, this engine has {mine}")
        if tuple(state["x"].shape) != tuple(self.x.shape):
            raise ValueError(f"the saved state holds {tuple(state['x'].shape)} positions, this engine {tuple(self.x.shape)}")
        self.x = state["x"].to(self.device, self.dtype).clone()
        self.v = state["v"].to(self.device, self.dtype).clone()
        self.temperature_K = state["temperature_K"].to(self.device, torch.float64).clone()
        self.walker_ids = state["walker_ids"].to(self.device, torch.int64).clone()
        self.step_count = int(state["step_count"])
        self._update_forces()

    # ------------------------------------------------------------------ dynamics
    def step(self, n_steps: int = 1) -> None:
        """Advance every walker by ``n_steps`` LangevinMiddle steps."""
        dt = self.timestep_ps
        a = math.exp(-self.friction_per_ps * dt)
        kT = (MOLAR_GAS_CONSTANT * self.temperature_K).to(self.dtype)[:, None, None]
        noise_scale = torch.sqrt(kT * (1.0 - a * a) * self.inverse_mass)  # [B, N, 1]
        kick = dt * self.inverse_mass
        for _ in range(n_steps):
            keys = noise.walker_keys(self.seed, noise.DYNAMICS, self.step_count, self.walker_ids)
            self.x, self.v = self._update(self.x, self.v, self.forces, keys, kick, noise_scale, a, 0.5 * dt)
            self.step_count += 1
            self._update_forces()

    @staticmethod
    def _middle_step(x, v, forces, keys, kick, noise_scale, a: float, half_dt: float):
        """One LangevinMiddle step from the forces at ``x`` (elementwise: ``torch.compile`` fuses it)."""
        r = noise.normals(keys, x.shape[1] * 3, x.dtype).reshape(x.shape)
        v = v + kick * forces
        x = x + half_dt * v
        v = a * v + noise_scale * r
        return x + half_dt * v, v

    # ------------------------------------------------------------------ observables
    def kinetic_energy(self) -> torch.Tensor:
        """Kinetic energy of each walker, kJ/mol ``[B]`` (of the stored, mid-step velocities)."""
        mass = torch.where(self.inverse_mass > 0, 1.0 / self.inverse_mass, 0.0)
        return 0.5 * (mass * self.v.square()).sum(dim=(1, 2))

    def kinetic_temperature(self) -> torch.Tensor:
        """Instantaneous kinetic temperature of each walker, K ``[B]`` (3 degrees of freedom per moving atom)."""
        dof = 3 * int((self.inverse_mass > 0).sum())
        return 2.0 * self.kinetic_energy().double() / (dof * MOLAR_GAS_CONSTANT)

    @property
    def simulated_ps(self) -> float:
        """Time simulated by each walker so far."""
        return self.step_count * self.timestep_ps


def _tensor(value, unit_) -> torch.Tensor:
    """A tensor, array or Quantity (converted to ``unit_``) as a torch tensor."""
    if unit.is_quantity(value):
        value = value.value_in_unit(unit_)
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))


def _value(quantity, unit_, scale: float) -> float:
    """A Quantity in ``unit_``, or a bare number times ``scale`` (fs -> ps: 1e-3)."""
    if unit.is_quantity(quantity):
        return float(quantity.value_in_unit(unit_))
    return float(quantity) * scale
