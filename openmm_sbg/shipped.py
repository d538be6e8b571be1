"""Paths of the data that ships inside the package: trained flows and reference MD."""

from __future__ import annotations

from importlib import resources


def _package_file(folder: str, filename: str, what: str) -> str:
    path = resources.files("openmm_sbg") / folder / filename
    if not path.is_file():
        available = sorted(p.name for p in (resources.files("openmm_sbg") / folder).iterdir() if p.is_file())
        raise FileNotFoundError(f"no shipped {what} {filename!r}; the package has {available}")
    return str(path)


def model_path(name: str = "ad2-small") -> str:
    """The shipped flow checkpoint ``name`` (e.g. ``"ad2-small"``), for ``TarFlow.load``."""
    return _package_file("models", f"{name}.pt", "model")


def reference_path(system: str = "ad2") -> str:
    """Shipped reference MD of a built-in system: an ``openmm-sbg md`` HDF5 file, independent of training data."""
    return _package_file("reference", f"{system}-ref.h5", "reference MD")
