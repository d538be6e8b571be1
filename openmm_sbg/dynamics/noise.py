"""Counter-based random numbers: one independent stream per walker, with no state to save.

Every random number of the batched engine is a pure function of ``(seed, channel, counter,
walker, element)``: the Langevin noise of walker ``w`` at step ``s`` is
``normals(seed, DYNAMICS, s, [w], 3N)``. So a walker's trajectory does not depend on the batch
it runs in, and a checkpoint needs only the step count to resume bit for bit.

The bits come from a 32-bit integer hash (Chris Wellons' "lowbias32", two rounds per value)
computed with int64 torch operations on any device; normals from the Box-Muller transform.
Values lie on a grid of 2**-32, so the largest normal is about 6.7 standard deviations.
"""

from __future__ import annotations

import math

import torch

#: Streams of the engine (the ``channel`` argument).
DYNAMICS, VELOCITIES, EXCHANGE = 0, 1, 2

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_TWO_TO_32 = 4294967296.0


def _mix(x):
    """lowbias32: a bijection of 32-bit words with good avalanche (ints or int64 tensors holding them)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _base_key(seed: int, channel: int, counter: int) -> int:
    """One 32-bit word from a seed, a channel and a counter (each any non-negative integer below 2**64)."""
    key = 0
    for word in (seed & _MASK, seed >> 32, channel, counter & _MASK, counter >> 32):
        key = _mix((key ^ _mix(word & _MASK)) + _GOLDEN & _MASK)
    return key


def walker_keys(seed: int, channel: int, counter: int, walkers: torch.Tensor) -> torch.Tensor:
    """32-bit keys (int64 tensor like ``walkers``) of the streams of ``walkers`` at ``counter``."""
    if seed < 0 or counter < 0:
        raise ValueError(f"seed and counter must be non-negative, got {seed}, {counter}")
    base = _base_key(seed, channel, counter)
    return _mix(_mix((walkers.to(torch.int64) * _GOLDEN + base) & _MASK))


def uniforms(keys: torch.Tensor, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[len(keys), n]`` numbers in (0, 1), element ``j`` of row ``i`` a hash of ``(keys[i], j)``."""
    element = _mix(torch.arange(n, dtype=torch.int64, device=keys.device) * _GOLDEN & _MASK)
    bits = _mix(_mix(keys[:, None] ^ element))
    return (bits.to(dtype) + 0.5) * (1.0 / _TWO_TO_32)


def normals(keys: torch.Tensor, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[len(keys), n]`` standard normal numbers, row ``i`` from the stream ``keys[i]`` (Box-Muller)."""
    half = (n + 1) // 2
    u = uniforms(keys, 2 * half, dtype)
    radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    angle = (2.0 * math.pi) * u[:, half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :n]
