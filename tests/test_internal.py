"""Internal-coordinate flows: the Z-matrix bijection, its exact density, and a known log Z."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from openmm import unit
from scipy import integrate
from toy_molecules import carbon_chain

from openmm_sbg import BoltzmannTarget, systems
from openmm_sbg.flow import FlowConfig, TarFlow, train
from openmm_sbg.flow.features import fit_representation
from openmm_sbg.flow.model import standard_normal_log_prob
from openmm_sbg.flow.symmetry import random_rotations
from openmm_sbg.flow.zmatrix import ZMatrix
from openmm_sbg.smc.proposal import com_log_density

TINY_INTERNAL = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=2, representation="internal")
# Plain, with the per-feature Gaussianization, and with spline blocks: every exactness check
# holds for each.
VARIANTS = [{}, {"marginals": 4}, {"spline_bins": 6}]


def jittered(target, n, scale=0.01, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(target.positions, dtype=torch.float64)
    return x + scale * torch.randn(n, *x.shape, dtype=torch.float64, generator=generator)


def random_internal_flow(target, seed=0, **variant) -> TarFlow:
    """An internal flow fitted to jittered structures, with random (non-identity) blocks, in float64."""
    torch.manual_seed(seed)
    flow = TarFlow(dataclasses.replace(TINY_INTERNAL, **variant), target=target, std=0.2)
    fit_representation(flow.representation, jittered(target, 256, seed=seed))
    for block in flow.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
        torch.nn.init.normal_(block.proj_out.bias, std=0.05)
    return flow.double()


@pytest.mark.parametrize("name", systems.names())
def test_zmatrix_round_trip_on_every_builtin_system(name):
    target = systems.get(name, platform="Reference")
    zmatrix = ZMatrix.from_topology(target.topology)
    assert sorted(zmatrix.order) == list(range(target.n_atoms))
    x = jittered(target, 4, scale=0.005) @ random_rotations(4, torch.Generator().manual_seed(1), torch.float64).transpose(1, 2)
    q, centre = zmatrix.to_internal(x)
    assert q.shape == (4, target.n_atoms - 2, 3)
    back = zmatrix.to_cartesian(q, centre, zmatrix.orientation(x))
    assert (back - x).abs().max() < 1e-10


def test_ring_closing_bonds_are_implied():
    """Chignolin's proline and tryptophan rings: every bond length survives the round trip."""
    target = systems.get("chignolin", platform="Reference")
    zmatrix = ZMatrix.from_topology(target.topology)
    bonds = np.array([(a.index, b.index) for a, b in target.topology.bonds()])
    placed = {frozenset(pair) for pair in zmatrix.placed[:, :2].tolist()}
    placed |= {frozenset((zmatrix.root[0], zmatrix.root[1])), frozenset((zmatrix.root[0], zmatrix.root[2]))}
    implied = [pair for pair in bonds.tolist() if frozenset(pair) not in placed]
    assert len(implied) >= 2  # at least the two rings close on a bond the Z-matrix does not hold
    x = jittered(target, 2, scale=0.003)
    q, centre = zmatrix.to_internal(x)
    back = zmatrix.to_cartesian(q, centre, zmatrix.orientation(x))
    lengths = lambda y: (y[:, bonds[:, 0]] - y[:, bonds[:, 1]]).norm(dim=-1)
    torch.testing.assert_close(lengths(back), lengths(x), atol=1e-10, rtol=0)


def test_disconnected_bond_graph_is_refused():
    with pytest.raises(ValueError, match="not connected"):
        ZMatrix.from_bonds(5, [(0, 1), (1, 2), (3, 4)])


def _rigid_and_internal(representation, flat: torch.Tensor):
    """Features, CoM and three Euler-type angles of the frame: a full set of 3N coordinates."""
    x = flat.view(1, -1, 3)
    features, _ = representation.forward(x)
    rotation = representation.zmatrix.orientation(x)[0]
    e1, e2 = rotation[:, 0], rotation[:, 1]
    polar, azimuth = torch.acos(e1[2]), torch.atan2(e1[1], e1[0])
    f1 = torch.linalg.cross(e1, torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype))
    f1 = f1 / f1.norm()
    spin = torch.atan2(e2 @ torch.linalg.cross(e1, f1), e2 @ f1)
    return torch.cat([features.flatten(), x.mean(1)[0], torch.stack([polar, azimuth, spin])]), polar


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("name", ["ad2", "al3"])
def test_log_det_equals_float64_autograd_jacobian(name, variant):
    """log q(x) = log p(h) + log N(c) + log(uniform SO(3) density in these angles) + log|d(h, c, angles)/dx|."""
    target = systems.get(name, platform="Reference")
    flow = random_internal_flow(target, **variant)
    representation = flow.representation
    x, log_q = flow.sample(3, generator=torch.Generator().manual_seed(2))
    for i in range(3):
        flat = x[i].reshape(-1).clone()
        jacobian = torch.autograd.functional.jacobian(lambda v: _rigid_and_internal(representation, v)[0], flat)
        features, polar = _rigid_and_internal(representation, flat)
        com = x[i : i + 1].mean(1)
        s = representation.com_std
        log_com = -1.5 * math.log(2 * math.pi * s**2) - com.square().sum() / (2 * s**2)
        log_rotation = torch.log(torch.sin(polar)) - math.log(8 * math.pi**2)
        expected = torch.linalg.slogdet(jacobian)[1] + log_com + log_rotation
        assert representation.forward(x[i : i + 1])[1].item() == pytest.approx(expected.item(), abs=1e-9)
        z, block_log_det = flow.normalised_forward(features[: flow.dim].view(1, -1, 3))
        assert log_q[i].item() == pytest.approx((standard_normal_log_prob(z) + block_log_det + expected).item(), abs=1e-8)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_sample_log_q_equals_log_prob_and_draws_are_reproducible(variant):
    target = systems.get("ad2", platform="Reference")
    flow = random_internal_flow(target, **variant)
    x, log_q = flow.sample(64, generator=torch.Generator().manual_seed(1), batch_size=20)
    torch.testing.assert_close(log_q, flow.log_prob(x).detach(), atol=1e-9, rtol=0)
    again, _ = flow.sample(64, generator=torch.Generator().manual_seed(1), batch_size=20)
    torch.testing.assert_close(again, x, atol=0, rtol=0)
    latents = flow.draw_latents(8, torch.Generator().manual_seed(3))
    assert latents.shape == (8, 3 * 22 - 6 + 7)
    torch.testing.assert_close(flow.from_latents(latents[2:5])[0], flow.from_latents(latents)[0][2:5], atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_checkpoint_round_trip_keeps_zmatrix_and_normalisation(tmp_path, variant):
    target = systems.get("ad2", platform="Reference")
    flow = random_internal_flow(target, **variant).float()
    flow.save(tmp_path / "flow.pt")
    loaded = TarFlow.load(tmp_path / "flow.pt")
    assert loaded.config.representation == "internal"
    assert loaded.representation.zmatrix.root == flow.representation.zmatrix.root
    x = jittered(target, 5).float()
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x), atol=0, rtol=0)
    # A float32 flow samples float32 positions and log-densities, as the SMC layers expect.
    samples, log_q = loaded.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == log_q.dtype == torch.float32


