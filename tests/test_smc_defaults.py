"""The sampler's defaults: exact weights for flows with an analytic centre, one ESS, IS that keeps its weights."""

import json
import math

import numpy as np
import pytest
import torch

from openmm_sbg import cli
from openmm_sbg.flow import FlowConfig, TarFlow
from openmm_sbg.smc import GaussianProposal, SMCResult, SMCSampler, normalised_ess
from openmm_sbg.smc.proposal import PAPER_CLIP_FRACTION, com_log_density, has_gaussian_centre, source_energy
from openmm_sbg.smc.testing import GaussianTarget

SIGMA = 0.2


class _Spring(GaussianTarget):
    """Two atoms on a spring, ``E = |x1 - x2|^2 / (4 sigma^2)``: the internal coordinate ``d = x1 - x2``
    is ``N(0, 2 sigma^2)``, exactly what a proposal of two independent ``N(0, sigma^2)`` atoms gives it."""

    def __init__(self):
        self.n_atoms = 2

    def _energy(self, x):
        return (x[:, 0] - x[:, 1]).square().sum(-1) / (4 * SIGMA**2)


def _perfect_proposal(gaussian_centre: bool | None) -> GaussianProposal:
    # Its CoM is N(0, sigma^2 / 2 I), independent of d: an analytic Gaussian centre.
    proposal = GaussianProposal(torch.zeros(2, 3), SIGMA)
    if gaussian_centre is not None:
        proposal.gaussian_centre = gaussian_centre
    return proposal


def _two_carbons():
    from openmm import app

    topology = app.Topology()
    residue = topology.addResidue("TWO", topology.addChain())
    for name in ("C1", "C2"):
        topology.addAtom(name, app.element.carbon, residue)
    return topology


def _importance_sampling(proposal, n=4000, **options):
    options = {"progress": False, **options}
    return SMCSampler(_Spring(), proposal, n, 0, **options).run(0)


def test_the_default_weights_of_a_flow_with_an_analytic_centre_are_exact():
    """A proposal exact in the internal coordinates: the default (Gaussian CoM) ESS is 1, the chi3 one ~0.6.

    The chi3 factor |c|^2 alone gives ESS E[r^2]^2 / E[r^4] = 9 / 15 = 0.6: a default that fell
    back to the paper's protocol for such a flow fails here.
    """
    exact = _importance_sampling(_perfect_proposal(True))
    assert exact.info["com_adjustment"] == "gaussian" and exact.info["clip_fraction"] == 0.0
    assert exact.ess == pytest.approx(1.0, abs=1e-9)
    paper = _importance_sampling(_perfect_proposal(True), com_adjustment="chi3")
    assert paper.info["clip_fraction"] == PAPER_CLIP_FRACTION
    assert 0.5 < paper.ess < 0.7
    # A proposal that does not declare an analytic centre keeps the paper's protocol.
    undeclared = _importance_sampling(_perfect_proposal(None))
    assert undeclared.info["com_adjustment"] == "chi3" and undeclared.ess == pytest.approx(paper.ess)


def test_internal_flows_have_an_analytic_centre_and_cartesian_flows_do_not(ad2):
    small = dict(width=16, n_blocks=1, layers_per_block=1, heads=1)
    internal = TarFlow(FlowConfig(**small, representation="internal"), target=ad2, std=0.2)
    cartesian = TarFlow(FlowConfig(**small), n_atoms=22, std=0.2)
    assert has_gaussian_centre(internal) and not has_gaussian_centre(cartesian)
    from openmm_sbg.distributed.fast_paths import FastFlow

    assert has_gaussian_centre(FastFlow(internal)) and not has_gaussian_centre(FastFlow(cartesian))
    for flow, kind, clip in ((internal, "gaussian", 0.0), (cartesian, "chi3", PAPER_CLIP_FRACTION)):
        options = SMCSampler(ad2, flow, 10, 0, progress=False).options
        assert (options.com_adjustment, options.clip_fraction) == (kind, clip)
        # Explicit choices are kept.
        options = SMCSampler(ad2, flow, 10, 0, com_adjustment="chi3", clip_fraction=0.01, progress=False).options
        assert (options.com_adjustment, options.clip_fraction) == ("chi3", 0.01)


def test_default_ess_of_the_shipped_internal_flow_is_the_exact_one(ad2):
    flow = TarFlow.load("ad2", target=ad2)
    result = SMCSampler(ad2, flow, 300, 0, resample_at_end=False, progress=False).run(0)
    x = torch.as_tensor(result.positions)
    log_q = -source_energy(flow, x, need_grad=False)[0]
    log_w = -ad2.energy(x) + com_log_density(x, flow.com_std, "gaussian") - log_q
    assert result.info["n_kept"] == 300  # nothing clipped
    np.testing.assert_allclose(result.log_weights, log_w.numpy(), atol=2e-3)
    assert result.ess == pytest.approx(normalised_ess(log_w), abs=1e-3)


