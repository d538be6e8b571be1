"""Batched Langevin walkers and in-batch replica exchange: OpenMM's scheme, exact toys, resume, CLI."""

import dataclasses
import json

import h5py
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_sbg import data
from openmm_sbg.cli import main
from openmm_sbg.dynamics import (
    BatchedEngineUnavailable,
    BatchedLangevin,
    EngineOptions,
    LadderExchange,
    batched_force_field,
    minimised_structure,
    run_batched_md,
    run_batched_replica_exchange,
    system_masses,
)
from openmm_sbg.dynamics import noise
from openmm_sbg.dynamics.langevin import MOLAR_GAS_CONSTANT, resolve_device
from openmm_sbg.energy.base import EnergyBackend
from openmm_sbg.md import MDConfig
from openmm_sbg.replica_exchange import ReplicaExchangeConfig
from openmm_sbg.target import BoltzmannTarget

CONFIG = MDConfig(n_frames=12, steps_per_frame=10, equilibration_steps=20, frames_per_checkpoint=4, seed=5)


class Harmonic(EnergyBackend):
    """U = k/2 |x|^2 summed over atoms (kJ/mol, nm): every coordinate an independent oscillator."""

    name = "harmonic"

    def __init__(self, n_atoms: int, k: float):
        self.n_atoms, self.k = n_atoms, k

    def _energy_and_forces(self, x):
        return 0.5 * self.k * x.square().sum(dim=(1, 2)), -self.k * x


def stationary_covariance(k: float, m: float, kT: float, dt: float, gamma: float) -> np.ndarray:
    """Exact stationary covariance of (x, v) for LangevinMiddle on a 1-D oscillator (discrete Lyapunov equation)."""
    a = np.exp(-gamma * dt)
    kick = np.array([[1.0, 0.0], [-dt * k / m, 1.0]])
    drift = np.array([[1.0, dt / 2], [0.0, 1.0]])
    damp = np.diag([1.0, a])
    transition = drift @ damp @ drift @ kick
    b = drift @ np.array([0.0, np.sqrt(kT / m * (1 - a * a))])
    lhs = np.eye(4) - np.kron(transition, transition)
    return np.linalg.solve(lhs, np.outer(b, b).reshape(-1)).reshape(2, 2)


@pytest.fixture(scope="module")
def ad2_start():
    from openmm_sbg import systems

    target = systems.get("ad2", platform="Reference")
    return target, minimised_structure(target)


# ----------------------------------------------------------------------------- OpenMM's scheme
@pytest.mark.parametrize("kelvin, friction", [(0.0, 5.0), (300.0, 0.0)])
def test_deterministic_steps_match_openmm_langevin_middle(ad2_start, kelvin, friction):
    """Zero temperature (friction acting) or zero friction (no noise): OpenMM's Reference trajectory to round-off."""
    target, x0 = ad2_start
    v0 = np.random.default_rng(0).normal(scale=0.3, size=x0.shape)
    integrator = openmm.LangevinMiddleIntegrator(kelvin * unit.kelvin, friction / unit.picosecond, 1.0 * unit.femtosecond)
    context = openmm.Context(target.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x0)
    context.setVelocities(v0)
    integrator.step(25)
    state = context.getState(positions=True, velocities=True)
    x_ref = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    v_ref = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    for precision, tolerance in (("float64", 1e-10), ("float32", 2e-5)):
        engine = BatchedLangevin(
            batched_force_field(target.system, 2), system_masses(target.system), np.stack([x0, x0]), kelvin,
            friction=friction / unit.picosecond, velocities=np.stack([v0, v0]), precision=precision,
        )
        engine.step(25)
        assert engine.x.dtype == getattr(torch, precision)
        np.testing.assert_allclose(engine.x[1].double().numpy(), x_ref, atol=tolerance)
        np.testing.assert_allclose(engine.v[1].double().numpy(), v_ref, atol=1e3 * tolerance)


