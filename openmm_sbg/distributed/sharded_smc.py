"""SMC with the particles split over processes: :class:`ShardedSMCSampler`.

Each process holds a contiguous slice of the particles and does the expensive work for it:
drawing its proposals, the flow and force-field evaluations, the Langevin moves. Everything
that couples particles is global and replicated: every process keeps the log-weights and the
two path energies of *all* particles (a few numbers per particle, refreshed with an
``all_gather`` after each move), so the schedule, ESS, log Z, filters and resampling indices
are computed by the unchanged :class:`~openmm_sbg.smc.step.SMCStep` on identical inputs in
every process, with the same generator state; only moving the particles is sharded
(:func:`move_sharded`). Resampling then moves each particle to the
process that holds its new slot (``all_to_all``), and the slices are rebalanced.

Random numbers are drawn exactly as one process draws them (each process draws the whole
step's noise and keeps its rows), so for the same seed the result equals the single-process
run's; to the last bit when the flow and force field give the same per-particle answers in
any batch (float64 on the CPU), and up to that rounding otherwise. Checkpoints have the
single-process format: a run interrupted with one number of processes resumes with another.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from openmm_sbg.distributed.fast_paths import FastFlow
from openmm_sbg.flow.model import SAMPLE_BATCH_SIZE, TarFlow
from openmm_sbg.smc.driver import SMCSampler
from openmm_sbg.smc.kernels import PathState
from openmm_sbg.smc.proposal import draw_proposals
from openmm_sbg.smc.result import SMCResult
from openmm_sbg.smc.step import MoveRows, with_rows


def split_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of ``world_size`` contiguous slices of ``n`` items, differing by at most one."""
    size, rest = divmod(n, world_size)
    return [size + (rank < rest) for rank in range(world_size)]


def _span(sizes: list[int], rank: int) -> tuple[int, int]:
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def all_gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every process's ``tensor`` (``sizes[r]`` rows on rank ``r``) in rank order."""
    # all_gather needs equal shapes: pad to the largest slice (at least one row, as gloo
    # rejects empty tensors), then drop the padding.
    rows = max(1, *sizes)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


_FIELDS = [field.name for field in dataclasses.fields(PathState)]


def _pack(state: PathState) -> torch.Tensor:
    # One float64 matrix [B, 3 * 3N + 2] so that one collective moves whole particles.
    return torch.cat([getattr(state, name).reshape(len(state.x), -1).to(torch.float64) for name in _FIELDS], 1)


def _unpack(packed: torch.Tensor, like: PathState) -> PathState:
    fields, column = [], 0
    for name in _FIELDS:
        reference = getattr(like, name)
        width = reference[0].numel() if len(reference) else int(torch.tensor(reference.shape[1:]).prod())
        fields.append(packed[:, column : column + width].reshape(-1, *reference.shape[1:]).to(reference.dtype))
        column += width
    return PathState(*fields)


class ShardedState:
    """Particles split over processes: this process's rows plus the energies of all of them.

    Stands in for :class:`~openmm_sbg.smc.PathState` as ``SMCRun.state`` of the driver, which
    reads the global ``e_source`` and ``e_target`` and selects particles by global index.

    Parameters
    ----------
    local
        This process's particles (rows ``sum(sizes[:rank])`` to ``sum(sizes[:rank + 1])``).
    sizes
        Particles held by each process, in rank order.
    """

    def __init__(self, local: PathState, sizes: list[int]):
        self.local = local
        self.sizes = sizes
        self.rank = dist.get_rank()
        # Every process's energies (collective).
        energies = all_gather_rows(torch.stack([self.local.e_source, self.local.e_target], 1), self.sizes)
        self.e_source, self.e_target = energies[:, 0].contiguous(), energies[:, 1].contiguous()

    @property
    def span(self) -> tuple[int, int]:
        """Global index range ``[start, stop)`` of this process's particles."""
        return _span(self.sizes, self.rank)

    def __len__(self) -> int:
        return sum(self.sizes)

    def select(self, index: torch.Tensor) -> ShardedState:
        """The particles at global ``index`` (boolean mask or indices), rebalanced over processes (collective)."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        new_sizes = split_sizes(len(index), len(self.sizes))
        ends = torch.tensor(self.sizes).cumsum(0)
        owner = torch.searchsorted(ends, index, right=True)
        start = self.span[0]
        # Every process knows the whole index, so each works out what to send where.
        send, send_counts = [], []
        for destination in range(len(self.sizes)):
            lo, hi = _span(new_sizes, destination)
            mine = index[lo:hi][owner[lo:hi] == self.rank] - start
            send.append(mine)
            send_counts.append(len(mine))
        lo, hi = _span(new_sizes, self.rank)
        wanted_owner = owner[lo:hi]
        receive_counts = torch.bincount(wanted_owner, minlength=len(self.sizes)).tolist()
        packed = _pack(self.local).index_select(0, torch.cat(send))
        received = packed.new_empty((sum(receive_counts), packed.shape[1]))
        dist.all_to_all_single(received, packed, receive_counts, send_counts)
        # Rows arrive grouped by sending process; put them back in the order of ``index``.
        order = torch.argsort(wanted_owner, stable=True)
        local = torch.empty_like(received)
        local[order] = received
        return ShardedState(_unpack(local, self.local), new_sizes)

    def gather(self) -> PathState:
        """All particles, in every process (collective)."""
        return _unpack(all_gather_rows(_pack(self.local), self.sizes), self.local)

    @classmethod
    def scatter(cls, state: PathState) -> ShardedState:
        """This process's even share of ``state`` (which every process holds)."""
        sizes = split_sizes(len(state.x), dist.get_world_size())
        start, stop = _span(sizes, dist.get_rank())
        return cls(state.select(slice(start, stop)), sizes)


