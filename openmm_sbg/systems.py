"""Built-in peptide systems from the SBG paper, and targets from any PDB + force field.

==============  ======================  ======================================  =====  ======
name            molecule                force field                             cutoff  T
==============  ======================  ======================================  =====  ======
ad2             Ace-Ala-Nme (22 atoms)  amber99sbildn + amber99_obc (OBC GBSA)  none   300 K
ad2-vacuum      Ace-Ala-Nme             amber99sbildn                           none   300 K
al3             AAA (33 atoms)          amber14-all + implicit/obc1             2 nm   310 K
al4             Ace-AAA-Nme (42 atoms)  amber99sbildn + amber99_obc             none   300 K
al6             AAAAAA (63 atoms)       amber14-all + implicit/obc1             2 nm   310 K
chignolin       GYDPETGTWG (138 atoms)  amber14-all + implicit/obc1             2 nm   310 K
==============  ======================  ======================================  =====  ======

Every system is unconstrained (a Cartesian flow cannot represent constraints) and
non-periodic. Starting structures ship as minimised PDB files built by
``tools/build_structures.py``. Chignolin also ships its folded (native) structure, from the
NMR structure PDB 1UAO, which its folded fraction is measured against (:func:`folded_structure_path`).
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources

from openmm import app, unit

from openmm_sbg.target import BoltzmannTarget, as_temperature, notice


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """How a built-in system is made."""

    description: str
    forcefield_files: tuple[str, ...]
    nonbonded_method: object
    cutoff: unit.Quantity | None
    temperature: unit.Quantity
    pdb: str


_AMBER99_OBC = ("amber99sbildn.xml", "amber99_obc.xml")
_AMBER14_OBC1 = ("amber14-all.xml", "implicit/obc1.xml")

SYSTEM_SPECS: dict[str, SystemSpec] = {
    "ad2": SystemSpec("Ace-Ala-Nme, OBC implicit solvent", _AMBER99_OBC, app.NoCutoff, None, 300 * unit.kelvin, "ad2"),
    "ad2-vacuum": SystemSpec(
        "Ace-Ala-Nme in vacuum", ("amber99sbildn.xml",), app.NoCutoff, None, 300 * unit.kelvin, "ad2"
    ),
    "al3": SystemSpec(
        "Ala-Ala-Ala, OBC1 implicit solvent", _AMBER14_OBC1, app.CutoffNonPeriodic, 2.0 * unit.nanometer,
        310 * unit.kelvin, "al3",
    ),
    "al4": SystemSpec("Ace-(Ala)3-Nme, OBC implicit solvent", _AMBER99_OBC, app.NoCutoff, None, 300 * unit.kelvin, "al4"),
    "al6": SystemSpec(
        "(Ala)6, OBC1 implicit solvent", _AMBER14_OBC1, app.CutoffNonPeriodic, 2.0 * unit.nanometer,
        310 * unit.kelvin, "al6",
    ),
    "chignolin": SystemSpec(
        "chignolin GYDPETGTWG, OBC1 implicit solvent", _AMBER14_OBC1, app.CutoffNonPeriodic, 2.0 * unit.nanometer,
        310 * unit.kelvin, "chignolin",
    ),
}


def names() -> list[str]:
    """Names accepted by :func:`get`."""
    return list(SYSTEM_SPECS)


def structure_path(name: str) -> str:
    """Path of the shipped starting structure (PDB) of a built-in system."""
    spec = _spec(name)
    return str(resources.files("openmm_sbg") / "structures" / f"{spec.pdb}.pdb")


#: Built-in systems with a folded structure, and its file in ``structures/``.
FOLDED_STRUCTURES = {"chignolin": "chignolin-folded"}


def folded_structure_path(name: str) -> str | None:
    """Path of the folded (native) structure of a built-in system, in its starting structure's atom order; None
    for a system without one (the alanine peptides have no folded state)."""
    _spec(name)
    if name not in FOLDED_STRUCTURES:
        return None
    return str(resources.files("openmm_sbg") / "structures" / f"{FOLDED_STRUCTURES[name]}.pdb")


def _spec(name: str) -> SystemSpec:
    try:
        return SYSTEM_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown system {name!r}; built-in systems are {names()}") from None


def get(name: str, **target_kwargs) -> BoltzmannTarget:
    """The built-in system ``name`` as a :class:`BoltzmannTarget` (keyword arguments go to it)."""
    spec = _spec(name)
    return from_pdb(
        structure_path(name),
        spec.forcefield_files,
        target_kwargs.pop("temperature", spec.temperature),
        nonbonded_method=spec.nonbonded_method,
        nonbonded_cutoff=spec.cutoff,
        name=name,
        **target_kwargs,
    )


def from_pdb(
    pdb,
    forcefield_files,
    temperature,
    nonbonded_method=app.NoCutoff,
    nonbonded_cutoff: unit.Quantity | None = None,
    name: str | None = None,
    **target_kwargs,
) -> BoltzmannTarget:
    """Build a target from a PDB file (path or ``app.PDBFile``) and OpenMM force-field files.

    The System is created unconstrained with no CMMotionRemover, as SBG requires.
    ``nonbonded_method`` must be ``app.NoCutoff`` or ``app.CutoffNonPeriodic``. An empty or
    malformed file is refused with a ``ValueError`` that says so. A structure without any
    hydrogen (what crystal structures and most drawn PDBs are) gets them from OpenMM's
    ``Modeller.addHydrogens`` with the same force field at pH 7, and a one-line notice
    says so; minimise before sampling (``openmm-sbg md`` does).
    """
    label = "<PDBFile>"
    if isinstance(pdb, (str, os.PathLike)):
        label = os.fspath(pdb)
        pdb = read_pdb(pdb)
    forcefield = _forcefield(forcefield_files)
    topology, positions = pdb.topology, pdb.positions
    if topology.getNumAtoms() == 0:
        raise ValueError(f"the PDB {label} has no atoms; give a structure of your molecule")
    if not any(atom.element is not None and atom.element.symbol == "H" for atom in topology.atoms()):
        topology, positions = add_hydrogens(topology, positions, forcefield, label)
    system = _create_system(topology, forcefield, nonbonded_method, nonbonded_cutoff)
    return BoltzmannTarget(system, topology, as_temperature(temperature), positions=positions, name=name, **target_kwargs)


def read_pdb(path) -> app.PDBFile:
    """Read a PDB file; a missing, empty or malformed file gets one clear error, not OpenMM's traceback."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PDB file {path!r} does not exist")
    with open(path, errors="replace") as handle:
        records = [line for line in handle if line.startswith(("ATOM", "HETATM"))]
    if not records:
        raise ValueError(f"the PDB file {path!r} has no atoms (no ATOM or HETATM records): it is empty or not a PDB file")
    try:
        pdb = app.PDBFile(path)
    except Exception as err:  # OpenMM's parser fails with IndexError, AssertionError, ValueError ...
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise ValueError(
            f"the PDB file {path!r} could not be read ({detail}); check its ATOM/HETATM lines follow the PDB "
            "format's fixed columns (e.g. write it again with OpenMM, PyMOL or mdtraj)"
        ) from None
    if pdb.topology.getNumAtoms() == 0:
        raise ValueError(f"the PDB file {path!r} has no atoms OpenMM could read")
    return pdb