# ----------------------------------------------------------------------------- exact toys
def test_harmonic_oscillator_position_variance_and_kinetic_energy():
    """x variance kT/k (BAOAB's configurations are exact for a harmonic well at any dt), v as the exact map says."""
    k, dt_fs, gamma, kelvin = 1000.0, 5.0, 10.0, 300.0
    masses = np.array([1.0, 12.0])
    walkers = 1000
    engine = BatchedLangevin(Harmonic(2, k), masses, np.zeros((walkers, 2, 3)), kelvin, timestep=dt_fs * unit.femtosecond,
                             friction=gamma / unit.picosecond, seed=3)
    engine.step(200)
    xs, vs = [], []
    for _ in range(100):
        engine.step(20)
        xs.append(engine.x.double().numpy().copy())
        vs.append(engine.v.double().numpy().copy())
    xs, vs = np.stack(xs), np.stack(vs)  # [T, B, 2, 3]
    kT = MOLAR_GAS_CONSTANT * kelvin
    for atom, m in enumerate(masses):
        exact = stationary_covariance(k, m, kT, dt_fs * 1e-3, gamma)
        assert exact[0, 0] == pytest.approx(kT / k, rel=1e-9)
        assert xs[:, :, atom].var() == pytest.approx(kT / k, rel=0.02)
        assert vs[:, :, atom].var() == pytest.approx(exact[1, 1], rel=0.02)
        assert abs(xs[:, :, atom].mean()) < 0.02 * np.sqrt(kT / k)
    # Equipartition: 1/2 m <v^2> per degree of freedom, with the exact map's (mid-step) velocity variance.
    kinetic_ratio = engine.kinetic_temperature().mean().item() / kelvin
    expected = np.mean([m * stationary_covariance(k, m, kT, dt_fs * 1e-3, gamma)[1, 1] / kT for m in masses])
    assert kinetic_ratio == pytest.approx(expected, rel=0.02)


def test_starting_velocities_are_maxwell_at_each_walkers_temperature():
    masses = np.array([1.0, 16.0])
    engine = BatchedLangevin(Harmonic(2, 100.0), masses, np.zeros((20000, 2, 3)), [300.0, 600.0] * 10000)
    v = engine.v.double().numpy()
    for start, kelvin in ((0, 300.0), (1, 600.0)):
        for atom, m in enumerate(masses):
            assert v[start::2, atom].var() == pytest.approx(MOLAR_GAS_CONSTANT * kelvin / m, rel=0.03)


def _exchange_acceptance_expected(d: int, kelvin: tuple, draws: int = 2_000_000) -> float:
    rng = np.random.default_rng(0)
    kT = MOLAR_GAS_CONSTANT * np.asarray(kelvin)
    u_low, u_high = rng.gamma(d / 2, kT[0], draws), rng.gamma(d / 2, kT[1], draws)
    return float(np.minimum(1.0, np.exp((1 / kT[0] - 1 / kT[1]) * (u_low - u_high))).mean())


def test_exchange_acceptance_and_energies_match_detailed_balance():
    """Two temperatures, harmonic walkers: acceptance as the analytic expectation, each temperature's energies Gamma."""
    ladder, copies, n_atoms, k = (300.0, 420.0), 256, 4, 500.0
    exchange = LadderExchange(ladder, copies, seed=1)
    engine = BatchedLangevin(Harmonic(n_atoms, k), np.full(n_atoms, 12.0), np.zeros((exchange.n_walkers, n_atoms, 3)),
                             exchange.temperatures_K, timestep=2 * unit.femtosecond, friction=20 / unit.picosecond, seed=2)
    engine.step(300)
    energies = {0: [], 1: []}
    for _ in range(400):
        engine.step(10)
        changed = exchange.attempt(engine.energy_kj)
        assert int(changed.sum()) % 2 == 0  # swaps come in pairs
        engine.set_temperatures(exchange.temperatures_K)
        for index in energies:
            energies[index].append(engine.energy_kj[exchange.state == index].double().numpy())
    d = 3 * n_atoms
    acceptance = exchange.acceptance()[0]
    assert exchange.proposed.tolist() == [copies * 200]  # even attempts only for a pair of temperatures
    assert acceptance == pytest.approx(_exchange_acceptance_expected(d, ladder), abs=0.02)
    for index, kelvin in enumerate(ladder):
        u = np.concatenate(energies[index])
        assert u.mean() == pytest.approx(d / 2 * MOLAR_GAS_CONSTANT * kelvin, rel=0.02)
    # Walkers of one copy hold one temperature each, whatever the swaps.
    assert (exchange.walker_table().sort(dim=1).values == torch.arange(exchange.n_walkers).reshape(copies, 2)).all()


