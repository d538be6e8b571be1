"""Runs under ``torchrun --nproc-per-node 2`` for tests/test_distributed.py (not collected by pytest).

Usage: ``torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR``. Every
process trains with DDP and runs each sharded SMC scenario of :data:`distributed_cases.SMC_SCENARIOS`; rank 0
writes what the test compares with single-process runs into ``OUT_DIR``.
"""

import os
import sys
from pathlib import Path

import torch

from openmm_sbg import cli, distributed

sys.path.insert(0, str(Path(__file__).parent))
import distributed_cases as cases  # noqa: E402


def main(out: Path) -> None:
    from openmm_sbg.distributed.ddp_train import train_distributed
    from openmm_sbg.distributed.sharded_smc import ShardedSMCSampler
    from openmm_sbg import systems

    context = distributed.init("cpu")
    torch.set_num_threads(1)
    target = systems.get("ad2", platform="Reference")
    frames = cases.ddp_frames(target)
    train_distributed(
        frames[:100], frames[100:], target=target, config=cases.DDP_CONFIG, options=cases.ddp_options(),
        checkpoint_path=out / "ddp.pt", progress=False,
    )
    cli.main(["sample", "--flow", str(out / "ddp.pt"), "--out", str(out / "cli.h5"), "--n-particles", "12",
              "--n-steps", "0", "--batch-size", "4", "--no-progress", "--summary", str(out / "cli.json")])
    from openmm_sbg.flow import TarFlow
    from openmm_sbg.flow.refine import refine

    for objective in cases.REFINE_OBJECTIVES:
        refine(TarFlow.load(out / "ddp.pt", target=target), target, cases.refine_options(objective), data_positions=frames[:100],
               checkpoint_path=out / f"refine-{objective}.pt", progress=False)
    for name in cases.SMC_SCENARIOS:
        target, proposal, kwargs = cases.smc_scenario(name)
        checkpoint = out / f"{name}.ckpt"
        result = ShardedSMCSampler(target, proposal, checkpoint_path=checkpoint, progress=False, **kwargs).run(seed=cases.SMC_SEED)
        if context.is_writer:
            torch.save({key: getattr(result, key) for key in ("positions", "log_weights", "energies", "log_z", "ess")}
                       | {"diagnostics": result.diagnostics, "n_processes": result.info["n_processes"]}, out / f"{name}.pt")
    # Every rank has written what it must; leave without tearing the gloo group down. Its
    # teardown (destroy_process_group, then the interpreter's exit) now and then hangs (torch
    # 2.4) or aborts with "terminate called without an active exception" (torch 2.13) in one
    # rank, which fails the test for no fault of the code under test.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
