"""TorchForceField: an ``openmm.System``'s energy and forces as batched torch code.

The System becomes a list of energy terms (:mod:`openmm_sbg.energy.system_terms`, which
reads every parameter from its forces); each term (:mod:`openmm_sbg.energy.terms`) evaluates
a whole batch at once and adds its analytic gradient in the same pass. This module runs them:
batches split into chunks of bounded size, optional ``torch.compile``, and a custom autograd
function that makes the energy differentiable for callers that need it. The tests check
energies and forces against OpenMM.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import openmm
import torch

from openmm_sbg.energy.base import EnergyBackend
from openmm_sbg.energy.system_terms import system_terms

#: Default cap on ``batch * pairs`` per chunk. On CPU, chunks of about 2**19 pair elements
#: balance per-operation overhead (small chunks) against cache misses (large ones); on GPUs
#: larger chunks fill the device, and the cap only bounds memory.
CPU_PAIR_ELEMENTS = 2**19
GPU_PAIR_ELEMENTS = 2**23


class TorchForceField(EnergyBackend):
    """Batched energies and forces of an ``openmm.System``, in torch.

    Parameters
    ----------
    system
        The System (not modified). Raises :class:`~openmm_sbg.energy.UnsupportedForceError`, naming every
        problem, if it holds a force (or setting) this backend does not implement.
    groups
        Optional set of force groups to evaluate, as in ``Context.getState(groups=...)``.
    max_pair_elements
        Largest ``batch * pairs`` evaluated at once; bigger batches are split into chunks so
        memory stays bounded and, on CPU, data stays in cache. Default: ``CPU_PAIR_ELEMENTS``
        on CPU, ``GPU_PAIR_ELEMENTS`` elsewhere. Results do not depend on it.
    compile
        Compile the evaluation with ``torch.compile`` (needs a C++ compiler on CPU, Triton on
        GPU). The first call for each device and dtype takes tens of seconds; afterwards fused
        kernels run several times faster than eager torch. Batches are evaluated in chunks of
        one fixed size (the last one padded), so nothing is compiled twice. Worth it for long
        runs (SMC, benchmarks), not for a few calls.

    Notes
    -----
    Works on any device and dtype: parameters are copied to the input's device and dtype on
    first use. Use float64 to reproduce OpenMM to round-off; float32 is faster and accurate
    to about 1e-5 relative for well-formed configurations. Forces are analytic (computed with
    the energy, no autograd graph); :meth:`energy` is still differentiable with respect to
    the positions through a custom autograd function.
    """

    name = "torch"

    def __init__(
        self,
        system: openmm.System,
        groups: set[int] | None = None,
        max_pair_elements: int | None = None,
        compile: bool = False,
    ):
        self._terms = torch.nn.ModuleList(system_terms(system, groups))
        self.n_atoms = system.getNumParticles()
        self._pairs = max(1, sum(t.n_pairs for t in self._terms))
        self._max_pair_elements = max_pair_elements
        self.compile = compile
        if compile:
            self.name = "torch-compiled"
        self._chunk_functions: dict[tuple[torch.device, torch.dtype, bool], Callable] = {}

    def chunk_size(self, device: torch.device | str = "cpu") -> int:
        """Configurations evaluated at once on ``device``."""
        cap = self._max_pair_elements
        if cap is None:
            cap = CPU_PAIR_ELEMENTS if torch.device(device).type == "cpu" else GPU_PAIR_ELEMENTS
        return max(1, cap // self._pairs)

    def _chunk_function(self, x: torch.Tensor, forces: bool) -> Callable:
        """``f(xc [3, N, B]) -> (energy [B], dU/dx [3, N, B] | None)`` for x's device and dtype."""
        key = (x.device, x.dtype, forces)
        if key not in self._chunk_functions:
            terms = copy.deepcopy(self._terms).to(device=x.device, dtype=x.dtype)

            def evaluate(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                grad = torch.zeros_like(xc) if forces else None
                energy = xc.new_zeros(xc.shape[2])
                for term in terms:
                    energy = energy + term(xc, grad)
                return energy, grad

            self._chunk_functions[key] = torch.compile(evaluate) if self.compile else evaluate
        return self._chunk_functions[key]

    def _evaluate(self, x: torch.Tensor, forces: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Energies ``[B]`` and, if ``forces``, gradients dU/dx ``[B, N, 3]``, chunk by chunk."""
        evaluate = self._chunk_function(x, forces)
        size = self.chunk_size(x.device)
        energies, grads = [], []
        for chunk in x.detach().split(size):
            n = chunk.shape[0]
            if self.compile and n < size:
                # Compiled code is specialised to one shape: pad with copies of a real
                # configuration rather than compile again for every batch size.
                chunk = torch.cat([chunk, chunk[-1:].expand(size - n, -1, -1)])
            energy, grad = evaluate(chunk.permute(2, 1, 0).contiguous())
            energies.append(energy[:n])
            if forces:
                grads.append(grad[..., :n].permute(2, 1, 0))
        return torch.cat(energies), torch.cat(grads) if forces else None

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        # Differentiable with respect to x (first derivatives), through the analytic gradient.
        if torch.is_grad_enabled() and x.requires_grad:
            return _Potential.apply(x, self)
        return self._evaluate(x, forces=False)[0]

    def _energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Detached: the forces come from the analytic gradient, not autograd.
        energy, grad = self._evaluate(x, forces=True)
        return energy, -grad


class _Potential(torch.autograd.Function):
    """Autograd hook: the energy's gradient is the analytic one computed with it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forcefield: TorchForceField) -> torch.Tensor:
        energy, grad = forcefield._evaluate(x, forces=True)
        ctx.save_for_backward(grad)
        return energy

    @staticmethod
    def backward(ctx, grad_energy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad_energy[:, None, None] * grad, None