def test_exchange_pairs_alternate_and_reject_nan():
    exchange = LadderExchange((300.0, 350.0, 400.0, 460.0), n_copies=1, seed=0)
    exchange.attempt(torch.zeros(4))  # equal energies: every proposed swap is accepted
    assert exchange.state.tolist() == [1, 0, 3, 2] and exchange.proposed.tolist() == [1, 0, 1]
    exchange.attempt(torch.zeros(4))
    assert exchange.state.tolist() == [2, 0, 3, 1] and exchange.proposed.tolist() == [1, 1, 1]
    exchange.attempt(torch.tensor([float("nan"), 0.0, 0.0, 0.0]))
    # Pair (0, 1) swaps; pair (2, 3) holds the NaN walker 0 and does not.
    assert exchange.state.tolist() == [2, 1, 3, 0] and exchange.accepted.tolist() == [2, 1, 1]
    assert exchange.proposed.tolist() == [2, 1, 2]


# ----------------------------------------------------------------------------- random streams
def test_noise_is_standard_normal_and_independent_per_walker_and_step():
    n = 4000
    z = noise.normals(noise.walker_keys(7, noise.DYNAMICS, 3, torch.arange(n)), 66, torch.float64).numpy()
    later = noise.normals(noise.walker_keys(7, noise.DYNAMICS, 4, torch.arange(n)), 66, torch.float64).numpy()
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.006) and (z**4).mean() == pytest.approx(3, abs=0.05)

    def z_scores(a, b):  # correlation of matching columns, in standard errors (N(0, 1) if independent)
        return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]) * np.sqrt(len(a))

    for scores in (z_scores(z[:-1], z[1:]), z_scores(z[:, :-1], z[:, 1:]), z_scores(z, later)):  # walkers, elements, steps
        assert abs(scores.mean()) < 0.5 and np.sqrt((scores**2).mean()) < 1.5
    # A walker's stream depends on its id, not on the batch around it.
    alone = noise.normals(noise.walker_keys(7, noise.DYNAMICS, 3, torch.tensor([1234])), 66, torch.float64)
    np.testing.assert_array_equal(alone[0].numpy(), z[1234])


def test_runs_are_reproducible_per_seed():
    def final(seed):
        engine = BatchedLangevin(Harmonic(3, 800.0), np.full(3, 4.0), np.zeros((8, 3, 3)), 300.0, seed=seed)
        engine.step(50)
        return engine.x

    assert torch.equal(final(1), final(1))
    assert not torch.allclose(final(1), final(2))


def test_engine_state_resumes_bit_for_bit(ad2_start):
    target, x0 = ad2_start
    make = lambda: BatchedLangevin(batched_force_field(target.system, 3), system_masses(target.system),
                                   np.stack([x0] * 3), [300.0, 350.0, 400.0], seed=9)  # noqa: E731
    whole = make()
    whole.step(40)
    half = make()
    half.step(20)
    saved = half.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    resumed.step(20)
    assert torch.equal(resumed.x, whole.x) and torch.equal(resumed.v, whole.v) and resumed.step_count == 40


# ----------------------------------------------------------------------------- runs and files
def test_batched_md_resumes_to_the_same_file(ad2, tmp_path):
    whole, resumed = str(tmp_path / "whole.h5"), str(tmp_path / "resumed.h5")
    result = run_batched_md(ad2, whole, CONFIG, 3, progress=False)
    assert result.status == "complete" and result.frames == 36 and result.walkers == 3
    with h5py.File(whole) as handle:  # walker by walker, each trajectory contiguous
        assert handle["walker"][()].tolist() == [0] * 12 + [1] * 12 + [2] * 12
        assert handle["time"][:2].tolist() == pytest.approx([0.03, 0.04])
    stopped = run_batched_md(ad2, resumed, CONFIG, 3, progress=False, stop_after_frames=4)
    assert stopped.status == "interrupted" and not (tmp_path / "resumed.h5").exists()
    run_batched_md(ad2, resumed, CONFIG, 3, progress=False)
    np.testing.assert_array_equal(data.load_positions(whole, ad2), data.load_positions(resumed, ad2))
    np.testing.assert_array_equal(data.read_metadata(whole)["energies_kT"], data.read_metadata(resumed)["energies_kT"])


