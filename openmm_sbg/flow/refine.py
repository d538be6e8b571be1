"""Energy-aware refinement of a trained TarFlow: from the MD data's quality towards the force field's.

Maximum likelihood on MD frames never sees the force field; refinement continues from a
trained flow and fits it to the Boltzmann distribution itself. Three objectives
(:attr:`RefineOptions.objective`), each mixed with the MD data's likelihood (``data_weight``):

``"weighted-ml"`` (default): importance-weighted maximum likelihood with a replay buffer, the
    bootstrap of flow annealed importance sampling (FAB) with plain importance sampling in
    place of AIS. Every ``refresh_every`` steps the EMA flow proposes
    ``proposals_per_refresh`` configurations scored with the target energy; the buffer keeps
    the last ``buffer_refreshes`` of these sets with their weights ``p / q_old``; each step
    fits the flow to a batch resampled from the buffer by weight (the buffer starts full). This is the forward
    KL(p || q): mass-covering, so it moves mass between the basins the flow proposes instead
    of collapsing onto one, and it needs no force. With ``temper_ess`` each set's weights
    are tempered, ``(p / q_old)^beta`` with the largest ``beta <= 1`` that keeps that ESS
    fraction, as adaptive tempering in SMC: the flow then fits ``q_old^(1 - beta) p^beta``,
    one step of an annealing from itself to the target. A poor start (ESS of a few percent)
    otherwise resamples its batches from a few dozen heavy proposals and collapses onto them.
``"alpha-2"``: the same buffer with each set's weights squared, ``(p / q_old)^2``: the
    gradient of FAB's alpha-2 divergence ``integral p^2 / q``, whose minimum is the maximum of
    the importance-sampling ESS itself (``ESS = 1 / integral (p^2 / q)`` for normalised ``p``).
    Squaring puts the fit where the flow proposes too little, the heavy tail of the weights
    that sets the ESS; it resamples from fewer effective proposals, so ``temper_ess`` (the
    largest exponent up to 2 that keeps that ESS) is its natural companion.
``"reverse-kl"``: KL(q || p) through the differentiable inverse, with the target's forces;
    mode-seeking, which is why the data term matters more here.

Guards: every ``eval_every`` steps ``eval_proposals`` proposals of the EMA flow give the
importance-sampling ESS and, given ``states`` (a function from positions to state labels),
the proposals' state populations next to the importance-weighted ones. Refinement stops
early, keeping the EMA weights of the best ESS so far, when a state holding at least
``min_state_population`` of the weighted mass gets less than ``drift_ratio`` of that mass in
the proposals (the mass less ``drift_errors`` of its standard errors, so that a share resting
on a few heavy proposals does not stop a run on noise), or when the ESS falls below
``ess_floor`` (a half) of its starting value. Every checkpoint is the flow itself (an exact
density); a run resumes exactly from it, every random draw of step ``t`` coming from a
generator seeded by ``(seed, t)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable

import numpy as np
import torch

from openmm_sbg import populations
from openmm_sbg.flow import features
from openmm_sbg.flow.fitting import AllProcesses, Fit, OneProcess, Processes, feature_tensor, fingerprint, stream_generator
from openmm_sbg.flow.model import TarFlow
from openmm_sbg.resume import without_later_settings
from openmm_sbg.smc.proposal import com_energy, com_log_density
from openmm_sbg.smc.weights import jarzynski_increment, largest_exponent_keeping_ess, normalised_ess

OBJECTIVES = ("weighted-ml", "alpha-2", "reverse-kl")
#: The power of ``p / q_old`` that each buffered objective fits (before tempering).
WEIGHT_POWERS = {"weighted-ml": 1.0, "alpha-2": 2.0}
# Kinds of random stream (see openmm_sbg.flow.fitting): proposals, buffer batches and their
# augmentation, data batches and theirs, evaluation, the buffer's first filling.
_REFRESH, _BUFFER_BATCH, _BUFFER_AUGMENT, _DATA_BATCH, _DATA_AUGMENT, _EVALUATE, _FILL = range(10, 17)


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """Settings of :func:`refine` (each field's docstring says what it sets)."""

    objective: str = "weighted-ml"
    """``"weighted-ml"``, ``"alpha-2"`` or ``"reverse-kl"`` (see the module docstring)."""
    data_weight: float = 0.5
    """Weight of the MD data's NLL in the loss, ``(1 - w) * energy term + w * data NLL``; 0 uses the energy
    alone, 1 the data alone (more maximum-likelihood training under the guards: the control that shows what
    the energy adds)."""
    steps: int = 300
    """Optimiser steps."""
    batch_size: int = 256
    """Configurations per step (buffer draws or reverse-KL samples, and data frames)."""
    lr: float = 5e-5
    """AdamW learning rate, constant: the flow starts trained."""
    grad_clip: float = 1.0
    """Maximum global gradient norm."""
    ema_decay: float = 0.99
    """Decay of the EMA of the weights, which are evaluated and saved."""
    proposals_per_refresh: int = 2048
    """``weighted-ml`` and ``alpha-2``: proposals drawn into the replay buffer per refresh."""
    refresh_every: int = 10
    """``weighted-ml`` and ``alpha-2``: steps between refreshes."""
    buffer_refreshes: int = 10
    """``weighted-ml`` and ``alpha-2``: refreshes the buffer keeps (20k proposals with the defaults)."""
    temper_ess: float = 0.0
    """``weighted-ml`` and ``alpha-2``: temper each refresh's weights to keep at least this ESS fraction
    (see the module docstring); 0 uses the weights as they are (squared for ``alpha-2``)."""
    eval_every: int = 50
    """Steps between guard evaluations (and checkpoints)."""
    eval_proposals: int = 4096
    """Proposals per guard evaluation."""
    drift_ratio: float = 0.5
    """Stop when a state's share of the proposals falls below this fraction of its weighted share."""
    drift_errors: float = 2.0
    """The weighted share the guard compares is its estimate less this many standard errors: a share that
    rests on a few heavy proposals (a low ESS) cannot stop a run on its noise. 0 compares the estimates."""
    min_state_population: float = 0.01
    """States with less weighted mass than this are not guarded."""
    ess_floor: float = 0.5
    """Stop when the ESS falls below this fraction of its starting value. At an ESS of a few percent one
    evaluation's estimate scatters by a third or more, so a poor start needs a lower floor or more ``eval_proposals``."""
    max_seconds: float | None = None
    """Wall-clock budget: stop at the first evaluation past it (a resumed run counts the time already
    spent). Runs stopped by time are not bit-reproducible; step counts are."""
    patience: int | None = None
    """Stop when this many evaluations in a row have not raised the ESS above its best so far: the budget
    ends when the guard's ESS stops rising. None: run to ``steps`` (or ``max_seconds``)."""
    seed: int = 0
    """Seed of every random draw."""
    select_best: bool = True
    """Keep the EMA weights of the evaluation with the highest ESS; False keeps the last ones. The ESS of
    proposals sees only the states the flow proposes, so a refinement that teaches the flow a state it
    missed (a data term holding a rare basin) can lower it while making the flow right: keep the last."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0 <= self.data_weight <= 1:
            raise ValueError(f"data_weight must lie in [0, 1], got {self.data_weight}")
        if not 0 <= self.ess_floor < 1:
            raise ValueError(f"ess_floor must lie in [0, 1), got {self.ess_floor}")
        if self.drift_errors < 0:
            raise ValueError(f"drift_errors must be a non-negative number of standard errors, got {self.drift_errors}")
        if not 0 <= self.temper_ess < 1:
            raise ValueError(f"temper_ess must lie in [0, 1), got {self.temper_ess}")
        if min(self.steps, self.batch_size, self.proposals_per_refresh, self.refresh_every, self.buffer_refreshes,
               self.eval_every, self.eval_proposals) < 1:
            raise ValueError("steps, batch sizes, refresh and evaluation intervals must be positive")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive number of evaluations (or None), got {self.patience}")

    def to_dict(self) -> dict:
        """Plain-dict form, as stored in checkpoints; no ``patience`` when unset, as checkpoints written before it
        existed hold."""
        return without_later_settings(dataclasses.asdict(self), {"patience": None})


def importance_weights(flow: TarFlow, target, n: int, generator: torch.Generator, batch_size: int = 1024, processes=None):
    """``n`` proposals of ``flow`` ``[n, N, 3]`` and their log importance weights for ``target``.

    ``log w = -U/kT + log N(CoM; 0, com_std^2) - log q``: the ``"gaussian"`` CoM adjustment
    (:mod:`openmm_sbg.smc.proposal`), which cancels the flow's CoM factor, so the weights
    measure the flow and not the CoM convention. (The sampler's default ``"chi3"`` multiplies
    every weight by ``4 pi |CoM|^2``, whose spread alone caps the ESS at 9/15 = 0.6.) A
    configuration with a non-finite energy gets ``-inf``. All latents are drawn first, so
    with ``processes`` each process inverts and scores only its rows and every process gets
    the same ``n`` proposals as one process would.
    """
    processes = processes or OneProcess()
    latents = flow.draw_latents(n, generator)[processes.rows(n)]
    xs, log_ws = [], []
    for start in range(0, len(latents), batch_size):
        with torch.no_grad():
            x, log_q = flow.from_latents(latents[start : start + batch_size])
        x = x.double()
        # The sampler's weights at t = 0: E_S = -log q, E_T' = U/kT - log rho(c) (openmm_sbg.smc.proposal).
        e_com, _ = com_energy(x, flow.com_std, "gaussian", need_grad=False)
        xs.append(x)
        log_ws.append(jarzynski_increment(-log_q.double(), target.energy(x, allow_nonfinite=True) + e_com, 0.0, 1.0))
    return processes.gather(torch.cat(xs)), processes.gather(torch.cat(log_ws))


def tempered(log_w: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * log_w``, with ``-inf`` kept (not ``nan``) at ``beta = 0``."""
    return torch.where(torch.isfinite(log_w), beta * log_w, torch.full_like(log_w, -math.inf))


def tempering_exponent(log_w: torch.Tensor, ess_fraction: float, largest: float = 1.0, iterations: int = 40) -> float:
    """The largest ``beta`` in [0, largest] whose weights ``softmax(beta * log_w)`` keep an ESS of ``ess_fraction``.

    Bisection (:func:`~openmm_sbg.smc.weights.largest_exponent_keeping_ess`, ``iterations``
    halvings of the range), since the ESS falls as ``beta`` grows; ``largest`` when those
    weights keep it. Configurations with ``-inf`` log-weights (clashes) keep weight 0 at every
    ``beta > 0``.
    """
    if ess_fraction <= 0:
        return largest
    log_w = log_w.double()
    return largest_exponent_keeping_ess(lambda beta: normalised_ess(tempered(log_w, beta)), ess_fraction, 0.0, largest,
                                        tolerance=largest * 0.5**iterations)


class _ReducedEnergy(torch.autograd.Function):
    """``U(x)/kT`` of the target, differentiable in ``x`` through its forces."""

    @staticmethod
    def forward(ctx, x, target):
        energy, forces = target.energy_and_forces(x.detach().double(), allow_nonfinite=True)
        ctx.save_for_backward(forces.to(x.dtype))
        return energy.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (forces,) = ctx.saved_tensors
        return -grad[:, None, None] * forces, None


def refine(
    flow: TarFlow,
    target,
    options: RefineOptions | None = None,
    *,
    data_positions=None,
    states: Callable[[np.ndarray], np.ndarray] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    provenance: dict | None = None,
) -> TarFlow:
    """Refine a trained ``flow`` with ``target``'s energy; return the refined EMA flow.

    Parameters
    ----------
    flow
        A trained :class:`TarFlow` of ``target``'s molecule (either representation).
    target
        The :class:`~openmm_sbg.BoltzmannTarget`.
    options
        :class:`RefineOptions`.
    data_positions
        MD frames ``[T, N, 3]`` in nm for the data term (needed unless ``data_weight`` is 0).
    states
        Optional function from positions ``[B, N, 3]`` (nm, numpy) to integer state labels,
        for the population guard (e.g. the backbone basins, :mod:`openmm_sbg.populations`).
    checkpoint_path
        Written at every evaluation (resumable) and at the end (the refined flow, with its
        record in ``flow.metadata["refinement"]``).
    provenance
        JSON-serialisable facts kept in that record as ``"provenance"``: where the starting
        flow and the data came from (the CLI stores their paths).

    Under ``torchrun`` (torch.distributed's default group initialised), every process calls
    this with the same arguments; they share each step's proposals and gradients
    (:class:`AllProcesses`), end with the one-process result, and rank 0 writes.
    """
    options = options or RefineOptions()
    if options.data_weight > 0 and (data_positions is None or len(data_positions) == 0):
        raise ValueError("data_weight > 0 needs data_positions, MD frames such as the flow was trained on; or pass data_weight=0")
    if flow.n_atoms != target.n_atoms:
        raise ValueError(f"the flow models {flow.n_atoms} atoms but the target has {target.n_atoms}; refine the flow of this molecule")
    # Under torchrun (an initialised default group) the processes share every step's work.
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    run = _Run(flow, target, options, data_positions, states, AllProcesses() if launched else OneProcess(),
               checkpoint_path=checkpoint_path, provenance=provenance)
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        run.resume()
    return run.fit(progress)


def drift_reason(entry: dict, start_ess: float, options: RefineOptions) -> str | None:
    """Why the guards stop a run at this evaluation ``entry`` (see :class:`RefineOptions`), or None."""
    if entry["ess"] < options.ess_floor * start_ess:
        return f"ESS fell to {entry['ess']:.3f} from {start_ess:.3f}"
    weighted = entry.get("weighted_populations", [])
    errors = entry.get("weighted_population_errors", [])
    for s, (proposed, share, error) in enumerate(zip(entry.get("proposal_populations", []), weighted, errors)):
        if share >= options.min_state_population and proposed < options.drift_ratio * (share - options.drift_errors * error):
            return f"state {s} holds {share:.3f} +- {error:.3f} of the weighted mass but {proposed:.3f} of the proposals"
    return None


class _Run(Fit):
    """The state of one refinement: the fit, the target, the replay buffer, the guards' record."""

    name, state_key = "refinement", "refine_state"
    non_finite_remedy = "lower the learning rate"
    finished_remedy = "refine into another file"
    settings_remedy = "rerun with the same settings to resume it, or refine into another file"

    def __init__(self, flow: TarFlow, target, options: RefineOptions, data_positions, states, processes: Processes,
                 checkpoint_path=None, provenance: dict | None = None):
        self.target, self.states, self.provenance = target, states, dict(provenance or {})
        settings = {"options": options.to_dict(), "start_sha1": fingerprint(*[p.detach().cpu().numpy() for p in flow.parameters()]),
                    "data_sha1": None if data_positions is None else fingerprint(np.asarray(data_positions))}
        model = copy.deepcopy(flow).float().train().requires_grad_(True)
        super().__init__(model, options, processes, checkpoint_path, settings, betas=(0.9, 0.95), weight_decay=0.0,
                         total_steps=options.steps, eval_every=options.eval_every, label=f"refine ({options.objective})")
        self.ema.eval()
        self.data = None
        if data_positions is not None:
            self.data = feature_tensor(np.asarray(data_positions, dtype=np.float64), self.model)
        # (positions, tempered log-weights, tempering exponent) of each refresh, oldest first.
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    # ------------------------------------------------------------------ losses
    def loss(self) -> torch.Tensor:
        o = self.options
        loss = (1 - o.data_weight) * self.energy_loss() if o.data_weight < 1 else 0.0
        if o.data_weight > 0:
            loss = loss + o.data_weight * self.data_loss()
        return loss

    def energy_loss(self) -> torch.Tensor:
        """This process's part of the energy term: a sum over its rows divided by the batch size."""
        o, rows = self.options, self.processes.rows(self.options.batch_size)
        if o.objective in WEIGHT_POWERS:
            if not self.buffer:
                # Start full: batches resampled from one refresh alone would revisit its few
                # heavy configurations and pull the flow onto them.
                self.buffer = [self.proposals(stream_generator(o.seed, _FILL, i)) for i in range(o.buffer_refreshes)]
            elif self.step % o.refresh_every == 0:
                self.buffer = [*self.buffer, self.proposals(stream_generator(o.seed, _REFRESH, self.step))][-o.buffer_refreshes :]
            # Each refresh's self-normalised weights estimate p; the buffer averages them.
            probs = torch.cat([torch.softmax(log_w, 0) for _, log_w, _ in self.buffer]) / len(self.buffer)
            pick = torch.multinomial(probs, o.batch_size, replacement=True, generator=stream_generator(o.seed, _BUFFER_BATCH, self.step))
            x = torch.cat([x for x, _, _ in self.buffer])[pick]
            y = features.training_features(self.model.representation, x.double()).float()
            y = features.augment_features(self.model.representation, y, stream_generator(o.seed, _BUFFER_AUGMENT, self.step))
            return self.model.nll_per_dim(y[rows]).sum() / o.batch_size
        latents = self.model.draw_latents(o.batch_size, stream_generator(o.seed, _REFRESH, self.step))[rows]
        x, log_q = self.model.from_latents(latents)
        log_p = -_ReducedEnergy.apply(x, self.target) + com_log_density(x, self.model.com_std, "gaussian")
        finite = torch.isfinite(log_p)  # a clash: no gradient from that sample
        return (log_q - log_p)[finite].sum() / (o.batch_size * self.model.dim)

    def proposals(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        x, log_w = importance_weights(self.ema, self.target, self.options.proposals_per_refresh, generator, processes=self.processes)
        beta = tempering_exponent(log_w, self.options.temper_ess, largest=WEIGHT_POWERS[self.options.objective])
        return x.float(), tempered(log_w, beta), beta

    def data_loss(self) -> torch.Tensor:
        o, rows = self.options, self.processes.rows(self.options.batch_size)
        pick = torch.randint(0, len(self.data), (o.batch_size,), generator=stream_generator(o.seed, _DATA_BATCH, self.step))
        y = features.augment_features(self.model.representation, self.data[pick], stream_generator(o.seed, _DATA_AUGMENT, self.step))
        return self.model.nll_per_dim(y[rows]).sum() / o.batch_size

    # ------------------------------------------------------------------ guard
    def evaluate(self) -> dict:
        o = self.options
        x, log_w = importance_weights(self.ema, self.target, o.eval_proposals, stream_generator(o.seed, _EVALUATE, 0), processes=self.processes)
        entry = {"step": self.step, "seconds": self.seconds, "ess": normalised_ess(log_w)}
        if self.buffer:
            entry["temper"] = self.buffer[-1][2]
        if self.states is not None:
            labels = np.asarray(self.states(x.numpy()))
            n_states, log_w = int(labels.max()) + 1, log_w.numpy()
            entry["proposal_populations"] = populations.state_populations(labels, n_states).tolist()
            entry["weighted_populations"] = populations.state_populations(labels, n_states, log_w).tolist()
            entry["weighted_population_errors"] = populations.population_errors(labels, n_states, log_w).tolist()
        return entry

    def score(self, entry: dict) -> float:
        return entry["ess"]

    def stop_reason(self, entry: dict) -> str | None:
        o = self.options
        reason = drift_reason(entry, self.history[0]["ess"], o)
        if reason is None and o.max_seconds is not None and self.seconds >= o.max_seconds:
            reason = f"the wall-clock budget of {o.max_seconds:g} s is spent"
        without_gain = self.evaluations_without_gain(entry)
        if reason is None and o.patience is not None and without_gain >= o.patience:
            reason = f"the ESS has not risen for {without_gain} evaluations"
        return reason

    def postfix(self) -> dict:
        return {"ess": f"{self.history[-1]['ess']:.3f}"}

    # ------------------------------------------------------------------ checkpoints
    def flow_metadata(self, complete: bool) -> dict:
        # A finished run that keeps the last weights reports the last evaluation.
        ess, step = self.best[:2] if self.options.select_best or not complete else (self.history[-1]["ess"], self.history[-1]["step"])
        return {**self.ema.metadata, "refinement": {
            "options": self.options.to_dict(), "steps": self.step, "seconds": self.seconds, "history": self.history,
            "selected_step": step, "ess": ess, "stopped": self.stopped, "complete": complete, "provenance": self.provenance,
        }}

    def resume_state(self) -> dict:
        return {"best": self.best, "buffer": [(x.clone(), log_w.clone(), beta) for x, log_w, beta in self.buffer]}

    def restore(self, state: dict) -> None:
        self.best, self.buffer = state["best"], list(state["buffer"])
