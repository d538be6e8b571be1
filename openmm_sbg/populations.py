"""Populations of conformational states from weighted samples, with error bars, and their free energies.

A state is an integer label per sample (:func:`backbone_states` labels the phi/psi basins of a
peptide's first residue). Populations are the normalised importance weights summed per state;
their error bars come from independent repeats (:func:`combine_repeats`: SMC runs with
different seeds) or, for independent proposals (importance sampling), from the bootstrap over
proposals (:func:`bootstrap_populations`). Free-energy differences ``dF(A -> B) = -ln(p_B/p_A)``
are in kT, with the delta-method error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: The backbone basins of alanine dipeptide-like residues, in the order of :func:`backbone_states`.
BACKBONE_STATES = ("C7eq/beta", "alphaR", "alphaL/C7ax")
BACKBONE_STATE_RULE = (
    "alphaL/C7ax: 0 <= phi < 120 deg; otherwise alphaR: -120 <= psi < 50 deg; otherwise C7eq/beta "
    "(C7eq, beta, PII; includes phi >= 120, the beta region across the periodic boundary)"
)


def backbone_states(phi_psi: np.ndarray) -> np.ndarray:
    """Index into :data:`BACKBONE_STATES` of each ``(phi, psi)`` pair in radians, ``[T, 2] -> [T]``.

    The left-handed side ``0 <= phi < 120 deg`` is alphaL/C7ax (the rare basin of alanine
    dipeptide); the strip ``120 <= phi <= 180 deg`` continues the beta region across the
    periodic boundary.
    """
    phi_psi = np.asarray(phi_psi)
    if phi_psi.ndim != 2 or phi_psi.shape[1] != 2:
        raise ValueError(f"expected (phi, psi) pairs of shape [T, 2] in radians, got shape {phi_psi.shape}")
    phi, psi = np.degrees(phi_psi[:, 0]), np.degrees(phi_psi[:, 1])
    left = (phi >= 0) & (phi < 120)
    labels = np.zeros(len(phi), dtype=int)
    labels[~left & (psi >= -120) & (psi < 50)] = 1
    labels[left] = 2
    return labels


def _normalised_weights(n: int, log_weights) -> np.ndarray:
    if log_weights is None:
        return np.full(n, 1.0 / n)
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.shape != (n,):
        raise ValueError(f"log_weights has shape {log_weights.shape}; expected one per sample, ({n},)")
    if np.isnan(log_weights).any() or not np.isfinite(log_weights.max()):
        raise ValueError("log_weights holds NaN or +inf, or no finite weight; check the sampler's energies")
    weights = np.exp(log_weights - log_weights.max())
    return weights / weights.sum()


def _check_labels(labels, n_states: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of state indices, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_states:
        raise ValueError(f"labels must lie in 0..{n_states - 1}, got {labels.min()}..{labels.max()}")
    return labels


def state_populations(labels, n_states: int, log_weights=None) -> np.ndarray:
    """Weighted fraction of samples in each state, ``[n_states]`` (unweighted without ``log_weights``)."""
    labels = _check_labels(labels, n_states)
    return np.bincount(labels, weights=_normalised_weights(len(labels), log_weights), minlength=n_states)


def state_effective_sizes(labels, n_states: int, log_weights=None) -> np.ndarray:
    """Kish effective sample size of the weights inside each state, ``(sum w)^2 / sum w^2``, ``[n_states]``.

    How many samples a state's weighted mass rests on. Where it is a handful, that state's
    population is heavy-tailed from run to run and one run's bootstrap error understates the
    spread: repeat with other seeds (:func:`combine_repeats`).
    """
    labels = _check_labels(labels, n_states)
    weights = _normalised_weights(len(labels), log_weights)
    mass = np.bincount(labels, weights=weights, minlength=n_states)
    squares = np.bincount(labels, weights=weights**2, minlength=n_states)
    return np.divide(mass**2, squares, out=np.zeros(n_states), where=squares > 0)


def population_errors(labels, n_states: int, log_weights=None) -> np.ndarray:
    """Standard error of each weighted population, ``[n_states]``, by the delta method.

    For the self-normalised estimate ``p_s = sum_i w_i 1[i in s]`` of independent samples
    with normalised weights ``w``: ``sqrt(sum_i w_i^2 (1[i in s] - p_s)^2)``. It is the
    closed-form counterpart of :func:`bootstrap_populations`, cheap enough for a guard
    evaluated during training, and it grows as a share comes to rest on fewer samples.
    """
    labels = _check_labels(labels, n_states)
    weights = _normalised_weights(len(labels), log_weights)
    member = labels[:, None] == np.arange(n_states)
    shares = np.bincount(labels, weights=weights, minlength=n_states)
    return np.sqrt(np.sum(weights[:, None] ** 2 * (member - shares) ** 2, axis=0))


def bootstrap_populations(labels, n_states: int, log_weights=None, n_bootstrap: int = 500, seed: int = 0):
    """Populations and their bootstrap standard errors, for independent samples (importance sampling).

    Resamples the samples with replacement and recomputes the self-normalised populations, so
    the error includes the weights' variance. Not for SMC particles after resampling, which
    are correlated: use :func:`combine_repeats` over seeds. Nor for a state whose
    :func:`state_effective_sizes` is a handful: the few heavy weights it rests on are
    missing from most runs, so the bootstrap sees too little of their spread.
    """
    labels = _check_labels(labels, n_states)
    log_weights = np.zeros(len(labels)) if log_weights is None else np.asarray(log_weights, dtype=np.float64)
    estimate = state_populations(labels, n_states, log_weights)
    rng = np.random.default_rng(seed)
    draws = np.empty((n_bootstrap, n_states))
    for b in range(n_bootstrap):
        pick = rng.integers(0, len(labels), len(labels))
        draws[b] = state_populations(labels[pick], n_states, log_weights[pick])
    return estimate, draws.std(axis=0, ddof=1)


def combine_repeats(populations) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean of independent repeats' populations, ``[R, n_states]``."""
    populations = np.asarray(populations, dtype=np.float64)
    if populations.ndim != 2 or len(populations) < 2:
        raise ValueError(f"need two or more repeats of shape [R, n_states], got shape {populations.shape}")
    return populations.mean(axis=0), populations.std(axis=0, ddof=1) / np.sqrt(len(populations))


