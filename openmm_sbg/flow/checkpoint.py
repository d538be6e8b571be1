"""Checkpoint files: safe to load (tensors and plain containers only), atomic to write.

A checkpoint is a ``torch.save`` dict with

``format``, ``format_version``
    file type marker, so a foreign ``.pt`` file gives a clear error;
``config``
    :class:`~openmm_sbg.flow.FlowConfig` as a dict;
``n_atoms``, ``std``, ``com_std``
    molecule size, the scalar normalisation (nm) and the CoM std of the flow's samples (nm);
``state_dict``
    the EMA weights (what sampling uses);
``target``
    the molecule's identity: system name and/or System XML + topology PDB, temperature and
    the per-atom (element, residue, atom) names used to catch a wrong molecule;
``metadata``
    training record (data, steps, time, validation NLL, versions);
``training_state``
    only while training is unfinished: raw weights, optimiser state and progress, so that
    an interrupted run resumes where its last checkpoint left it.

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
:func:`flow_payload` and :func:`flow_from_payload` turn a :class:`~openmm_sbg.flow.TarFlow` into
that dict and back (``TarFlow.save``, ``TarFlow.load`` and friends call them).
"""

from __future__ import annotations

import io
import os

import openmm
from openmm import app, unit

from openmm_sbg.io import atomic_path

FORMAT = "openmm-sbg-tarflow"
FORMAT_VERSION = 1
_REQUIRED = ("config", "n_atoms", "std", "com_std", "state_dict", "target", "metadata")


def write_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` (with the format marker added) to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a checkpoint written by :func:`write_checkpoint`.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is corrupt, truncated, holds Python objects other than tensors and plain
        containers, or is not an openmm-sbg flow checkpoint.
    """
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"flow checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean "unreadable"
        raise ValueError(
            f"cannot read flow checkpoint {path!r}: the file is corrupt, truncated, or not a torch "
            f"checkpoint of tensors ({_reason(err)}). Re-copy it or train it again."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is a torch file but not an openmm-sbg TarFlow checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has checkpoint format version {payload['format_version']}; this openmm-sbg reads "
            f"version {FORMAT_VERSION} and older. Upgrade openmm-sbg."
        )
    missing = [key for key in _REQUIRED if key not in payload]
    if missing:
        raise ValueError(f"flow checkpoint {path!r} is incomplete: missing {missing}")
    return payload


def _reason(err: Exception) -> str:
    """The informative line of a torch.load error (its first line is often generic)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line:
            name = line.split("GLOBAL", 1)[-1].split()[0]
            return f"it holds a Python object of type {name}, which is not loaded because it could run code"
    return lines[0] if lines else type(err).__name__


# ---------------------------------------------------------------------------- flows
def flow_payload(flow, state_dict: dict | None = None) -> dict:
    """The checkpoint dict of a TarFlow (``state_dict`` overrides its own weights)."""
    weights = flow.state_dict() if state_dict is None else state_dict
    return {
        "config": flow.config.to_dict(),
        "n_atoms": flow.n_atoms,
        "std": flow.std,
        "com_std": flow.com_std,
        "state_dict": {key: value.detach().cpu().clone() for key, value in weights.items()},
        "target": flow.target_identity,
        "metadata": dict(flow.metadata),
    }


def flow_from_payload(flow_class, payload: dict, source: str = "<payload>", target=None):
    """Build a ``flow_class`` (TarFlow) flow from a validated checkpoint dict, in eval mode.

    ``target``, if given, must be the checkpoint's molecule (see :func:`check_target`);
    ``source`` names the checkpoint in errors.
    """
    from openmm_sbg.flow.zmatrix import ZMatrix

    identity = payload["target"]
    if target is not None:
        if identity is None:
            raise ValueError(f"flow checkpoint {source} stores no target, so it cannot be checked against one")
        check_target(identity, target, source)
    weights = payload["state_dict"]
    zmatrix = None
    if "representation.root" in weights:
        zmatrix = ZMatrix(tuple(weights["representation.root"].tolist()), weights["representation.placed"].numpy())
    flow = flow_class(payload["config"], payload["n_atoms"], std=payload["std"], zmatrix=zmatrix)
    flow.target_identity = identity
    flow.metadata = dict(payload["metadata"])
    try:
        # assign: every tensor keeps the dtype it was saved in (a float32 flow's float64-by-default
        # marginal buffers stay float32), so a loaded flow computes exactly what the saved one did.
        flow.load_state_dict(weights, assign=True)
    except RuntimeError as err:
        raise ValueError(f"flow checkpoint {source} does not match its own configuration: {err}") from None
    return flow.eval()


# ---------------------------------------------------------------------------- target identity
def atom_identity(topology: app.Topology) -> list[list[str]]:
    """Per-atom ``[element, residue name, atom name]``, the fingerprint of a molecule."""
    return [
        [atom.element.symbol if atom.element is not None else "", atom.residue.name, atom.name]
        for atom in topology.atoms()
    ]


def target_identity(target) -> dict:
    """What a checkpoint stores to recognise and rebuild ``target`` (a BoltzmannTarget).

    A built-in system is stored by name; any other target also stores its System XML and
    topology (as PDB text), so :func:`target_from_identity` can rebuild it anywhere.
    """
    from openmm_sbg import systems

    identity = {
        "name": target.name,
        "temperature_K": float(target.temperature.value_in_unit(unit.kelvin)),
        "atoms": atom_identity(target.topology),
        "residues": [residue.name for residue in target.topology.residues()],
    }
    if target.name not in systems.names():
        positions = target.positions if target.positions is not None else [[0.0, 0.0, 0.0]] * target.n_atoms
        text = io.StringIO()
        app.PDBFile.writeFile(target.topology, positions * unit.nanometer, text, keepIds=True)
        identity["system_xml"] = openmm.XmlSerializer.serialize(target.system)
        identity["topology_pdb"] = text.getvalue()
    return identity


def target_from_identity(identity: dict, **target_kwargs):
    """Rebuild the BoltzmannTarget described by :func:`target_identity` (keywords go to it)."""
    from openmm_sbg import systems
    from openmm_sbg.target import BoltzmannTarget

    temperature = identity["temperature_K"] * unit.kelvin
    if "system_xml" not in identity:
        return systems.get(identity["name"], temperature=temperature, **target_kwargs)
    pdb = app.PDBFile(io.StringIO(identity["topology_pdb"]))
    system = openmm.XmlSerializer.deserialize(identity["system_xml"])
    return BoltzmannTarget(
        system, pdb.topology, temperature, positions=pdb.positions, name=identity["name"], **target_kwargs
    )


def describe(name: str | None, residues: list[str], n_atoms: int) -> str:
    """Human-readable molecule, e.g. ``'ad2' (22 atoms; residues ACE-ALA-NME)``."""
    label = f"{name!r} " if name else ""
    return f"{label}({n_atoms} atoms; residues {'-'.join(residues)})"


def check_target(identity: dict, target, source: str) -> None:
    """Raise ValueError, naming both molecules, if ``target`` is not the checkpoint's molecule."""
    atoms = atom_identity(target.topology)
    if atoms != [list(atom) for atom in identity["atoms"]]:
        raise ValueError(
            f"flow checkpoint {source} was trained for "
            f"{describe(identity['name'], identity['residues'], len(identity['atoms']))}, but the target is "
            f"{describe(target.name, [r.name for r in target.topology.residues()], len(atoms))}. Use a flow trained for this molecule "
            "(openmm-sbg train) or the target it was trained for."
        )
