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
``tools/build_structures.py``.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources

from openmm import app, unit

from openmm_sbg.target import BoltzmannTarget, as_temperature


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
    ``nonbonded_method`` must be ``app.NoCutoff`` or ``app.CutoffNonPeriodic``.
    """
    if isinstance(pdb, (str, os.PathLike)):
        if not os.path.exists(pdb):
            raise FileNotFoundError(f"PDB file {os.fspath(pdb)!r} does not exist")
        pdb = app.PDBFile(os.fspath(pdb))
    system = create_system(pdb.topology, forcefield_files, nonbonded_method, nonbonded_cutoff)
    return BoltzmannTarget(
        system, pdb.topology, as_temperature(temperature), positions=pdb.positions, name=name, **target_kwargs
    )


def create_system(topology: app.Topology, forcefield_files, nonbonded_method=app.NoCutoff, nonbonded_cutoff=None):
    """An unconstrained, non-periodic System without CMMotionRemover, as SBG requires.

    ``nonbonded_method`` must be ``app.NoCutoff`` or ``app.CutoffNonPeriodic`` (default
    cutoff 1 nm, as OpenMM's).
    """
    if isinstance(forcefield_files, str):
        forcefield_files = (forcefield_files,)
    if nonbonded_method not in (app.NoCutoff, app.CutoffNonPeriodic):
        raise ValueError(
            f"nonbonded_method {nonbonded_method} is periodic; use app.NoCutoff or app.CutoffNonPeriodic "
            "(SBG samples vacuum or implicit-solvent systems)"
        )
    forcefield = app.ForceField(*forcefield_files)
    kwargs = {"nonbondedMethod": nonbonded_method, "constraints": None, "rigidWater": False, "removeCMMotion": False}
    if nonbonded_method is app.CutoffNonPeriodic and nonbonded_cutoff is not None:
        kwargs["nonbondedCutoff"] = nonbonded_cutoff
    return forcefield.createSystem(topology, **kwargs)
