"""Shared fixtures: built-in targets are built once per pytest run."""

import functools

import pytest
import torch

from openmm_sbg import systems


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Test-sized models and batches are latency bound: extra torch threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
