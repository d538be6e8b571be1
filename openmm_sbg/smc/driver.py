"""SMCSampler: flow proposals annealed to the target with Langevin moves and Jarzynski weights."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from openmm_sbg.io import atomic_path
from openmm_sbg.resume import check_resume_settings
from openmm_sbg.smc.kernels import PathState, get_kernel, ula_step
from openmm_sbg.smc.options import SMCOptions
from openmm_sbg.smc.proposal import Proposal, com_energy, draw_proposals, module_dtype_device, source_energy
from openmm_sbg.smc.resampling import ResamplingPolicy, get_resampler
from openmm_sbg.smc.result import SMCResult
from openmm_sbg.smc.run_state import ProposalCounts, SMCRun
from openmm_sbg.smc.schedules import get_schedule
from openmm_sbg.smc.step import SMCStep, move_local
from openmm_sbg.smc.weights import (
    energy_cutoff_filter,
    jarzynski_increment,
    normalised_ess,
    pareto_k,
    top_fraction_filter,
)


class SMCSampler:
    """Sequential Boltzmann Generator sampling: the SMC part of Tan et al. (2025).

    Draws ``n_particles`` proposals from ``flow``, weights them by ``E_S - E_T``, drops
    those above ``energy_cutoff`` and the top ``clip_fraction`` of log-weights, then anneals
    along ``E_t = (1 - t) E_S + t E_T``: at each step the weights gain
    ``-(t_{k+1} - t_k)(E_T - E_S)(x)``, the population is resampled when its normalised
    ESS falls below ``resample_threshold`` (before ``t = 1``; at ``t = 1`` if and only if
    ``resample_at_end``), and every particle takes ``n_mcmc_steps`` Langevin moves at the
    new ``t``. With ``n_steps=0`` it is plain importance sampling: the proposals keep their
    weights unless ``resample_at_end``.

    By default (``com_adjustment="auto"``, ``clip_fraction=None``) a flow with an analytic
    Gaussian centre (an internal-coordinate TarFlow) gets exact weights (the Gaussian CoM
    adjustment, nothing clipped) and any other flow the paper's protocol (chi3, 0.2%
    clipped); :attr:`options` holds the resolved values. The run's quality is
    :attr:`SMCResult.ess <openmm_sbg.smc.SMCResult.ess>`.

    Parameters
    ----------
    target
        A :class:`~openmm_sbg.BoltzmannTarget` (or anything with ``energy``,
        ``energy_and_forces``, ``n_atoms``): energies in kT of positions ``[B, N, 3]`` nm.
    flow
        The proposal: a :class:`~openmm_sbg.TarFlow` or :class:`GaussianProposal`.
    n_particles, n_steps, **options
        The fields of :class:`~openmm_sbg.smc.SMCOptions` (documented there, with their
        defaults); the sampler keeps them as :attr:`options`.

    One annealing step is :attr:`step`, a pure :class:`~openmm_sbg.smc.step.SMCStep`; the
    sampler draws the proposals and runs the loop, checkpoints and progress around it.
    Subclasses that hold the particles elsewhere (split over processes) override the hooks
    :meth:`_draw_state`, :meth:`_distribute`, :meth:`_gather`, :attr:`_writes_output` and
    :attr:`_move_particles` (the step's :data:`~openmm_sbg.smc.step.ParticleMover`); the
    algorithm itself is written once, in the step.
    """

    def __init__(self, target, flow: Proposal, n_particles: int, n_steps: int, **options):
        self.options = SMCOptions(n_particles, n_steps, **options).resolved(flow)
        flow_atoms = getattr(flow, "n_atoms", target.n_atoms)
        if flow_atoms != target.n_atoms:
            raise ValueError(
                f"the flow models {flow_atoms} atoms but the target has {target.n_atoms}; "
                "use the flow trained for this system"
            )
        self.target = target
        self.flow = flow
        self.kernel = get_kernel(self.options.kernel)
        self.schedule = get_schedule(self.options.schedule, n_steps, self.options.target_cess)
        self.adapt_step_size = self.options.adapt_step_size and self.kernel is not ula_step
        self.resampling = ResamplingPolicy(
            get_resampler(self.options.resampling),
            n_particles,
            self.options.resample_threshold,
            self.options.resample_at_end,
        )
        self.step = None if self.schedule is None else SMCStep(
            self.schedule,
            self.kernel,
            self.potential,
            self.resampling,
            self.options.n_mcmc_steps,
            self.options.batch_size,
            self.options.target_acceptance if self.adapt_step_size else None,
            self._move_particles,
        )

    @property
    def importance_sampling(self) -> bool:
        """Whether the run is plain importance sampling (no annealing steps)."""
        return self.schedule is None

    # ------------------------------------------------------------------ energies
    def potential(self, x: torch.Tensor, need_grad: bool = True) -> PathState:
        """Path end energies (kT) and gradients (kT/nm) of ``x [B, N, 3]``, in batches.

        ``e_source = -log q(x)``; ``e_target = E_T(x) - log rho(c)``, the force field plus
        the CoM term (see :mod:`openmm_sbg.smc.proposal`); :meth:`physical_energy` removes it.
        """
        parts = []
        com_std = getattr(self.flow, "com_std", None)
        batch_size = self.options.batch_size
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            e_source, grad_source = source_energy(self.flow, chunk, need_grad)
            e_com, grad_com = com_energy(chunk, com_std, self.options.com_adjustment, need_grad)
            if need_grad:
                e_target, forces = self.target.energy_and_forces(chunk, allow_nonfinite=True)
                grad_target = grad_com - forces.to(torch.float64)
            else:
                e_target = self.target.energy(chunk, allow_nonfinite=True)
                grad_source = grad_target = torch.zeros_like(chunk)
            parts.append(PathState(chunk, e_source, e_target.to(torch.float64) + e_com, grad_source, grad_target))
        return PathState.cat(parts)

    def physical_energy(self, state: PathState) -> torch.Tensor:
        """The force-field energy ``E_T`` (kT) of the particles, without the CoM term."""
        com_std = getattr(self.flow, "com_std", None)
        e_com, _ = com_energy(state.x, com_std, self.options.com_adjustment, need_grad=False)
        return state.e_target - e_com

    # ------------------------------------------------------------------ run
    def run(self, seed: int = 0, resume: bool = False) -> SMCResult:
        """Run the sampler; the same seed (and batch size) gives the same result.

        Parameters
        ----------
        seed
            Seeds the proposal draws and every random number of the run.
        resume
            Continue from ``checkpoint_path`` if that file exists (it must come from a run
            with the same options and seed); the result equals an uninterrupted run's.
        """
        started = time.perf_counter()
        checkpoint_path = self.options.checkpoint_path
        if resume and checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path; pass the file the interrupted run wrote")
        resuming = resume and os.path.exists(checkpoint_path)
        run = self._load_checkpoint(seed) if resuming else self._start(seed)
        earlier = run.earlier_seconds

        def elapsed() -> float:
            return earlier + time.perf_counter() - started

        if not resuming:
            self._save_checkpoint(run, elapsed())
        bar = tqdm(
            total=0 if self.importance_sampling else self.schedule.max_steps,
            initial=run.step,
            desc="IS" if self.importance_sampling else "SMC",
            unit="step",
            disable=not self.options.progress or not self._writes_output or self.importance_sampling,
        )
        # One generator for the whole loop; each step leaves its state in the run it returns.
        generator = torch.Generator()
        generator.set_state(run.generator)
        with bar:
            while not self.importance_sampling and run.t < 1.0:
                run, record = self.step(run, generator)
                run = run.recorded(record)
                bar.update(1)
                bar.set_postfix(t=f"{run.t:.3f}", ess=f"{record.ess:.3f}")
                if run.step % self.options.checkpoint_every == 0:
                    self._save_checkpoint(run, elapsed())
        if self.importance_sampling:
            run = run.with_final_weights()
            if self.resampling.wants(run.final_ess, final=True):
                run = dataclasses.replace(self.resampling.resample(run, generator), generator=generator.get_state())
        return self._result(run, elapsed())

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        # Independent streams for the flow's draws (on the flow's device) and for the SMC's
        # noise, resampling and acceptance tests (CPU), both derived from one seed.
        flow_seed, smc_seed = np.random.SeedSequence(seed).generate_state(2)
        device = module_dtype_device(self.flow)[1]
        return (
            torch.Generator(device=device).manual_seed(int(flow_seed)),
            torch.Generator().manual_seed(int(smc_seed)),
        )

    def _start(self, seed: int) -> SMCRun:
        """Draw, evaluate and filter the proposals: the state of the run at t = 0."""
        flow_generator, generator = self._generators(seed)
        state = self._draw_state(flow_generator)
        # The filters judge proposals by their importance weights exp(E_S - E_T).
        log_w = jarzynski_increment(state.e_source, state.e_target, 0.0, 1.0)
        keep = energy_cutoff_filter(self.physical_energy(state), self.options.energy_cutoff)
        n_after_cutoff = int(keep.sum())
        clip_fraction = self.options.clip_fraction
        keep &= top_fraction_filter(torch.where(keep, log_w, torch.full_like(log_w, -math.inf)), clip_fraction)
        n_particles = self.options.n_particles
        if not keep.any():
            raise RuntimeError(
                f"all {n_particles} proposals were dropped (non-finite energies or above "
                f"energy_cutoff={self.options.energy_cutoff} kT); check the flow matches the target or raise the cutoff"
            )
        n_kept = int(keep.sum())
        counts = ProposalCounts(
            n_proposals=n_particles,
            n_finite=int(torch.isfinite(log_w).sum()),
            n_after_energy_cutoff=n_after_cutoff,
            n_kept=n_kept,
            ess_proposals=normalised_ess(log_w[keep]),
            pareto_k_proposals=pareto_k(log_w[keep]),
        )
        return SMCRun(
            seed=seed,
            state=state.select(keep),
            # Annealing starts from exact samples of exp(-E_S) (weight 1) and accumulates the
            # weights step by step; importance sampling takes them in one go.
            log_w=log_w[keep] if self.importance_sampling else torch.zeros(n_kept, dtype=torch.float64),
            n_norm=n_particles,
            step_size=self.options.step_size,
            generator=generator.get_state(),
            counts=counts,
        )

    def _result(self, run: SMCRun, seconds: float) -> SMCResult:
        state = self._gather(run.state)
        diagnostics = {key: np.asarray(values) for key, values in run.diagnostics.items()}
        info = {
            **self.options.resume_key(),
            "adapt_step_size": self.adapt_step_size,
            **dataclasses.asdict(run.counts),
            "seed": run.seed,
            "system": getattr(self.target, "name", None),
            "kT_kJ_per_mol": getattr(self.target, "kT_kj_per_mol", None),
            "n_resampling": int(diagnostics["resampled"].sum()) if len(diagnostics["resampled"]) else 0,
            "seconds": seconds,
        }
        return SMCResult(
            positions=state.x.numpy().copy(),
            log_weights=run.log_w.numpy().copy(),
            energies=self.physical_energy(state).numpy(),
            log_z=run.final_log_z,
            ess=self._run_ess(run),
            ess_since_last_resampling=run.final_ess,
            diagnostics=diagnostics,
            topology=getattr(self.target, "topology", None),
            info=info,
        )

    def _run_ess(self, run: SMCRun) -> float:
        """The run's ESS (see :attr:`SMCResult.ess`): the proposals' for importance sampling,
        else the smallest ESS the weights reached at any step, before any resampling."""
        if self.importance_sampling:
            return run.final_ess
        return float(min(run.diagnostics["ess"]))

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, run: SMCRun, seconds: float) -> None:
        """Save ``run`` with ``seconds``, the run's wall-clock so far, as its ``earlier_seconds``."""
        if self.options.checkpoint_path is None:
            return
        # Always all particles (the single-process form), so a run may resume however its
        # particles are split.
        whole = dataclasses.replace(run, state=self._gather(run.state), earlier_seconds=seconds)
        if self._writes_output:
            with atomic_path(self.options.checkpoint_path) as tmp:
                torch.save({"options": self.options.resume_key(), "run": whole.to_dict()}, tmp)

    def _load_checkpoint(self, seed: int) -> SMCRun:
        path = self.options.checkpoint_path
        checkpoint = torch.load(path, weights_only=True)
        saved, run = checkpoint.get("options", {}), checkpoint.get("run", {})
        expected = {**self.options.resume_key(), "seed": seed}
        # Options a checkpoint holds that these no longer have do not count.
        saved = {**{key: saved.get(key) for key in expected}, "seed": run.get("seed")}
        check_resume_settings(
            f"the checkpoint {path}", saved, expected, remedy="resume with the same ones, or delete the file to start afresh",
            what="settings or seed",
        )
        run = SMCRun.from_dict(run)
        return dataclasses.replace(run, state=self._distribute(run.state))

    # ------------------------------------------------------------------ hooks for split particles
    def _draw_state(self, flow_generator: torch.Generator) -> PathState:
        """Draw and evaluate the ``n_particles`` proposals (with gradients unless sampling by importance)."""
        options = self.options
        x = draw_proposals(self.flow, options.n_particles, options.batch_size, flow_generator)
        return self.potential(x, need_grad=not self.importance_sampling)

    def _distribute(self, state: PathState) -> PathState:
        """The run's state made from all particles (read from a checkpoint)."""
        return state

    def _gather(self, state: PathState) -> PathState:
        """All particles of the run's state, as one PathState."""
        return state

    #: The step's :data:`~openmm_sbg.smc.step.ParticleMover`: here every particle is in this process.
    _move_particles = staticmethod(move_local)

    @property
    def _writes_output(self) -> bool:
        """Whether this process writes checkpoints and shows progress."""
        return True