def move_sharded(state: ShardedState, alive: torch.Tensor, move: MoveRows) -> tuple[ShardedState, torch.Tensor]:
    """The :data:`~openmm_sbg.smc.step.ParticleMover` of a :class:`ShardedState` (collective).

    Each process moves the ``alive`` particles it holds; the new state gathers everyone's
    energies, and the acceptances of all ``alive`` particles are gathered in their order.
    """
    start, stop = state.span
    mine = (alive >= start) & (alive < stop)
    rows = alive[mine] - start
    moved, acceptance = move(state.local.select(rows), mine)
    moved_state = ShardedState(state.local if moved is None else with_rows(state.local, rows, moved), state.sizes)
    spans = (_span(state.sizes, rank) for rank in range(len(state.sizes)))
    alive_sizes = [int(((alive >= lo) & (alive < hi)).sum()) for lo, hi in spans]
    return moved_state, all_gather_rows(acceptance.to(torch.float64), alive_sizes)


def _draw_rows(flow, n: int, batch_size: int, generator: torch.Generator, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``draw_proposals(flow, n, batch_size, generator)``, inverting only those.

    A :class:`~openmm_sbg.TarFlow` draws all the noise of a batch (:meth:`~openmm_sbg.TarFlow.draw_latents`)
    and then inverts it (the costly part); drawing every batch's noise keeps the generator in
    step with one process's draws (a :class:`FastFlow` samples as its TarFlow). Other
    proposals are drawn in full and sliced.
    """
    if isinstance(flow, FastFlow):
        flow = flow.flow
    if not isinstance(flow, TarFlow):
        return draw_proposals(flow, n, batch_size, generator)[start:stop]
    # TarFlow.sample draws its noise in chunks of SAMPLE_BATCH_SIZE; follow the same chunks.
    rows = []
    for call_start in range(0, n, batch_size):
        call_count = min(batch_size, n - call_start)
        for offset in range(0, call_count, SAMPLE_BATCH_SIZE):
            first = call_start + offset
            latents = flow.draw_latents(min(SAMPLE_BATCH_SIZE, call_count - offset), generator)
            lo, hi = max(start, first) - first, min(stop, first + len(latents)) - first
            if lo < hi:
                with torch.no_grad():
                    rows.append(flow.from_latents(latents[lo:hi])[0].to(dtype=torch.float64, device="cpu"))
    return torch.cat(rows) if rows else torch.empty((0, flow.n_atoms, 3), dtype=torch.float64)


class ShardedSMCSampler(SMCSampler):
    """:class:`~openmm_sbg.smc.SMCSampler` with its particles split over torch.distributed processes.

    Takes the same arguments; call :func:`openmm_sbg.distributed.init` (or
    ``torch.distributed.init_process_group``) first, and construct and run it in every
    process with the same arguments and seed. Every process returns the whole
    :class:`~openmm_sbg.smc.SMCResult`; only rank 0 writes the checkpoint and shows progress
    (write the samples file from rank 0 too).

    ``n_particles`` need not be a multiple of the number of processes (slices differ by at
    most one particle), but must be at least that number.
    """

    def __init__(self, target, flow, n_particles: int, n_steps: int, **options):
        if not dist.is_initialized():
            raise RuntimeError(
                "ShardedSMCSampler needs a torch.distributed process group; launch with torchrun and call "
                "openmm_sbg.distributed.init() first, or use SMCSampler in a single process"
            )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if n_particles < self.world_size:
            raise ValueError(
                f"{n_particles} particles cannot be split over {self.world_size} processes; use at least "
                f"{self.world_size} particles or fewer processes (torchrun --nproc-per-node)"
            )
        super().__init__(target, flow, n_particles, n_steps, **options)

    def physical_energy(self, state: PathState | ShardedState) -> torch.Tensor:
        """``E_T`` (kT) without the CoM term; for a :class:`ShardedState`, of all particles (collective)."""
        if isinstance(state, ShardedState):
            return all_gather_rows(super().physical_energy(state.local), state.sizes)
        return super().physical_energy(state)

    def _result(self, run, seconds: float) -> SMCResult:
        result = super()._result(run, seconds)
        result.info["n_processes"] = self.world_size
        return result

    # The driver's hooks: each process draws, evaluates and moves its own slice; the step's
    # bookkeeping sees the global energies through the ShardedState.
    def _draw_state(self, flow_generator: torch.Generator) -> ShardedState:
        sizes = split_sizes(self.options.n_particles, self.world_size)
        start, stop = _span(sizes, self.rank)
        x = _draw_rows(self.flow, self.options.n_particles, self.options.batch_size, flow_generator, start, stop)
        return ShardedState(self.potential(x, need_grad=not self.importance_sampling), sizes)

    def _distribute(self, state: PathState) -> ShardedState:
        return ShardedState.scatter(state)

    def _gather(self, state: ShardedState) -> PathState:
        return state.gather()

    _move_particles = staticmethod(move_sharded)

    @property
    def _writes_output(self) -> bool:
        return self.rank == 0
