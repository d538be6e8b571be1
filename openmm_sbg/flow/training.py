"""Maximum-likelihood training of a TarFlow on MD configurations, with exact resume.

Recipe (Tan et al. 2025): loss NLL / 3N on centred, scaled, randomly rotated configurations
with CoM noise; AdamW with betas (0.9, 0.95) and weight decay 4e-4; one-cycle learning rate
with 5% warm-up; batch 512; gradient clipping at 1.0; EMA of the weights (decay 0.999),
which is what gets validated and saved; by default the EMA weights of the epoch with the
lowest validation NLL are the result (``TrainOptions.select_best``).

Every random choice of step ``t`` (its batch, rotations and noise) is drawn from a generator
seeded by ``(seed, t)``, so a run resumed from a checkpoint continues exactly as if it had
never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from openmm_sbg.flow import features
from openmm_sbg.flow.fitting import Fit, OneProcess, Processes, feature_tensor, fingerprint, stream_generator, stream_seed
from openmm_sbg.flow.model import TarFlow
from openmm_sbg.flow.presets import FlowConfig, resolve_config
from openmm_sbg.flow.symmetry import centred_std
from openmm_sbg.resume import without_later_settings

# Kinds of random stream (see openmm_sbg.flow.fitting), combined with the seed and an index into one generator seed.
_BATCH_ORDER, _AUGMENT, _VALIDATION, _INIT = range(4)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings; the defaults are the paper's.

    Parameters
    ----------
    epochs
        Passes over the training frames (used when ``steps`` is None).
    steps
        Total optimiser steps; overrides ``epochs``.
    batch_size
        Configurations per step (capped at the number of training frames).
    lr
        Peak learning rate of the one-cycle schedule.
    betas, weight_decay
        AdamW settings.
    warmup
        Fraction of the steps spent warming the learning rate up from ``lr / 25``.
    grad_clip
        Maximum global gradient norm.
    ema_decay
        Decay of the exponential moving average of the weights.
    seed
        Seeds the initial weights and every batch, rotation and noise draw.
    val_frames
        At most this many held-out frames (evenly spaced) are scored after each epoch.
    select_best
        Return (and save at the end) the EMA weights of the epoch with the lowest validation
        NLL, not the last ones: on a CPU budget the flow fits its training frames' noise
        before the schedule ends (early stopping without losing the run's record).
    patience
        Stop when this many evaluations (epochs) in a row have not lowered the validation NLL
        (the best epoch's weights are kept); None trains every step. A fit that has found
        its best stops paying for the rest of its schedule.
    """

    epochs: int = 100
    steps: int | None = None
    batch_size: int = 512
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 4e-4
    warmup: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    val_frames: int = 2048
    select_best: bool = True
    patience: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.steps is None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.warmup < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"invalid training options {self}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive number of epochs (or None), got {self.patience}")

    def to_dict(self) -> dict:
        """Plain-dict form (lists, not tuples), as stored in checkpoints; no ``patience`` when unset, as
        checkpoints written before it existed hold."""
        return without_later_settings({**dataclasses.asdict(self), "betas": list(self.betas)}, {"patience": None})


