"""Pluggable pieces named by a string or given as functions (kernels, resamplers)."""

from __future__ import annotations

from collections.abc import Callable


def resolve(choice: str | Callable, registry: dict[str, Callable], what: str) -> Callable:
    """``choice`` itself if it is a function, else the function ``registry`` names ``choice``."""
    if callable(choice):
        return choice
    try:
        return registry[choice]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(registry)} or a function, got {choice!r}") from None