def test_a_resumed_batched_run_adds_up_the_wall_clock_of_its_calls(ad2, tmp_path):
    out = str(tmp_path / "md.h5")
    progress_file = tmp_path / "md.h5.work" / "progress.json"
    stopped = run_batched_md(ad2, out, CONFIG, 2, progress=False, stop_after_frames=4)
    committed = json.loads(progress_file.read_text())["wall_s"]  # to the last commit; later work is redone
    assert 0 < committed <= stopped.wall_s and stopped.run_wall_s == stopped.wall_s
    finished = run_batched_md(ad2, out, CONFIG, 2, progress=False)
    assert finished.run_wall_s == pytest.approx(committed + finished.wall_s, rel=1e-12)
    # A run begun before the wall-clock was kept says it does not know the whole run's.
    older = str(tmp_path / "older.h5")
    run_batched_md(ad2, older, CONFIG, 2, progress=False, stop_after_frames=4)
    older_progress = tmp_path / "older.h5.work" / "progress.json"
    older_progress.write_text(json.dumps({k: v for k, v in json.loads(older_progress.read_text()).items() if k != "wall_s"}))
    resumed = run_batched_md(ad2, older, CONFIG, 2, progress=False)
    assert resumed.status == "complete" and resumed.run_wall_s is None and resumed.wall_s > 0


