"""Two processes (torchrun, gloo on CPU): DDP training and sharded SMC equal one process's runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from distributed_cases import (
    DDP_CONFIG,
    REFINE_OBJECTIVES,
    SMC_SCENARIOS,
    SMC_SEED,
    ddp_frames,
    ddp_options,
    refine_options,
    smc_scenario,
)
from openmm_sbg import cli, distributed
from openmm_sbg.distributed.sharded_smc import split_sizes
from openmm_sbg.flow import TarFlow, train
from openmm_sbg.flow.refine import refine
from openmm_sbg.smc import SMCSampler

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Run tests/distributed_worker.py in two processes once; the directory of what it wrote."""
    out = tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run under torchrun must not hand its own group to the workers
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "distributed_worker.py"), str(out)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return out


def test_ddp_checkpoint_loads_in_one_process_and_matches_single_process_training(two_processes, tmp_path, ad2):
    flow = TarFlow.load(two_processes / "ddp.pt", target=ad2)
    assert flow.metadata["complete"] and flow.metadata["steps"] == ddp_options().steps
    frames = ddp_frames(ad2)
    torch.set_num_threads(1)
    single = train(frames[:100], frames[100:], target=ad2, config=DDP_CONFIG, options=ddp_options(), progress=False)
    # Two processes average two half-batch gradients: the single-process step up to rounding.
    for key, value in single.state_dict().items():
        torch.testing.assert_close(flow.state_dict()[key], value, atol=2e-5, rtol=1e-4)
    losses = [entry["train_nll_per_dim"] for entry in flow.metadata["history"][1:]]
    expected = [entry["train_nll_per_dim"] for entry in single.metadata["history"][1:]]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


@pytest.mark.parametrize("objective", REFINE_OBJECTIVES)
def test_refinement_under_torchrun_equals_one_process(two_processes, ad2, objective):
    start = TarFlow.load(two_processes / "ddp.pt", target=ad2)
    torch.set_num_threads(1)
    single = refine(start, ad2, refine_options(objective), data_positions=ddp_frames(ad2)[:100], progress=False)
    shared = TarFlow.load(two_processes / f"refine-{objective}.pt", target=ad2)
    # Each process backpropagates half of every batch; the summed gradients equal one process's up to rounding.
    for key, value in single.state_dict().items():
        torch.testing.assert_close(shared.state_dict()[key], value, atol=2e-5, rtol=1e-4)
    ess = lambda flow: [entry["ess"] for entry in flow.metadata["refinement"]["history"]]  # noqa: E731
    np.testing.assert_allclose(ess(shared), ess(single), rtol=1e-4)


@pytest.mark.parametrize("name", SMC_SCENARIOS)
def test_sharded_smc_equals_the_single_process_run(two_processes, name):
    sharded = torch.load(two_processes / f"{name}.pt", weights_only=False)
    assert sharded["n_processes"] == 2
    target, proposal, kwargs = smc_scenario(name)
    single = SMCSampler(target, proposal, progress=False, **kwargs).run(seed=SMC_SEED)
    # All in float64 with per-particle answers independent of the batch: equal to the bit.
    # A flow's matrix products may round differently for other batch sizes (on an AMD EPYC
    # both flows do, on the Intel Xeon only the Cartesian one did): equal to rounding.
    tolerance = dict(rtol=1e-12, atol=1e-14) if "tarflow" in name else dict(rtol=0, atol=0)
    np.testing.assert_allclose(sharded["positions"], single.positions, **tolerance)
    np.testing.assert_allclose(sharded["log_weights"], single.log_weights, **tolerance)
    np.testing.assert_allclose(sharded["energies"], single.energies, **tolerance)
    np.testing.assert_allclose([sharded["log_z"], sharded["ess"]], [single.log_z, single.ess], **tolerance)
    for key, values in single.diagnostics.items():
        np.testing.assert_allclose(sharded["diagnostics"][key], values, err_msg=key, **tolerance)


def test_sharded_checkpoint_resumes_in_one_process(two_processes, tmp_path):
    target, proposal, kwargs = smc_scenario("ula")
    reference = SMCSampler(target, proposal, progress=False, **kwargs).run(seed=SMC_SEED)
    path = tmp_path / "run.ckpt"
    shutil.copy(two_processes / "ula.ckpt", path)  # written by rank 0 at step 6 of 7
    resumed = SMCSampler(target, proposal, progress=False, **{**kwargs, "checkpoint_path": path}).run(seed=SMC_SEED, resume=True)
    np.testing.assert_array_equal(resumed.positions, reference.positions)
    assert resumed.log_z == reference.log_z


def test_sample_command_under_torchrun_writes_one_file_equal_to_one_process(two_processes, tmp_path):
    out = tmp_path / "single.h5"
    argv = ["sample", "--flow", str(two_processes / "ddp.pt"), "--out", str(out), "--n-particles", "12",
            "--n-steps", "0", "--batch-size", "4", "--no-progress"]
    assert cli.main(argv) == 0
    assert not (two_processes / "cli.h5.ckpt").exists()
    with h5py.File(two_processes / "cli.h5") as sharded, h5py.File(out) as single:
        # The float32 flow may round coordinates differently for other batch splits (atol 1e-6 nm below). This
        # barely trained flow proposes clashes whose energies reach 1e11 kT, and a clash's r^-12 term multiplies
        # a coordinate's relative rounding error by 12 or more: 3e-6 relative has been seen on one CPU.
        np.testing.assert_allclose(sharded["log_weights"][()], single["log_weights"][()], rtol=1e-5)
        np.testing.assert_allclose(sharded["coordinates"][()], single["coordinates"][()], atol=1e-6)


def test_split_sizes_and_launch_detection(monkeypatch):
    assert split_sizes(101, 2) == [51, 50] and split_sizes(3, 4) == [1, 1, 1, 0]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.is_launched()
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init("cpu")
    from openmm_sbg.distributed.sharded_smc import ShardedSMCSampler

    target, proposal, kwargs = smc_scenario("importance")
    with pytest.raises(RuntimeError, match="process group"):
        ShardedSMCSampler(target, proposal, **kwargs)


def test_fast_flow_bf16_energy_is_close_and_differentiable():
    from openmm_sbg.distributed.fast_paths import FastFlow
    from openmm_sbg.smc.proposal import source_energy

    _, flow, _ = smc_scenario("tarflow")
    flow = flow.float()
    x = flow.sample(16, generator=torch.Generator().manual_seed(0))[0].double()
    e_ref, g_ref = source_energy(flow, x)
    e, g = source_energy(FastFlow(flow, autocast=torch.bfloat16), x)
    assert e.dtype == torch.float64 and torch.isfinite(g).all()
    torch.testing.assert_close(e, e_ref, rtol=0.05, atol=0.5)  # bf16 keeps ~3 digits
    with pytest.raises(ValueError, match="cuda_graphs needs compile"):
        FastFlow(flow, cuda_graphs=True)


def test_device_backend_returns_the_callers_dtype(ad2):
    from openmm_sbg.distributed.fast_paths import DeviceBackend

    x = torch.as_tensor(ad2.positions[None]).repeat(3, 1, 1)
    energy, forces = DeviceBackend(ad2.backend, "cpu", torch.float32).energy_and_forces(x)
    reference, reference_forces = ad2.backend.energy_and_forces(x)
    assert energy.dtype == torch.float64
    torch.testing.assert_close(energy, reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(forces, reference_forces, rtol=1e-3, atol=0.05)  # kJ/mol/nm, float32 sums
