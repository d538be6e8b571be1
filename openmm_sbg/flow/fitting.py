"""The one loop that fits a flow's weights: maximum-likelihood training and energy refinement share it.

:class:`Fit` owns what every fit does: the AdamW optimiser, the exponential moving average
(EMA) of the weights (what gets evaluated and saved), the step count, wall-clock seconds and
history, the progress bar, the non-finite-loss check, the best evaluation so far, and the
checkpoints: written at every evaluation (resumable) and at the end (the finished flow).
A subclass supplies its loss and its evaluation (:meth:`Fit.loss`, :meth:`Fit.evaluate`,
...), as openmmtools' ``BaseIntegratorMove.apply`` owns a move and its subclasses supply
the integrator.

Random streams. Every random draw of a fit comes from a generator seeded by
``(seed, kind, index)`` (:func:`stream_generator`), the kind naming what is drawn and the
index usually the step, so a resumed run draws what the uninterrupted one would have. Kinds
0-3 are training's, 10-16 refinement's.

Processes. :class:`OneProcess` fits in one process; :class:`AllProcesses` spreads every
batch and draw over the processes of torch.distributed's default group (``torchrun``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from openmm_sbg.flow import checkpoint
from openmm_sbg.flow.features import training_features
from openmm_sbg.resume import check_resume_settings


def stream_seed(seed: int, kind: int, index: int) -> int:
    """The seed of random stream ``(seed, kind, index)``."""
    return int(np.random.SeedSequence([seed, kind, index]).generate_state(1)[0])


def stream_generator(seed: int, kind: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for random stream ``(seed, kind, index)``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, kind, index))


def fingerprint(*arrays: np.ndarray) -> str:
    """SHA-1 of the arrays' shapes and float32 values: tells a resumed run whether it has the same data."""
    digest = hashlib.sha1()
    for array in arrays:
        digest.update(repr(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def cpu_copy(module: torch.nn.Module) -> dict:
    """A detached CPU copy of ``module``'s state dict."""
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def feature_tensor(positions: np.ndarray, flow) -> torch.Tensor:
    """The representation's training features of positions ``[T, N, 3]`` (nm), computed in float64 for
    accuracy and returned in the flow's dtype and on its device."""
    param = next(flow.parameters())
    y = training_features(flow.representation, torch.as_tensor(positions, dtype=torch.float64))
    return y.to(dtype=param.dtype, device=param.device)


def optimiser_step(loss: torch.Tensor, optimizer, flow, ema, grad_clip: float, ema_decay: float, step: int,
                   reduce_gradients: Callable[[torch.nn.Module], None] | None = None) -> None:
    """Backpropagate ``loss`` (then ``reduce_gradients(flow)``), clip the gradient norm, step the optimiser, update the EMA."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if reduce_gradients is not None:
        reduce_gradients(flow)
    torch.nn.utils.clip_grad_norm_(flow.parameters(), grad_clip)
    optimizer.step()
    _update_ema(ema, flow, ema_decay, step)


def _update_ema(ema, flow, decay: float, step: int) -> None:
    # Ramp the decay up over the first steps so the average is not anchored to the
    # initial (identity) weights when a run is short.
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, current in zip(ema.parameters(), flow.parameters()):
            average.lerp_(current, 1 - decay)


# ----------------------------------------------------------------------------- processes
class Processes(Protocol):
    """How a fit spreads its work over processes (:class:`OneProcess`, :class:`AllProcesses`)."""

    #: Whether this process writes the checkpoint.
    writes_checkpoints: bool

    def rows(self, n: int) -> slice:
        """This process's contiguous rows of ``n``."""

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's rows, in order."""

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum ``model``'s gradients over the processes."""

    def total(self, value: torch.Tensor) -> float:
        """The sum of ``value`` over the processes."""


class OneProcess:
    """A fit in one process: every row of every draw and batch is local."""

    writes_checkpoints = True

    def rows(self, n: int) -> slice:
        return slice(0, n)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Nothing to add: the local loss is the whole loss."""

    def total(self, value: torch.Tensor) -> float:
        return value.item()


class AllProcesses(OneProcess):
    """A fit over torch.distributed's default group (``torchrun``).

    Every process draws the same global batches (the same seeds); each inverts, scores and
    backpropagates a contiguous slice of their rows, draws are gathered and the gradients of
    the losses (sums over rows divided by the global row count) summed, so every process
    holds the one-process state, up to floating-point summation order, whatever the slices'
    sizes; only rank 0 writes the checkpoint.
    """

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("AllProcesses needs an initialised process group; call openmm_sbg.distributed.init() first")
        self.dist, self.rank, self.world_size = dist, dist.get_rank(), dist.get_world_size()
        self.writes_checkpoints = self.rank == 0

    def rows(self, n: int) -> slice:
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        parts = [None] * self.world_size
        self.dist.all_gather_object(parts, local)
        return torch.cat(parts)

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        grads = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
        if not grads:
            return
        # One collective per step, not one per parameter.
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        self.dist.all_reduce(flat)
        for grad, part in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(part.view_as(grad))

    def total(self, value: torch.Tensor) -> float:
        value = value.detach().clone()
        self.dist.all_reduce(value)
        return value.item()


# ----------------------------------------------------------------------------- the loop
class Fit:
    """One fit of ``model``'s weights: the loop, and everything it keeps (see the module docstring).

    ``options`` gives ``lr``, ``grad_clip``, ``ema_decay`` and ``select_best``; ``settings``
    (JSON-serialisable) must match for a checkpoint to resume. A step ``t`` computes
    :meth:`loss`, sets :meth:`learning_rate`, steps the optimiser and the EMA; after every
    ``eval_every`` steps and the last, :meth:`evaluate` gives the history entry,
    :meth:`stop_reason` may end the run early, and an unfinished run is checkpointed.
    """

    #: What errors and messages call the fit (``"training"``, ``"refinement"``).
    name: str
    #: The checkpoint entry holding an unfinished run's state (part of the file format).
    state_key: str
    #: What to do about a loss that became NaN or infinite.
    non_finite_remedy: str
    #: What to do when the checkpoint holds a finished flow.
    finished_remedy: str
    #: What to do when the checkpoint holds a run with other settings.
    settings_remedy: str

    def __init__(self, model, options, processes: Processes, checkpoint_path, settings: dict, *, betas: tuple[float, float],
                 weight_decay: float, total_steps: int, eval_every: int, label: str):
        self.model, self.options, self.processes = model, options, processes
        self.checkpoint_path, self.settings = checkpoint_path, settings
        self.total_steps, self.eval_every, self.label = total_steps, eval_every, label
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=betas, weight_decay=weight_decay)
        self.step, self.seconds, self.history = 0, 0.0, []
        self.best = None  # (score, step, EMA weights) of the best evaluation so far
        self.stopped: str | None = None
        self.losses: list[float] = []  # of the steps since the last evaluation

    # ------------------------------------------------------------------ what a subclass supplies
    def loss(self) -> torch.Tensor:
        """This process's part of step ``self.step``'s loss: a sum over its rows divided by the global row count."""
        raise NotImplementedError

    def learning_rate(self) -> float:
        """The learning rate of step ``self.step``."""
        return self.options.lr

    def evaluate(self) -> dict:
        """The history entry of an evaluation of the EMA flow now (``step`` among its keys)."""
        raise NotImplementedError

    def score(self, entry: dict) -> float:
        """How good an evaluation is: the highest score's weights are the best."""
        raise NotImplementedError

    def stop_reason(self, entry: dict) -> str | None:
        """Why the run stops at evaluation ``entry`` (before it is recorded), or None to go on."""
        return None

    def postfix(self) -> dict:
        """Progress-bar fields besides the loss."""
        return {}

    def flow_metadata(self, complete: bool) -> dict:
        """The record the EMA flow's metadata holds after this evaluation (finished or not)."""
        raise NotImplementedError

    def resume_state(self) -> dict:
        """What an unfinished checkpoint keeps besides the weights, optimiser, step, seconds and history."""
        return {}

    def restore(self, state: dict) -> None:
        """Restore what :meth:`resume_state` kept (and :attr:`best`) from an unfinished checkpoint's ``state``."""

    # ------------------------------------------------------------------ the loop
    def fit(self, progress: bool, callback: Callable[[int, float], None] | None = None):
        """Run (or go on with) the fit; the EMA flow with the selected weights, in eval mode.

        ``callback(step, loss)`` is called after every optimiser step (``step`` counts from 1).
        """
        if not self.history:
            self.record(self.evaluate())
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.label, unit="step", disable=not progress,
                   dynamic_ncols=True)
        started = time.perf_counter() - self.seconds
        self.model.train()
        try:
            while self.step < self.total_steps and self.stopped is None:
                loss = self.loss()
                loss_value = self.processes.total(loss)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"{self.name} loss became {loss_value} at step {self.step}; {self.non_finite_remedy}")
                for group in self.optimizer.param_groups:
                    group["lr"] = self.learning_rate()
                optimiser_step(loss, self.optimizer, self.model, self.ema, self.options.grad_clip, self.options.ema_decay,
                               self.step, reduce_gradients=self.processes.reduce_gradients)
                self.step += 1
                self.losses.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", **self.postfix())
                if callback is not None:
                    callback(self.step, loss_value)
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    self.seconds = time.perf_counter() - started
                    entry = self.evaluate()
                    self.stopped = self.stop_reason(entry)
                    self.record(entry)
                    self.losses = []
                    if self.stopped is None and self.step < self.total_steps:
                        self.write(complete=False)
        finally:
            bar.close()
        if self.stopped is not None and progress:
            tqdm.write(f"{self.name} stopped at step {self.step}: {self.stopped}; keeping the weights of step {self.best[1]}")
        if self.options.select_best:
            self.ema.load_state_dict(self.best[2])
        self.write(complete=True)
        return self.ema.eval()

    def evaluations_without_gain(self, entry: dict) -> int:
        """Evaluations in a row, ``entry`` (not yet recorded) included, that have not beaten the best; 0 if it does.

        What a patience rule counts (:meth:`stop_reason` of the subclasses)."""
        if self.score(entry) > self.best[0]:
            return 0
        return sum(past["step"] > self.best[1] for past in self.history) + 1

    def record(self, entry: dict) -> None:
        """Append an evaluation to the history; keep the EMA weights if it scores best so far."""
        self.history.append(entry)
        if self.best is None or self.score(entry) > self.best[0]:
            self.best = (self.score(entry), entry["step"], cpu_copy(self.ema))

    # ------------------------------------------------------------------ checkpoints
    def write(self, complete: bool) -> None:
        """Record the run in the EMA flow's metadata and write the checkpoint (resumable unless ``complete``)."""
        self.ema.metadata = self.flow_metadata(complete)
        if self.checkpoint_path is None or not self.processes.writes_checkpoints:
            return
        payload = self.ema.checkpoint_payload()
        if not complete:
            payload[self.state_key] = {
                **self.settings, "step": self.step, "seconds": self.seconds, "history": self.history,
                "model": cpu_copy(self.model), "optimizer": self.optimizer.state_dict(), **self.resume_state(),
            }
        checkpoint.write_checkpoint(self.checkpoint_path, payload)

    def resume(self) -> None:
        """Go on from the unfinished run in the checkpoint; refuse a finished one or one with other settings."""
        where = repr(os.fspath(self.checkpoint_path))
        payload = checkpoint.read_checkpoint(self.checkpoint_path)
        state = payload.get(self.state_key)
        if state is None:
            raise ValueError(f"{where} already holds a finished flow; {self.finished_remedy}")
        check_resume_settings(where, {key: state.get(key) for key in self.settings}, self.settings, remedy=self.settings_remedy)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
        self.step, self.seconds, self.history = state["step"], state["seconds"], list(state["history"])
        self.restore(state)