def test_internal_flow_needs_the_molecule_and_its_rigid_body_noise():
    with pytest.raises(ValueError, match="target="):
        TarFlow(TINY_INTERNAL, 22)
    flow = random_internal_flow(systems.get("ad2", platform="Reference"))
    with pytest.raises(ValueError, match="draw_latents"):
        flow.inverse(torch.zeros(2, 20, 3, dtype=torch.float64))


# ------------------------------------------------------------------ a molecule with a known Z
def _chain_target():
    """Five atoms in a chain with harmonic bonds and angles only: Z factorises over them."""
    topology, system = carbon_chain(5, "CHN")
    target = BoltzmannTarget(system, topology, 300 * unit.kelvin, name="chain")
    beta = 1 / target.kT_kj_per_mol
    bond_z = integrate.quad(lambda b: b**2 * math.exp(-beta * 100_000.0 * (b - 0.15) ** 2), 0.1, 0.2, epsabs=0, epsrel=1e-12)[0]
    angle_z = integrate.quad(lambda a: math.sin(a) * math.exp(-beta * 150.0 * (a - 1.9) ** 2), 0, math.pi, epsabs=0, epsrel=1e-12)[0]
    # 8 pi^2 orientations, 2 free dihedrals; the Gaussian CoM adjustment integrates to 1.
    log_z = math.log(8 * math.pi**2) + 4 * math.log(bond_z) + 3 * math.log(angle_z) + 2 * math.log(2 * math.pi)
    return target, log_z


def _chain_frames(target, n, seed=0) -> torch.Tensor:
    """Cartesian frames with bonds and angles near their minima and uniform dihedrals."""
    zmatrix = ZMatrix.from_topology(target.topology)
    generator = torch.Generator().manual_seed(seed)
    q = torch.empty(n, 3, 3, dtype=torch.float64)
    q[:, 0, :2] = 0.15 + 0.004 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    q[:, 0, 2] = 1.9 + 0.09 * torch.randn(n, generator=generator, dtype=torch.float64)
    q[:, 1:, 0] = 0.15 + 0.004 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    q[:, 1:, 1] = 1.9 + 0.09 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    q[:, 1:, 2] = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    return zmatrix.to_cartesian(q, torch.zeros(n, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64).expand(n, 3, 3))


def test_importance_sampling_recovers_known_log_z():
    """The flow's density over Cartesian positions is normalised: IS gives the exact log Z."""
    target, exact = _chain_target()
    torch.manual_seed(0)
    flow = TarFlow(TINY_INTERNAL, target=target, std=0.2)
    fit_representation(flow.representation, _chain_frames(target, 4000))
    for block in flow.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    flow = flow.double()
    estimates = []
    for seed in range(5):
        x, log_q = flow.sample(8000, generator=torch.Generator().manual_seed(seed))
        log_w = -target.energy(x) + com_log_density(x, flow.com_std, "gaussian") - log_q
        estimates.append(float(torch.logsumexp(log_w, 0) - math.log(len(log_w))))
    estimates = np.array(estimates)
    standard_error = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < max(4 * standard_error, 0.01), (estimates, exact)


def test_training_an_internal_flow_lowers_validation_nll():
    target = systems.get("ad2", platform="Reference")
    frames = jittered(target, 400, scale=0.004).numpy()
    flow = train(frames[:320], frames[320:], target=target, config=TINY_INTERNAL, progress=False,
                 options=__import__("openmm_sbg.flow", fromlist=["TrainOptions"]).TrainOptions(steps=30, batch_size=64, lr=1e-3))
    history = flow.metadata["history"]
    assert flow.config.representation == "internal"
    assert history[-1]["val_nll_per_dim"] < history[0]["val_nll_per_dim"]
