"""The flow as an OpenMM force: energy ``-kT log q(x)`` in kJ/mol, forces its negative gradient.

Two routes:

- :func:`create_flow_force`: an ``openmm.PythonForce`` (core OpenMM, every platform). The
  computation is a picklable :class:`FlowEnergy`, so Systems holding it can be copied and
  serialised with ``XmlSerializer`` (openmmtools does both).
- :func:`create_torch_force`: an ``openmmtorch.TorchForce`` running a traced TorchScript
  module, for GPU platforms without a round trip through Python. Needs the optional
  ``openmm-torch`` package.

The flow's energy ``-log q`` is dimensionless (nats) and ``q`` is a density in nm^-3N, so as
a force it is scaled by ``kT`` of the temperature the flow proposes for:
``E = kT (-log q(x))`` kJ/mol and ``F = -kT grad(-log q)`` kJ/mol/nm.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings

import numpy as np
import openmm
import torch
from openmm import unit

from openmm_sbg.flow import TarFlow
from openmm_sbg.shipped import flow_path
from openmm_sbg.smc.proposal import module_dtype_device, source_energy
from openmm_sbg.target import as_temperature

# Flows restored from pickles (copies of a System, openmmtools' context cache, replica
# exchange) are loaded once per process and shared: every copy is read-only.
_LOADED: dict[tuple, TarFlow] = {}

#: Where in-memory flows are snapshotted so that forces and moves can refer to them by path.
SNAPSHOT_DIR = os.path.join(tempfile.gettempdir(), "openmm-sbg-flows")


def molar_kT(temperature) -> float:
    """``R T`` in kJ/mol of an ``openmm.unit`` temperature (a bare number is kelvin)."""
    return (unit.MOLAR_GAS_CONSTANT_R * as_temperature(temperature)).value_in_unit(unit.kilojoule_per_mole)


def resolve_flow(flow: TarFlow | str | os.PathLike) -> tuple[TarFlow, str]:
    """The flow and the absolute path of a checkpoint holding it.

    A path is loaded (once per process). An in-memory flow is snapshotted to
    :data:`SNAPSHOT_DIR`, named by the hash of its checkpoint so that equal flows share one
    file: Systems, forces and moves store only that path when serialised (storing the
    weights would make every serialised System megabytes long, and openmmtools serialises
    Systems often). Pass the flow's own checkpoint path to serialise runs for another machine.
    """
    if isinstance(flow, TarFlow):
        buffer = io.BytesIO()
        torch.save(flow.checkpoint_payload(), buffer)
        path = os.path.join(SNAPSHOT_DIR, hashlib.sha256(buffer.getvalue()).hexdigest()[:32] + ".pt")
        if not os.path.exists(path):
            os.makedirs(SNAPSHOT_DIR, exist_ok=True)
            flow.save(path)
        return flow.eval(), path
    if isinstance(flow, (str, os.PathLike)):
        path = os.path.abspath(flow_path(flow))
        return load_shared(path), path
    raise TypeError(f"flow must be a TarFlow or the path of its checkpoint, got {type(flow).__name__}")


def load_shared(path: str) -> TarFlow:
    """The flow of checkpoint ``path``, loaded once per process (and again if the file changes)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"flow checkpoint {path!r} does not exist (it is needed to rebuild the flow)")
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = TarFlow.load(path).eval()
    return _LOADED[key]


