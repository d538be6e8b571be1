"""Energy-aware refinement: a toy with a known answer (three torsion basins), exact resume, guards."""

import copy
import dataclasses
import itertools
import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from scipy import integrate
from toy_molecules import carbon_chain

from openmm_sbg import BoltzmannTarget, populations
from openmm_sbg.flow import FlowConfig, TarFlow
from openmm_sbg.flow import refine as refine_module
from openmm_sbg.flow.features import fit_representation
from openmm_sbg.flow.refine import RefineOptions, importance_weights, refine
from openmm_sbg.flow.zmatrix import ZMatrix
from openmm_sbg.smc.weights import normalised_ess

TINY = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=2, representation="internal")
# Torsion V = K3 (1 + cos 3 phi) + K1 (1 + cos phi): trans (|phi| > 120 deg) below the two gauche basins.
K3, K1 = 5.0, 2.0


def torsion_states(phi: np.ndarray) -> np.ndarray:
    """0: gauche- [-120, 0) deg, 1: gauche+ [0, 120), 2: trans."""
    degrees = np.degrees(phi)
    return np.where((degrees >= -120) & (degrees < 0), 0, np.where((degrees >= 0) & (degrees < 120), 1, 2))


def butane_like():
    """Four atoms, stiff bonds and angles, a three-basin torsion: its basin populations by quadrature."""
    topology, system = carbon_chain(4, "BUT")
    torsion = openmm.PeriodicTorsionForce()
    torsion.addTorsion(0, 1, 2, 3, 3, 0.0, K3)
    torsion.addTorsion(0, 1, 2, 3, 1, 0.0, K1)
    system.addForce(torsion)
    target = BoltzmannTarget(system, topology, 300 * unit.kelvin, name="butane-like")
    boltzmann = lambda phi: math.exp(-(K3 * (1 + math.cos(3 * phi)) + K1 * (1 + math.cos(phi))) / target.kT_kj_per_mol)
    edges = np.radians([-180, -120, 0, 120, 180])
    mass = [integrate.quad(boltzmann, a, b, epsabs=0, epsrel=1e-12)[0] for a, b in itertools.pairwise(edges)]
    exact = np.array([mass[1], mass[2], mass[0] + mass[3]]) / sum(mass)
    return target, exact


def torsion_of(target):
    zmatrix = ZMatrix.from_topology(target.topology)

    def labels(x: np.ndarray) -> np.ndarray:
        q, _ = zmatrix.to_internal(torch.as_tensor(x, dtype=torch.float64))
        return torsion_states(q[:, -1, 2].numpy())

    return labels


def uniform_torsion_flow(target, seed=0, spread=1.0, **variant) -> TarFlow:
    """A flow fitted to frames with the right bonds and angles but a uniform torsion: equal basins.

    ``spread`` widens the bonds and angles beyond their thermal width: a poor start.
    """
    zmatrix = ZMatrix.from_topology(target.topology)
    generator = torch.Generator().manual_seed(seed)
    n = 4000
    q = torch.empty(n, 2, 3, dtype=torch.float64)
    bond, angle = 0.004 * spread, 0.09 * spread
    q[:, :, 0] = 0.15 + bond * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    q[:, 0, 2] = 1.9 + angle * torch.randn(n, generator=generator, dtype=torch.float64)
    q[:, 1, 1] = 1.9 + angle * torch.randn(n, generator=generator, dtype=torch.float64)
    q[:, 0, 1] = 0.15 + bond * torch.randn(n, generator=generator, dtype=torch.float64)
    q[:, 1, 2] = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    frames = zmatrix.to_cartesian(q, torch.zeros(n, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64).expand(n, 3, 3))
    torch.manual_seed(seed)
    flow = TarFlow(dataclasses.replace(TINY, **variant), target=target, std=0.1)
    fit_representation(flow.representation, frames)
    return flow


def weighted_populations(flow, target, labeller, n=6000, seed=123):
    x, log_w = importance_weights(flow, target, n, torch.Generator().manual_seed(seed))
    labels = labeller(x.numpy())
    estimate, error = populations.bootstrap_populations(labels, 3, log_w.numpy(), n_bootstrap=200)
    proposed = np.bincount(labels, minlength=3) / len(labels)
    weights = torch.softmax(log_w, 0).numpy()
    return estimate, error, proposed, float(1 / np.sum(weights**2) / n)