def test_batched_runs_integrate_on_one_cpu_thread_unless_told(ad2, tmp_path, monkeypatch):
    seen = []
    step = BatchedLangevin.step
    monkeypatch.setattr(BatchedLangevin, "step", lambda self, n: (seen.append(torch.get_num_threads()), step(self, n))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_batched_md(ad2, str(tmp_path / "one.h5"), CONFIG, 2, progress=False)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        run_batched_md(ad2, str(tmp_path / "two.h5"), CONFIG, 2, options=EngineOptions(threads=2), progress=False)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


def test_a_complete_batched_run_extends_to_more_frames(ad2, tmp_path):
    longer = dataclasses.replace(CONFIG, n_frames=18)
    direct, extended = str(tmp_path / "direct.h5"), str(tmp_path / "extended.h5")
    run_batched_md(ad2, direct, longer, 2, progress=False)
    assert run_batched_md(ad2, extended, CONFIG, 2, progress=False).frames == 24
    result = run_batched_md(ad2, extended, longer, 2, progress=False)
    assert result.status == "complete" and result.frames == 36
    np.testing.assert_array_equal(data.load_positions(direct, ad2), data.load_positions(extended, ad2))


def test_batched_replica_exchange_resumes_and_writes_both_files(ad2, tmp_path):
    config = ReplicaExchangeConfig(CONFIG, temperatures_K=(300.0, 360.0, 430.0))
    outs = [str(tmp_path / "whole.h5"), str(tmp_path / "resumed.h5")]
    summary = run_batched_replica_exchange(ad2, outs[0], config, n_copies=2, all_replicas=True, progress=False)
    run_batched_replica_exchange(ad2, outs[1], config, n_copies=2, all_replicas=True, progress=False, stop_after_frames=5)
    run_batched_replica_exchange(ad2, outs[1], config, n_copies=2, all_replicas=True, progress=False)
    for name in ("whole", "resumed"):
        assert (tmp_path / f"{name}-all-replicas.h5").exists()
    np.testing.assert_array_equal(data.load_positions(outs[0]), data.load_positions(outs[1]))
    pooled = data.read_metadata(summary.all_replicas)
    assert len(pooled["frame_temperature_K"]) == 12 * 6
    assert sorted(np.unique(pooled["frame_temperature_K"]).tolist()) == pytest.approx(config.temperatures_K)
    assert (np.bincount(np.searchsorted(config.temperatures_K, pooled["frame_temperature_K"] - 1e-6)) == 24).all()
    # Copy by copy, frame by frame, lowest temperature first: every third pooled frame is the target file's.
    np.testing.assert_array_equal(data.load_positions(summary.all_replicas)[::3], data.load_positions(outs[0]))
    low = data.read_metadata(outs[0])
    assert len(low["energies_kT"]) == 24 and len(summary.exchange_acceptance) == 2
    np.testing.assert_allclose(low["energies_kT"][:4], ad2.energy(data.load_positions(outs[0])[:4]).numpy(), rtol=1e-4)
    with h5py.File(outs[0]) as handle:
        assert handle["walker"].shape == (24,) and handle.attrs["system"] == "ad2"


def test_resume_with_other_settings_names_the_difference(ad2, tmp_path):
    out = str(tmp_path / "md.h5")
    run_batched_md(ad2, out, CONFIG, 2, progress=False, stop_after_frames=4)
    other = MDConfig(**{**CONFIG.__dict__, "steps_per_frame": 20})
    with pytest.raises(ValueError, match="steps_per_frame: 10 then, 20 now.*delete that folder"):
        run_batched_md(ad2, out, other, 2, progress=False)
    with pytest.raises(ValueError, match="precision"):
        run_batched_md(ad2, out, CONFIG, 2, options=EngineOptions(precision="float64"), progress=False)


def test_unsupported_system_is_refused_with_the_reason(ad2, tmp_path):
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("X", topology.addChain())
    for i in range(2):
        system.addParticle(12.0)
        topology.addAtom(f"C{i}", app.element.carbon, residue)
    restraint = openmm.CustomExternalForce("x^2+y^2+z^2")
    restraint.addParticle(0, [])
    system.addForce(restraint)
    target = BoltzmannTarget(system, topology, 300 * unit.kelvin, positions=np.zeros((2, 3)), backend="openmm")
    with pytest.raises(BatchedEngineUnavailable, match="CustomExternalForce.*without --walkers"):
        run_batched_md(target, str(tmp_path / "x.h5"), CONFIG, 4, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(BatchedEngineUnavailable, match="no CUDA"):
            resolve_device("cuda")


def test_md_command_with_walkers_writes_training_data(ad2, tmp_path, capsys):
    out = tmp_path / "walkers.h5"
    args = ["md", "ad2", "--walkers", "4", "--ns", "0.003", "--frame-interval-ps", "0.1", "--equilibration-ps", "0.05",
            "--threads", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert torch.get_num_threads() == 1
    assert '"walkers": 4' in capsys.readouterr().out
    train, val, _ = data.training_frames([str(out)], ad2)
    assert len(train) == 4 * 24 and len(val) == 4 * 3
    assert sorted(len(data.load_positions(str(out), ad2, split=s)) for s in ("train", "val", "test")) == [12, 12, 96]
    re_out = tmp_path / "re.h5"
    assert main(["md", "ad2", "--walkers", "2", "--replica-exchange", "--n-replicas", "3", "--t-max", "400",
                 "--all-replicas", "--ns", "0.002", "--frame-interval-ps", "0.1", "--exchange-interval-ps", "0.05",
                 "--equilibration-ps", "0.02", "--out", str(re_out), "--no-progress"]) == 0
    pooled = data.read_metadata(str(tmp_path / "re-all-replicas.h5"))
    assert len(pooled["frame_temperature_K"]) == 6 * 20 and data.load_positions(str(re_out)).shape == (2 * 20, 22, 3)
    assert main(["md", "ad2", "--exchange-interval-ps", "0.1", "--ns", "0.001", "--out", str(tmp_path / "y.h5")]) == 2
    assert "needs --walkers" in capsys.readouterr().err


def test_walkers_start_from_frames_spread_over_a_file(ad2, tmp_path):
    starts = np.stack([ad2.positions + [i, 0.0, 0.0] for i in range(4)]).astype(np.float32)
    import mdtraj

    mdtraj.Trajectory(starts, mdtraj.Topology.from_openmm(ad2.topology)).save_hdf5(str(tmp_path / "start.h5"))
    out = tmp_path / "w.h5"
    assert main(["md", "ad2", "--walkers", "4", "--start", str(tmp_path / "start.h5"), "--start-spread", "--ns", "0.001",
                 "--frame-interval-ps", "0.1", "--equilibration-ps", "0", "--out", str(out), "--no-progress"]) == 0
    first = data.load_positions(str(out))[::10].mean(axis=1)  # frame 1 of each walker (10 frames each)
    np.testing.assert_allclose(first[:, 0] - ad2.positions.mean(0)[0], np.arange(4), atol=0.05)


@pytest.mark.slow
def test_compiled_engine_follows_the_eager_one(ad2_start):
    target, x0 = ad2_start
    finals = []
    for compile in (False, True):
        engine = BatchedLangevin(batched_force_field(target.system, 4, compile=compile), system_masses(target.system),
                                 np.stack([x0] * 4), 300.0, seed=1, compile=compile)
        engine.step(10)
        finals.append(engine.x)
    torch.testing.assert_close(finals[0], finals[1], atol=1e-4, rtol=0)


def test_gpu_check_times_the_batched_engine_on_any_device():
    """benchmarks/gpu_check.py's batched-MD rows (run on CUDA by gpu_check.sh), here on the CPU."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import gpu_check

    checker = gpu_check.Checker(min_seconds=0.05, budget_s=60)
    checker.md_batches = [4]
    gpu_check.check_batched_md("ad2", 4, checker, "cpu", steps=3)
    assert [row[-1] for row in checker.rows] == ["ok", "ok"] and not checker.failed
    assert "batched MD" in checker.table()
