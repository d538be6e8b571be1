"""Batched energy backends reproduce OpenMM's Reference platform, force term by force term.

Tolerances (float64): energies to 1e-6 relative, forces to 1e-5 relative in the max-norm over
atoms. Errors are relative to ``max(|E|, 1 kJ/mol)`` and ``max_atoms |F|`` (at least
1 kJ/mol/nm), so that a term that happens to be near zero is not held to an impossible standard.
"""

import copy
import functools

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_sbg import BoltzmannTarget, systems
from openmm_sbg.energy import OpenMMBackend, ProcessPoolBackend, TorchForceField, UnsupportedForceError

ENERGY_RTOL = 1e-6
FORCE_RTOL = 1e-5
FAST_SYSTEMS = ["ad2", "ad2-vacuum", "al3", "al4", "al6"]


@functools.lru_cache(maxsize=None)
def _grouped(name: str) -> openmm.System:
    """The built-in System with each force in its own force group (group = force index)."""
    system = copy.deepcopy(systems.get(name, backend="openmm").system)
    for k, force in enumerate(system.getForces()):
        force.setForceGroup(k)
    return system


@functools.lru_cache(maxsize=None)
def _positions(name: str) -> np.ndarray:
    return systems.get(name, backend="openmm").positions


def configurations(name: str, seed: int = 0) -> torch.Tensor:
    """Perturbed (0.01-0.03 nm noise) and high-energy (0.06-0.1 nm, clashes) configurations."""
    rng = np.random.default_rng(seed)
    x0 = _positions(name)
    scales = np.array([0.01, 0.02, 0.03, 0.06, 0.1])[:, None, None]
    x = x0[None] + scales * rng.normal(size=(len(scales), *x0.shape))
    return torch.from_numpy(x)


def assert_matches(name_of_term: str, energy, forces, ref_energy, ref_forces) -> None:
    energy_err = ((energy - ref_energy).abs() / ref_energy.abs().clamp(min=1.0)).max().item()
    force_scale = ref_forces.norm(dim=-1).amax(-1).clamp(min=1.0)
    force_err = ((forces - ref_forces).norm(dim=-1).amax(-1) / force_scale).max().item()
    assert energy_err < ENERGY_RTOL, f"{name_of_term}: energy relative error {energy_err:.2e}"
    assert force_err < FORCE_RTOL, f"{name_of_term}: force relative error {force_err:.2e}"


def check_system(system: openmm.System, x: torch.Tensor, label: str) -> None:
    """Every force group alone, then the whole System, against the Reference platform."""
    for k, force in enumerate(system.getForces()):
        groups = {force.getForceGroup()}
        ref = OpenMMBackend(system, "Reference", groups=groups).energy_and_forces(x)
        got = TorchForceField(system, groups=groups).energy_and_forces(x)
        assert_matches(f"{label} {type(force).__name__} (force {k})", *got, *ref)
    reference = OpenMMBackend(system, "Reference").energy_and_forces(x)
    assert_matches(f"{label} total", *TorchForceField(system).energy_and_forces(x), *reference)


@pytest.mark.parametrize("name", FAST_SYSTEMS)
def test_builtin_systems_match_openmm_per_force(name):
    check_system(_grouped(name), configurations(name), name)


@pytest.mark.slow
def test_chignolin_matches_openmm_per_force():
    check_system(_grouped("chignolin"), configurations("chignolin"), "chignolin")


@pytest.mark.parametrize("name", ["ad2", "al6"])
def test_pairs_beyond_the_cutoff(name):
    """Stretched configurations put many pairs beyond the cutoff (and exceptions with them)."""
    x0 = configurations(name)[:2]
    centre = x0.mean(dim=1, keepdim=True)
    check_system(_grouped(name), centre + 2.5 * (x0 - centre), f"{name} stretched")


def _variant_system(forcefield_files, method, cutoff, **kwargs) -> openmm.System:
    pdb = app.PDBFile(systems.structure_path("ad2"))
    system = app.ForceField(*forcefield_files).createSystem(
        pdb.topology, nonbondedMethod=method, nonbondedCutoff=cutoff, constraints=None, **kwargs
    )
    for k, force in enumerate(system.getForces()):
        force.setForceGroup(k)
    return system


def test_variants_reaction_field_switching_gbsa_cutoff():
    """A short cutoff, a reaction field with eps=78.3, a switching function and GBSAOBCForce with a cutoff."""
    system = _variant_system(("amber99sbildn.xml", "amber99_obc.xml"), app.CutoffNonPeriodic, 0.6 * unit.nanometer)
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setReactionFieldDielectric(78.3)
            force.setUseSwitchingFunction(True)
            force.setSwitchingDistance(0.5)
    check_system(system, configurations("ad2"), "ad2 variant")


@pytest.mark.parametrize("model", ["implicit/obc1.xml", "implicit/obc2.xml"])
def test_custom_gb_variants_with_salt(model):
    """The CustomGBForce of obc1.xml/obc2.xml with salt (kappa > 0), with and without a cutoff."""
    for method, cutoff in [(app.NoCutoff, 1.0 * unit.nanometer), (app.CutoffNonPeriodic, 0.7 * unit.nanometer)]:
        system = _variant_system(
            ("amber14-all.xml", model), method, cutoff, implicitSolventKappa=1.0 / unit.nanometer, soluteDielectric=2.0
        )
        check_system(system, configurations("ad2"), f"ad2 {model} {method}")


def test_float32_is_close_to_float64():
    system = _grouped("al6")
    x = configurations("al6")[:3]
    backend = TorchForceField(system)
    e64, f64 = backend.energy_and_forces(x)
    e32, f32 = backend.energy_and_forces(x.float())
    assert e32.dtype == torch.float32 and f32.dtype == torch.float32
    assert ((e32.double() - e64).abs() / e64.abs()).max() < 1e-4
    assert ((f32.double() - f64).norm(dim=-1).amax(-1) / f64.norm(dim=-1).amax(-1)).max() < 1e-3


