"""SMCResult: weighted samples, their energies and the log-normaliser estimate of a run."""

from __future__ import annotations

import dataclasses
import json
import os

import h5py
import numpy as np

from openmm_sbg.io import atomic_path


#: What :attr:`SMCResult.ess` (and ``ess`` in the summaries of ``sample`` and ``demo``) is, in one line.
ESS_DEFINITION = (
    "normalised Kish ESS (sum w)^2 / (K sum w^2): for importance sampling that of the proposals' weights; "
    "for SMC the smallest one the weights reached at any annealing step before a resampling (incl. t = 1)"
)


@dataclasses.dataclass
class SMCResult:
    """The output of :meth:`SMCSampler.run <openmm_sbg.smc.SMCSampler.run>`.

    Attributes
    ----------
    positions
        ``[K, N, 3]`` particle positions in nm.
    log_weights
        ``[K]`` log importance weights of ``positions`` (all zero after the final
        resampling; ``-inf`` for particles with zero weight).
    energies
        ``[K]`` target energies ``E_T`` in kT. Energies held in memory are in kT throughout
        the package (the engine's unit), so the name carries no unit; in files, which other
        tools read, the unit is part of the name: :meth:`save` writes this as ``energies_kT``,
        as ``openmm-sbg md`` writes its frames' energies.
    log_z
        Estimate of ``log Z``, ``Z = integral exp(-E_T(x)) rho(c(x)) dx`` with ``E_T`` in kT,
        ``x`` in nm and ``rho`` the run's CoM density (the flow is normalised, so no
        proposal normaliser enters); :mod:`openmm_sbg.smc.proposal` states the convention.
    ess
        How good the run was: a normalised Kish ESS in [0, 1] (1: perfectly balanced
        weights). For importance sampling (``n_steps=0``) the ESS of the proposals' weights
        (after the filters); for SMC the smallest ESS the weights reached at any annealing
        step, before any resampling (the value each resampling acted on, and the one at
        ``t = 1``), i.e. ``diagnostics["ess"].min()``. A run that never resampled before
        ``t = 1`` thus reports the ESS of its Jarzynski weights over the whole path.
    ess_since_last_resampling
        The normalised ESS of the weights at ``t = 1`` before the final resampling: of the
        weights accumulated since the last resampling only, so near 1 when that was close to
        ``t = 1`` (not a measure of the run; ``None`` in files written before it was stored).
    diagnostics
        Per annealing step: ``t``, ``ess`` (before any resampling), ``acceptance``,
        ``resampled``, ``step_size``, ``n_alive`` and the running ``log_z``.
    topology
        ``openmm.app.Topology`` or ``mdtraj.Topology`` of the particles (``None`` for toy targets).
    info
        Run settings and counts (proposals drawn, kept by the filters, seed, timings ...).
    """

    positions: np.ndarray
    log_weights: np.ndarray
    energies: np.ndarray
    log_z: float
    ess: float
    diagnostics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    topology: object = None
    info: dict = dataclasses.field(default_factory=dict)
    ess_since_last_resampling: float | None = None

    @property
    def weights(self) -> np.ndarray:
        """Normalised importance weights ``[K]`` (sum to one)."""
        log_w = np.where(np.isfinite(self.log_weights), self.log_weights, -np.inf)
        w = np.exp(log_w - log_w.max())
        return w / w.sum()

    def to_mdtraj(self):
        """The particles as an ``mdtraj.Trajectory`` (weights are not part of it; see :attr:`weights`)."""
        import mdtraj

        if self.topology is None:
            raise ValueError("this result has no topology (toy target); use result.positions directly")
        topology = self.topology
        if not isinstance(topology, mdtraj.Topology):
            topology = mdtraj.Topology.from_openmm(topology)
        return mdtraj.Trajectory(self.positions.astype(np.float32), topology)

    def save(self, path: str | os.PathLike) -> None:
        """Write an mdtraj HDF5 trajectory plus datasets ``log_weights`` and ``energies_kT``.

        Read it back with :meth:`load`, or with ``mdtraj.load(path)`` and
        ``h5py.File(path)["log_weights"]``. ``log_z``, ``ess`` and ``info`` (JSON) are
        attributes of the file, the diagnostics datasets of the group ``diagnostics``. The
        file appears only once complete.
        """
        if os.path.splitext(os.fspath(path))[1].lower() not in (".h5", ".hdf5"):
            raise ValueError(f"samples are saved as HDF5; give a path ending in .h5, got {os.fspath(path)!r}")
        with atomic_path(path) as tmp:
            self.to_mdtraj().save_hdf5(tmp)
            with h5py.File(tmp, "a") as handle:
                handle.create_dataset("log_weights", data=np.asarray(self.log_weights, dtype=np.float64))
                handle.create_dataset("energies_kT", data=np.asarray(self.energies, dtype=np.float64))
                group = handle.create_group("diagnostics")
                for key, value in self.diagnostics.items():
                    group.create_dataset(key, data=np.asarray(value))
                handle.attrs["log_z"] = float(self.log_z)
                handle.attrs["ess"] = float(self.ess)
                if self.ess_since_last_resampling is not None:
                    handle.attrs["ess_since_last_resampling"] = float(self.ess_since_last_resampling)
                handle.attrs["smc_info"] = json.dumps(self.info, default=str)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SMCResult:
        """Read a file written by :meth:`save`."""
        import mdtraj

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no samples file at {path!r}; write one with `openmm-sbg sample`")
        traj = mdtraj.load(path)
        with h5py.File(path, "r") as handle:
            if "log_weights" not in handle:
                raise ValueError(f"{path} has no 'log_weights' dataset; it was not written by SMCResult.save")
            return cls(
                positions=traj.xyz.astype(np.float64),
                log_weights=handle["log_weights"][()],
                energies=handle["energies_kT"][()],
                log_z=float(handle.attrs["log_z"]),
                ess=float(handle.attrs["ess"]),
                diagnostics={key: value[()] for key, value in handle.get("diagnostics", {}).items()},
                topology=traj.topology,
                info=json.loads(handle.attrs.get("smc_info", "{}")),
                ess_since_last_resampling=(
                    float(handle.attrs["ess_since_last_resampling"]) if "ess_since_last_resampling" in handle.attrs else None
                ),
            )

    def __repr__(self) -> str:
        return (
            f"SMCResult(n_particles={len(self.log_weights)}, n_atoms={self.positions.shape[1]}, "
            f"log_z={self.log_z:.4f}, ess={self.ess:.4f})"
        )