def add_hydrogens(topology: app.Topology, positions, forcefield: app.ForceField, label: str = "the structure"):
    """``(topology, positions)`` with hydrogens added by OpenMM's Modeller at pH 7, and a one-line notice."""
    modeller = app.Modeller(topology, positions)
    try:
        modeller.addHydrogens(forcefield, pH=7.0)
    except Exception as err:
        raise ValueError(
            f"{label} has no hydrogens and OpenMM's Modeller could not add them ({err}); add them yourself "
            "(e.g. with PDBFixer) and try again"
        ) from None
    added = modeller.topology.getNumAtoms() - topology.getNumAtoms()
    notice(
        f"{label} has no hydrogens: added {added} with OpenMM's Modeller (pH 7, the same force field); "
        "they are placed, not minimised"
    )
    return modeller.topology, modeller.positions


def create_system(topology: app.Topology, forcefield_files, nonbonded_method=app.NoCutoff, nonbonded_cutoff=None):
    """An unconstrained, non-periodic System without CMMotionRemover, as SBG requires.

    ``nonbonded_method`` must be ``app.NoCutoff`` or ``app.CutoffNonPeriodic`` (default
    cutoff 1 nm, as OpenMM's).
    """
    return _create_system(topology, _forcefield(forcefield_files), nonbonded_method, nonbonded_cutoff)


def _forcefield(forcefield_files) -> app.ForceField:
    if isinstance(forcefield_files, str):
        forcefield_files = (forcefield_files,)
    return app.ForceField(*forcefield_files)


def _create_system(topology: app.Topology, forcefield: app.ForceField, nonbonded_method, nonbonded_cutoff):
    if nonbonded_method not in (app.NoCutoff, app.CutoffNonPeriodic):
        raise ValueError(
            f"nonbonded_method {nonbonded_method} is periodic; use app.NoCutoff or app.CutoffNonPeriodic "
            "(SBG samples vacuum or implicit-solvent systems)"
        )
    kwargs = {"nonbondedMethod": nonbonded_method, "constraints": None, "rigidWater": False, "removeCMMotion": False}
    if nonbonded_method is app.CutoffNonPeriodic and nonbonded_cutoff is not None:
        kwargs["nonbondedCutoff"] = nonbonded_cutoff
    return forcefield.createSystem(topology, **kwargs)
