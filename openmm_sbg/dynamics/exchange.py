"""Temperature replica exchange inside one batch: walkers swap temperatures, not configurations.

The batch holds ``n_copies`` copies of a temperature ladder (walker ``w`` belongs to copy
``w // n_temperatures`` and starts at temperature ``w % n_temperatures``). An exchange attempt
proposes, inside every copy, swaps between neighbouring temperatures: the pairs (0, 1), (2, 3),
... on even attempts and (1, 2), (3, 4), ... on odd ones. A pair swaps with the Metropolis
probability ``min(1, exp[(beta_i - beta_j) (U_i - U_j)])``, ``U`` the potential energy of the
configuration at each temperature. Swapped walkers keep their configuration and stream; their
velocities are scaled by ``sqrt(T_new / T_old)``, which keeps the Maxwell distribution exact.
The uniforms are counter-based (:mod:`openmm_sbg.dynamics.noise`), so the whole exchange state
is the temperature index of each walker, the attempt count and the acceptance counts.
"""

from __future__ import annotations

import numpy as np
import torch

from openmm_sbg.dynamics import noise
from openmm_sbg.dynamics.langevin import MOLAR_GAS_CONSTANT


class LadderExchange:
    """Neighbour swaps on ``n_copies`` copies of the ladder ``temperatures_K`` (increasing, kelvin)."""

    def __init__(self, temperatures_K, n_copies: int = 1, seed: int = 0):
        ladder = np.asarray(temperatures_K, dtype=np.float64)
        if ladder.ndim != 1 or len(ladder) < 2 or not np.all(np.diff(ladder) > 0) or ladder[0] <= 0:
            raise ValueError(f"the ladder needs two or more increasing positive temperatures, got {temperatures_K}")
        if n_copies < 1:
            raise ValueError(f"n_copies must be at least 1, got {n_copies}")
        self.ladder = torch.as_tensor(ladder)
        self.n_temperatures = len(ladder)
        self.n_copies = int(n_copies)
        self.n_walkers = self.n_copies * self.n_temperatures
        self.seed = int(seed)
        self.copy = torch.arange(self.n_walkers) // self.n_temperatures
        #: Index into the ladder of each walker's temperature.
        self.state = torch.arange(self.n_walkers) % self.n_temperatures
        self.attempts = 0
        self.accepted = torch.zeros(self.n_temperatures - 1, dtype=torch.int64)
        self.proposed = torch.zeros(self.n_temperatures - 1, dtype=torch.int64)

    @property
    def temperatures_K(self) -> torch.Tensor:
        """Each walker's temperature now, ``[n_walkers]``."""
        return self.ladder[self.state]

    def walkers_at(self, index: int) -> torch.Tensor:
        """The walker at ladder position ``index`` in each copy, ``[n_copies]`` (copy order)."""
        return self.walker_table()[:, index]

    def walker_table(self) -> torch.Tensor:
        """``[n_copies, n_temperatures]``: which walker holds each temperature of each copy."""
        table = torch.empty(self.n_copies, self.n_temperatures, dtype=torch.int64)
        table[self.copy, self.state] = torch.arange(self.n_walkers)
        return table

    def attempt(self, energies_kj) -> torch.Tensor:
        """One round of neighbour swaps given each walker's potential energy (kJ/mol, ``[n_walkers]``).

        Updates :attr:`state` and the counts; returns the boolean mask of walkers whose
        temperature changed.
        """
        energies = torch.as_tensor(energies_kj).detach().to("cpu", torch.float64).reshape(-1)
        if energies.shape != (self.n_walkers,):
            raise ValueError(f"expected {self.n_walkers} energies, got {tuple(energies.shape)}")
        lower = torch.arange(self.attempts % 2, self.n_temperatures - 1, 2)  # first ladder index of each pair
        table = self.walker_table()
        a, b = table[:, lower], table[:, lower + 1]  # [copies, pairs]
        beta = 1.0 / (MOLAR_GAS_CONSTANT * self.ladder)
        log_ratio = (beta[lower] - beta[lower + 1]) * (energies[a] - energies[b])
        pair_ids = (torch.arange(self.n_copies)[:, None] * self.n_temperatures + lower).reshape(-1)
        keys = noise.walker_keys(self.seed, noise.EXCHANGE, self.attempts, pair_ids)
        u = noise.uniforms(keys, 1).reshape(log_ratio.shape)
        # NaN energies never swap; log u < log_ratio is u < min(1, exp(log_ratio)).
        accept = torch.log(u) < torch.nan_to_num(log_ratio, nan=-torch.inf)
        new_state = self.state.clone()
        new_state[a[accept]] = lower.expand_as(a)[accept] + 1
        new_state[b[accept]] = lower.expand_as(b)[accept]
        changed = new_state != self.state
        self.state = new_state
        self.accepted.index_add_(0, lower, accept.sum(0))
        self.proposed.index_add_(0, lower, torch.full_like(lower, self.n_copies))
        self.attempts += 1
        return changed

    def acceptance(self) -> list[float]:
        """Fraction of accepted swaps of each neighbouring pair so far (NaN where none was proposed)."""
        return [float(a) / float(p) if p else float("nan") for a, p in zip(self.accepted.tolist(), self.proposed.tolist())]

    def state_dict(self) -> dict:
        return {"state": self.state.clone(), "attempts": self.attempts, "accepted": self.accepted.clone(),
                "proposed": self.proposed.clone(), "ladder": self.ladder.clone(), "seed": self.seed}

    def load_state_dict(self, saved: dict) -> None:
        if not torch.equal(saved["ladder"], self.ladder) or saved["seed"] != self.seed:
            raise ValueError("the saved exchange state belongs to another ladder or seed")
        self.state = saved["state"].clone()
        self.attempts = int(saved["attempts"])
        self.accepted, self.proposed = saved["accepted"].clone(), saved["proposed"].clone()
