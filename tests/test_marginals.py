"""Per-feature Gaussianization: a fitted, exact, invertible elementwise map."""

import pytest
import torch

from openmm_sbg.flow import FlowConfig
from openmm_sbg.flow.marginals import GaussianMixtureMarginals


def multimodal_and_heavy_tailed(n: int = 12_000, seed: int = 0) -> torch.Tensor:
    """Two features: three narrow wells (a methyl rotor's shape) and a Student-t with 3 degrees of freedom."""
    generator = torch.Generator().manual_seed(seed)
    wells = torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64)[torch.randint(3, (n,), generator=generator)]
    rotor = wells + 0.2 * torch.randn(n, generator=generator, dtype=torch.float64)
    student = torch.randn(n, generator=generator, dtype=torch.float64) / torch.sqrt(
        torch.distributions.Chi2(3.0).sample((n,)).double() / 3.0
    )
    return torch.stack([rotor, student], dim=1)


def kurtosis(values: torch.Tensor) -> torch.Tensor:
    centred = values - values.mean(0)
    return centred.pow(4).mean(0) / centred.square().mean(0).square()


def test_unfitted_map_is_the_identity():
    marginals = GaussianMixtureMarginals((2,), 5)
    u = torch.linspace(-6, 6, 50, dtype=torch.float64).view(25, 2)
    y, log_det = marginals(u)
    torch.testing.assert_close(y, u, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det, torch.zeros(25, dtype=torch.float64), atol=1e-12, rtol=0)


def test_fitted_map_makes_each_feature_standard_normal():
    torch.manual_seed(0)
    u = multimodal_and_heavy_tailed()
    marginals = GaussianMixtureMarginals((2,), 8)
    marginals.fit(u)
    y, _ = marginals(u)
    # The raw features are far from normal (flat-topped wells, heavy tail); their images are not.
    assert (kurtosis(u) - 3).abs().min() > 1.0
    torch.testing.assert_close(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(2, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(kurtosis(y), torch.full((2,), 3.0, dtype=torch.float64), atol=0.15, rtol=0)
    fresh = multimodal_and_heavy_tailed(seed=1)  # held out: the fit generalises, it does not memorise
    torch.testing.assert_close(marginals(fresh)[0].std(0), torch.ones(2, dtype=torch.float64), atol=0.03, rtol=0)


def test_inverse_round_trips_into_the_far_tails_with_the_same_log_det():
    marginals = GaussianMixtureMarginals((2,), 8)
    marginals.fit(multimodal_and_heavy_tailed())
    y = torch.randn(500, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    y[0] = torch.tensor([-40.0, 45.0])  # beyond the grid that brackets the inverse, and past ndtri's underflow
    u, log_det = marginals.inverse(y)
    again, log_det_again = marginals(u)
    torch.testing.assert_close(again, y, atol=1e-9, rtol=0)
    torch.testing.assert_close(log_det_again, log_det, atol=1e-9, rtol=0)


def test_log_det_equals_autograd_derivative_both_ways():
    marginals = GaussianMixtureMarginals((2,), 6)
    marginals.fit(multimodal_and_heavy_tailed())
    u = multimodal_and_heavy_tailed(8, seed=2).requires_grad_(True)
    y, log_det = marginals(u)
    (derivative,) = torch.autograd.grad(y.sum(), u)
    torch.testing.assert_close(derivative.log().sum(1), log_det.detach(), atol=1e-10, rtol=0)
    target = y.detach().clone().requires_grad_(True)
    back, log_det_back = marginals.inverse(target)
    (inverse_derivative,) = torch.autograd.grad(back.sum(), target)
    torch.testing.assert_close(-inverse_derivative.log().sum(1), log_det_back.detach(), atol=1e-9, rtol=0)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one component"):
        GaussianMixtureMarginals((2,), 0)
    with pytest.raises(ValueError, match="representation='internal'"):
        FlowConfig(representation="cartesian", marginals=4)
    with pytest.raises(ValueError, match="non-negative"):
        FlowConfig(representation="internal", marginals=-1)
