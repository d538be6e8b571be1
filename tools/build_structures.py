"""Build the starting structures shipped in ``openmm_sbg/structures/`` (developer tool).

Each peptide is built from its sequence with PeptideBuilder (ideal geometry, extended
backbone), capped where the system is capped, protonated at pH 7 with OpenMM's Modeller
for the system's own force field, and energy-minimised. Run from the repository root:

    pip install PeptideBuilder
    python tools/build_structures.py

ACE and NME caps are built as glycines whose extra atoms are removed: the ACE methyl
carbon sits where the glycine CA was, the NME methyl carbon likewise.

Chignolin's folded structure (``chignolin-folded.pdb``, the native state its folded fraction is
measured against) comes from the NMR structure PDB 1UAO, model 1, which is not shipped here:

    python tools/build_structures.py --folded-chignolin 1uao.pdb

keeps its heavy atoms, adds hydrogens as above, puts the atoms in ``chignolin.pdb``'s order and
minimises with chignolin's force field.
"""

from __future__ import annotations

import argparse
import io
import pathlib

import numpy as np

import openmm
from Bio.PDB import PDBIO
from openmm import app, unit
from PeptideBuilder import Geometry, PeptideBuilder

from openmm_sbg.systems import SYSTEM_SPECS, create_system

OUT = pathlib.Path(__file__).resolve().parents[1] / "openmm_sbg" / "structures"

# Sequences as built; "capped" systems get a glycine at each end that becomes ACE / NME.
SEQUENCES = {
    "ad2": ("A", True),
    "al3": ("AAA", False),
    "al4": ("AAA", True),
    "al6": ("AAAAAA", False),
    "chignolin": ("GYDPETGTWG", False),
}


def build_backbone(sequence: str, capped: bool) -> app.Modeller:
    residues = "G" + sequence + "G" if capped else sequence
    structure = PeptideBuilder.initialize_res(Geometry.geometry(residues[0]))
    for code in residues[1:]:
        PeptideBuilder.add_residue(structure, Geometry.geometry(code))
    if not capped:
        PeptideBuilder.add_terminal_OXT(structure)
    buffer = io.StringIO()
    writer = PDBIO()
    writer.set_structure(structure)
    writer.save(buffer)
    buffer.seek(0)
    pdb = app.PDBFile(buffer)
    if not capped:
        return app.Modeller(pdb.topology, pdb.positions)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    residues = list(modeller.topology.residues())
    keep = {residues[0]: {"CA": "CH3", "C": "C", "O": "O"}, residues[-1]: {"N": "N", "CA": "C"}}
    modeller.delete([a for r, names in keep.items() for a in r.atoms() if a.name not in names])
    residues = list(modeller.topology.residues())
    for residue, resname, names in zip((residues[0], residues[-1]), ("ACE", "NME"), keep.values()):
        residue.name = resname
        for atom in residue.atoms():
            atom.name = names[atom.name]
    return modeller


def minimise_and_write(name: str, topology, positions, out: pathlib.Path, remarks: tuple[str, ...] = ()) -> None:
    spec = SYSTEM_SPECS[name]
    system = create_system(topology, spec.forcefield_files, spec.nonbonded_method, spec.cutoff)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 5000)
    state = context.getState(positions=True, energy=True)
    with open(out, "w") as handle:
        for remark in remarks:
            print(f"REMARK 999 {remark}", file=handle)
        app.PDBFile.writeFile(topology, state.getPositions(), handle, keepIds=False)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    print(f"{out.name}: {topology.getNumAtoms()} atoms, minimised energy {energy:.1f} kJ/mol")


def build_all() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (sequence, capped) in SEQUENCES.items():
        modeller = build_backbone(sequence, capped)
        modeller.addHydrogens(app.ForceField(*SYSTEM_SPECS[name].forcefield_files), pH=7.0)
        minimise_and_write(name, modeller.topology, modeller.positions, OUT / f"{name}.pdb")


def build_folded_chignolin(native: str) -> None:
    """``chignolin-folded.pdb`` from an experimental chignolin structure (PDB 1UAO, model 1)."""
    pdb = app.PDBFile(native)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    peptide = next(modeller.topology.chains())  # the file may carry water and ions in chains of their own
    modeller.delete([atom for atom in modeller.topology.atoms()
                     if atom.residue.chain is not peptide or atom.element is None or atom.element.symbol == "H"])
    modeller.addHydrogens(app.ForceField(*SYSTEM_SPECS["chignolin"].forcefield_files), pH=7.0)
    built = {(atom.residue.index, atom.name): modeller.positions[atom.index].value_in_unit(unit.nanometer)
             for atom in modeller.topology.atoms()}
    extended = app.PDBFile(str(OUT / "chignolin.pdb"))
    keys = [(atom.residue.index, atom.name) for atom in extended.topology.atoms()]
    if sorted(keys) != sorted(built):
        raise SystemExit(f"{native}: its atoms, with hydrogens added, are not chignolin.pdb's; give PDB 1UAO (GYDPETGTWG)")
    positions = np.array([built[key] for key in keys]) * unit.nanometer
    minimise_and_write("chignolin", extended.topology, positions, OUT / "chignolin-folded.pdb",
                       ("chignolin folded: PDB 1UAO model 1 heavy atoms, hydrogens by OpenMM Modeller (pH 7),",
                        "atoms in chignolin.pdb's order, minimised with amber14-all + implicit/obc1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folded-chignolin", metavar="PDB",
                        help="build chignolin-folded.pdb from this chignolin structure (PDB 1UAO) instead")
    args = parser.parse_args()
    if args.folded_chignolin:
        build_folded_chignolin(args.folded_chignolin)
    else:
        build_all()


if __name__ == "__main__":
    main()
