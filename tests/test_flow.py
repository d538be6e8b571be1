"""TarFlow: invertibility, exact log-determinants, sampling, symmetry augmentation."""

import math

import numpy as np
import pytest
import torch

from openmm_sbg.flow import FlowConfig, TarFlow, get_preset, preset_names
from openmm_sbg.flow.symmetry import augment, centred_std, random_rotations, remove_com

TINY = FlowConfig(width=32, n_blocks=4, layers_per_block=1, heads=2)
# Affine blocks, and blocks with a rational-quadratic spline: every exactness check holds for both.
SPLINE_BINS = [0, 6]


def random_flow(tokens="atom", n_atoms=5, dtype=torch.float64, std=0.3, seed=0, spline_bins=0) -> TarFlow:
    """A small flow with random (non-identity) output projections, as after training."""
    torch.manual_seed(seed)
    config = FlowConfig(width=32, n_blocks=4, layers_per_block=2, heads=2, tokens=tokens, spline_bins=spline_bins)
    flow = TarFlow(config, n_atoms, std=std)
    for block in flow.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
        torch.nn.init.normal_(block.proj_out.bias, std=0.05)
    return flow.to(dtype)


@pytest.mark.parametrize("spline_bins", SPLINE_BINS)
@pytest.mark.parametrize("tokens", ["atom", "coordinate"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_inverse_of_forward_is_identity(tokens, dtype, tol, spline_bins):
    flow = random_flow(tokens, dtype=dtype, spline_bins=spline_bins)
    # Some coordinates (|x / std| > 5) lie beyond the splines' interval, in their identity tails.
    x = torch.randn(16, 5, 3, dtype=dtype) * 0.3
    x[0, 0] = torch.tensor([2.0, -1.8, 0.1], dtype=dtype)
    if spline_bins and dtype == torch.float32:
        # These random spline blocks expand by up to e^7 and then contract again, and the
        # autoregressive inverse carries float32 rounding of early tokens into later ones;
        # float64 (1e-10) shows that the map itself is exactly inverted.
        tol = 5e-3
    z, log_det = flow(x)
    x_back, log_det_inverse = flow.inverse(z)
    assert (z - x).abs().max() > 0.1  # the flow is not the identity
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    torch.testing.assert_close(log_det + log_det_inverse, torch.zeros_like(log_det), atol=tol * 100, rtol=0)


@pytest.mark.parametrize("spline_bins", SPLINE_BINS)
@pytest.mark.parametrize("tokens", ["atom", "coordinate"])
def test_log_det_matches_autograd_jacobian(tokens, spline_bins):
    flow = random_flow(tokens, n_atoms=4, spline_bins=spline_bins)
    x = torch.randn(3, 4, 3, dtype=torch.float64) * 0.3
    _, log_det = flow(x)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 4, 3))[0].reshape(-1), x[i].reshape(-1))
        assert torch.linalg.slogdet(jacobian)[1].item() == pytest.approx(log_det[i].item(), abs=1e-10)


@pytest.mark.parametrize("spline_bins", SPLINE_BINS)
@pytest.mark.parametrize("tokens", ["atom", "coordinate"])
def test_sample_log_q_equals_log_prob(tokens, spline_bins):
    flow = random_flow(tokens, spline_bins=spline_bins)
    x, log_q = flow.sample(64, generator=torch.Generator().manual_seed(1), batch_size=20)
    assert x.shape == (64, 5, 3) and log_q.shape == (64,)
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-10, rtol=0)
    again, _ = flow.sample(64, generator=torch.Generator().manual_seed(1), batch_size=20)
    torch.testing.assert_close(again, x, atol=0, rtol=0)


def test_sample_float32_log_q_close_to_log_prob():
    flow = random_flow(dtype=torch.float32)
    x, log_q = flow.sample(256)
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-3, rtol=1e-5)


def test_untrained_flow_is_scaled_standard_normal():
    """Zero-initialised blocks are the identity; the density includes the -3N log std Jacobian."""
    flow = TarFlow(TINY, 6, std=0.25).double()
    x = torch.randn(8, 6, 3, dtype=torch.float64)
    expected = -0.5 * (x / 0.25).square().sum((1, 2)) - 18 * math.log(2 * math.pi) / 2 - 18 * math.log(0.25)
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert flow.com_std == pytest.approx(0.25 / math.sqrt(6))


