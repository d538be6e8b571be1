"""Shared fixtures: built-in targets are built once per test session."""

import functools

import pytest

from openmm_sbg import systems


@functools.lru_cache(maxsize=None)
def _target(name: str):
    return systems.get(name, platform="Reference")


@pytest.fixture
def ad2():
    return _target("ad2")


@pytest.fixture
def get_target():
    """``get_target(name)``: a cached built-in target on the Reference platform."""
    return _target
