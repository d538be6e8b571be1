"""Build the starting structures shipped in ``openmm_sbg/structures/`` (developer tool).

Each peptide is built from its sequence with PeptideBuilder (ideal geometry, extended
backbone), capped where the system is capped, protonated at pH 7 with OpenMM's Modeller
for the system's own force field, and energy-minimised. Run from the repository root:

    pip install PeptideBuilder
    python tools/build_structures.py

ACE and NME caps are built as glycines whose extra atoms are removed: the ACE methyl
carbon sits where the glycine CA was, the NME methyl carbon likewise.
"""

from __future__ import annotations

import io
import pathlib

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


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (sequence, capped) in SEQUENCES.items():
        spec = SYSTEM_SPECS[name]
        modeller = build_backbone(sequence, capped)
        forcefield = app.ForceField(*spec.forcefield_files)
        modeller.addHydrogens(forcefield, pH=7.0)
        system = create_system(modeller.topology, spec.forcefield_files, spec.nonbonded_method, spec.cutoff)
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(modeller.positions)
        openmm.LocalEnergyMinimizer.minimize(context, 1.0, 5000)
        state = context.getState(positions=True, energy=True)
        with open(OUT / f"{name}.pdb", "w") as handle:
            app.PDBFile.writeFile(modeller.topology, state.getPositions(), handle, keepIds=False)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        print(f"{name}: {modeller.topology.getNumAtoms()} atoms, minimised energy {energy:.1f} kJ/mol")


if __name__ == "__main__":
    main()
