"""Packaging: setup.py states compatible ranges, the conda recipe and the constraints files agree
with them, the console script and package data exist."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's.
CONDA_NAMES = {"torch": "pytorch", "tables": "pytables", "matplotlib": "matplotlib-base"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_requirements() -> dict:
    """setup.py's INSTALL_REQUIRES as ``{PyPI name: packaging.requirements.Requirement}``."""
    from packaging.requirements import Requirement

    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES" for t in node.targets):
            requirements = [Requirement(text) for text in ast.literal_eval(node.value)]
            return {_canonical(r.name): r for r in requirements}
    raise AssertionError("setup.py has no INSTALL_REQUIRES list")


def python_requires() -> str:
    return re.search(r'python_requires="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)


def rendered_recipe() -> dict:
    """conda-recipe/meta.yaml rendered as conda-build does: jinja first, then YAML."""
    jinja2 = pytest.importorskip("jinja2")
    yaml = pytest.importorskip("yaml")
    template = jinja2.Environment(undefined=jinja2.DebugUndefined).from_string(
        (ROOT / "conda-recipe" / "meta.yaml").read_text()
    )
    return yaml.safe_load(template.render(PYTHON="python"))


def recipe_run_requirements() -> dict[str, str]:
    """``{conda name: version spec}`` of the recipe's run requirements."""
    out = {}
    for entry in rendered_recipe()["requirements"]["run"]:
        name, _, spec = entry.partition(" ")
        out[name] = spec.replace(" ", "")
    return out


def constraints(name: str) -> dict[str, str]:
    """``{canonical name: pinned version}`` of constraints/<name>.txt."""
    pins = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, sep, version = line.partition("==")
            assert sep, f"constraints/{name}: {line!r} is not an exact pin"
            pins[_canonical(package)] = version.strip()
    return pins


def test_install_requires_are_ranges_with_lower_and_upper_bounds():
    requirements = setup_requirements()
    assert len(requirements) >= 10
    for name, requirement in requirements.items():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, f"{name}: want a range '>=oldest,<next major', got {requirement}"


def test_recipe_lists_setup_ranges_under_conda_names():
    from packaging.specifiers import SpecifierSet

    run = recipe_run_requirements()
    assert SpecifierSet(run.pop("python")) == SpecifierSet(python_requires())
    want = {CONDA_NAMES.get(name, name): req.specifier for name, req in setup_requirements().items()}
    assert set(run) == set(want)
    for name, spec in run.items():
        assert SpecifierSet(spec) == want[name], f"{name}: recipe {spec}, setup.py {want[name]}"


@pytest.mark.parametrize("name", ["known-good.txt", "oldest.txt"])
def test_constraints_pin_every_dependency_inside_its_range(name):
    from packaging.version import Version

    pins = constraints(name)
    for package, requirement in setup_requirements().items():
        assert package in pins, f"constraints/{name} does not pin {package}"
        assert Version(pins[package]) in requirement.specifier, f"constraints/{name}: {package} {pins[package]} outside {requirement}"
    assert "pytest" in pins


def test_oldest_constraints_are_the_lower_bounds():
    """CI tests constraints/oldest.txt, so each lower bound in setup.py is a tested one."""
    from packaging.version import Version

    pins = constraints("oldest.txt")
    for package, requirement in setup_requirements().items():
        (lower,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert Version(pins[package]) == Version(lower), f"{package}: oldest.txt pins {pins[package]}, setup.py says >={lower}"


def test_ci_installs_both_constraint_sets():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints/known-good.txt" in ci and "constraints/oldest.txt" in ci


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
