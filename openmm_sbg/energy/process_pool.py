"""Energies from OpenMM Contexts in worker processes: the batch is split across CPU cores.

For Systems the torch force field does not cover, this is the fastest way to evaluate a
batch on CPU: each worker holds its own single-threaded Context and evaluates a contiguous
slice of the batch, so ``n_workers`` configurations are in flight at once.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import openmm
import torch

from openmm_sbg.energy.base import EnergyBackend
from openmm_sbg.energy.openmm_backend import OpenMMBackend, platform_by_name

# The worker process's backend, built once by ``_start_worker``.
_worker_backend: OpenMMBackend | None = None


def _start_worker(system_xml: str, platform: str, groups: set[int] | None) -> None:
    global _worker_backend
    system = openmm.XmlSerializer.deserialize(system_xml)
    # One thread per worker: the pool already uses one process per core.
    properties = {"Threads": "1"} if platform == "CPU" else None
    _worker_backend = OpenMMBackend(system, platform, groups, properties)


def _evaluate_slice(xs: np.ndarray, forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
    return _worker_backend.evaluate_numpy(xs, forces)


class ProcessPoolBackend(EnergyBackend):
    """Evaluate a System with one OpenMM Context per worker process.

    Parameters
    ----------
    system
        The System to evaluate (not modified; workers receive a serialized copy).
    n_workers
        Number of worker processes (default: the number of CPU cores).
    platform
        OpenMM platform of the workers' Contexts (``"CPU"`` by default, single-threaded).
    groups
        Optional set of force groups to evaluate, as in ``Context.getState(groups=...)``.

    Notes
    -----
    Workers are started with the ``spawn`` method (forking a process that already runs torch
    threads can deadlock), so scripts that create a pool need the usual
    ``if __name__ == "__main__":`` guard. Call :meth:`close` (or use ``with``) to stop them.
    """

    def __init__(
        self,
        system: openmm.System,
        n_workers: int | None = None,
        platform: str = "CPU",
        groups: set[int] | None = None,
    ):
        platform_by_name(platform)  # a clear error here rather than a broken pool later
        self.n_workers = n_workers or os.cpu_count() or 1
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}")
        self.name = f"openmm-{platform}-pool{self.n_workers}"
        self.n_atoms = system.getNumParticles()
        self._pool = ProcessPoolExecutor(
            self.n_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(openmm.XmlSerializer.serialize(system), platform, groups),
        )

    def _evaluate(self, x: torch.Tensor, forces: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        xs = x.detach().to("cpu", torch.float64).numpy()
        slices = [s for s in np.array_split(xs, self.n_workers) if len(s)]
        results = list(self._pool.map(_evaluate_slice, slices, [forces] * len(slices)))
        energy = torch.from_numpy(np.concatenate([e for e, _ in results])).to(device=x.device, dtype=x.dtype)
        if not forces:
            return energy, None
        force = torch.from_numpy(np.concatenate([f for _, f in results])).to(device=x.device, dtype=x.dtype)
        return energy, force

    def _energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._evaluate(x, forces=True)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, forces=False)[0]

    def close(self) -> None:
        """Stop the worker processes."""
        self._pool.shutdown()

    def __enter__(self) -> ProcessPoolBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
