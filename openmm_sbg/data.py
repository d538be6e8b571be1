"""Load MD data into ``[T, N, 3]`` arrays in nm, checked against a target's atoms.

Reads files written by ``openmm-sbg md`` (with their per-frame ``split`` codes and
``energies_kT``) and any trajectory mdtraj reads (DCD, XTC, HDF5, PDB, ...), given a topology.
"""

from __future__ import annotations

import os

import h5py
import mdtraj
import numpy as np

from openmm_sbg.md import HDF5_EXTENSIONS, SPLIT_CODES


PER_FRAME_KEYS = ("split", "energies_kT", "frame_temperature_K")


def _check_exists(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"trajectory file {path!r} does not exist")
    return path


def read_metadata(path) -> dict:
    """Per-frame ``split`` codes, ``energies_kT`` and (pooled temperatures) ``frame_temperature_K`` of an ``openmm-sbg md`` file ({} if none)."""
    path = _check_exists(path)
    if os.path.splitext(path)[1].lower() in HDF5_EXTENSIONS:
        with h5py.File(path, "r") as handle:
            return {key: handle[key][()] for key in PER_FRAME_KEYS if key in handle}
    sidecar = path + ".meta.npz"
    if os.path.exists(sidecar):
        with np.load(sidecar) as meta:
            return {key: meta[key] for key in PER_FRAME_KEYS if key in meta}
    return {}


def load_trajectory(path, target=None, top=None, split: str | None = None) -> mdtraj.Trajectory:
    """An mdtraj Trajectory of ``path``, optionally one split of it, checked against ``target``.

    Parameters
    ----------
    path
        Any trajectory mdtraj reads. HDF5 carries its own topology; DCD/XTC need ``top`` or
        ``target`` (whose topology is used).
    target
        A :class:`~openmm_sbg.target.BoltzmannTarget`; the trajectory's atoms must match it.
    top
        A topology file or mdtraj Topology for formats without one.
    split
        ``"train"``, ``"val"``, ``"test"`` or ``None`` (all frames). Needs split codes from
        ``openmm-sbg md``.
    """
    path = _check_exists(path)
    kwargs = {}
    if os.path.splitext(path)[1].lower() not in HDF5_EXTENSIONS + (".pdb",):
        if top is None and target is None:
            raise ValueError(f"{path} has no topology; pass top=PDB_FILE or target=...")
        kwargs["top"] = top if top is not None else mdtraj.Topology.from_openmm(target.topology)
    traj = mdtraj.load(path, **kwargs)
    if target is not None:
        check_atoms_match(traj.topology, target)
    if split is not None:
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {list(SPLIT_CODES)} or None, got {split!r}")
        meta = read_metadata(path)
        if "split" not in meta:
            raise ValueError(f"{path} has no train/val/test split; it was not written by `openmm-sbg md`. Use split=None")
        traj = traj[np.flatnonzero(meta["split"] == SPLIT_CODES[split])]
    return traj


def load_positions(path, target=None, top=None, split: str | None = None) -> np.ndarray:
    """Positions ``[T, N, 3]`` (float32, nm) of a trajectory; see :func:`load_trajectory`."""
    return load_trajectory(path, target=target, top=top, split=split).xyz


def check_atoms_match(topology: mdtraj.Topology, target) -> None:
    """Raise ValueError unless ``topology`` has the target's atoms (count, elements, names) in order."""
    expected = mdtraj.Topology.from_openmm(target.topology)
    if topology.n_atoms != expected.n_atoms:
        raise ValueError(
            f"the trajectory has {topology.n_atoms} atoms but the target {target.name or ''} has "
            f"{expected.n_atoms}; it belongs to another molecule"
        )
    for got, want in zip(topology.atoms, expected.atoms):
        if got.element != want.element or got.name != want.name:
            raise ValueError(
                f"atom {want.index} is {got} in the trajectory but {want} in the target; "
                "atoms must be the same and in the same order (build both from the same PDB)"
            )


def training_frames(paths, target=None, max_temperature_K: float | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and validation frames of every file, concatenated, and where validation came from.

    ``openmm-sbg md`` files (and replica-exchange files) give their train and val splits; any
    other trajectory holds out its last 10% of frames. ``max_temperature_K`` keeps only the
    frames sampled at or below that temperature: the lower rungs of a pooled replica-exchange
    file (``...-all-replicas.h5``), whose frames record their temperature.
    """
    train_parts, val_parts = [], []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        meta = read_metadata(path)
        frames = load_positions(path, target=target)
        if max_temperature_K is not None:
            if "frame_temperature_K" not in meta:
                raise ValueError(f"{path} does not record each frame's temperature, so max_temperature_K cannot select "
                                 "from it; pass the pooled replica-exchange file (`md --replica-exchange --all-replicas` "
                                 "writes ...-all-replicas.h5) or leave the temperature out")
            kept = meta["frame_temperature_K"] <= max_temperature_K + 1e-6
            if not kept.any():
                raise ValueError(f"no frame of {path} is at or below {max_temperature_K:g} K (its lowest is "
                                 f"{meta['frame_temperature_K'].min():g} K)")
        else:
            kept = np.ones(len(frames), dtype=bool)
        if "split" in meta:
            train_parts.append(frames[kept & (meta["split"] == SPLIT_CODES["train"])])
            val_parts.append(frames[kept & (meta["split"] == SPLIT_CODES["val"])])
        else:
            frames = frames[kept]
            n_val = max(1, len(frames) // 10)
            train_parts.append(frames[:-n_val])
            val_parts.append(frames[-n_val:])
    held_out = "each file's val split (or last 10% of frames)"
    if max_temperature_K is not None:
        held_out += f", frames at or below {max_temperature_K:g} K"
    return np.concatenate(train_parts), np.concatenate(val_parts), held_out
