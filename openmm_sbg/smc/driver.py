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
from openmm_sbg.smc.kernels import Kernel, PathState, adapt_step_size, get_kernel, ula_step
from openmm_sbg.smc.proposal import (
    COM_ADJUSTMENTS,
    Proposal,
    com_energy,
    draw_proposals,
    module_dtype_device,
    source_energy,
)
from openmm_sbg.smc.resampling import Resampler, get_resampler
from openmm_sbg.smc.result import SMCResult
from openmm_sbg.smc.schedules import Schedule, get_schedule
from openmm_sbg.smc.weights import (
    energy_cutoff_filter,
    jarzynski_increment,
    log_mean_weight,
    normalised_ess,
    top_fraction_filter,
)

#: Default Langevin step size in nm^2 (energies in kT). On ad2 the stiffest bonds make
#: unadjusted Langevin unstable above ~1e-5 nm^2; see ``ula_step``.
DEFAULT_STEP_SIZE = 1e-6


class SMCSampler:
    """Sequential Boltzmann Generator sampling: the SMC part of Tan et al. (2025).

    Draws ``n_particles`` proposals from ``flow``, weights them by ``E_S - E_T``, drops
    those above ``energy_cutoff`` and the top ``clip_fraction`` of log-weights, then anneals
    along ``E_t = (1 - t) E_S + t E_T``: at each step the weights gain
    ``-(t_{k+1} - t_k)(E_T - E_S)(x)``, the population is resampled when its normalised
    ESS falls below ``resample_threshold`` (and at ``t = 1`` if ``resample_at_end``), and
    every particle takes ``n_mcmc_steps`` Langevin moves at the new ``t``. With
    ``n_steps=0`` it is plain importance sampling.

    Parameters
    ----------
    target
        A :class:`~openmm_sbg.BoltzmannTarget` (or anything with ``energy``,
        ``energy_and_forces``, ``n_atoms``): energies in kT of positions ``[B, N, 3]`` nm.
    flow
        The proposal: a :class:`~openmm_sbg.TarFlow` or :class:`GaussianProposal`.
    n_particles
        Number of proposals drawn, and of particles after each resampling.
    n_steps
        Annealing steps (``0``: importance sampling); the most steps for ``schedule="adaptive"``.
    kernel
        ``"ula"`` (unadjusted Langevin, the paper's), ``"mala"`` (Metropolis-adjusted, with
        step-size adaptation) or a kernel function (see :mod:`openmm_sbg.smc.kernels`).
    step_size
        Langevin step size ``h`` in nm^2 (displacement ~ ``sqrt(2h)`` nm per coordinate).
    schedule
        ``"linear"`` (the paper's, reaching t = 1 exactly), ``"adaptive"`` (keeps the
        conditional ESS of each step at ``target_cess``) or a schedule object.
    target_cess
        Conditional ESS per step for the adaptive schedule.
    n_mcmc_steps
        Langevin moves per annealing step.
    resampling
        ``"systematic"``, ``"multinomial"`` or a function ``(log_w, n, generator) -> indices``.
    resample_threshold
        Resample when the normalised ESS falls below this (0: only at the end).
    resample_at_end
        Resample at ``t = 1`` so the output particles are equally weighted.
    energy_cutoff
        Drop proposals whose target energy exceeds this many kT (``None``: keep all
        finite). Clashing proposals otherwise produce huge forces in the Langevin moves.
    clip_fraction
        Fraction of proposals with the largest log-weights to drop (the paper's 0.2%).
    com_adjustment
        ``"chi3"`` (the paper's), ``"gaussian"`` or ``"none"``; see :mod:`openmm_sbg.smc.proposal`.
    adapt_step_size
        For MALA, adapt ``h`` after each step towards ``target_acceptance``.
    target_acceptance
        Mean MALA acceptance the adaptation aims for.
    batch_size
        Particles per flow / force-field evaluation; lower it if memory runs out.
    checkpoint_path
        If set, the run's state is written there (atomically) after drawing the proposals
        and every ``checkpoint_every`` steps; ``run(resume=True)`` continues from it.
    checkpoint_every
        Steps between checkpoints.
    progress
        Show a tqdm progress bar.
    """

    def __init__(
        self,
        target,
        flow: Proposal,
        n_particles: int,
        n_steps: int,
        *,
        kernel: str | Kernel = "ula",
        step_size: float = DEFAULT_STEP_SIZE,
        schedule: str | Schedule = "linear",
        target_cess: float = 0.99,
        n_mcmc_steps: int = 1,
        resampling: str | Resampler = "systematic",
        resample_threshold: float = 0.5,
        resample_at_end: bool = True,
        energy_cutoff: float | None = None,
        clip_fraction: float = 0.002,
        com_adjustment: str = "chi3",
        adapt_step_size: bool = True,
        target_acceptance: float = 0.574,
        batch_size: int = 256,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        progress: bool = True,
    ):
        flow_atoms = getattr(flow, "n_atoms", target.n_atoms)
        if flow_atoms != target.n_atoms:
            raise ValueError(
                f"the flow models {flow_atoms} atoms but the target has {target.n_atoms}; "
                "use the flow trained for this system"
            )
        if n_particles < 1 or n_steps < 0 or n_mcmc_steps < 1 or batch_size < 1 or checkpoint_every < 1:
            raise ValueError(
                "need n_particles >= 1, n_steps >= 0, n_mcmc_steps >= 1, batch_size >= 1 and checkpoint_every >= 1; "
                f"got {n_particles}, {n_steps}, {n_mcmc_steps}, {batch_size}, {checkpoint_every}"
            )
        if not step_size > 0:
            raise ValueError(f"step_size must be positive (nm^2), got {step_size}")
        if com_adjustment not in COM_ADJUSTMENTS:
            raise ValueError(f"com_adjustment must be one of {COM_ADJUSTMENTS}, got {com_adjustment!r}")
        self.target = target
        self.flow = flow
        self.n_particles = n_particles
        self.n_steps = n_steps
        self.kernel = get_kernel(kernel)
        self.step_size = step_size
        self.schedule = get_schedule(schedule, n_steps, target_cess)
        self.n_mcmc_steps = n_mcmc_steps
        self.resample = get_resampler(resampling)
        self.resample_threshold = resample_threshold
        self.resample_at_end = resample_at_end
        self.energy_cutoff = energy_cutoff
        self.clip_fraction = clip_fraction
        self.com_adjustment = com_adjustment
        self.adapt_step_size = adapt_step_size and self.kernel is not ula_step
        self.target_acceptance = target_acceptance
        self.batch_size = batch_size
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self._settings = {
            "n_particles": n_particles,
            "n_steps": n_steps,
            "kernel": getattr(self.kernel, "__name__", repr(self.kernel)),
            "step_size": step_size,
            "schedule": repr(self.schedule),
            "n_mcmc_steps": n_mcmc_steps,
            "resampling": getattr(self.resample, "__name__", repr(self.resample)),
            "resample_threshold": resample_threshold,
            "resample_at_end": resample_at_end,
            "energy_cutoff": energy_cutoff,
            "clip_fraction": clip_fraction,
            "com_adjustment": com_adjustment,
            "adapt_step_size": self.adapt_step_size,
            "batch_size": batch_size,
        }

    # ------------------------------------------------------------------ energies
    def potential(self, x: torch.Tensor, need_grad: bool = True) -> PathState:
        """Path end energies (kT) and gradients (kT/nm) of ``x [B, N, 3]``, in batches.

        ``e_source = -log q(x)``; ``e_target = E_T(x) - log rho(c)``, the force field plus
        the CoM term (see :mod:`openmm_sbg.smc.proposal`); :meth:`physical_energy` removes it.
        """
        parts = []
        com_std = getattr(self.flow, "com_std", None)
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            e_source, grad_source = source_energy(self.flow, chunk, need_grad)
            e_com, grad_com = com_energy(chunk, com_std, self.com_adjustment, need_grad)
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
        e_com, _ = com_energy(state.x, getattr(self.flow, "com_std", None), self.com_adjustment, need_grad=False)
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
            with the same settings and seed); the result equals an uninterrupted run's.
        """
        started = time.perf_counter()
        if resume and self.checkpoint_path is None:
            raise ValueError("resume=True needs checkpoint_path; pass the file the interrupted run wrote")
        if resume and os.path.exists(self.checkpoint_path):
            run = self._load_checkpoint(seed)
        else:
            run = self._start(seed)
            self._save_checkpoint(run)
        bar = tqdm(
            total=self.schedule.max_steps if self.schedule is not None else 0,
            initial=run["step"],
            desc="SMC" if self.schedule is not None else "IS",
            unit="step",
            disable=not self.progress or self.schedule is None,
        )
        with bar:
            while self.schedule is not None and run["t"] < 1.0:
                self._step(run)
                bar.update(1)
                bar.set_postfix(t=f"{run['t']:.3f}", ess=f"{run['diagnostics']['ess'][-1]:.3f}")
                if run["step"] % self.checkpoint_every == 0:
                    self._save_checkpoint(run)
        if self.schedule is None:
            self._maybe_resample(run, final=True)
        return self._result(run, seed, time.perf_counter() - started)

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        # Independent streams for the flow's draws (on the flow's device) and for the SMC's
        # noise, resampling and acceptance tests (CPU), both derived from one seed.
        flow_seed, smc_seed = np.random.SeedSequence(seed).generate_state(2)
        device = module_dtype_device(self.flow)[1]
        return (
            torch.Generator(device=device).manual_seed(int(flow_seed)),
            torch.Generator().manual_seed(int(smc_seed)),
        )

    def _start(self, seed: int) -> dict:
        """Draw, evaluate and filter the proposals: the state of the run at t = 0."""
        flow_generator, generator = self._generators(seed)
        x = draw_proposals(self.flow, self.n_particles, self.batch_size, flow_generator)
        return self._initial_run(seed, self.potential(x, need_grad=self.schedule is not None), generator)

    def _initial_run(self, seed: int, state: PathState, generator: torch.Generator) -> dict:
        """Filter the evaluated proposals ``state`` and set up the run at t = 0."""
        # The filters judge proposals by their importance weights exp(E_S - E_T).
        log_w = jarzynski_increment(state.e_source, state.e_target, 0.0, 1.0)
        keep = energy_cutoff_filter(self.physical_energy(state), self.energy_cutoff)
        n_after_cutoff = int(keep.sum())
        keep &= top_fraction_filter(torch.where(keep, log_w, torch.full_like(log_w, -math.inf)), self.clip_fraction)
        if not keep.any():
            raise RuntimeError(
                f"all {self.n_particles} proposals were dropped (non-finite energies or above "
                f"energy_cutoff={self.energy_cutoff} kT); check the flow matches the target or raise the cutoff"
            )
        return {
            "seed": seed,
            "step": 0,
            "t": 0.0,
            "state": state.select(keep),
            # Annealing starts from exact samples of exp(-E_S) (weight 1) and accumulates the
            # weights step by step; importance sampling takes them in one go.
            "log_w": log_w[keep] if self.schedule is None else torch.zeros(int(keep.sum()), dtype=torch.float64),
            "log_z_offset": 0.0,  # log Z accumulated over completed resampling epochs
            "n_norm": self.n_particles,  # denominator of the current epoch's mean weight
            "step_size": self.step_size,
            "generator": generator.get_state(),
            "counts": {
                "n_proposals": self.n_particles,
                "n_finite": int(torch.isfinite(log_w).sum()),
                "n_after_energy_cutoff": n_after_cutoff,
                "n_kept": int(keep.sum()),
                "ess_proposals": normalised_ess(log_w[keep]),
            },
            "diagnostics": {k: [] for k in ("t", "ess", "acceptance", "resampled", "step_size", "n_alive", "log_z")},
            "final_ess": None,
            "final_log_z": None,
        }

    def _maybe_resample(self, run: dict, final: bool, generator: torch.Generator | None = None) -> bool:
        """Resample ``run`` if its ESS is below the threshold (or ``final`` and resample_at_end)."""
        ess = normalised_ess(run["log_w"])
        if final:
            # The weights at t = 1 are final here: a later move that lands a particle on a
            # non-finite energy zeroes its weight but must not change these.
            run["final_ess"] = ess
            run["final_log_z"] = run["log_z_offset"] + log_mean_weight(run["log_w"], run["n_norm"])
        if not (ess < self.resample_threshold or (final and self.resample_at_end)):
            return False
        owns_generator = generator is None
        if owns_generator:
            generator = torch.Generator()
            generator.set_state(run["generator"])
        run["log_z_offset"] += log_mean_weight(run["log_w"], run["n_norm"])
        index = self.resample(run["log_w"], self.n_particles, generator)
        run["state"] = run["state"].select(index)
        run["log_w"] = torch.zeros(self.n_particles, dtype=torch.float64)
        run["n_norm"] = self.n_particles
        if owns_generator:
            run["generator"] = generator.get_state()
        return True

    def _step(self, run: dict) -> None:
        """One annealing step: reweight to the next t, maybe resample, move at the new t."""
        generator = torch.Generator()
        generator.set_state(run["generator"])
        state, t = run["state"], run["t"]
        t_next = self.schedule.next_time(run["step"], t, run["log_w"], state.e_source, state.e_target)
        if not t < t_next <= 1.0:
            raise RuntimeError(f"the schedule went from t={t} to t={t_next}; times must increase up to 1")
        run["log_w"] = run["log_w"] + jarzynski_increment(state.e_source, state.e_target, t, t_next)
        ess = normalised_ess(run["log_w"])
        resampled = self._maybe_resample(run, final=t_next == 1.0, generator=generator)

        step_size = run["step_size"]
        mean_acceptance, n_alive = self._move(run, t_next, step_size, generator)
        if self.adapt_step_size and n_alive:
            run["step_size"] = adapt_step_size(step_size, mean_acceptance, self.target_acceptance)

        run.update(t=t_next, step=run["step"] + 1, generator=generator.get_state())
        log_z = run["final_log_z"] if t_next == 1.0 else run["log_z_offset"] + log_mean_weight(run["log_w"], run["n_norm"])
        for key, value in zip(
            ("t", "ess", "acceptance", "resampled", "step_size", "n_alive", "log_z"),
            (t_next, ess, mean_acceptance, resampled, step_size, n_alive, log_z),
        ):
            run["diagnostics"][key].append(value)

    def _move(self, run: dict, t: float, step_size: float, generator: torch.Generator) -> tuple[float, int]:
        """``n_mcmc_steps`` kernel moves at ``t`` of the particles with non-zero weight, in place.

        Returns the mean acceptance and the number of particles moved.
        """
        state = run["state"]
        acceptance = []
        for _ in range(self.n_mcmc_steps):
            alive = torch.isfinite(run["log_w"]).nonzero().squeeze(1)  # zero weight: not worth moving
            # Draw all random numbers at once so results do not depend on batch_size.
            noise = torch.randn((len(alive), *state.x.shape[1:]), dtype=torch.float64, generator=generator)
            uniform = torch.rand(len(alive), dtype=torch.float64, generator=generator)
            moved, moved_acceptance = self._apply_kernel(state.select(alive), t, step_size, noise, uniform)
            if moved is not None:
                state.assign(alive, moved)
                acceptance.append(moved_acceptance)
            # A move onto a non-finite energy (possible with ULA) zeroes that particle's weight
            # at once, so no particle ever has a finite weight and a non-finite energy.
            finite = torch.isfinite(state.e_source) & torch.isfinite(state.e_target)
            run["log_w"] = torch.where(finite, run["log_w"], torch.full_like(run["log_w"], -math.inf))
        mean_acceptance = float(torch.cat(acceptance).mean()) if acceptance else float("nan")
        return mean_acceptance, len(alive)

    def _apply_kernel(
        self, moving: PathState, t: float, step_size: float, noise: torch.Tensor, uniform: torch.Tensor
    ) -> tuple[PathState | None, torch.Tensor]:
        """One kernel move of every particle in ``moving``, ``batch_size`` at a time.

        Returns the moved particles (``None`` if there were none) and their acceptances.
        """
        moved, acceptance = [], []
        for start in range(0, len(noise), self.batch_size):
            batch = slice(start, start + self.batch_size)
            new, info = self.kernel(moving.select(batch), t, self.potential, step_size, noise[batch], uniform[batch])
            moved.append(new)
            acceptance.append(info.acceptance)
        if not moved:
            return None, torch.empty(0, dtype=torch.float64)
        return PathState.cat(moved), torch.cat(acceptance)

    def _result(self, run: dict, seed: int, seconds: float) -> SMCResult:
        state = run["state"]
        diagnostics = {key: np.asarray(values) for key, values in run["diagnostics"].items()}
        info = {
            **self._settings,
            **run["counts"],
            "seed": seed,
            "system": getattr(self.target, "name", None),
            "kT_kJ_per_mol": getattr(self.target, "kT", None),
            "n_resampling": int(diagnostics["resampled"].sum()) if len(diagnostics["resampled"]) else 0,
            "seconds": seconds,
        }
        return SMCResult(
            positions=state.x.numpy().copy(),
            log_weights=run["log_w"].numpy().copy(),
            energies=self.physical_energy(state).numpy(),
            log_z=run["final_log_z"],
            ess=run["final_ess"],
            diagnostics=diagnostics,
            topology=getattr(self.target, "topology", None),
            info=info,
        )

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, run: dict) -> None:
        if self.checkpoint_path is None:
            return
        run = {**run, "state": dataclasses.asdict(run["state"])}
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save({"settings": self._settings, "run": run}, tmp)

    def _load_checkpoint(self, seed: int) -> dict:
        checkpoint = torch.load(self.checkpoint_path, weights_only=True)
        if checkpoint["settings"] != self._settings or checkpoint["run"]["seed"] != seed:
            raise ValueError(
                f"the checkpoint {self.checkpoint_path} comes from a run with other settings or seed "
                f"({checkpoint['settings']}, seed {checkpoint['run']['seed']}); resume with the same ones, "
                "or delete the file to start afresh"
            )
        run = checkpoint["run"]
        run["state"] = PathState(**run["state"])
        return run