def test_energy_is_minus_log_prob_with_autograd_gradient():
    flow = random_flow()
    x = (torch.randn(4, 5, 3, dtype=torch.float64) * 0.3).requires_grad_()
    energy = flow.energy(x)
    torch.testing.assert_close(energy, -flow.log_prob(x))
    (grad,) = torch.autograd.grad(energy.sum(), x)
    step = torch.zeros_like(x)
    step[1, 2, 0] = 1e-6
    numeric = (flow.energy(x + step) - flow.energy(x - step))[1] / 2e-6
    assert grad[1, 2, 0].item() == pytest.approx(numeric.item(), rel=1e-6)
    assert flow.energy(x.float()).dtype == torch.float32  # energy comes back in the input's dtype


def test_bad_inputs_are_explained():
    flow = TarFlow(TINY, 5)
    with pytest.raises(ValueError, match=r"\[batch, 5, 3\]"):
        flow.log_prob(torch.zeros(2, 4, 3))
    with pytest.raises(TypeError, match="torch tensor"):
        flow.log_prob(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="n_atoms >= 2"):
        TarFlow(TINY, 1)
    with pytest.raises(KeyError, match="ad2-small"):
        TarFlow("no-such-preset", 5)


def test_presets_have_paper_sizes():
    sizes = {name: (c.width, c.n_blocks, c.layers_per_block, c.heads) for name, c in
             ((name, get_preset(name)) for name in preset_names())}
    assert sizes["ad2"] == (256, 4, 4, 4) and get_preset("ad2").tokens == "coordinate"
    assert sizes["al3"] == sizes["al4"] == (256, 6, 6, 4)
    assert sizes["al6"] == (384, 6, 6, 6)
    assert sizes["chignolin"] == (384, 8, 8, 6)
    assert "ad2-small" in sizes
    for name in preset_names():
        config = get_preset(name)
        assert config.width // config.heads == 64  # the paper's head dimension


# ------------------------------------------------------------------ symmetry augmentation
def test_random_rotations_are_proper_and_uniform():
    rotations = random_rotations(200_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye.expand_as(rotations))
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(len(rotations), dtype=torch.float64))
    # Haar measure on SO(3): E[R] = 0, E[R_ij^2] = 1/3, and the rotation angle has density
    # (1 - cos t) / pi, so E[tr R] = 0, E[(tr R)^2] = 1 and P(t < pi/2) = 1/2 - 1/pi.
    assert rotations.mean(0).abs().max() < 0.01
    torch.testing.assert_close(rotations.square().mean(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0)
    trace = rotations.diagonal(dim1=1, dim2=2).sum(-1)
    assert abs(trace.mean().item()) < 0.01
    assert trace.square().mean().item() == pytest.approx(1.0, abs=0.02)
    angle = torch.arccos(((trace - 1) / 2).clamp(-1, 1))
    assert (angle < math.pi / 2).double().mean().item() == pytest.approx(0.5 - 1 / math.pi, abs=0.005)


def test_augment_preserves_distances_and_adds_com_noise():
    generator = torch.Generator().manual_seed(0)
    y = remove_com(torch.randn(20_000, 7, 3, dtype=torch.float64, generator=generator))
    out = augment(y, generator)
    torch.testing.assert_close(torch.cdist(out, out), torch.cdist(y, y))
    com = out.mean(1)
    # One 3-vector N(0, I/N) shared by all atoms: the CoM is N(0, I/N).
    torch.testing.assert_close(com.var(0), torch.full((3,), 1 / 7, dtype=torch.float64), atol=0.005, rtol=0)
    torch.testing.assert_close(remove_com(out).square().mean(), y.square().mean())


def test_centred_std_ignores_translation():
    x = np.random.default_rng(0).normal(size=(50, 6, 3)) * 0.2
    shifted = x + np.random.default_rng(1).normal(size=(50, 1, 3)) * 10
    assert centred_std(shifted) == pytest.approx(centred_std(x))
    with pytest.raises(ValueError, match="frames, atoms, 3"):
        centred_std(np.zeros((5, 3)))


def test_paper_ad2_preset_runs_with_coordinate_tokens():
    flow = TarFlow("ad2", 22, std=0.17)
    assert len(flow.blocks) == 4 and flow.blocks[0].position.shape == (65, 256)  # 3N - 1 positions
    x, log_q = flow.sample(2)
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-3, rtol=1e-5)
