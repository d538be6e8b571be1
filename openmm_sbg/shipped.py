"""Paths of the data that ships inside the package: trained flows and reference MD."""

from __future__ import annotations

import os
from importlib import resources


def _package_file(folder: str, filename: str, what: str) -> str:
    path = resources.files("openmm_sbg") / folder / filename
    if not path.is_file():
        available = sorted(p.name for p in (resources.files("openmm_sbg") / folder).iterdir() if p.is_file())
        raise FileNotFoundError(f"no shipped {what} {filename!r}; the package has {available}")
    return str(path)


def model_path(name: str = "ad2") -> str:
    """The shipped flow checkpoint ``name`` (e.g. ``"ad2"``), for ``TarFlow.load``."""
    return _package_file("models", f"{name}.pt", "model")


def model_names() -> list[str]:
    """Names of the shipped flows."""
    return sorted(p.name[:-3] for p in (resources.files("openmm_sbg") / "models").iterdir() if p.name.endswith(".pt"))


def flow_path(flow: str | os.PathLike) -> str:
    """A flow checkpoint's path: ``flow`` itself if that file exists, else the shipped model of that name."""
    path = os.fspath(flow)
    if os.path.exists(path):
        return path
    if path in model_names():
        return model_path(path)
    raise FileNotFoundError(
        f"flow checkpoint {path!r} does not exist and there is no shipped model of that name (shipped: {', '.join(model_names())}); "
        "train one with `openmm-sbg train`"
    )


def reference_path(system: str = "ad2") -> str:
    """Shipped reference MD of a built-in system: an ``openmm-sbg md`` HDF5 file, independent of training data."""
    return _package_file("reference", f"{system}-ref.h5", "reference MD")
