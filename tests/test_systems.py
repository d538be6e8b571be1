"""Built-in systems build, match the paper's specification, and have finite minimised energies."""

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_sbg import systems

EXPECTED = {
    # name: (atoms, temperature K, has GBSAOBCForce, has CustomGBForce, cutoff nm or None)
    "ad2": (22, 300, True, False, None),
    "ad2-vacuum": (22, 300, False, False, None),
    "al3": (33, 310, False, True, 2.0),
    "al4": (42, 300, True, False, None),
    "al6": (63, 310, False, True, 2.0),
    "chignolin": (138, 310, False, True, 2.0),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_system_matches_spec_and_minimises(get_target, name):
    n_atoms, kelvin, obc, custom_gb, cutoff = EXPECTED[name]
    target = get_target(name)
    forces = target.system.getForces()
    assert target.n_atoms == n_atoms and target.name == name
    assert target.temperature == kelvin * unit.kelvin
    assert target.system.getNumConstraints() == 0 and not target.system.usesPeriodicBoundaryConditions()
    assert any(isinstance(f, openmm.GBSAOBCForce) for f in forces) == obc
    assert any(isinstance(f, openmm.CustomGBForce) for f in forces) == custom_gb
    nonbonded = next(f for f in forces if isinstance(f, openmm.NonbondedForce))
    if cutoff is None:
        assert nonbonded.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    else:
        assert nonbonded.getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic
        assert nonbonded.getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(cutoff)
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(target.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    minimised = context.getState(energy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert np.isfinite(minimised)
    assert minimised <= target.energy(target.positions).item() * target.kT_kj_per_mol + 1e-6


def test_unknown_system_lists_the_choices():
    with pytest.raises(KeyError, match="chignolin"):
        systems.get("ad3")


def test_from_pdb_builds_an_unconstrained_target(tmp_path):
    target = systems.from_pdb(
        systems.structure_path("al3"), ["amber14-all.xml", "implicit/obc1.xml"], 310,
        nonbonded_method=app.CutoffNonPeriodic, nonbonded_cutoff=1.5 * unit.nanometer,
    )
    assert target.n_atoms == 33 and target.system.getNumConstraints() == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        systems.from_pdb(tmp_path / "missing.pdb", "amber14-all.xml", 300)
    with pytest.raises(ValueError, match="periodic"):
        systems.from_pdb(systems.structure_path("al3"), "amber14-all.xml", 300, nonbonded_method=app.PME)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_system_runs_md_without_blowing_up(get_target, name):
    target = get_target(name)
    integrator = openmm.LangevinMiddleIntegrator(target.temperature, 1 / unit.picosecond, 1 * unit.femtosecond)
    context = openmm.Context(target.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(target.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    integrator.step(2000)
    energy = context.getState(energy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert np.isfinite(energy) and abs(energy) < 1e5


_AMBER99_OBC = ["amber99sbildn.xml", "amber99_obc.xml"]


def _ad2_without_hydrogens(path):
    lines = open(systems.structure_path("ad2")).read().splitlines()
    path.write_text("\n".join(line for line in lines if not (line.startswith(("ATOM", "HETATM")) and line[76:78].strip() == "H")))
    return path


def test_a_pdb_without_hydrogens_gets_them_and_says_so(tmp_path, capsys):
    target = systems.from_pdb(_ad2_without_hydrogens(tmp_path / "noh.pdb"), _AMBER99_OBC, 300)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "no hydrogens: added 12" in notice[0] and "Modeller" in notice[0]
    reference = systems.get("ad2", platform="Reference")
    assert [a.name for a in target.topology.atoms()] == [a.name for a in reference.topology.atoms()]
    # Placed by the Modeller, not minimised: close to the minimised structure's energy.
    assert abs(float(target.energy(target.positions)) - float(reference.energy(reference.positions))) < 5


@pytest.mark.parametrize("text, message", [("", "no atoms"), ("HEADER    nothing here\nEND\n", "no atoms"),
                                           ("ATOM      1  N   ALA A   1  garbage\n", "could not be read")])
def test_an_empty_or_malformed_pdb_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.pdb"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        systems.from_pdb(path, _AMBER99_OBC, 300)


@pytest.mark.parametrize("command", [["run", "--folder", "FOLDER"], ["md", "--ns", "0.001", "--out", "FOLDER/md.h5"]])
def test_the_commands_refuse_an_empty_pdb_in_one_line(tmp_path, capsys, command):
    from openmm_sbg import cli

    (tmp_path / "empty.pdb").write_text("")
    argv = [part.replace("FOLDER", str(tmp_path / "out")) for part in command]
    code = cli.main([*argv, "--pdb", str(tmp_path / "empty.pdb")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no atoms" in err[0] and "Traceback" not in err[0]