@pytest.mark.parametrize("objective", ["weighted-ml", "alpha-2", "reverse-kl"])
def test_refinement_raises_ess_and_keeps_every_basin_mass(objective):
    target, exact = butane_like()
    labeller = torsion_of(target)
    flow = uniform_torsion_flow(target)
    _, _, proposed_before, ess_before = weighted_populations(flow, target, labeller)
    options = RefineOptions(objective=objective, steps=120, batch_size=128, lr=3e-3, data_weight=0.0, eval_every=40,
                            eval_proposals=2000, proposals_per_refresh=1024, refresh_every=5, ema_decay=0.9)
    refined = refine(flow, target, options, states=labeller, progress=False)
    estimate, error, proposed_after, ess_after = weighted_populations(refined, target, labeller)
    assert ess_after > ess_before + 0.1, (ess_before, ess_after)
    # Every basin's weighted mass agrees with quadrature within its bootstrap error ...
    assert np.all(np.abs(estimate - exact) < 4 * error + 1e-3), (estimate, error, exact)
    # ... and the proposals moved towards the Boltzmann populations without dropping a basin.
    assert np.abs(proposed_after - exact).sum() < np.abs(proposed_before - exact).sum()
    assert proposed_after.min() > 0.5 * exact.min()
    record = refined.metadata["refinement"]
    assert record["complete"] and record["history"][0]["step"] == 0 and record["stopped"] is None


def test_tempered_refinement_climbs_from_a_poor_start_and_keeps_every_basin_mass():
    target, exact = butane_like()
    labeller = torsion_of(target)
    flow = uniform_torsion_flow(target, spread=3.0)  # bonds and angles 3x too wide: ESS below 1%
    _, _, _, ess_before = weighted_populations(flow, target, labeller)
    assert ess_before < 0.01
    options = RefineOptions(steps=120, batch_size=128, lr=3e-3, data_weight=0.0, eval_every=40, temper_ess=0.3,
                            eval_proposals=2000, proposals_per_refresh=1024, refresh_every=5, ema_decay=0.9)
    refined = refine(flow, target, options, states=labeller, progress=False)
    history = refined.metadata["refinement"]["history"]
    # The first refreshes were tempered (the flow fitted q^(1-beta) p^beta), the last ones no longer needed it.
    assert history[1]["temper"] < 0.9 and history[-1]["temper"] == 1.0, history
    estimate, error, proposed, ess_after = weighted_populations(refined, target, labeller)
    assert ess_after > 0.3, (ess_before, ess_after)
    assert np.all(np.abs(estimate - exact) < 4 * error + 1e-3), (estimate, error, exact)
    assert proposed.min() > 0.5 * exact.min()


def test_tempering_exponent_keeps_the_requested_ess():
    log_w = 3.0 * torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_w[:100] = -math.inf  # clashes
    ess = lambda beta: normalised_ess(refine_module.tempered(log_w, beta))
    assert ess(1.0) < 0.05
    beta = refine_module.tempering_exponent(log_w, 0.3)
    assert 0 < beta < 1 and abs(ess(beta) - 0.3) < 1e-6 and ess(beta + 1e-3) < 0.3
    assert refine_module.tempering_exponent(log_w, 0.0) == 1.0
    # alpha-2 searches up to the square of the weights, and keeps it when that holds the ESS.
    assert abs(refine_module.tempering_exponent(log_w, 0.3, largest=2.0) - beta) < 1e-9
    assert refine_module.tempering_exponent(0.1 * log_w[100:], 0.3, largest=2.0) == 2.0
    assert refine_module.tempering_exponent(0.1 * log_w[100:], 0.3) == 1.0  # weights that keep the ESS stay as they are
    # No beta keeps more than the finite share (98%) of the proposals: beta 0 weighs the finite ones equally.
    assert refine_module.tempering_exponent(log_w, 0.99) == 0.0 and abs(ess(0.0) - 0.98) < 1e-12