class FlowEnergy:
    """The computation of an ``openmm.PythonForce``: ``kT (-log q(x))`` and its forces.

    Pickles as the flow's checkpoint path (see :func:`resolve_flow`), so a System holding
    the force survives ``copy.deepcopy`` and ``XmlSerializer`` and stays small.

    Parameters
    ----------
    flow
        A :class:`~openmm_sbg.TarFlow` or the path of its checkpoint.
    temperature
        Temperature whose ``kT`` turns ``-log q`` into kJ/mol (normally the target's).
    """

    def __init__(self, flow: TarFlow | str | os.PathLike, temperature):
        self.flow, self.checkpoint_path = resolve_flow(flow)
        self.kT_kj_per_mol = molar_kT(temperature)

    def energy_and_forces(self, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy (kJ/mol) and forces (kJ/mol/nm ``[N, 3]``) of positions ``[N, 3]`` in nm."""
        x = torch.as_tensor(np.asarray(positions, dtype=np.float64)).unsqueeze(0)
        energy, grad = source_energy(self.flow, x, need_grad=True)
        return self.kT_kj_per_mol * float(energy[0]), -self.kT_kj_per_mol * grad[0].numpy()

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        return self.energy_and_forces(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))

    def __getstate__(self) -> dict:
        # The key stays "kT": Systems serialised with earlier versions hold it.
        return {"kT": self.kT_kj_per_mol, "checkpoint_path": self.checkpoint_path}

    def __setstate__(self, state: dict) -> None:
        self.kT_kj_per_mol = state["kT"]
        self.checkpoint_path = state["checkpoint_path"]
        self.flow = load_shared(self.checkpoint_path)

    def __repr__(self) -> str:
        return f"FlowEnergy({self.checkpoint_path!r}, kT={self.kT_kj_per_mol:.4f} kJ/mol)"


def create_flow_force(flow: TarFlow | str | os.PathLike, temperature) -> openmm.PythonForce:
    """An ``openmm.PythonForce`` with energy ``-kT log q(x)`` over all particles.

    Parameters
    ----------
    flow
        A :class:`~openmm_sbg.TarFlow` or the path of its checkpoint (serialised Systems
        store the path; see :func:`resolve_flow`).
    temperature
        ``openmm.unit`` temperature setting ``kT`` (normally the target's).

    Examples
    --------
    >>> force = create_flow_force("flow.pt", 300 * unit.kelvin)   # doctest: +SKIP
    >>> system.addForce(force)                                      # doctest: +SKIP
    """
    return openmm.PythonForce(FlowEnergy(flow, temperature))


class FlowEnergyModule(torch.nn.Module):
    """``positions [N, 3] nm -> kT (-log q)`` kJ/mol, the interface of ``openmmtorch.TorchForce``."""

    def __init__(self, flow: TarFlow, kT_kj_per_mol: float):
        super().__init__()
        self.flow = flow
        self.kT_kj_per_mol = kT_kj_per_mol
        self.dtype = module_dtype_device(flow)[0]

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        energy = self.flow.energy(positions.to(self.dtype).unsqueeze(0))[0]
        return (self.kT_kj_per_mol * energy).to(positions.dtype)


def flow_energy_module(flow: TarFlow | str | os.PathLike, temperature) -> torch.jit.ScriptModule:
    """The flow's energy in kJ/mol as a traced TorchScript module (what ``TorchForce`` runs).

    Tracing fixes the number of atoms, which a flow fixes anyway; save it with
    ``module.save("flow_energy.pt")`` to load it in C++ or another process.
    """
    flow, _ = resolve_flow(flow)
    example = torch.randn(flow.n_atoms, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * flow.std
    with warnings.catch_warnings():
        # Shape checks inside the flow become constants of the trace, which is what we want.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(FlowEnergyModule(flow, molar_kT(temperature)).eval(), example, check_trace=False)


def create_torch_force(flow: TarFlow | str | os.PathLike, temperature):
    """An ``openmmtorch.TorchForce`` with energy ``-kT log q(x)``; forces come from autograd.

    Raises
    ------
    ImportError
        ``openmm-torch`` is not installed.
    """
    try:
        import openmmtorch
    except ImportError as err:
        raise ImportError(
            "create_torch_force needs openmm-torch (conda install -c conda-forge openmm-torch); "
            "without it use create_flow_force, which needs only OpenMM"
        ) from err
    return openmmtorch.TorchForce(flow_energy_module(flow, temperature))
