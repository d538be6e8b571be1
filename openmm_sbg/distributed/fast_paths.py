"""Optional GPU speed-ups for SMC: the flow's energy with bf16 autocast, torch.compile and CUDA
graphs (:class:`FastFlow`), and the torch force field on a GPU (:class:`DeviceBackend`).

:class:`FastFlow` wraps a :class:`~openmm_sbg.TarFlow` and is itself a proposal that
:class:`~openmm_sbg.smc.SMCSampler` (and :class:`~openmm_sbg.distributed.sharded_smc.ShardedSMCSampler`)
accept in its place::

    proposal = FastFlow(flow.to("cuda"), autocast=torch.bfloat16, compile=True, cuda_graphs=True)
    result = SMCSampler(target, proposal, n_particles=10_000, n_steps=100, batch_size=1024).run(seed=0)

Only ``energy`` (``-log q`` and, through autograd, its gradient: the per-step cost) takes the
fast paths. ``sample`` is the flow's own, in full precision and with the same random stream,
because its token-by-token inversion compounds rounding. Weights, schedule and resampling stay
float64 on the CPU in the driver; only the flow's matrix products run in bf16 under autocast
(reductions and the log-determinant stay float32), and ``energy`` returns the input's dtype.

Each option changes the numbers slightly or costs compile time; ``benchmarks/gpu_check.sh``
measures their speed and their error against CPU float64 on a GPU. On a CPU none of them is a
clear gain (see ``benchmarks/RESULTS.md``), so the default is the plain flow.
"""

from __future__ import annotations

import contextlib

import torch

from openmm_sbg.energy.base import EnergyBackend
from openmm_sbg.flow.model import TarFlow


class FastFlow(torch.nn.Module):
    """A TarFlow proposal whose energy evaluation uses the chosen fast paths.

    Parameters
    ----------
    flow
        The TarFlow, already on its device.
    autocast
        ``torch.bfloat16`` (or ``torch.float16`` on GPUs without bf16) to run the flow's
        matrix products in reduced precision; ``None`` for the flow's own dtype.
    compile
        Compile the energy with ``torch.compile``; batches are padded to ``batch_size`` so
        one compiled shape serves every call.
    cuda_graphs
        With ``compile`` on a CUDA device: also capture the fixed-shape evaluation in CUDA
        graphs (``mode="reduce-overhead"``), removing the kernel-launch overhead that
        dominates small molecules.
    batch_size
        The fixed batch shape for ``compile``; give the sampler's ``batch_size``.
    """

    def __init__(
        self,
        flow: TarFlow,
        *,
        autocast: torch.dtype | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        batch_size: int = 256,
    ):
        super().__init__()
        device = next(flow.parameters()).device
        if cuda_graphs and not (compile and device.type == "cuda"):
            raise ValueError("cuda_graphs needs compile=True and the flow on a CUDA device (flow.to('cuda'))")
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast}")
        self.flow = flow
        self.n_atoms = flow.n_atoms
        self.autocast = autocast
        self.batch_size = batch_size if compile else None
        energy = flow.energy
        if compile:
            energy = torch.compile(energy, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
        self._energy = energy

    @property
    def com_std(self) -> float:
        """The wrapped flow's CoM std (nm)."""
        return self.flow.com_std

    @property
    def gaussian_centre(self) -> bool:
        """Whether the wrapped flow's centre is analytic (the samplers' default weights follow it)."""
        from openmm_sbg.smc.proposal import has_gaussian_centre

        return has_gaussian_centre(self.flow)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's own samples (full precision, same random stream as the flow)."""
        return self.flow.sample(n, generator=generator)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``-log q(x)`` ``[B]`` in the dtype of ``x``, through the fast paths; differentiable in ``x``."""
        n = len(x)
        if self.batch_size is not None and n != self.batch_size:
            if n > self.batch_size:
                return torch.cat([self.energy(part) for part in x.split(self.batch_size)])
            # Pad with copies of a real configuration: compiled code (and a CUDA graph) has one shape.
            x = torch.cat([x, x[:1].expand(self.batch_size - n, *x.shape[1:])])
        context = (
            torch.autocast(x.device.type, dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()
        )
        with context:
            energy = self._energy(x)
        # Cloned: a CUDA-graph output is overwritten by the next replay.
        return energy[:n].to(x.dtype).clone()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` ``[B]`` through the same fast paths."""
        return -self.energy(x)


class DeviceBackend(EnergyBackend):
    """Evaluate a torch energy backend on another device and dtype (e.g. the GPU, float64).

    The SMC driver keeps its particles on the CPU in float64 and hands them to the target, so
    a :class:`~openmm_sbg.energy.TorchForceField` would run on the CPU even next to a GPU
    flow. Wrapped, each batch is copied (through pinned memory, so the copy overlaps) to
    ``device``, evaluated there and the results come back in the caller's device and dtype::

        target.backend = DeviceBackend(target.backend, "cuda")

    Parameters
    ----------
    backend
        A backend that computes on its input's device (:class:`~openmm_sbg.energy.TorchForceField`).
    device
        Where to evaluate.
    dtype
        Dtype to evaluate in: float64 reproduces OpenMM to round-off; float32 is faster on
        consumer GPUs and accurate to about 1e-5 relative.
    """

    def __init__(self, backend: EnergyBackend, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float64):
        self.backend = backend
        self.n_atoms = backend.n_atoms
        self.device = torch.device(device)
        self.dtype = dtype
        self.name = f"{backend.name}-{self.device.type}"

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.dtype)
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def _energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energy, forces = self.backend.energy_and_forces(self._to_device(x))
        return energy.to(x.device, x.dtype), forces.to(x.device, x.dtype)

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.energy(self._to_device(x)).to(x.device, x.dtype)
