"""Composing bijections: one chain of steps, run forward for densities and backward for samples.

Every step maps a batch ``[B, ...]`` both ways and returns the log-determinant of the direction
it ran, ``[B]``: ``forward(x) -> (y, log|det dy/dx|)`` and ``inverse(y) -> (x, log|det dx/dy|)``.
A TarFlow is the chain ``[representation, blocks]`` (positions -> features -> latent) over a
standard normal base; the blocks are a chain of their own, so that the normalised-space flow
(features <-> latent) is one object too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Bijection(Protocol):
    """A step of a :class:`Composition`."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Composition:
    """``steps`` applied in order by :meth:`forward` and in reverse order by :meth:`inverse`.

    The log-determinants are summed in the order the steps run, starting from zero: callers
    that must reproduce numbers bit for bit rely on that order.
    """

    def __init__(self, steps: Sequence[Bijection]):
        self.steps = list(steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_det = step.forward(x)
            log_det = log_det + step_log_det
        return x, log_det

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = y.new_zeros(y.shape[0])
        for step in reversed(self.steps):
            y, step_log_det = step.inverse(y)
            log_det = log_det + step_log_det
        return y, log_det


class Reshaped:
    """``bijection`` applied to its input viewed as ``[B, *shape]``; results keep the input's shape."""

    def __init__(self, bijection: Bijection, shape: tuple[int, ...]):
        self.bijection, self.shape = bijection, tuple(shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_det = self.bijection.forward(x.reshape(x.shape[0], *self.shape))
        return y.reshape(x.shape), log_det

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det = self.bijection.inverse(y.reshape(y.shape[0], *self.shape))
        return x.reshape(y.shape), log_det


class Conditioned:
    """``bijection`` whose inverse also takes ``context``, with that context fixed.

    An internal-coordinate representation places each sample in space with normal numbers of
    its own (its rigid-body noise): its inverse needs them, its forward accounts for the
    rigid-body motion analytically.
    """

    def __init__(self, bijection, context: torch.Tensor | None):
        self.bijection, self.context = bijection, context

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bijection.forward(x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bijection.inverse(y, self.context)
