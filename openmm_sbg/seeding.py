"""Seeded MD: target-temperature runs started inside states that replica exchange found but rarely holds there.

A flow trained on every replica's frames learns a rare state's shape mostly from the hot
replicas, which spread it too wide; its proposals then miss part of the state at the target
temperature, and importance sampling underestimates its mass. Plain MD at the target
temperature started inside the state samples its shape there (it need not stay: the data only
has to cover the state, the weights set its mass). On ad2 at 300 K this moved P(alphaL/C7ax)
from 1.5 standard errors below umbrella sampling to agreement (benchmarks/RESULTS.md, "Rare
basin ..., seeded-basin").
"""

from __future__ import annotations

import numpy as np


def rare_state_seeds(labels, frame_temperatures_K, target_K: float, n_states: int, below: float) -> list[dict]:
    """The frames to start seeded MD from: one per state that is rare at ``target_K`` but visited.

    Parameters
    ----------
    labels
        State of each replica-exchange frame ``[T]`` (integers in ``[0, n_states)``).
    frame_temperatures_K
        Temperature of each frame's replica ``[T]``.
    target_K
        The target temperature; some frames must be at it.
    below
        A state whose fraction among the target-temperature frames is at most this is rare
        (0: only states no target-temperature frame visits; 1: every visited state).

    Returns
    -------
    list of dict
        Per rare state that some replica visits: ``state``, ``fraction_at_target``,
        ``from_K`` (the coldest temperature whose frames visit it) and ``frame`` (the
        middle one, in time order, of that temperature's frames in the state).
    """
    labels = np.asarray(labels)
    temperatures = np.asarray(frame_temperatures_K, dtype=float)
    if labels.shape != temperatures.shape:
        raise ValueError(f"{labels.shape} labels for {temperatures.shape} frame temperatures")
    at_target = np.isclose(temperatures, target_K)
    if not at_target.any():
        raise ValueError(f"no frame is at the target temperature {target_K:g} K (the replicas span "
                         f"{temperatures.min():g}-{temperatures.max():g} K)")
    seeds = []
    for state in range(n_states):
        fraction = float(np.mean(labels[at_target] == state))
        in_state = np.flatnonzero(labels == state)
        if fraction > below or len(in_state) == 0:
            continue
        coldest = temperatures[in_state].min()
        candidates = in_state[np.isclose(temperatures[in_state], coldest)]
        seeds.append({"state": state, "fraction_at_target": fraction, "from_K": float(coldest),
                      "frame": int(candidates[len(candidates) // 2])})
    return seeds