def free_energy_differences(populations, errors=None, reference: int = 0):
    """``dF(reference -> s) = -ln(p_s / p_reference)`` in kT for every state ``s``, and delta-method errors.

    A state with zero population gets ``+inf`` (never seen); errors treat the two populations
    as independent, which overstates the error a little when they are anti-correlated.
    """
    p = np.asarray(populations, dtype=np.float64)
    if p[reference] <= 0:
        raise ValueError(f"the reference state {reference} has no population; choose a populated reference")
    with np.errstate(divide="ignore"):
        df = -np.log(p / p[reference])
    if errors is None:
        return df
    e = np.asarray(errors, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        df_err = np.hypot(e / p, e[reference] / p[reference])
    df_err[reference] = 0.0
    return df, df_err


def residue_state_labeller(topology) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
    """Names of the residues with phi and psi (``"ALA2"``), and a function from positions ``[B, N, 3]`` (nm)
    to the :func:`backbone_states` of each of them, ``[B, R]``.

    ``topology`` is an OpenMM or mdtraj Topology of a peptide (standard atom names).
    """
    import mdtraj

    top = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
    probe = mdtraj.Trajectory(np.zeros((1, top.n_atoms, 3), dtype=np.float32), top)
    (phi, _), (psi, _) = mdtraj.compute_phi(probe), mdtraj.compute_psi(probe)
    # phi of residue i ends at its C, psi starts at its N: pair them by the residue of their CA.
    phi_of = {top.atom(int(q[2])).residue.index: q for q in phi}
    psi_of = {top.atom(int(q[1])).residue.index: q for q in psi}
    residues = sorted(set(phi_of) & set(psi_of))
    if not residues:
        raise ValueError("the topology has no residue with both phi and psi; backbone states need a peptide")
    names = [str(top.residue(r)) for r in residues]
    quartets = np.stack([q for r in residues for q in (phi_of[r], psi_of[r])])

    def labels(positions: np.ndarray) -> np.ndarray:
        traj = mdtraj.Trajectory(np.asarray(positions, dtype=np.float32), top)
        angles = mdtraj.compute_dihedrals(traj, quartets).reshape(traj.n_frames, len(residues), 2)
        return backbone_states(angles.reshape(-1, 2)).reshape(traj.n_frames, len(residues))

    return names, labels


def backbone_state_labeller(topology) -> Callable[[np.ndarray], np.ndarray]:
    """A function from positions ``[B, N, 3]`` (nm) to :func:`backbone_states` of the first residue with phi and psi.

    ``topology`` is an OpenMM or mdtraj Topology of a peptide (standard atom names).
    """
    _, every_residue = residue_state_labeller(topology)
    return lambda positions: every_residue(positions)[:, 0]
