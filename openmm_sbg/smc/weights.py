"""Importance weights: Jarzynski increments, effective sample size, proposal filters.

All functions take and return torch tensors of log-weights (float64). A particle that must
not count (non-finite energy, filtered out) has log-weight ``-inf``; no function here ever
produces NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _finite_or_neg_inf(values: torch.Tensor) -> torch.Tensor:
    """NaN and +-inf become -inf: an unusable particle gets zero weight, never a NaN weight."""
    return torch.where(torch.isfinite(values), values, torch.full_like(values, -math.inf))


def normalised_ess(log_weights: torch.Tensor) -> float:
    """Kish effective sample size divided by the number of particles, in [0, 1].

    ``(sum w)^2 / (K sum w^2)`` with ``K = len(log_weights)``; 0 when no particle has a
    finite weight.
    """
    log_weights = _finite_or_neg_inf(torch.as_tensor(log_weights, dtype=torch.float64))
    if log_weights.numel() == 0 or not torch.isfinite(log_weights).any():
        return 0.0
    ess = torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))
    return float(ess) / log_weights.numel()


def pareto_k(log_weights: torch.Tensor) -> float:
    """Shape ``k`` of a generalised Pareto fit to the largest weights: how heavy their tail is.

    The diagnostic of Pareto-smoothed importance sampling (Vehtari et al., JMLR 2024): the
    ``min(n / 5, 3 sqrt(n))`` largest weights, less the next one, are fitted by the
    empirical-Bayes estimator of Zhang & Stephens (2009), with the same weak prior towards
    0.5. With ``k > 1/2`` the weights' variance is infinite, so the Kish ESS keeps falling
    as proposals are added and one set's ESS says little; above 0.7 importance-sampling
    estimates are unreliable at any practical size. ``inf`` when fewer than 5 weights make
    the tail; ``-inf`` when the largest weights are all equal (no tail at all).
    """
    log_w = _finite_or_neg_inf(torch.as_tensor(log_weights, dtype=torch.float64)).flatten()
    log_w = torch.sort(log_w[torch.isfinite(log_w)]).values
    n = log_w.numel()
    tail_length = min(int(math.ceil(0.2 * n)), int(math.ceil(3 * math.sqrt(n))))
    if n < 2 or tail_length < 5 or tail_length >= n:
        return math.inf
    scaled = torch.exp(log_w - log_w[-1])
    exceedances = scaled[n - tail_length :] - scaled[n - tail_length - 1]
    if exceedances[-1] <= 0:
        return -math.inf
    return _generalised_pareto_shape(exceedances)


def _generalised_pareto_shape(x: torch.Tensor) -> float:
    """Zhang & Stephens' posterior-mean shape for sorted positive exceedances ``x``, shrunk to 0.5 with weight 10."""
    n = x.numel()
    m = 30 + int(math.sqrt(n))
    b = 1 - torch.sqrt(m / (torch.arange(1, m + 1, dtype=torch.float64) - 0.5))
    b = b / (3 * x[int(n / 4 + 0.5) - 1]) + 1 / x[-1]
    k = torch.log1p(-b[:, None] * x).mean(dim=1)
    log_likelihood = n * (torch.log(-b / k) - k - 1)
    weights = torch.softmax(log_likelihood, 0)
    b_posterior = (b * weights).sum()
    k_posterior = float(torch.log1p(-b_posterior * x).mean())
    return (n * k_posterior + 10 * 0.5) / (n + 10)


def log_mean_weight(log_weights: torch.Tensor, n_total: int | None = None) -> float:
    """``log(sum_i w_i / n_total)``, the importance-sampling estimate of a log normaliser.

    ``n_total`` defaults to the number of weights; pass the number of particles drawn when
    some were dropped by a filter (they count as weight zero).
    """
    n_total = log_weights.numel() if n_total is None else n_total
    return float(torch.logsumexp(_finite_or_neg_inf(log_weights), 0)) - math.log(n_total)


def jarzynski_increment(
    e_source: torch.Tensor, e_target: torch.Tensor, t_from: float, t_to: float
) -> torch.Tensor:
    """Log-weight increment ``-(t_to - t_from) (E_T - E_S)`` of one annealing step.

    Along the path ``E_t = (1 - t) E_S + t E_T`` the weights of particles at ``x`` gain
    ``E_{t_from}(x) - E_{t_to}(x)``. Non-finite energies give ``-inf``.
    """
    return _finite_or_neg_inf(-(t_to - t_from) * (e_target - e_source))


def conditional_ess(log_weights: torch.Tensor, increments: torch.Tensor) -> float:
    """Conditional ESS (Zhou, Johansen & Aston 2016) of a step with log ``increments``, in [0, 1].

    ``(sum_i W_i v_i)^2 / sum_i W_i v_i^2`` with ``W`` the current normalised weights and
    ``v`` the incremental weights: how much the next step alone degrades the population,
    independent of degeneracy already present.
    """
    log_w = torch.log_softmax(_finite_or_neg_inf(log_weights), 0)
    log_v = _finite_or_neg_inf(increments)
    numerator = 2 * torch.logsumexp(log_w + log_v, 0)
    denominator = torch.logsumexp(log_w + 2 * log_v, 0)
    if not torch.isfinite(denominator):
        return 0.0
    return float(torch.exp(numerator - denominator))


def largest_exponent_keeping_ess(ess: Callable[[float], float], target: float, low: float, high: float,
                                 tolerance: float) -> float:
    """The largest exponent in ``[low, high]`` whose weights keep ``ess(exponent) >= target``.

    For an ``ess`` that falls as the exponent grows and keeps the target at ``low``: an
    annealing time whose step keeps a conditional ESS (:class:`~openmm_sbg.smc.AdaptiveSchedule`),
    a tempering exponent of importance weights (:func:`openmm_sbg.flow.refine.tempering_exponent`).
    ``high`` when it keeps the target; otherwise bisection until the bracket is no wider than
    ``tolerance``, returning its lower end.
    """
    if ess(high) >= target:
        return high
    while high - low > tolerance:
        middle = 0.5 * (low + high)
        if ess(middle) >= target:
            low = middle
        else:
            high = middle
    return low


def energy_cutoff_filter(e_target: torch.Tensor, cutoff: float | None) -> torch.Tensor:
    """Boolean mask of proposals to keep: finite target energy not above ``cutoff`` (kT).

    The paper drops proposals above an energy threshold before annealing: such
    configurations (clashing atoms) have vanishing weight and huge forces that would make
    the Langevin steps blow up. ``cutoff=None`` keeps every finite energy.
    """
    keep = torch.isfinite(e_target)
    if cutoff is not None:
        keep &= e_target <= cutoff
    return keep


def top_fraction_filter(log_weights: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask that drops the ``fraction`` of particles with the largest log-weights.

    The paper clips the top 0.2% of log-weights: a handful of proposals in the flow's
    low-density tail otherwise dominate the weights. It trades a small, bounded bias for a
    large variance reduction. Particles with log-weight ``-inf`` are never kept.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"the clipped fraction must be in [0, 1), got {fraction}")
    keep = torch.isfinite(log_weights)
    n_drop = int(math.floor(fraction * int(keep.sum())))
    if n_drop > 0:
        finite = torch.where(keep, log_weights, torch.full_like(log_weights, -math.inf))
        keep[torch.topk(finite, n_drop).indices] = False
    return keep
