"""Process-group set-up for runs started by ``torchrun`` (or any launcher that sets its variables).

``torchrun --nproc-per-node K ...`` starts K copies of a command with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`is_launched`
recognises that, and :func:`init` joins the process group: gloo for CPU tensors and, when the
run uses CUDA, NCCL for GPU tensors as well (one backend per device type), with each process on
GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a multi-process run.

    Attributes
    ----------
    rank, world_size
        This process's index and the number of processes.
    local_rank
        Index among the processes on this machine (selects the GPU).
    device
        Torch device this process computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0


def is_launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(name in os.environ for name in _LAUNCH_VARIABLES)


def _device(requested: str | torch.device, local_rank: int) -> torch.device:
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but CUDA is not available; use --device cpu")
    if device.index is not None:
        # One GPU per process: a fixed index would put every process on the same GPU.
        raise ValueError(
            f"under torchrun give --device cuda (each process takes GPU LOCAL_RANK), not {requested!r}; "
            "choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"process LOCAL_RANK={local_rank} has no GPU: only {torch.cuda.device_count()} are visible; "
            "start at most that many processes per node (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def init(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by the launcher's environment (idempotent).

    Parameters
    ----------
    device
        ``"cpu"`` or ``"cuda"``; with CUDA each process uses GPU ``LOCAL_RANK`` and the group
        gets an NCCL backend for GPU tensors besides gloo for CPU tensors.
    timeout_s
        How long a collective waits for the other processes before failing.

    Returns
    -------
    DistributedContext
        This process's rank, the world size and its device.
    """
    if not dist.is_initialized() and not is_launched():
        missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
        raise RuntimeError(
            f"not started by torchrun (environment lacks {', '.join(missing)}); launch with "
            "`torchrun --nproc-per-node K ...` or call torch.distributed.init_process_group first"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(device, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The SMC bookkeeping (weights, resampling) lives on the CPU even when the flow runs
        # on a GPU, so CPU tensors always need gloo.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group (after a barrier, so no process exits while others still talk)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
