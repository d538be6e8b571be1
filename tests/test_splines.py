"""Rational-quadratic splines: an exact monotone bijection, and what it lets one block learn."""

import math

import pytest
import torch

from openmm_sbg.flow import FlowConfig, TarFlow
from openmm_sbg.flow.autoregressive import AutoregressiveBlock
from openmm_sbg.flow.elementwise import token_transforms
from openmm_sbg.flow.splines import parameters_per_channel, rational_quadratic

BINS = 8
BOUND = 5.0


def spline_parameters(n: int, spread: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return spread * torch.randn(n, parameters_per_channel(BINS), generator=generator, dtype=torch.float64)


def test_zero_parameters_are_the_identity():
    x = torch.linspace(-8, 8, 101, dtype=torch.float64)
    y, log_det = rational_quadratic(x, torch.zeros(101, parameters_per_channel(BINS), dtype=torch.float64), BOUND)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(log_det, torch.zeros_like(x), atol=1e-14, rtol=0)


def test_monotone_onto_the_interval_and_identity_outside():
    raw = spline_parameters(1, 1.5).expand(2001, -1)
    x = torch.linspace(-7, 7, 2001, dtype=torch.float64)
    y, _ = rational_quadratic(x, raw, BOUND)
    assert (y.diff() > 0).all()
    outside = x.abs() > BOUND
    torch.testing.assert_close(y[outside], x[outside], atol=0, rtol=0)
    ends, _ = rational_quadratic(torch.tensor([-BOUND, BOUND], dtype=torch.float64), raw[:2], BOUND)
    torch.testing.assert_close(ends, torch.tensor([-BOUND, BOUND], dtype=torch.float64), atol=1e-12, rtol=0)
    assert (y[~outside] - x[~outside]).abs().max() > 0.3  # not the identity inside


def test_log_derivative_equals_autograd_and_the_inverse_round_trips():
    x = (3.0 * torch.randn(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).requires_grad_()
    raw = spline_parameters(4000, 1.0)
    y, log_det = rational_quadratic(x, raw, BOUND)
    (gradient,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(log_det, gradient.log(), atol=1e-10, rtol=0)
    back, log_det_back = rational_quadratic(y.detach(), raw, BOUND, inverse=True)
    torch.testing.assert_close(back, x.detach(), atol=1e-9, rtol=0)
    torch.testing.assert_close(log_det_back, -log_det.detach(), atol=1e-9, rtol=0)


def test_gradients_are_finite_in_the_tails_and_reach_the_parameters():
    x = torch.tensor([-9.0, -BOUND, 0.3, BOUND, 9.0], dtype=torch.float64, requires_grad=True)
    raw = spline_parameters(5, 1.0).requires_grad_()
    for inverse in (False, True):
        y, log_det = rational_quadratic(x, raw, BOUND, inverse=inverse)
        x_grad, raw_grad = torch.autograd.grad((y + log_det).sum(), (x, raw))
        assert torch.isfinite(x_grad).all() and torch.isfinite(raw_grad).all()
        torch.testing.assert_close(x_grad[[0, 4]], torch.ones(2, dtype=torch.float64), atol=0, rtol=0)
        assert raw_grad[2].abs().sum() > 0 and raw_grad[[0, 4]].abs().sum() == 0


def test_bad_parameter_count_is_refused():
    with pytest.raises(ValueError, match="3K - 1"):
        rational_quadratic(torch.zeros(3), torch.zeros(3, 7), BOUND)
    with pytest.raises(ValueError, match="spline_bins"):
        FlowConfig(spline_bins=1)


def two_well_conditional(n: int, seed: int) -> torch.Tensor:
    """Two tokens: ``x0 ~ N(0, 1)`` and ``x1 = +-2 + 0.3 N(0, 1) + 0.5 x0`` with equal odds."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator) * 2.0 - 1.0
    x1 = 2.0 * sign + 0.3 * torch.randn(n, generator=generator) + 0.5 * x0
    return torch.stack([x0, x1], dim=1).unsqueeze(-1)


def _entropy_two_well_conditional() -> float:
    """Entropy (nats per token) of :func:`two_well_conditional`: both tokens' terms, the wells do not overlap."""
    normal = 0.5 * math.log(2 * math.pi * math.e)
    return (normal + (normal + math.log(0.3) + math.log(2.0))) / 2


def _fit_one_block(spline_bins: int, steps: int = 400) -> float:
    torch.manual_seed(0)
    block = AutoregressiveBlock(2, 1, width=32, layers=1, heads=2, mlp_ratio=2, reverse=False, transforms=token_transforms(spline_bins))
    optimiser = torch.optim.Adam(block.parameters(), lr=1e-2)
    data = two_well_conditional(2048, seed=0)

    def nll(x):
        z, log_det = block(x)
        return (0.5 * z.square().sum(dim=(1, 2)) + math.log(2 * math.pi) - log_det).mean() / 2

    for _ in range(steps):
        optimiser.zero_grad()
        nll(data).backward()
        optimiser.step()
    with torch.no_grad():
        return nll(two_well_conditional(8192, seed=1)).item()


def test_one_spline_block_learns_a_two_well_conditional_that_an_affine_block_cannot():
    """A token whose conditional has two wells: an affine block's best is one Gaussian over
    both, a spline block's is within 0.05 nats of the exact entropy on held-out draws."""
    entropy = _entropy_two_well_conditional()
    assert _fit_one_block(spline_bins=8) < entropy + 0.05
    assert _fit_one_block(spline_bins=0) > entropy + 0.3


def test_spline_flow_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    flow = TarFlow(FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=2, spline_bins=5), 4, std=0.3)
    for block in flow.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    flow.save(tmp_path / "flow.pt")
    loaded = TarFlow.load(tmp_path / "flow.pt")
    assert loaded.config.spline_bins == 5
    x = 0.3 * torch.randn(6, 4, 3)
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x), atol=0, rtol=0)
