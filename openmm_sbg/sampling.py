"""Sampling to a file: SMC or importance sampling from a trained flow, resumable, with a JSON summary.

The library side of ``openmm-sbg sample``, used by the demo and :mod:`openmm_sbg.pipeline`.
"""

from __future__ import annotations

import os

import numpy as np


def sample(target, flow, out: str, seed: int = 0, restart: bool = False, **options) -> dict:
    """Run :class:`~openmm_sbg.smc.SMCSampler` and write its samples file; return the JSON summary.

    The run checkpoints to ``out + ".ckpt"``; calling again with the same arguments resumes
    from it (``restart=True`` ignores it). The checkpoint is removed once ``out`` is written.
    """
    from openmm_sbg import distributed, metrics
    from openmm_sbg.smc import SMCSampler
    from openmm_sbg.smc.proposal import log_z_convention
    from openmm_sbg.smc.result import ESS_DEFINITION

    if os.path.splitext(out)[1].lower() not in (".h5", ".hdf5"):
        raise ValueError(f"--out must be an HDF5 file ending in .h5, got {out!r}")
    checkpoint = out + ".ckpt"
    resuming = os.path.exists(checkpoint) and not restart
    launched = distributed.is_launched()
    if launched:
        from openmm_sbg.distributed.sharded_smc import ShardedSMCSampler

    sampler_class = ShardedSMCSampler if launched else SMCSampler
    sampler = sampler_class(target, flow, checkpoint_path=checkpoint, **options)
    result = sampler.run(seed=seed, resume=resuming)
    if not launched or sampler.rank == 0:  # every process holds the result; one writes it
        result.save(out)
        os.remove(checkpoint)
    diagnostics = result.diagnostics
    alive = result.weights > 0
    summary = {
        "out": os.path.abspath(out),
        "system": result.info["system"],
        "n_particles": len(result.log_weights),
        "n_steps": len(diagnostics["t"]),
        "resumed": resuming,
        "log_z": result.log_z,
        "log_z_convention": log_z_convention(result.info["com_adjustment"], getattr(flow, "com_std", None)),
        "com_adjustment": result.info["com_adjustment"],
        "clip_fraction": result.info["clip_fraction"],
        "ess": result.ess,
        "ess_definition": ESS_DEFINITION,
        "ess_proposals": result.info["ess_proposals"],
        "ess_since_last_resampling": result.ess_since_last_resampling,
        "pareto_k_proposals": result.info["pareto_k_proposals"],
        "n_proposals": result.info["n_proposals"],
        "n_kept_by_filters": result.info["n_kept"],
        "n_resampling": result.info["n_resampling"],
        "mean_acceptance": float(np.nanmean(diagnostics["acceptance"])) if len(diagnostics["acceptance"]) else None,
        "energy_kT_mean": float(np.sum(result.weights[alive] * result.energies[alive])),
        "seconds": result.info["seconds"],
    }
    if result.topology is not None:
        summary["wrong_chirality_fraction"] = metrics.wrong_chirality_fraction(result.to_mdtraj(), result.weights)
    return summary
