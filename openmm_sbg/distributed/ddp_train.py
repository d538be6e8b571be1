"""Data-parallel TarFlow training over processes, around :func:`openmm_sbg.flow.train`.

Every process runs the ordinary training loop on the same data and seed, so all draw the same
global batch of ``batch_size`` frames with the same rotations and noise; each backpropagates
its own contiguous slice of it and the gradients are summed over the processes
(:class:`openmm_sbg.flow.fitting.AllProcesses`, the strategy refinement uses too). The
optimiser steps, EMA and checkpoint are therefore those of a single process training on the
whole batch (up to floating-point summation order), a checkpoint written by a multi-process
run resumes in a single process and vice versa, and the file format does not change. Only
rank 0 writes the checkpoint and shows progress. (The module keeps the name it had when it
wrapped the flow in DistributedDataParallel, so that imports of it keep working.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from openmm_sbg.distributed.launch import init
from openmm_sbg.flow.fitting import AllProcesses
from openmm_sbg.flow.model import TarFlow
from openmm_sbg.flow.training import train


def train_distributed(
    train_positions,
    val_positions=None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **kwargs,
) -> TarFlow:
    """:func:`openmm_sbg.flow.train` under ``torchrun``: one process per CPU share or GPU.

    Joins the process group if needed (:func:`openmm_sbg.distributed.init`), trains with
    :class:`~openmm_sbg.flow.fitting.AllProcesses` and waits for every process before
    returning, so the checkpoint is complete on return in every process.

    Parameters
    ----------
    train_positions, val_positions
        The same frames in every process (each takes its slice of every batch).
    device
        ``"cpu"`` or ``"cuda"`` (each process uses GPU ``LOCAL_RANK``).
    progress
        Progress bar on rank 0.
    **kwargs
        Passed to :func:`openmm_sbg.flow.train` (``options``, ``checkpoint_path``, ``callback``
        (called in every process, with the loss of the global batch) ...).
        ``options.batch_size`` is the global batch; the processes' slices of it differ by at
        most one frame.
    """
    context = init(device)
    if context.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several processes on one machine would each grab every core and slow each other down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))))
    flow = train(
        train_positions,
        val_positions,
        device=context.device,
        progress=progress and context.is_writer,
        parallel=AllProcesses(),
        **kwargs,
    )
    dist.barrier()
    return flow