@pytest.mark.parametrize("variant", [{}, {"marginals": 4}, {"spline_bins": 6}], ids=str)
def test_refinement_resumes_exactly(tmp_path, monkeypatch, variant):
    target, _ = butane_like()
    flow = uniform_torsion_flow(target, **variant)
    frames = flow.sample(500, generator=torch.Generator().manual_seed(1))[0].double().numpy()
    # Tempered: the buffer's exponents travel in the checkpoint too.
    options = RefineOptions(steps=12, batch_size=64, lr=1e-3, data_weight=0.5, eval_every=4, eval_proposals=256,
                            proposals_per_refresh=256, refresh_every=3, buffer_refreshes=2, temper_ess=0.9)
    whole = refine(flow, target, options, data_positions=frames, checkpoint_path=tmp_path / "whole.pt", progress=False)

    evaluate = refine_module._Run.evaluate

    def interrupted(run):
        if run.step == 8:
            raise KeyboardInterrupt  # after the step-4 checkpoint, before the step-8 one
        return evaluate(run)

    monkeypatch.setattr(refine_module._Run, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        refine(flow, target, options, data_positions=frames, checkpoint_path=tmp_path / "split.pt", progress=False)
    monkeypatch.setattr(refine_module._Run, "evaluate", evaluate)
    resumed = refine(flow, target, options, data_positions=frames, checkpoint_path=tmp_path / "split.pt", progress=False)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    untimed = lambda history: [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]
    assert untimed(TarFlow.load(tmp_path / "split.pt").metadata["refinement"]["history"]) == untimed(whole.metadata["refinement"]["history"])
    with pytest.raises(ValueError, match="finished flow"):
        refine(flow, target, options, data_positions=frames, checkpoint_path=tmp_path / "split.pt", progress=False)
    # The refined flow (with its fixed Gaussianization or splines, if any) is still an exact density.
    refined = TarFlow.load(tmp_path / "split.pt", target=target).double()
    x, log_q = refined.sample(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(refined.log_prob(x), log_q, rtol=0, atol=1e-8)


def test_the_replay_buffer_starts_full_and_refreshes_replace_its_oldest_set():
    target, _ = butane_like()
    options = RefineOptions(steps=4, batch_size=16, data_weight=0.0, proposals_per_refresh=32, refresh_every=2, buffer_refreshes=3)
    run = refine_module._Run(uniform_torsion_flow(target), target, options, None, None, refine_module.OneProcess())
    run.energy_loss()
    first = [x for x, _, _ in run.buffer]
    assert len(first) == 3 and all(len(x) == 32 for x in first)
    assert not torch.equal(first[0], first[1])  # three independent sets, not one repeated
    run.step = 1
    run.energy_loss()
    assert [x is f for (x, _, _), f in zip(run.buffer, first)] == [True, True, True]  # no refresh between
    run.step = 2
    run.energy_loss()
    kept = [x for x, _, _ in run.buffer]
    assert len(kept) == 3 and kept[0] is first[1] and kept[1] is first[2] and all(kept[2] is not f for f in first)


def test_population_guard_stops_a_run_that_drops_a_basin():
    target, _ = butane_like()
    labeller = torsion_of(target)
    flow = uniform_torsion_flow(target)
    # A guard no flow can satisfy at once (proposals must hold 10x a basin's weighted mass) stops at the first check.
    options = RefineOptions(steps=50, batch_size=32, eval_every=5, eval_proposals=256, proposals_per_refresh=256,
                            data_weight=0.0, drift_ratio=10.0)
    refined = refine(flow, target, options, states=labeller, progress=False)
    record = refined.metadata["refinement"]
    assert record["steps"] == 5 and "of the proposals" in record["stopped"]


def test_population_guard_ignores_a_share_that_rests_on_one_heavy_proposal():
    """The al4 case: a state with a few percent of the weighted mass, carried by one proposal of many."""
    n = 4000
    labels = np.zeros(n, dtype=int)
    labels[:40] = 1  # 1% of the proposals
    mass = 0.06 / 0.94 * (n - 40)  # 6% of the weight, against weight 1 for each proposal of state 0
    one_heavy = np.zeros(n)
    one_heavy[:40] = -50.0
    one_heavy[0] = np.log(mass)  # all of it on one proposal
    evenly = np.zeros(n)
    evenly[:40] = np.log(mass / 40)  # spread evenly over the state's 40
    for log_w, stops in [(one_heavy, False), (evenly, True)]:
        entry = {"ess": 0.5, **{key: getattr(populations, f)(labels, 2, *args).tolist() for key, f, args in [
            ("proposal_populations", "state_populations", ()),
            ("weighted_populations", "state_populations", (log_w,)),
            ("weighted_population_errors", "population_errors", (log_w,)),
        ]}}
        assert entry["weighted_populations"][1] == pytest.approx(0.06)
        reason = refine_module.drift_reason(entry, 0.5, RefineOptions())
        assert (reason is not None) == stops
        # Without the error margin both stop: the estimate alone cannot tell noise from drift.
        assert "state 1 holds 0.060" in refine_module.drift_reason(entry, 0.5, RefineOptions(drift_errors=0.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"objective": "forward"}, "objective"), ({"data_weight": 2.0}, r"\[0, 1\]"), ({"steps": 0}, "positive"),
     ({"temper_ess": 1.0}, r"\[0, 1\)"), ({"ess_floor": -0.1}, "ess_floor"), ({"drift_errors": -1.0}, "drift_errors")],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RefineOptions(**kwargs)


def test_data_term_needs_data():
    target, _ = butane_like()
    with pytest.raises(ValueError, match="data_positions"):
        refine(uniform_torsion_flow(target), target, RefineOptions(data_weight=0.5), progress=False)


@pytest.mark.parametrize("objective, spline_bins", [("weighted-ml", 0), ("reverse-kl", 0), ("reverse-kl", 5)])
def test_a_refined_cartesian_flow_is_still_an_exact_density(objective, spline_bins, tmp_path, monkeypatch):
    target, _ = butane_like()
    # This untrained flow's ESS is 1/128 at every check, a tie the best-ESS selection resolves
    # to the starting weights; a later check ranking higher makes the checkpoint hold trained ones.
    evaluate = refine_module._Run.evaluate
    monkeypatch.setattr(refine_module._Run, "evaluate", lambda run: {**evaluate(run), "ess": run.step})
    torch.manual_seed(0)
    config = FlowConfig(width=32, n_blocks=2, layers_per_block=1, heads=2, representation="cartesian", spline_bins=spline_bins)
    flow = TarFlow(config, target=target, std=0.1)
    frames = uniform_torsion_flow(target).sample(256, generator=torch.Generator().manual_seed(2))[0].double().numpy()
    options = RefineOptions(objective=objective, steps=6, batch_size=32, lr=1e-3, eval_every=3, eval_proposals=128,
                            proposals_per_refresh=128, refresh_every=3)
    refine(flow, target, options, data_positions=frames, checkpoint_path=tmp_path / "refined.pt", progress=False)
    refined = TarFlow.load(tmp_path / "refined.pt", target=target).double()
    assert any(not torch.equal(a, b) for a, b in zip(refined.state_dict().values(), flow.double().state_dict().values()))
    x, log_q = refined.sample(64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(refined.log_prob(x), log_q, rtol=0, atol=1e-8)


def test_train_refine_command_writes_a_refined_flow_and_its_record(tmp_path, capsys):
    from openmm_sbg import cli, shipped

    out = tmp_path / "refined.pt"
    # The reference file holds only test frames: the data term has nothing to fit, which is refused ...
    argv = ["train", "--refine", "ad2", "--data", shipped.reference_path("ad2"), "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--eval-every", "1", "--eval-proposals", "64", "--no-progress"]
    assert cli.main(argv) == 2
    assert "data_positions" in capsys.readouterr().err
    # ... and without the data term the energy alone refines.
    assert cli.main([*argv, "--data-weight", "0"]) == 0
    summary = __import__("json").loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and [entry["step"] for entry in summary["ess_over_time"]] == [0, 1, 2]
    assert len(summary["state_populations"]["weighted_populations"]) >= 2  # backbone basins of a peptide are tracked
    refined = TarFlow.load(out)
    assert refined.metadata["refinement"]["complete"] and refined.metadata["refinement"]["options"]["objective"] == "weighted-ml"
    # Without the data term no data shaped the flow, so the record names none.
    assert refined.metadata["refinement"]["provenance"] == {"started_from": "ad2", "data": [], "added_blocks": 0}
    # A data term needs --data, and says so; without one, --data is not needed.
    no_data = [arg for arg in argv if arg not in ("--data", shipped.reference_path("ad2"))]
    assert cli.main(no_data) == 2
    assert "give --data" in capsys.readouterr().err
    assert cli.main(["train", "ad2", "--out", str(tmp_path / "flow.pt")]) == 2
    assert "train needs --data" in capsys.readouterr().err
    # --add-blocks grows the flow before refining it; the checkpoint is the grown flow.
    grown_out = tmp_path / "grown.pt"
    no_data[no_data.index(str(out))] = str(grown_out)
    assert cli.main([*no_data, "--data-weight", "0", "--add-blocks", "2"]) == 0
    grown = TarFlow.load(grown_out)
    assert grown.config.n_blocks == TarFlow.load("ad2").config.n_blocks + 2
    assert grown.metadata["grown"]["added_blocks"] == 2 and grown.metadata["refinement"]["provenance"]["added_blocks"] == 2


@pytest.mark.parametrize("ess_floor, stops", [(0.5, False), (0.7, True)])
def test_ess_guard_stops_below_its_floor(monkeypatch, ess_floor, stops):
    target, _ = butane_like()
    estimates = iter([0.4, 0.25, 0.25])  # the start, then a fall to 62% of it

    def evaluate(run):
        return {"step": run.step, "seconds": run.seconds, "ess": next(estimates)}

    monkeypatch.setattr(refine_module._Run, "evaluate", evaluate)
    options = RefineOptions(steps=10, batch_size=16, eval_every=5, proposals_per_refresh=64, data_weight=0.0, ess_floor=ess_floor)
    record = refine(uniform_torsion_flow(target), target, options, progress=False).metadata["refinement"]
    if stops:
        assert record["steps"] == 5 and record["stopped"] == "ESS fell to 0.250 from 0.400" and record["selected_step"] == 0
    else:
        assert record["steps"] == 10 and record["stopped"] is None


def test_data_weight_one_trains_on_the_data_alone(monkeypatch):
    target, _ = butane_like()
    flow = uniform_torsion_flow(target)
    frames = flow.sample(256, generator=torch.Generator().manual_seed(1))[0].double().numpy()

    def no_energy(run):
        raise AssertionError("the energy term was computed with data_weight=1")

    monkeypatch.setattr(refine_module._Run, "energy_loss", no_energy)
    options = RefineOptions(steps=4, batch_size=32, lr=1e-3, data_weight=1.0, eval_every=2, eval_proposals=128)
    refined = refine(flow, target, options, data_positions=frames, progress=False)
    assert refined.metadata["refinement"]["steps"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(refined.state_dict().values(), flow.state_dict().values()))


@pytest.mark.parametrize("select_best, selected", [(True, 5), (False, 15)])
def test_refinement_keeps_the_best_or_the_last_weights(monkeypatch, select_best, selected):
    target, _ = butane_like()
    estimates = iter([0.4, 0.5, 0.45, 0.3])  # best at step 5, last at step 15

    def evaluate(run):
        return {"step": run.step, "seconds": run.seconds, "ess": next(estimates)}

    monkeypatch.setattr(refine_module._Run, "evaluate", evaluate)
    options = RefineOptions(steps=15, batch_size=16, eval_every=5, proposals_per_refresh=64, data_weight=0.0,
                            ess_floor=0.0, select_best=select_best)
    snapshots, record = {}, refine_module._Run.record

    def record_and_snapshot(run, entry):
        record(run, entry)
        snapshots[entry["step"]] = copy.deepcopy(run.ema.state_dict())

    monkeypatch.setattr(refine_module._Run, "record", record_and_snapshot)
    refined = refine(uniform_torsion_flow(target), target, options, progress=False)
    assert refined.metadata["refinement"]["selected_step"] == selected
    assert all(torch.equal(refined.state_dict()[key], value) for key, value in snapshots[selected].items())
    assert not all(torch.equal(refined.state_dict()[key], value) for key, value in snapshots[0].items())


@pytest.mark.parametrize("patience, steps, stopped", [
    (2, 15, "the ESS has not risen for 2 evaluations"),  # best at step 5; steps 10 and 15 do not beat it
    (3, 20, None),                                       # step 20 beats it before a third evaluation without a rise
])
def test_patience_ends_a_refinement_whose_ess_stopped_rising(monkeypatch, patience, steps, stopped):
    target, _ = butane_like()
    estimates = iter([0.4, 0.5, 0.45, 0.48, 0.55])

    def evaluate(run):
        return {"step": run.step, "seconds": run.seconds, "ess": next(estimates)}

    monkeypatch.setattr(refine_module._Run, "evaluate", evaluate)
    options = RefineOptions(steps=20, batch_size=16, eval_every=5, proposals_per_refresh=64, data_weight=0.0,
                            ess_floor=0.0, patience=patience)
    record = refine(uniform_torsion_flow(target), target, options, progress=False).metadata["refinement"]
    assert record["steps"] == steps and record["stopped"] == stopped
    assert record["selected_step"] == (5 if stopped else 20)
