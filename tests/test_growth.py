"""Growing a flow: identity blocks keep the density exactly, and are reproducible."""

import pytest
import torch
from test_refine import butane_like, uniform_torsion_flow

from openmm_sbg.flow import FlowConfig, TarFlow
from openmm_sbg.flow.growth import with_identity_blocks


def trained_looking(flow: TarFlow) -> TarFlow:
    """Random output layers, so that every block of ``flow`` transforms (a fresh flow is the identity)."""
    with torch.no_grad():
        for block in flow.blocks:
            block.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(block.layers)))
    return flow


@pytest.mark.parametrize("representation", ["internal", "cartesian", "internal-spline"])
def test_identity_blocks_keep_the_density_exactly(representation):
    target, _ = butane_like()
    if representation.startswith("internal"):
        flow = uniform_torsion_flow(target, spline_bins=4 if representation.endswith("spline") else 0)
    else:
        torch.manual_seed(0)
        flow = TarFlow(FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=2), target=target, std=0.1)
    flow = trained_looking(flow).double()
    grown = with_identity_blocks(flow, 3)
    assert grown.config.n_blocks == flow.config.n_blocks + 3 and len(grown.blocks) == len(flow.blocks) + 3
    assert [block.reverse for block in grown.blocks] == [i % 2 == 1 for i in range(len(grown.blocks))]
    assert grown.metadata["grown"] == {"from_blocks": 2, "added_blocks": 3}
    assert all(block.spline_bins == flow.config.spline_bins for block in grown.blocks)
    x, log_q = flow.sample(64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grown.log_prob(x), log_q, rtol=0, atol=1e-10)
    latents = flow.draw_latents(16, torch.Generator().manual_seed(2))
    torch.testing.assert_close(grown.from_latents(latents)[0], flow.from_latents(latents)[0], rtol=0, atol=1e-10)
    # The new blocks have weights to train: their output layers get gradients at once.
    grown.log_prob(x).sum().backward()
    assert grown.blocks[-1].proj_out.weight.grad.abs().sum() > 0


def test_growing_is_reproducible_and_refuses_nothing_to_add():
    target, _ = butane_like()
    flow = uniform_torsion_flow(target)
    a, b = with_identity_blocks(flow, 1, seed=5), with_identity_blocks(flow, 1, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = with_identity_blocks(flow, 1, seed=6)
    assert not torch.equal(a.blocks[-1].proj_in.weight, c.blocks[-1].proj_in.weight)
    with pytest.raises(ValueError, match="positive"):
        with_identity_blocks(flow, 0)