def one_cycle_lr(step: int, total_steps: int, lr: float, warmup: float) -> float:
    """One-cycle schedule (as ``torch.optim.lr_scheduler.OneCycleLR``, linear warm-up, cosine decay).

    A pure function of ``step``, so resuming needs no scheduler state.
    """
    warm = max(1, round(warmup * total_steps))
    start, end = lr / 25, lr / 25 / 1e4
    if step < warm:
        return start + (lr - start) * step / warm
    progress = (step - warm) / max(1, total_steps - warm)
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    train_positions,
    val_positions=None,
    *,
    target=None,
    config: FlowConfig | str | dict | None = None,
    initial: TarFlow | None = None,
    options: TrainOptions | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    metadata: dict | None = None,
    parallel: Processes | None = None,
    compile: bool = False,
) -> TarFlow:
    """Train a TarFlow on configurations ``[T, N, 3]`` (nm) by maximum likelihood.

    Parameters
    ----------
    train_positions, val_positions
        Training and held-out frames, arrays ``[T, N, 3]`` in nm (e.g. from
        :func:`openmm_sbg.data.load_positions`). Without ``val_positions`` the last 10% of
        the training frames are held out.
    target
        The :class:`~openmm_sbg.BoltzmannTarget` the data samples; stored in the checkpoint
        so the flow can be checked against and rebuild its molecule.
    config
        Flow architecture: preset name, :class:`FlowConfig` or dict (default ``"ad2-small"``,
        or ``initial``'s).
    initial
        A trained flow to start from instead of random weights: a new learning-rate schedule
        over these frames (a longer fit, or more data). Its architecture and its coordinate
        statistics (internal coordinates' cuts, centres and scales; the Cartesian scale) are
        kept, since its weights assume them; the frames must be of the same molecule.
    options
        :class:`TrainOptions` (paper defaults).
    checkpoint_path
        Written after every epoch (loadable by :meth:`TarFlow.load` at any time) and at the
        end. If it holds an unfinished run with the same data, config and options, training
        resumes from it; a finished run or a different one is an error unless ``overwrite``.
    overwrite
        Start afresh even if ``checkpoint_path`` holds a run.
    device
        Torch device to train on.
    progress
        Show a tqdm progress bar with the training loss and validation NLL.
    callback
        Called as ``callback(step, loss)`` after every optimiser step (``step`` counts from 1).
    metadata
        Extra entries for the checkpoint's metadata (e.g. the command line and data path).
    parallel
        How the processes share the work (:mod:`openmm_sbg.flow.fitting`):
        :class:`~openmm_sbg.flow.fitting.OneProcess` (the default) or, for data parallelism
        under ``torchrun``, :class:`~openmm_sbg.flow.fitting.AllProcesses` (see
        :func:`openmm_sbg.distributed.ddp_train.train_distributed`): every process draws the
        same global batch and backpropagates its slice of it, the gradients are summed, and
        only rank 0 writes ``checkpoint_path``.
    compile
        Compile the training loss (forward and backward) with ``torch.compile``: the same
        model, faster steps once compiled (a minute or so first); validation stays eager. Not
        part of a checkpoint's settings, so a run may resume with or without it.

    Returns
    -------
    TarFlow
        The EMA weights (of the best validation epoch with ``options.select_best``), in eval
        mode on ``device``; ``flow.metadata`` holds the training record.
    """
    options = options or TrainOptions()
    train_positions = _as_frames(train_positions, "train_positions")
    if val_positions is None or len(val_positions) == 0:
        n_val = max(1, len(train_positions) // 10)
        train_positions, val_positions = train_positions[:-n_val], train_positions[-n_val:]
    val_positions = _as_frames(val_positions, "val_positions")
    n_atoms = train_positions.shape[1]
    if val_positions.shape[1:] != train_positions.shape[1:]:
        raise ValueError(f"validation frames have shape {val_positions.shape[1:]}, training frames {train_positions.shape[1:]}")
    if target is not None and target.n_atoms != n_atoms:
        raise ValueError(f"the data has {n_atoms} atoms per frame but the target has {target.n_atoms}")
    if len(train_positions) < 1:
        raise ValueError("no training frames left after holding out validation frames; pass more data")

    if initial is None:
        config = resolve_config("ad2-small" if config is None else config)
        with torch.random.fork_rng(devices=[]):
            # Seed the initial weights without touching the caller's global RNG.
            torch.manual_seed(stream_seed(options.seed, _INIT, 0))
            flow = TarFlow(config, n_atoms, target=target, std=centred_std(train_positions))
        features.fit_representation(flow.representation, torch.as_tensor(train_positions))
    else:
        flow = _starting_flow(initial, config, n_atoms)
    run = TrainingRun(flow.to(device), train_positions, val_positions, options, parallel or OneProcess(),
                      checkpoint_path, metadata, compile, initial=initial)
    if checkpoint_path is not None and os.path.exists(checkpoint_path) and not overwrite:
        run.resume()
        if progress:
            tqdm.write(f"resuming {os.fspath(checkpoint_path)!r} from step {run.step}")
    return run.fit(progress, callback)


class TrainingRun(Fit):
    """One maximum-likelihood fit: the training and validation features, the batches, the record."""

    name, state_key = "training", "training_state"
    non_finite_remedy = "lower the learning rate (--lr) or check the data for broken frames"
    finished_remedy = "write to another file or pass overwrite=True (--overwrite) to train from scratch"
    settings_remedy = ("rerun with the same settings to resume it, or pass overwrite=True (--overwrite) to train afresh "
                       "with different options, config or data")

    def __init__(self, flow: TarFlow, train_positions, val_positions, options: TrainOptions, processes: Processes,
                 checkpoint_path, metadata: dict | None, compile: bool = False, initial: TarFlow | None = None):
        self.metadata = metadata or {}
        # Shapes are fixed (one batch size), so one compiled graph serves every step.
        self.nll_per_dim = torch.compile(flow.nll_per_dim, dynamic=False) if compile else flow.nll_per_dim
        self.data_sha1 = fingerprint(train_positions, val_positions)
        # A checkpoint written before fits could start from a flow holds no initial_sha1: None, as from random weights.
        initial_sha1 = None if initial is None else weights_fingerprint(initial)
        settings = {"config": flow.config.to_dict(), "options": options.to_dict(), "data_sha1": self.data_sha1,
                    "n_atoms": flow.n_atoms, "initial_sha1": initial_sha1}
        if initial is not None:
            self.metadata = {**self.metadata, "started_from": _starting_record(initial, initial_sha1)}
        # The representation's features, computed once in float64 for accuracy.
        self.y_train = feature_tensor(train_positions, flow)
        self.y_val = feature_tensor(val_positions[_evenly_spaced(len(val_positions), options.val_frames)], flow)
        self.batch_size = min(options.batch_size, len(self.y_train))
        self.steps_per_epoch = max(1, len(self.y_train) // self.batch_size)
        super().__init__(flow, options, processes, checkpoint_path, settings, betas=options.betas,
                         weight_decay=options.weight_decay, total_steps=options.steps or options.epochs * self.steps_per_epoch,
                         eval_every=self.steps_per_epoch, label="train")

    def loss(self) -> torch.Tensor:
        options, y_train = self.options, self.y_train
        epoch, index = divmod(self.step, self.steps_per_epoch)
        order = torch.randperm(len(y_train), generator=stream_generator(options.seed, _BATCH_ORDER, epoch))
        batch = y_train[order[index * self.batch_size : (index + 1) * self.batch_size].to(y_train.device)]
        # Augment the whole batch first so each process sees the rows a single process would.
        y = features.augment_features(self.model.representation, batch, stream_generator(options.seed, _AUGMENT, self.step, device=y_train.device))
        return self.nll_per_dim(y[self.processes.rows(len(y))]).sum() / len(y)

    def learning_rate(self) -> float:
        return one_cycle_lr(self.step, self.total_steps, self.options.lr, self.options.warmup)

    def evaluate(self) -> dict:
        val_nll = validation_nll(self.ema, self.y_val, self.options.seed)
        if self.step == 0:
            return {"epoch": 0, "step": 0, "val_nll_per_dim": val_nll, "seconds": 0.0}
        return {
            "epoch": math.ceil(self.step / self.steps_per_epoch),
            "step": self.step,
            "train_nll_per_dim": float(np.mean(self.losses)),
            "val_nll_per_dim": val_nll,
            "lr": one_cycle_lr(self.step - 1, self.total_steps, self.options.lr, self.options.warmup),  # the last step's
            "seconds": self.seconds,
        }

    def stop_reason(self, entry: dict) -> str | None:
        patience, without_gain = self.options.patience, self.evaluations_without_gain(entry)
        if patience is None or without_gain < patience:
            return None
        return f"the validation NLL has not improved for {without_gain} epochs"

    def score(self, entry: dict) -> float:
        return -entry["val_nll_per_dim"]

    def postfix(self) -> dict:
        return {"val": f"{self.history[-1]['val_nll_per_dim']:.4f}"}

    def flow_metadata(self, complete: bool) -> dict:
        options, history = self.options, self.history
        selected = min(history, key=lambda entry: entry["val_nll_per_dim"]) if options.select_best else history[-1]
        return {
            **self.metadata,
            **_record(options, history, selected, self.seconds, self.step, self.steps_per_epoch, len(self.y_train),
                      len(self.y_val), self.data_sha1),
            "complete": complete,
            "stopped": self.stopped,
        }

    def resume_state(self) -> dict:
        return {"best_weights": self.best[2]}

    def restore(self, state: dict) -> None:
        # The best weights are those of the first evaluation with the lowest validation NLL.
        best = min(self.history, key=lambda entry: entry["val_nll_per_dim"])
        self.best = (self.score(best), best["step"], state["best_weights"])


# ----------------------------------------------------------------------------- helpers
def _starting_flow(initial: TarFlow, config, n_atoms: int) -> TarFlow:
    """A trainable copy of ``initial``, checked against the frames and any ``config`` also given."""
    if initial.n_atoms != n_atoms:
        raise ValueError(f"the flow to start from has {initial.n_atoms} atoms but the data has {n_atoms} per frame")
    config = None if config is None else resolve_config(config)
    if config is not None and config != initial.config:
        raise ValueError(f"the flow to start from has the architecture {initial.config}, not {config}: "
                         "leave the architecture out (it is the flow's) or train from random weights")
    return copy.deepcopy(initial).train().requires_grad_(True)  # a trained flow is handed out frozen


def _starting_record(initial: TarFlow, weights_sha1: str) -> dict:
    """What the record of a fit keeps of the flow it started from: its data, fit length and score."""
    record = initial.metadata
    keys = ("data", "steps", "train_seconds", "val_nll_per_dim", "data_sha1", "started_from")
    return {"weights_sha1": weights_sha1, **{key: record[key] for key in keys if key in record}}


def weights_fingerprint(flow: TarFlow) -> str:
    """SHA-1 of a flow's weights and buffers: tells a resumed run whether it starts from the same flow."""
    return fingerprint(*(value.detach().cpu().numpy() for value in flow.state_dict().values()))


def _as_frames(positions, name: str) -> np.ndarray:
    array = np.asarray(positions, dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [frames, atoms, 3] in nm, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return array


def _evenly_spaced(n: int, most: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(int))


@torch.no_grad()
def validation_nll(flow: TarFlow, y_val: torch.Tensor, seed: int, batch_size: int = 1024) -> float:
    """Mean NLL / 3N of the held-out frames, with one fixed set of rotations and CoM noise."""
    generator = stream_generator(seed, _VALIDATION, 0, device=y_val.device)
    total = 0.0
    for start in range(0, len(y_val), batch_size):
        total += flow.nll_per_dim(features.augment_features(flow.representation, y_val[start : start + batch_size], generator)).sum().item()
    return total / len(y_val)


def _record(options, history, selected, seconds, step, steps_per_epoch, n_train, n_val, data_sha1) -> dict:
    """The training record; ``selected`` is the history entry whose weights the flow holds."""
    import openmm_sbg

    return {
        "steps": step,
        "epochs": step / steps_per_epoch,
        "train_seconds": seconds,
        "selected_step": selected["step"],
        "val_nll_per_dim": selected["val_nll_per_dim"],
        "train_nll_per_dim": selected.get("train_nll_per_dim"),
        "n_train": n_train,
        "n_val": n_val,
        "data_sha1": data_sha1,
        "options": options.to_dict(),
        "history": history,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "openmm_sbg_version": openmm_sbg.__version__,
        "torch_version": str(torch.__version__),  # TorchVersion is not a plain str
    }
