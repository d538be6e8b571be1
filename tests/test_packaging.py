"""Packaging: the conda recipe and setup.py agree, the console script and package data exist."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's.
CONDA_NAMES = {"torch": "pytorch", "tables": "pytables"}


def setup_requirements() -> dict[str, str]:
    text = (ROOT / "setup.py").read_text()
    block = re.search(r"INSTALL_REQUIRES = \[(.*?)\]", text, re.S).group(1)
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', block))
    return {CONDA_NAMES.get(name.lower(), name.lower()): version for name, version in pins.items()}


def recipe_requirements() -> dict[str, str]:
    text = (ROOT / "conda-recipe" / "meta.yaml").read_text()
    run = text.split("  run:")[1].split("\ntest:")[0]
    return dict(re.findall(r"- ([A-Za-z0-9_.-]+) ==(\S+)", run))


def test_recipe_and_setup_list_the_same_runtime_dependencies():
    assert setup_requirements() == recipe_requirements()
    assert len(setup_requirements()) >= 10


def test_recipe_is_noarch_with_tests():
    text = (ROOT / "conda-recipe" / "meta.yaml").read_text()
    assert "noarch: python" in text and "openmm-sbg --help" in text and "imports:" in text


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "openmm_sbg.cli", "--help"], capture_output=True, text=True, check=True)
    assert "md" in out.stdout


def test_structures_ship_as_package_data():
    from openmm_sbg import systems

    for name in systems.names():
        assert pathlib.Path(systems.structure_path(name)).is_file()
