"""Multi-process training and sampling with torch.distributed, launched by ``torchrun``.

- :mod:`.launch`: recognise ``torchrun`` and join the process group (gloo on CPU, NCCL on GPU);
- :mod:`.ddp_train`: data-parallel TarFlow training (gradients summed over processes), same checkpoints;
- :mod:`.sharded_smc`: SMC with the particles split over processes, equal to one process's run;
- :mod:`.fast_paths`: optional GPU speed-ups (bf16 autocast, torch.compile, CUDA graphs).

Example
-------
``torchrun --nproc-per-node 4 -m openmm_sbg.cli sample --flow flow.pt --out samples.h5 ...``
"""

from openmm_sbg.distributed.launch import DistributedContext, init, is_launched, shutdown

__all__ = ["DistributedContext", "init", "is_launched", "shutdown"]