def test_autograd_through_the_energy_gives_the_forces():
    backend = TorchForceField(_grouped("ad2"))
    x = configurations("ad2")[:2].requires_grad_(True)
    (grad,) = torch.autograd.grad(backend.energy(x).sum(), x)
    _, forces = backend.energy_and_forces(x)
    torch.testing.assert_close(-grad, forces, rtol=1e-10, atol=1e-8)
    assert not forces.requires_grad


def test_large_batches_are_chunked_without_changing_results():
    system = _grouped("ad2")
    x = configurations("ad2")
    whole = TorchForceField(system).energy_and_forces(x)
    chunked_backend = TorchForceField(system, max_pair_elements=1)
    assert chunked_backend.chunk_size() == 1
    for a, b in zip(whole, chunked_backend.energy_and_forces(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    backend = TorchForceField(_grouped("al6"))
    x = configurations("al6")
    energy, forces = backend.energy_and_forces(x.cuda())
    assert energy.device.type == "cuda"
    assert_matches("al6 on CUDA", energy.cpu(), forces.cpu(), *backend.energy_and_forces(x))


def _ad2_with_external_force() -> BoltzmannTarget:
    target = systems.get("ad2", backend="openmm")
    system = copy.deepcopy(target.system)
    restraint = openmm.CustomExternalForce("0.5*(x^2+y^2+z^2)")
    restraint.addParticle(0, [])
    system.addForce(restraint)
    return system, target


def test_unsupported_force_falls_back_to_openmm_with_a_notice(capsys):
    system, reference = _ad2_with_external_force()
    target = BoltzmannTarget(system, reference.topology, 300 * unit.kelvin)
    notice = capsys.readouterr().err
    assert isinstance(target.backend, OpenMMBackend)
    assert "CustomExternalForce" in notice and notice.count("\n") == 1
    x = configurations("ad2")[:2]
    assert torch.all(target.energy(x) > reference.energy(x))  # the restraint is really evaluated
    with pytest.raises(UnsupportedForceError, match="CustomExternalForce"):
        BoltzmannTarget(system, reference.topology, 300 * unit.kelvin, backend="torch")


def test_builtin_targets_use_the_torch_backend(capsys):
    target = systems.get("al3")
    assert isinstance(target.backend, TorchForceField) and "torch" in repr(target)
    assert capsys.readouterr().err == ""


def test_unrecognised_custom_gb_force_is_unsupported():
    system = copy.deepcopy(_grouped("al3"))
    gb = next(f for f in system.getForces() if isinstance(f, openmm.CustomGBForce))
    expression, kind = gb.getEnergyTermParameters(0)
    gb.setEnergyTermParameters(0, expression.replace("-0.5*", "-0.25*"), kind)
    with pytest.raises(UnsupportedForceError, match="CustomGBForce"):
        TorchForceField(system)


def test_process_pool_matches_a_single_context():
    system = _grouped("ad2")
    x = configurations("ad2")
    with ProcessPoolBackend(system, n_workers=2, platform="Reference") as pool:
        energy, forces = pool.energy_and_forces(x)
        assert_matches("process pool", energy, forces, *OpenMMBackend(system, "Reference").energy_and_forces(x))
        torch.testing.assert_close(pool.energy(x), energy, rtol=1e-12, atol=1e-9)
        assert pool.energy(x.float()).dtype == torch.float32


@pytest.mark.slow
def test_compiled_backend_matches_openmm():
    """torch.compile'd evaluation (one compile, padded chunks) gives OpenMM's numbers in float64."""
    system = _grouped("ad2")
    backend = TorchForceField(system, compile=True, max_pair_elements=4 * 700)
    x = configurations("ad2")  # 5 configurations: one full chunk of 4 and one padded chunk
    reference = OpenMMBackend(system, "Reference")
    assert_matches("compiled", *backend.energy_and_forces(x), *reference.energy_and_forces(x))
    torch.testing.assert_close(backend.energy(x[:3]), reference.energy(x[:3]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ad2", "al3"])
def test_obc_atom_inside_another_atoms_scaled_sphere(name):
    """An atom moved inside another's scaled sphere takes OBC's 'engulfed' branch (GBSAOBCForce
    adds 2 (1/rho - 1/L) there, the CustomGBForce does not)."""
    system = _grouped(name)
    k, gb = next((k, f) for k, f in enumerate(system.getForces()) if "GB" in type(f).__name__)
    params = np.array(
        [[float(getattr(v, "_value", v)) for v in gb.getParticleParameters(a)] for a in range(gb.getNumParticles())]
    )
    if isinstance(gb, openmm.GBSAOBCForce):
        rho = params[:, 1] - 0.009
        scaled = rho * params[:, 2]
    else:
        rho, scaled = params[:, 1], params[:, 2]
    depth = scaled[None, :] - rho[:, None]  # atom i fits inside j's scaled sphere if r < depth[i, j]
    np.fill_diagonal(depth, -np.inf)
    i, j = np.unravel_index(np.argmax(depth), depth.shape)
    assert depth[i, j] > 0
    x = configurations(name)[:2].clone()
    x[:, i] = x[:, j] + torch.tensor([0.5 * depth[i, j], 0.0, 0.0], dtype=x.dtype)
    ref = OpenMMBackend(system, "Reference", groups={k}).energy_and_forces(x)
    got = TorchForceField(system, groups={k}).energy_and_forces(x)
    assert_matches(f"{name} {type(gb).__name__} engulfed", *got, *ref)