def test_importance_sampling_keeps_its_weights_unless_asked():
    """n_steps=0 keeps the proposals and their weights by default (and with resample_at_end=False), even far
    below resample_threshold; resample_at_end=True resamples them; SMC resamples at the end by default."""
    proposal = GaussianProposal(torch.zeros(2, 3), 1.0)
    target = GaussianTarget(torch.full((2, 3), 0.7), 0.5)
    options = dict(com_adjustment="none", clip_fraction=0.0, progress=False)
    kept = SMCSampler(target, proposal, 500, 0, resample_threshold=0.9, **options).run(0)
    assert kept.ess < 0.3
    explicit = SMCSampler(target, proposal, 500, 0, resample_at_end=False, resample_threshold=0.9, **options).run(0)
    np.testing.assert_array_equal(explicit.log_weights, kept.log_weights)
    x = torch.as_tensor(kept.positions)
    np.testing.assert_allclose(kept.log_weights, (proposal.energy(x) - target.energy(x)).numpy(), rtol=1e-12)
    assert len(np.unique(kept.positions[:, 0, 0])) == 500
    resampled = SMCSampler(target, proposal, 500, 0, resample_at_end=True, **options).run(0)
    assert (resampled.log_weights == 0).all() and resampled.ess == kept.ess
    assert SMCSampler(target, proposal, 8, 1, **options).options.resample_at_end


def test_the_run_ess_is_the_smallest_before_a_resampling(tmp_path):
    proposal = GaussianProposal(torch.zeros(2, 3), 1.0)
    target = GaussianTarget(torch.full((2, 3), 0.7), 0.5)
    result = SMCSampler(target, proposal, 500, 10, kernel="mala", step_size=0.05, com_adjustment="none",
                        progress=False).run(0)
    ess = result.diagnostics["ess"]
    assert result.diagnostics["resampled"][:-1].any(), "the test needs a run that resampled before t = 1"
    assert result.ess == ess.min() and result.ess_since_last_resampling == ess[-1]
    assert result.ess < result.ess_since_last_resampling
    result.topology = _two_carbons()
    result.save(tmp_path / "x.h5")
    loaded = SMCResult.load(tmp_path / "x.h5")
    assert (loaded.ess, loaded.ess_since_last_resampling) == (result.ess, result.ess_since_last_resampling)
    # IS: the proposals' ESS, whatever happens to the output.
    importance = SMCSampler(target, proposal, 500, 0, com_adjustment="none", progress=False).run(0)
    assert importance.ess == importance.info["ess_proposals"] == importance.ess_since_last_resampling


@pytest.mark.parametrize("flag", [[], ["--no-final-resample"]])
def test_sample_with_zero_steps_writes_the_weighted_proposals(tmp_path, capsys, ad2, flag):
    """Importance sampling keeps its proposals and their weights by default, and with --no-final-resample."""
    flow = TarFlow(FlowConfig(width=16, n_blocks=1, layers_per_block=1, heads=1, representation="internal"),
                   target=ad2, std=0.2)
    flow.save(tmp_path / "flow.pt")
    out = tmp_path / "is.h5"
    code = cli.main(["sample", "--flow", str(tmp_path / "flow.pt"), "--n-particles", "32", "--n-steps", "0",
                     *flag, "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["com_adjustment"] == "gaussian" and summary["clip_fraction"] == 0.0
    assert "translational volume counts as 1" in summary["log_z_convention"] and "ess_definition" in summary
    assert summary["ess"] < 0.5  # an untrained flow: far below the default resample threshold
    samples = SMCResult.load(out)
    assert not (samples.log_weights == 0).all()
    assert len(np.unique(samples.positions[:, 0, 0])) == 32
    assert samples.ess == pytest.approx(normalised_ess(torch.as_tensor(samples.log_weights)))
    assert math.isfinite(samples.log_z)


def test_sample_resamples_importance_sampling_when_asked(tmp_path, capsys, ad2):
    flow = TarFlow(FlowConfig(width=16, n_blocks=1, layers_per_block=1, heads=1, representation="internal"),
                   target=ad2, std=0.2)
    flow.save(tmp_path / "flow.pt")
    out = tmp_path / "is.h5"
    code = cli.main(["sample", "--flow", str(tmp_path / "flow.pt"), "--n-particles", "32", "--n-steps", "0",
                     "--final-resample", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    samples = SMCResult.load(out)
    assert (samples.log_weights == samples.log_weights[0]).all()  # equal weights: resampled
    assert len(np.unique(samples.positions[:, 0, 0])) < 32  # an untrained flow's heavy proposals repeat
