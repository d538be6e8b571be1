"""Data-parallel TarFlow training with DistributedDataParallel, around :func:`openmm_sbg.flow.train`.

Every process runs the ordinary training loop on the same data and seed, so all draw the same
global batch of ``batch_size`` frames with the same rotations and noise; each keeps its own
contiguous slice of it, and DistributedDataParallel averages the gradients. The optimiser
steps, EMA and checkpoint are therefore those of a single process training on the whole
batch (up to floating-point summation order), a checkpoint written by a multi-process run
resumes in a single process and vice versa, and the file format does not change. Only rank 0
writes the checkpoint and shows progress.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from openmm_sbg.distributed.launch import init
from openmm_sbg.flow.model import TarFlow
from openmm_sbg.flow.training import train


class _PerSampleNLL(torch.nn.Module):
    # DistributedDataParallel synchronises gradients only for calls through its forward, and
    # the training loss is TarFlow.nll_per_dim rather than TarFlow.forward.
    def __init__(self, flow: TarFlow):
        super().__init__()
        self.flow = flow

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.flow.nll_per_dim(y)


class DataParallel:
    """The ``parallel`` argument of :func:`openmm_sbg.flow.train`: every process of the default group."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised process group; call openmm_sbg.distributed.init() first")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @property
    def writes_checkpoints(self) -> bool:
        """Only rank 0 writes the checkpoint."""
        return self.rank == 0

    def wrap(self, flow: TarFlow) -> Callable[[torch.Tensor], torch.Tensor]:
        """Per-sample loss ``y -> NLL / 3N`` whose backward averages gradients over processes."""
        device = next(flow.parameters()).device
        return DistributedDataParallel(
            _PerSampleNLL(flow),
            device_ids=[device] if device.type == "cuda" else None,
        )

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous slice of a global batch (equal slices for every process)."""
        size, rest = divmod(len(batch), self.world_size)
        if rest or size == 0:
            # Unequal slices would weight the frames of smaller slices more in the averaged gradient.
            raise ValueError(
                f"the training batch of {len(batch)} frames does not split evenly over {self.world_size} processes; "
                f"pass a --batch-size that is a multiple of {self.world_size} (and at most the number of training "
                "frames), or start a number of processes that divides it"
            )
        return batch[self.rank * size : (self.rank + 1) * size]

    def mean(self, loss: torch.Tensor) -> float:
        """Mean of ``loss`` over the processes (the global batch's loss), the same on every process."""
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / self.world_size


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
    :class:`DataParallel` and waits for every process before returning, so the checkpoint is
    complete on return in every process.

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
        ``options.batch_size`` is the global batch and must be a multiple of the number of
        processes.
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
        parallel=DataParallel(),
        **kwargs,
    )
    dist.barrier()
    return flow
